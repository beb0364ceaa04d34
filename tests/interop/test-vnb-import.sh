#!/usr/bin/env bash
# qcbt import / restore / verify of backup sets made by the real
# virtnbdbackup (Debian's 1.9.15) against a running libvirt QEMU domain
# (TCG; the guest idles in firmware, guest writes are injected through the
# monitor's qemu-io): full, incrementals and differentials, with and
# without lz4 compression.  Each restore point must equal a shadow model
# of the disk kept beside the writes (checked against the real disk at the
# end), the imported chain must be clean for qemu-img, malformed sets must
# fail with one clear line and leave nothing, and a fixed-seed mutation
# sweep must never crash.
. "$(dirname "$0")/../functions.sh"
umask 022

requires virtnbdbackup virsh libvirtd qemu-system-x86_64 qemu-img qemu-io \
    setpriv

DOM=qcbt-vnb-$$
MIB=$((1024 * 1024))
SIZE=$((128 * MIB)) # vda: big enough for a 40 MiB extent (chunked lz4)
SIZE_B=$((4 * MIB)) # vdb: small, for the mutation sweep
IMG=$TMPD/img

# --- a private libvirtd (tests/libvirt-lib.sh) ------------------------------
. "$TESTS_DIR/libvirt-lib.sh"
libvirt_start "$IMG"
URI="qemu:///session?socket=$LV_SOCK"
V=(virsh -q -c "$URI")

# The domain goes before the daemon (which would leave it running).
vnb_cleanup() {
    if pid_alive $LV_PID; then
        "${V[@]}" destroy "$DOM" >/dev/null 2>&1 || true
    fi
}
trap 'rc=$?; vnb_cleanup; (exit $rc); _qcbt_cleanup' EXIT

