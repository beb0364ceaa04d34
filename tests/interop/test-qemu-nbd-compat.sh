#!/usr/bin/env bash
# qcbt-server as a drop-in for qemu-nbd (issue 15):
#   (a) started as qemu-nbd (a symlink first in PATH), each qemu-nbd option
#       set that backup tools pass gives what the real qemu-nbd gives on the
#       same image: nbdinfo --json (name, description, size, read-only,
#       multi-conn, meta contexts, content) and nbdinfo --map of every
#       context are equal; without -t both exit after their one client;
#       values qemu-nbd rejects are rejected too; options qcbt-server cannot
#       honour are one line naming them, exit 1;
#   (b) Debian's real virtnbdbackup, offline mode (a libvirt domain that is
#       shut off), runs qcbt-server as its qemu-nbd through PATH: full
#       backup, then virtnbdrestore's output equals the disk.
. "$(dirname "$0")/../functions.sh"
umask 022

requires qemu-nbd qemu-img qemu-io nbdinfo jq timeout

SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER"
SERVER=$(cd "$(dirname "$SERVER")" && pwd)/$(basename "$SERVER")
REAL_QEMU_NBD=$(command -v qemu-nbd)

BIN=$TMPD/bin # qemu-nbd here is qcbt-server
mkdir -p "$BIN"
ln -s "$SERVER" "$BIN/qemu-nbd"
OURS=$BIN/qemu-nbd

rc=0
bad() {
    note "FAIL: $*"
    rc=1
}

# --- the image: a chain with a persistent bitmap, data, zeroes, holes --------
K=65536
cd "$TMPD" || fail "cannot enter $TMPD"
qemu-img create -q -f qcow2 base.qcow2 4M
qemu-io -f qcow2 -c "write -P 0x11 0 $((4 * K))" \
    -c "write -P 0x12 $((20 * K)) $K" base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
qemu-img bitmap --add top.qcow2 b0
qemu-io -f qcow2 -c "write -P 0x21 $K $K" -c "write -z $((20 * K)) $K" \
    -c "write -P 0x22 $((40 * K)) $((3 * K))" top.qcow2 >/dev/null
qemu-img info --output=json top.qcow2 | grep '"name": "b0"' >/dev/null ||
    fail "oracle broke: qemu-img did not add bitmap b0"

# serve WHICH TAG ARGS...: start qemu-nbd (WHICH: real or ours) with ARGS
# after --fork --pid-file TAG.WHICH.pid; the socket is TAG.WHICH.sock (ARGS
# say -k @SOCK@).  Fails the test when it does not start.
serve() {
    local which=$1 tag=$2 bin=$REAL_QEMU_NBD a args=()
    shift 2
    [[ $which == ours ]] && bin=$OURS
    for a in "$@"; do args+=("${a//@SOCK@/$TMPD/$tag.$which.sock}"); done
    timeout 60 "$bin" --fork --pid-file "$TMPD/$tag.$which.pid" "${args[@]}" \
        >"$tag.$which.out" 2>&1 ||
        fail "$which qemu-nbd ${args[*]}: did not start: $(head -n 3 "$tag.$which.out")"
    cleanup_pid "$(cat "$TMPD/$tag.$which.pid")"
    wait_nbd "$TMPD/$tag.$which.sock" || fail "$which: socket not ready"
}

# facts URI: the fields of nbdinfo --json that qemu-nbd's options decide.
facts() {
    nbdinfo --json "$1" | jq -S '.exports[0] | {name: .["export-name"],
        description, size: .["export-size"], ro: .is_read_only,
        mc: .can_multi_conn, contexts: (.contexts | sort), content}'
}

# compare TAG EXPORT ARGS...: both servers with -t and ARGS; equal facts
# and maps.
compare() {
    local tag=$1 exp=$2 w ctx
    shift 2
    for w in real ours; do
        serve "$w" "$tag" "$@"
        facts "nbd+unix:///$exp?socket=$TMPD/$tag.$w.sock" >"$tag.$w.json" ||
            fail "$w: nbdinfo --json failed"
        for ctx in $(jq -r '.contexts[]' "$tag.$w.json"); do
            nbdinfo --map="$ctx" "nbd+unix:///$exp?socket=$TMPD/$tag.$w.sock" \
                >"$tag.$w.map.$ctx" || fail "$w: nbdinfo --map=$ctx failed"
        done
        kill "$(cat "$TMPD/$tag.$w.pid")"
    done
    jq -e '.contexts | length > 0' "$tag.real.json" >/dev/null ||
        fail "oracle broke: qemu-nbd $* has no meta context"
    if ! cmp -s "$tag.real.json" "$tag.ours.json"; then
        bad "$tag: nbdinfo --json differs: $(diff "$tag.real.json" "$tag.ours.json" | head -n 8)"
        return
    fi
    for ctx in $(jq -r '.contexts[]' "$tag.real.json"); do
        cmp -s "$tag.real.map.$ctx" "$tag.ours.map.$ctx" ||
            bad "$tag: nbdinfo --map=$ctx differs: $(diff "$tag.real.map.$ctx" "$tag.ours.map.$ctx" | head -n 6)"
    done
    note "ok: $tag: qemu-nbd $* (facts, $(jq '.contexts | length' "$tag.real.json") map(s) equal)"
}

# virtnbdbackup 1.9.15's offline command line, argument for argument
# (qemu/util.py startBackupNbdServer), with and without --bitmap: "-e 2"
# is one argument, and "--" stands where no bitmap is given.
compare vnb-full vda -r --format=qcow2 -x vda top.qcow2 -k @SOCK@ -t "-e 2" \
    --detect-zeroes=on --
compare vnb-inc vda -r --format=qcow2 -x vda top.qcow2 -k @SOCK@ -t "-e 2" \
    --detect-zeroes=on --bitmap=b0
# Every long form, and the options that change nothing read-only.
compare long x --read-only --format=qcow2 --export-name=x \
    --description="a chain" --bitmap=b0 --allocation-depth --shared=3 \
    --persistent --socket=@SOCK@ --discard=unmap --detect-zeroes=unmap \
    --cache=writethrough --aio=threads top.qcow2
compare short y -r -f qcow2 -x y -D d2 -B b0 -A -e 1 -t -k @SOCK@ \
    --discard=ignore --cache=unsafe --detect-zeroes=off -v top.qcow2
compare image-opts "" -r -t -k @SOCK@ --image-opts \
    driver=qcow2,file.driver=file,file.filename=top.qcow2
compare raw "" -r -t -k @SOCK@ -f raw base.qcow2

# Defaults: one client (-e 1: no multi-conn), and without -t the server
# exits once its client has gone.
for w in real ours; do
    serve "$w" once -r -k @SOCK@ top.qcow2
    pid=$(cat "once.$w.pid")
    facts "nbd+unix:///?socket=$TMPD/once.$w.sock" >"once.$w.json" ||
        fail "$w: nbdinfo failed"
    wait_gone "$pid" || bad "$w qemu-nbd without -t: still running after its client left"
done
[[ $(jq .mc once.real.json) == false ]] ||
    fail "oracle broke: qemu-nbd's default -e 1 advertises multi-conn"
cmp -s once.real.json once.ours.json ||
    bad "defaults: nbdinfo --json differs: $(diff once.real.json once.ours.json | head -n 6)"
note "ok: defaults: -e 1, exit after the client"

# As qemu-nbd, -T is --trace (refused below) but --threads still works.
serve ours threads -r -t --threads=2 -k @SOCK@ top.qcow2
facts "nbd+unix:///?socket=$TMPD/threads.ours.sock" >threads.json ||
    bad "qemu-nbd(ours) --threads=2: nbdinfo failed"
kill "$(cat threads.ours.pid)"

# --- refused ---------------------------------------------------------------
# refused NEEDLE ARGS...: ours exits 1 with one line "qemu-nbd: ..."
# holding NEEDLE, nothing on stdout, and no server.
refused() {
    local needle=$1 st=0
    shift
    timeout 60 "$OURS" "$@" >r.out 2>r.err </dev/null || st=$?
    if [[ $st -ne 1 || -s r.out || $(wc -l <r.err) -ne 1 ]] ||
        [[ $(head -c10 r.err) != "qemu-nbd: " ]] || ! grep -qF -- "$needle" r.err; then
        bad "qemu-nbd(ours) $*: exit $st, expected 1 and one line naming '$needle': $(head -n 3 r.err)"
        return
    fi
    note "ok: refused: $*: $(cat r.err)"
}
refused "-r/--read-only" -k s1 top.qcow2 # qemu-nbd would serve writable
refused "-r/--read-only" --discard=unmap --format=qcow2 -x vda top.qcow2 \
    -k s1 --fork                        # virtnbdrestore's line
refused "-c/--connect" -r -c /dev/nbd0 top.qcow2
refused "-d/--disconnect" -d /dev/nbd0
refused "-L/--list" -L -k s1
refused "-s/--snapshot" -r -s top.qcow2
refused "-l/--load-snapshot" -r -l sn1 top.qcow2
refused "-o/--offset" -r -o 512 top.qcow2
refused "--tls-authz" -r --tls-authz=a0 top.qcow2
refused "--selinux-label" -r --selinux-label=x top.qcow2
refused "-T/--trace" -r -T 'nbd_*' top.qcow2
refused "--image-opts" -r --image-opts driver=qcow2,file.driver=ssh,file.filename=x

# Values qemu-nbd itself rejects: both refuse (ours in one line).
for args in "--detect-zeroes=maybe" "--discard=trim" "--cache=sometimes" \
    "--aio=fast" "--detect-zeroes=unmap" "--aio=native --cache=writeback"; do
    # shellcheck disable=SC2086
    if timeout 60 "$REAL_QEMU_NBD" -r $args -k s2 top.qcow2 >/dev/null 2>&1 </dev/null; then
        fail "oracle broke: qemu-nbd accepted $args"
    fi
    # shellcheck disable=SC2086
    refused "${args%%=*}" -r $args -k s2 top.qcow2