# --- the domain and the shadow model --------------------------------------
qemu-img create -q -f qcow2 "$IMG/vda.qcow2" $SIZE
qemu-img create -q -f qcow2 "$IMG/vdb.qcow2" $SIZE_B
libvirt_own "$IMG"/*.qcow2
truncate -s $SIZE "$TMPD/model-vda.raw"
truncate -s $SIZE_B "$TMPD/model-vdb.raw"

# model DISK PATTERN OFFSET LEN: what a write does to the disk.
model() {
    "$PYTHON" - "$TMPD/model-$1.raw" "$2" "$3" "$4" <<'EOF'
import sys
path, pat, off, n = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3]), int(sys.argv[4])
with open(path, "r+b") as f:
    f.seek(off)
    f.write(bytes([pat]) * n)
EOF
}

# Offline writes before the first backup: a 40 MiB extent (virtnbdbackup
# cuts reads at 32 MiB: a compressed frame of several lz4 frames) and
# some scattered data.
offline_write() { # DISK PATTERN OFFSET LEN
    qemu-io -f qcow2 -c "write -P $2 $3 $4" "$IMG/$1.qcow2" >/dev/null
    model "$1" "$2" "$3" "$4"
}
offline_write vda 0x11 $((8 * MIB)) $((40 * MIB))
offline_write vda 0x12 0 65536
offline_write vda 0x13 $((100 * MIB)) $((3 * MIB))
offline_write vdb 0x21 0 $MIB

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
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$IMG/vdb.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>
EOF
"${V[@]}" define "$TMPD/dom.xml" >/dev/null
"${V[@]}" start "$DOM" >/dev/null
QEMU_PID=$(cat "$LV/run/libvirt/qemu/run/$DOM.pid") ||
    fail "no pid file for the domain's QEMU"
cleanup_pid "$QEMU_PID"

# gw DISK ARGS...: a guest write through the monitor (qemu-io on the
# device's backend), and the same change to the model.  ARGS: "-P PAT OFF
# LEN" or "-z OFF LEN".
gw() {
    local disk=$1 dev
    shift
    dev=/machine/peripheral/virtio-disk$([[ $disk == vda ]] && echo 0 || echo 1)/virtio-backend
    "${V[@]}" qemu-monitor-command --hmp "$DOM" \
        "qemu-io -d $dev \"write $*\"" >/dev/null
    if [[ $1 == -z ]]; then
        model "$disk" 0 "$2" "$3"
    else
        model "$disk" "$2" "$3" "$4"
    fi
}

# backup SET LEVEL POINT [--compress]: run virtnbdbackup, then keep the
# model of both disks as restore point POINT of SET.
backup() {
    local set=$1 level=$2 point=$3
    shift 3
    virtnbdbackup -U "$URI" -d "$DOM" -l "$level" -o "$TMPD/$set" \
        -f "$LV/run/vnb.sock" \
        --noprogress "$@" >"$TMPD/vnb.log" 2>&1 ||
        {
            tail -5 "$TMPD/vnb.log" >&2
            fail "virtnbdbackup -l $level failed"
        }
    cp --sparse=always "$TMPD/model-vda.raw" "$TMPD/$set.vda.$point.raw"
    cp --sparse=always "$TMPD/model-vdb.raw" "$TMPD/$set.vdb.$point.raw"
}

# A differential is named by the second it was made in: two in one
# second would be one file.  Wait for the next second.
second_is_not() { [[ $(date +%s) != "$1" ]]; }
next_second() {
    wait_until -- second_is_not "$(date +%s)" || fail "the clock stands still"
}

# run_set SET [--compress]: full, inc, diff, inc (on the first inc's
# checkpoint: its base is not the diff), diff.
run_set() {
    local set=$1
    shift
    backup "$set" full 0 "$@"
    gw vda -P 0x31 $((1 * MIB)) $((2 * MIB))
    gw vdb -P 0x41 $((2 * MIB)) 65536
    backup "$set" inc 1 "$@"
    gw vda -P 0x32 $((20 * MIB)) 65536
    gw vdb -P 0x42 0 4096
    next_second
    backup "$set" diff 2 "$@"
    gw vda -P 0x33 $((60 * MIB)) $((1 * MIB))
    gw vda -z $((8 * MIB)) $((1 * MIB)) # dirty, now zeros
    gw vdb -z 65536 65536
    backup "$set" inc 3 "$@"
    gw vda -P 0x34 $((127 * MIB)) $MIB
    gw vdb -P 0x43 $((3 * MIB)) $MIB
    next_second
    backup "$set" diff 4 "$@"
}

run_set plain
run_set lz4 --compress

# The oracle: the model is the disk.
"${V[@]}" qemu-monitor-command --hmp "$DOM" \
    'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "flush"' >/dev/null
"${V[@]}" qemu-monitor-command --hmp "$DOM" \
    'qemu-io -d /machine/peripheral/virtio-disk1/virtio-backend "flush"' >/dev/null
"${V[@]}" destroy "$DOM" >/dev/null
for d in vda vdb; do
    qemu-img compare -q -f raw -F qcow2 "$TMPD/model-$d.raw" "$IMG/$d.qcow2" ||
        fail "oracle broke: the model of $d differs from the disk"
done
grep -q '"compressed": 2' "$TMPD/lz4/vda.full.data" ||
    fail "oracle broke: --compress did not compress"
grep -q '^{"[0-9]*": \[\|, {"[0-9]*": \[\|\[{"[0-9]*": \[' \
    <(tail -c 4096 "$TMPD/lz4/vda.full.data") ||
    fail "oracle broke: no chunked lz4 frame in the full backup"
ls "$TMPD"/plain/vda.diff.*.data >/dev/null ||
    fail "oracle broke: no differential"

# --- import, verify, restore at every point -------------------------------
check_set() {
    local set=$1 disk=$2 out=$TMPD/imp-$1-$2 k f
    "$QCBT" import --disk "$disk" "$TMPD/$set" "$out" >"$TMPD/import.out" ||
        fail "import of $set/$disk failed"
    [[ $(grep -c ' -> backup-' "$TMPD/import.out") -eq 5 ]] ||
        fail "import of $set/$disk: expected 5 backups: $(cat "$TMPD/import.out")"
    "$QCBT" verify "$out" >/dev/null || fail "verify of imported $set/$disk"
    [[ $(stat -c %a "$out") == 755 ]] ||
        fail "$out has mode $(stat -c %a "$out"), not 755 as mkdir makes it"
    for f in "$out"/backup-*.qcow2; do
        qemu-img check -q "$f" || fail "qemu-img check $f"
    done
    qemu-img info --backing-chain "$out/backup-0004.qcow2" >"$TMPD/info" ||
        fail "qemu-img info --backing-chain $set/$disk"
    # Point 3 (inc on checkpoint 1) builds on backup 1, not on the diff.
    grep -q "^backing file: backup-0001.qcow2" \
        <(qemu-img info "$out/backup-0003.qcow2") ||
        fail "$set/$disk: backup 3 does not build on backup 1"
    for k in 0 1 2 3 4; do
        "$QCBT" restore --at $k "$out" "$TMPD/r.raw" >/dev/null ||
            fail "restore --at $k of $set/$disk"
        cmp "$TMPD/r.raw" "$TMPD/$set.$disk.$k.raw" ||
            fail "$set/$disk: restore at point $k differs from the disk then"
        qemu-img compare -q -f qcow2 -F raw "$out/backup-000$k.qcow2" \
            "$TMPD/$set.$disk.$k.raw" ||
            fail "$set/$disk: qemu-img reads backup $k differently"
        rm -f "$TMPD/r.raw"
    done
}
for set in plain lz4; do
    for disk in vda vdb; do
        check_set $set $disk
    done
done

# --- restore and verify straight from a virtnbdbackup directory ---------
export TMPDIR=$TMPD/vt
mkdir "$TMPDIR"
"$QCBT" verify --disk vda "$TMPD/lz4" >"$TMPD/v.out" ||
    fail "verify of the lz4 set itself"
grep -q "every stream is well formed" "$TMPD/v.out" || fail "verify: $(cat "$TMPD/v.out")"
[[ $(grep -c ': ok (' "$TMPD/v.out") -eq 5 ]] || fail "verify: $(cat "$TMPD/v.out")"
for k in 2 4; do
    "$QCBT" restore --disk vda --at $k "$TMPD/plain" "$TMPD/r.raw" >/dev/null ||
        fail "restore --at $k from the plain set itself"
    cmp "$TMPD/r.raw" "$TMPD/plain.vda.$k.raw" ||
        fail "restore --at $k from the plain set itself differs"
    rm "$TMPD/r.raw"
done
[[ -z $(ls -A "$TMPDIR") ]] || fail "restore/verify left $(ls -A "$TMPDIR")"
mkdir "$TMPD/broken"
cp "$TMPD"/lz4/vdb.* "$TMPD"/lz4/*.cpt "$TMPD/broken/"
truncate -s -100 "$TMPD/broken/vdb.inc.virtnbdbackup.2.data"
expect_qcbt_error "vdb.inc.virtnbdbackup.2.data" "must end with a \"comp\" frame" \
    -- verify "$TMPD/broken"
expect_qcbt_error "must end with a \"comp\" frame" \
    -- restore "$TMPD/broken" "$TMPD/r.raw"
[[ ! -e $TMPD/r.raw ]] || fail "a failed restore left its output"
[[ -z $(ls -A "$TMPDIR") ]] || fail "failed restore/verify left $(ls -A "$TMPDIR")"
expect_qcbt_error "--disk applies to a virtnbdbackup directory" \
    -- verify --disk vda "$TMPD/imp-lz4-vda"
unset TMPDIR

# A fatal signal in the middle leaves nothing either: SIGTERM once the
# import has written a file, for qcbt import and for a restore from the
# set.
has_part() { compgen -G "$1" >/dev/null; }
export TMPDIR=$TMPD/vt
"$QCBT" import --disk vda "$TMPD/lz4" "$TMPD/sig-out" >/dev/null 2>&1 &
pid=$!
wait_until -p $pid -- has_part "$TMPD/.qcbt-import-*/backup-0000.qcow2" ||
    fail "oracle broke: import finished before it could be interrupted"
kill -TERM $pid
rc=0
wait $pid || rc=$?
[[ $rc -eq 143 ]] || fail "import killed by SIGTERM exited $rc"
! has_part "$TMPD/.qcbt-import-*" && [[ ! -e $TMPD/sig-out ]] ||
    fail "an import killed by SIGTERM left $(ls -d "$TMPD"/.qcbt-import-* "$TMPD"/sig-out 2>/dev/null)"
"$QCBT" restore --disk vda "$TMPD/lz4" "$TMPD/sig.raw" >/dev/null 2>&1 &
pid=$!
wait_until -p $pid -- has_part "$TMPDIR/qcbt-vnb-*/.qcbt-import-*/backup-0000.qcow2" ||
    fail "oracle broke: restore finished before it could be interrupted"
kill -TERM $pid
rc=0
wait $pid || rc=$?
[[ $rc -eq 143 ]] || fail "restore killed by SIGTERM exited $rc"
[[ -z $(ls -A "$TMPDIR") ]] || fail "a restore killed by SIGTERM left $(ls -A "$TMPDIR")"
unset TMPDIR

# --- history carries on: qcbt backup --since a virtnbdbackup checkpoint ---
# The lz4 set's checkpoints live on as bitmaps in vda.qcow2 (offline
# writes are recorded in them too).
SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER"
offline_write vda 0x51 $((30 * MIB)) $((2 * MIB))
"$SERVER" -t -f qcow2 -B virtnbdbackup.2 -k "$TMPD/s.sock" "$IMG/vda.qcow2" &
cleanup_pid $!
wait_nbd "nbd+unix:///?socket=$TMPD/s.sock" $! || fail "qcbt-server did not start"
"$QCBT" backup --since virtnbdbackup.2 "nbd+unix:///?socket=$TMPD/s.sock" \
    "$TMPD/imp-lz4-vda" >/dev/null || fail "backup --since on the imported chain"