done

# --- (b) virtnbdbackup, offline, through PATH --------------------------------
if ! command -v virtnbdbackup >/dev/null || ! command -v libvirtd >/dev/null ||
    ! command -v virtnbdrestore >/dev/null || ! command -v setpriv >/dev/null; then
    [[ $rc -eq 0 ]] || fail "see above"
    skip "part (b): virtnbdbackup, virtnbdrestore, libvirtd or setpriv missing"
fi
DOM=qcbt-compat-$$
MIB=$((1024 * 1024))
IMG=$TMPD/img
. "$TESTS_DIR/libvirt-lib.sh"
libvirt_start "$IMG"
URI="qemu:///session?socket=$LV_SOCK"
V=(virsh -q -c "$URI")

# The domain is defined and never started: virtnbdbackup's offline mode.
qemu-img create -q -f qcow2 "$IMG/vda.qcow2" $((64 * MIB))
qemu-io -f qcow2 -c "write -P 0x31 0 $MIB" -c "write -P 0x32 $((33 * MIB)) $((5 * MIB))" \
    -c "write -z $((40 * MIB)) $MIB" -c "write -P 0x33 $((63 * MIB)) 4096" \
    "$IMG/vda.qcow2" >/dev/null
libvirt_own "$IMG"/*.qcow2
cat >"$TMPD/dom.xml" <<EOF
<domain type='qemu'>
  <name>$DOM</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$IMG/vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
EOF
"${V[@]}" define "$TMPD/dom.xml" >/dev/null || fail "virsh define failed"

# vnb PATHDIR OUT: virtnbdbackup full, offline, with PATHDIR first in PATH.
vnb() {
    PATH="$1:$PATH" timeout 600 virtnbdbackup -U "$URI" -d "$DOM" -l full \
        -o "$2" -f "$TMPD/vnb.sock" --noprogress >"$2.log" 2>&1
}
# Negative control: virtnbdbackup must run the qemu-nbd first in PATH.
mkdir -p "$TMPD/falsebin"
ln -s "$(type -P false)" "$TMPD/falsebin/qemu-nbd"
if vnb "$TMPD/falsebin" "$TMPD/vnb-false"; then
    fail "oracle broke: virtnbdbackup did not run the qemu-nbd first in PATH: $(tail -n 5 "$TMPD/vnb-false.log")"
fi
t0=$(date +%s.%N)
vnb "$BIN" "$TMPD/vnb" || fail "virtnbdbackup through qcbt-server failed: $(tail -n 5 "$TMPD/vnb.log")"
t1=$(date +%s.%N)
grep -q "Domain is offline" "$TMPD/vnb.log" ||
    fail "oracle broke: virtnbdbackup did not take its offline path"
ls "$TMPD"/vnb/vda.copy.data >/dev/null || fail "no vda.copy.data in the backup set"
# Restoring writes through a writable qemu-nbd: qcbt-server refuses that
# (one line), so virtnbdrestore runs the real one.
if PATH="$BIN:$PATH" timeout 600 virtnbdrestore -U "$URI" -i "$TMPD/vnb" \
    -o "$TMPD/rest-ours" \
    >"$TMPD/rest-ours.log" 2>&1; then
    bad "virtnbdrestore through qcbt-server (writable) succeeded"
elif ! grep -qF "a writable export is not supported" "$TMPD/rest-ours.log"; then
    bad "virtnbdrestore through qcbt-server failed without our line: $(tail -n 3 "$TMPD/rest-ours.log")"
fi
timeout 600 virtnbdrestore -U "$URI" -i "$TMPD/vnb" -o "$TMPD/rest" >"$TMPD/rest.log" 2>&1 ||
    fail "virtnbdrestore failed: $(tail -n 5 "$TMPD/rest.log")"
# virtnbdrestore signals its qemu-nbd and returns without waiting for it:
# wait until the image's lock is free.
unlocked() { qemu-img info "$1" >/dev/null 2>&1; }
wait_until -- unlocked "$TMPD/rest/vda.qcow2" ||
    fail "the restored image stays locked"
qemu-img compare -q "$IMG/vda.qcow2" "$TMPD/rest/vda.qcow2" ||
    bad "virtnbdrestore output differs from the disk"
qemu-img convert -O raw "$IMG/vda.qcow2" "$TMPD/disk.raw"
qemu-img convert -O raw "$TMPD/rest/vda.qcow2" "$TMPD/rest.raw"
cmp -s "$TMPD/disk.raw" "$TMPD/rest.raw" ||
    bad "virtnbdrestore output differs from the disk (raw bytes)"
note "ok: virtnbdbackup offline through qcbt-server as qemu-nbd: restore equals the disk ($("$PYTHON" -c "print(round($t1 - $t0, 2))") s)"
exit $rc