grep -q '"backing-file": "backup-0004.qcow2"' "$TMPD/imp-lz4-vda/manifest.json" ||
    fail "backup --since did not build on the imported chain"
"$QCBT" restore "$TMPD/imp-lz4-vda" "$TMPD/r.raw" >/dev/null ||
    fail "restore after backup --since"
cmp "$TMPD/r.raw" "$TMPD/model-vda.raw" ||
    fail "backup --since on the imported chain: the restore differs from the disk"
"$QCBT" verify "$TMPD/imp-lz4-vda" >/dev/null || fail "verify after backup --since"
rm "$TMPD/r.raw"

# --json
"$QCBT" import --json --disk vdb "$TMPD/lz4" "$TMPD/imp-json" >"$TMPD/j"
"$PYTHON" - "$TMPD/j" <<'EOF' || fail "import --json"
import json, sys
j = json.load(open(sys.argv[1]))
b = j["backups"]
assert [x["type"] for x in b] == ["full", "incremental", "incremental",
                                  "differential", "incremental"], b
assert b[3]["backing-file"] == "backup-0001.qcow2", b
assert all(x["compressed"] for x in b), b
assert b[0]["checkpoint"] == "virtnbdbackup.0" and b[2]["checkpoint"] is None, b
EOF

# A set of several disks needs --disk.
expect_qcbt_error "choose one with --disk" -- import "$TMPD/plain" "$TMPD/x"
[[ ! -e $TMPD/x ]] || fail "a failed import left $TMPD/x"

# --- malformed sets: one clear line, nothing left -------------------------
# bad SET NEEDLE MUTATION...: copy SET's vdb files, mutate, expect failure.
bad() {
    local set=$1 needle=$2 b=$TMPD/bad
    shift 2
    rm -rf "$b" "$TMPD/bad-out"
    mkdir "$b"
    cp "$TMPD/$set"/vdb.* "$TMPD/$set"/*.cpt "$b"/
    (cd "$b" && eval "$*")
    expect_qcbt_error "$needle" -- import "$b" "$TMPD/bad-out" ||
        fail "malformed set ($*) was not refused as expected"
    [[ ! -e $TMPD/bad-out ]] || fail "failed import ($*) left its directory"
    ! ls -d "$TMPD"/.qcbt-import-* 2>/dev/null ||
        fail "failed import ($*) left a temporary directory"
}
inc1=vdb.inc.virtnbdbackup.1.data
# patch FILE OFFSET BYTES: overwrite bytes in place.
patch() {
    printf "$3" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}
# hdr FILE N: byte offset of the Nth frame header after the metadata.
hdr() {
    "$PYTHON" - "$1" "$2" <<'EOF'
import sys
d = open(sys.argv[1], "rb").read()
pos = 40 + int(d[22:38], 16) + 2
for _ in range(int(sys.argv[2])):
    kind, ln = d[pos:pos+4], int(d[pos+22:pos+38], 16)
    pos += 40 + (ln + 2 if kind == b"data" else 0)
print(pos)
EOF
}
# trailer_at FILE: byte offset of a compressed stream's trailer.
trailer_at() {
    "$PYTHON" - "$1" <<'EOF'
import sys
d = open(sys.argv[1], "rb").read()
print(len(d) - 42 - int(d[-18:-2], 16))
EOF
}
bad plain "truncated" "truncate -s -5000 $inc1"
bad plain "truncated" "truncate -s 30 $inc1"
bad plain "not a virtnbdbackup stream" "patch $inc1 0 xeta"
bad plain "metadata" "patch $inc1 41 '['"
# Same-length edits: the metadata frame's length still holds.
bad plain "virtualSize 4194305 is not a positive multiple of 512" \
    "sed -i 's/\"virtualSize\": 4194304/\"virtualSize\": 4194305/' $inc1"
bad plain "the metadata says dataSize 65535" \
    "sed -i 's/\"dataSize\": 65536/\"dataSize\": 65535/' $inc1"
bad plain "no \\r\\n after the metadata" \
    "sed -i 's/\"dataSize\": 65536/\"dataSize\": 655360/' $inc1"
bad plain "no \\r\\n after a data frame" \
    "patch $inc1 \$((\$(hdr $inc1 0) + 22)) 0000000000000200"
bad plain "outside the" \
    "patch vdb.full.data \$((\$(hdr vdb.full.data 1) + 5)) 00000000ffff0000"
bad plain "overlaps or precedes" \
    "patch vdb.full.data \$((\$(hdr vdb.full.data 1) + 5)) 0000000000000000"
bad plain "bad frame header" "patch $inc1 \$(hdr $inc1 0) 'da!a'"
bad plain "unexpected \"meta\" frame" "patch $inc1 \$(hdr $inc1 0) meta"
bad plain "without a \"stop\" frame" \
    "truncate -s \$(hdr $inc1 1) $inc1"
bad plain "unexpected bytes after the \"stop\"" "printf junk >>$inc1"
bad lz4 "ERROR_blockChecksum_invalid" \
    "patch $inc1 \$((\$(hdr $inc1 0) + 40 + 30)) XYZ"
bad lz4 "LZ4 frame at byte" "patch $inc1 \$((\$(hdr $inc1 0) + 40)) X"
bad lz4 "must end with a \"comp\" frame" "truncate -s -3 $inc1"
bad lz4 "must end with a \"comp\" frame" "truncate -s -60 $inc1"
bad lz4 "compression trailer" "truncate -s -42 $inc1; printf 'comp 0000000000000000 0000000000000002\r\n' >>$inc1"
# Its trailer is [298]: compressed sizes too large, too small, absurd.
grep -q '^\[298\]' <(tail -c 50 "$TMPD/lz4/$inc1") ||
    fail "oracle broke: $inc1 has another trailer: $(tail -c 50 "$TMPD/lz4/$inc1")"
bad lz4 "runs past the data" "patch $inc1 \$((\$(trailer_at $inc1) + 1)) 3"
bad lz4 "is incomplete" "patch $inc1 \$((\$(trailer_at $inc1) + 1)) 1"
bad lz4 "a size is not a positive integer within the file" \
    "patch $inc1 \$((\$(trailer_at $inc1) + 1)) 9"
bad lz4 "the compression trailer lists 2 data frames, the stream holds 1" \
    "truncate -s -47 $inc1; printf '[298, 1]\r\ncomp 0000000000000000 0000000000000008\r\n' >>$inc1"
bad plain "virtnbdbackup.1\", which no backup" "rm $inc1"
bad plain "virtnbdbackup.1\", which no backup" "rm $inc1 *.cpt"
bad plain "checkpoint \"virtnbdbackup.2\" in" \
    "rm vdb.inc.virtnbdbackup.2.data \$(ls vdb.diff.*.data | sort | tail -1)"
bad plain "no full backup" "rm vdb.full.data"
bad plain "not named as virtnbdbackup names" "cp vdb.full.data vdb.weird.data"
bad plain "metadata names disk" "cp vdb.full.data vdc.full.data; rm vdb.*"

# vda's compressed full backup has a chunked trailer item {"TOTAL":
# [SIZE, ...]} (the 40 MiB extent): a TOTAL that is not their sum.
rm -rf "$TMPD/bad" "$TMPD/bad-out"
mkdir "$TMPD/bad"
cp "$TMPD/lz4/vda.full.data" "$TMPD/bad/"
"$PYTHON" - "$TMPD/bad/vda.full.data" <<'EOF' || fail "oracle broke: no chunked item"
import sys
p = sys.argv[1]
d = bytearray(open(p, "rb").read())
i = d.rindex(b'{"')
j = d.index(b'"', i + 2) - 1          # the key's last digit
d[j] = ord("0") + (d[j] - ord("0") + 1) % 10
open(p, "wb").write(d)
EOF
expect_qcbt_error "vda.full.data: compression trailer item" "sizes add up to" \
    -- import "$TMPD/bad" "$TMPD/bad-out" || fail "a bad chunked trailer item"
[[ ! -e $TMPD/bad-out ]] || fail "failed import left its directory"

# --- mutation sweep (fixed seed): never a crash, always one line ----------
"$PYTHON" - "$TMPD" "$QCBT" <<'EOF' || fail "mutation sweep"
import glob, os, random, shutil, subprocess, sys
tmpd, qcbt = sys.argv[1], sys.argv[2]
rng = random.Random(15)
fails = oks = 0
for n in range(160):
    src = tmpd + ("/plain" if n % 2 else "/lz4")
    d = tmpd + "/mut"
    shutil.rmtree(d, ignore_errors=True)
    os.mkdir(d)
    for f in glob.glob(src + "/vdb.*") + glob.glob(src + "/*.cpt"):
        shutil.copy(f, d)
    victim = rng.choice(sorted(glob.glob(d + "/vdb.*.data")))
    data = bytearray(open(victim, "rb").read())
    op = rng.randrange(4)
    if op == 0:      # flip bytes anywhere
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == 1:    # truncate
        del data[rng.randrange(len(data)):]
    elif op == 2:    # a hex digit of a frame header
        hdrs = [i for i in range(0, len(data) - 40) if data[i:i+5] in
                (b"data ", b"zero ", b"stop ", b"comp ", b"meta ")]
        i = rng.choice(hdrs) + rng.choice(range(5, 38))
        data[i] = ord(rng.choice("0123456789abcdefF "))
    else:            # duplicate a slice
        i = rng.randrange(len(data)); j = rng.randrange(i, len(data))
        data[i:i] = data[i:j]
    open(victim, "wb").write(data)
    out = tmpd + "/mut-out"
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run([qcbt, "import", d, out], capture_output=True,
                       text=True, errors="replace", timeout=120)
    if p.returncode == 0:
        oks += 1
        continue
    lines = p.stderr.splitlines()
    notices = [l for l in lines if "notice:" in l]
    errs = [l for l in lines if "notice:" not in l]
    if p.returncode != 1 or len(errs) != 1 or not errs[0].startswith("qcbt: "):
        print("mutation %d (op %d on %s): exit %d, stderr %r" %
              (n, op, os.path.basename(victim), p.returncode, p.stderr))
        sys.exit(1)
    if os.path.exists(out) or glob.glob(tmpd + "/.qcbt-import-*"):
        print("mutation %d left output" % n)
        sys.exit(1)
    fails += 1
print("mutation sweep: %d refused, %d imported" % (fails, oks))
if fails < 100:
    print("oracle broke: too few mutations were refused")
    sys.exit(1)
EOF

note "ok"
