#!/bin/bash
# Image formats qcbt does not decode are refused by name, never served as
# raw.  QEMU probes a file's format from its first 2 KiB (each driver's
# probe: vmdk, qed, vdi, vhdx, vpc, luks, qcow, bochs, cloop, parallels,
# and dmg by its name); read as raw, such a file is its container's bytes
# (a 10 MiB VMDK is served as 64 KiB of metadata).
#
# For every format: `qemu-img info` says the format (the oracle; for the
# dmg file qemu-img fails in the dmg driver), and each front end refuses
# the file naming it -- `qcbt info`, `qcbt cat`, qcbt-server at start, the
# nbdkit plugin (probing and its default format=qcow2) and the nbdkit
# filter over the file plugin -- and so do a qcow2 overlay whose backing
# file is that image (format probed, recorded as qcow2, recorded as the
# format).  Given explicitly as raw (-f raw, format=raw, backing format
# raw) the bytes are served as they are, as qemu-nbd -f raw does.
#
# QCBT_KEEP_TMP=1 keeps the images.  QCBT_CASES=REGEX runs matching cases.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-nbd nbdkit nbdinfo nbdcopy cmp timeout ldd nm

MiB=$((1024 * 1024))
BUILD=${QCBT_BUILD_DIR:-$TESTS_DIR/../build}
SERVER=$BUILD/server/qcbt-server
PLUGIN=$BUILD/plugins/qcbt/nbdkit-qcbt-plugin.so
FILTER=$BUILD/plugins/qcbt-filter/nbdkit-qcbt-filter.so
for f in "$SERVER" "$PLUGIN" "$FILTER"; do
    [[ -e $f ]] || fail "not built: $f (set QCBT_BUILD_DIR)"
done
SERVER=$(cd "$(dirname "$SERVER")" && pwd)/$(basename "$SERVER")
PLUGIN=$(cd "$(dirname "$PLUGIN")" && pwd)/$(basename "$PLUGIN")
FILTER=$(cd "$(dirname "$FILTER")" && pwd)/$(basename "$FILTER")

want() { [[ -z ${QCBT_CASES:-} || $1 =~ $QCBT_CASES ]]; }

# An ASan-built plugin runs under the stock nbdkit with libasan preloaded
# (STYLE.md).  nbdkit 1.32 with libasan preloaded can hang in its exit
# handlers after an error: then a failure that printed its error and hung
# is accepted, as in test-nbdkit-plugin.sh.
NBDKIT_ENV=()
if nm -D "$PLUGIN" 2>/dev/null | grep '__asan_init' >/dev/null ||
    ldd "$PLUGIN" 2>/dev/null | grep libasan >/dev/null; then
    libasan=$(ldd "$PLUGIN" | awk '/libasan/ { print $3; exit }')
    [[ -n $libasan && -f $libasan ]] || libasan=$(gcc -print-file-name=libasan.so)
    [[ -f $libasan ]] || fail "ASan-built plugin but no libasan found to preload"
    NBDKIT_ENV=(LD_PRELOAD="$libasan" ASAN_OPTIONS=detect_leaks=0
                UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1)
fi
FAIL_TIMEOUT=${QCBT_FAIL_TIMEOUT:-120}
ASAN_EXIT_HANG=
if [[ ${#NBDKIT_ENV[@]} -gt 0 ]]; then
    probe_rc=0
    timeout -k 5 15 env "${NBDKIT_ENV[@]}" nbdkit -f -U "$TMPD/probe.sock" file "$TMPD/no-such-file" \
        >/dev/null 2>&1 </dev/null || probe_rc=$?
    if [[ $probe_rc -eq 124 || $probe_rc -eq 137 ]]; then
        ASAN_EXIT_HANG=1
        FAIL_TIMEOUT=30
    fi
fi

# must_fail NAME NEEDLE... -- CMD...: CMD exits non-zero, by itself (not by
# the timeout, unless it is the libasan exit hang after an error), and its
# stderr contains every NEEDLE and no control bytes but newlines.  CMD
# listens (if ever) on $CASE_DIR/fail.sock.
must_fail() {
    local name=$1 needles=() rc=0 err n
    shift
    while [[ $1 != -- ]]; do
        needles+=("$1")
        shift
    done
    shift
    err=$CASE_DIR/$name.err
    # nbdkit binds before the plugin opens the image: a socket is left.
    rm -f "$CASE_DIR/fail.sock"
    { printf '%q ' "$@"; printf '  # must fail\n'; } >>"$CASE_DIR/recipe.txt"
    timeout -k 5 "$FAIL_TIMEOUT" "$@" >/dev/null 2>"$err" </dev/null || rc=$?
    if [[ ($rc -eq 124 || $rc -eq 137) && -n $ASAN_EXIT_HANG ]] && grep -qF 'error' "$err"; then
        note "[$CASE] $name: failed, then hung in exit (the libasan exit hang)"
    elif [[ $rc -eq 0 || $rc -ge 124 ]]; then
        note "[$CASE] $name: expected a failure, exit $rc: $(head -c 600 "$err")"
        return 1
    fi
    if grep -qE 'AddressSanitizer|LeakSanitizer|runtime error:' "$err"; then
        note "[$CASE] $name: sanitizer report: $(head -c 600 "$err")"
        return 1
    fi
    for n in "${needles[@]}"; do
        if ! grep -qF -- "$n" "$err"; then
            note "[$CASE] $name: stderr lacks '$n': $(head -c 600 "$err")"
            return 1
        fi
    done
    if LC_ALL=C tr -d '\n' <"$err" | LC_ALL=C grep -q '[[:cntrl:]]'; then
        note "[$CASE] $name: control bytes in stderr"
        return 1
    fi
    note "[$CASE] ok: $name: $(grep -m1 -F "${needles[0]}" "$err")"
}

# refused IMG FMT: every front end refuses IMG naming FMT.
refused() {
    local img=$1 fmt=$2 rc=0 msg
    msg="image format $fmt is not supported"
    for cmd in info cat map; do
        expect_qcbt_error "$msg" "$img" "qcbt reads qcow2 and raw" -- "$cmd" "$img" || rc=1
    done
    must_fail server "qcbt-server: " "$msg" -- \
        "$SERVER" -k "$CASE_DIR/fail.sock" "$img" || rc=1
    must_fail plugin-probe "$msg" -- env "${NBDKIT_ENV[@]}" \
        nbdkit -f -U "$CASE_DIR/fail.sock" "$PLUGIN" file="$img" format=auto || rc=1
    if [[ $fmt != dmg ]]; then
        # Told "qcow2" (the plugin's default, the filter, -f qcow2), the
        # refusal still names what the file is; QEMU knows dmg by its
        # name only, so there it is a qcow2 with a bad magic.
        expect_qcbt_error "$msg" -- info -f qcow2 "$img" || rc=1
        must_fail plugin "$msg" -- env "${NBDKIT_ENV[@]}" \
            nbdkit -f -U "$CASE_DIR/fail.sock" "$PLUGIN" file="$img" || rc=1
        must_fail filter "$msg" -- env "${NBDKIT_ENV[@]}" \
            nbdkit -f -U "$CASE_DIR/fail.sock" --filter="$FILTER" file "$img" || rc=1
    fi
    return "$rc"
}

# oracle IMG FMT: qemu-img says IMG is FMT.
oracle() {
    local got
    got=$(qemu-img info --output=json "$1" 2>/dev/null |
          "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["format"])') || got=
    if [[ $got != "$2" ]]; then
        note "[$CASE] qemu-img info says '$got' for $1, not '$2'"
        return 1
    fi
}

# raw_ok IMG: given as raw, IMG is its bytes (rounded up to whole
# sectors), from the CLI, qcbt-server and the plugin, as from qemu-nbd.
raw_ok() {
    local img=$1 rc=0 size qsize srv_pid
    size=$(( ($(stat -c %s "$img") + 511) / 512 * 512 ))
    cp "$img" ref.raw
    truncate -s "$size" ref.raw
    if ! "$QCBT" cat -f raw "$img" >cat.raw 2>cat.err || ! cmp -s ref.raw cat.raw; then
        note "[$CASE] qcbt cat -f raw $img is not its bytes: $(cat cat.err)"
        rc=1
    fi
    run "$SERVER" --fork --pid-file "$CASE_DIR/srv.pid" -t -f raw -k "$CASE_DIR/raw.sock" "$img"
    srv_pid=$(cat "$CASE_DIR/srv.pid")
    cleanup_pid "$srv_pid"
    run qemu-nbd --fork --pid-file "$CASE_DIR/qnbd.pid" -t -r -f raw -k "$CASE_DIR/qnbd.sock" "$img"
    cleanup_pid "$(cat "$CASE_DIR/qnbd.pid")"
    qsize=$(nbdinfo --size "nbd+unix:///?socket=$CASE_DIR/qnbd.sock")
    if [[ $(nbdinfo --size "nbd+unix:///?socket=$CASE_DIR/raw.sock") != "$qsize" ]]; then
        note "[$CASE] qcbt-server -f raw serves $(nbdinfo --size "nbd+unix:///?socket=$CASE_DIR/raw.sock") bytes, qemu-nbd -f raw $qsize"
        rc=1
    fi
    rm -f srv.raw qnbd.raw
    nbdcopy "nbd+unix:///?socket=$CASE_DIR/raw.sock" srv.raw &&
        nbdcopy "nbd+unix:///?socket=$CASE_DIR/qnbd.sock" qnbd.raw ||
        fail "[$CASE] nbdcopy failed"
    if ! cmp -s srv.raw qnbd.raw; then
        note "[$CASE] qcbt-server -f raw and qemu-nbd -f raw serve different bytes"
        rc=1
    fi
    kill "$srv_pid" "$(cat "$CASE_DIR/qnbd.pid")" 2>/dev/null || true
    if ! timeout -k 5 "$FAIL_TIMEOUT" env "${NBDKIT_ENV[@]}" nbdkit -U - "$PLUGIN" file="$img" format=raw \
            --run 'nbdinfo --size "$uri"' >plugin.size 2>plugin.err ||
        [[ $(cat plugin.size) != "$size" ]]; then
        note "[$CASE] nbdkit qcbt format=raw: $(cat plugin.size plugin.err)"
        rc=1
    fi
    return "$rc"
}

# backing_refused IMG FMT: a qcow2 overlay of IMG refuses it, naming FMT,
# whether its format is probed or recorded as qcow2 or FMT; recorded as
# raw it reads IMG's bytes, as QEMU does.
backing_refused() {
    local img=$1 fmt=$2 rc=0 msg="image format $fmt is not supported" bf
    run qemu-img create -q -f qcow2 -u -b "$img" -F raw top-raw.qcow2 $((1 * MiB))
    # Probed: no backing format in the overlay.
    run qemu-img create -q -f qcow2 -u -b "$img" -F raw top-probe.qcow2 $((1 * MiB))
    drop_backing_fmt top-probe.qcow2
    run qemu-img create -q -f qcow2 -u -b "$img" -F qcow2 top-qcow2.qcow2 $((1 * MiB))
    for bf in probe qcow2; do
        [[ $bf == qcow2 && $fmt == dmg ]] && continue
        expect_qcbt_error "layer 1" "$msg" -- info "top-$bf.qcow2" || rc=1
        expect_qcbt_error "layer 1" "$msg" -- cat "top-$bf.qcow2" || rc=1
        must_fail "server-backing-$bf" "$msg" -- \
            "$SERVER" -k "$CASE_DIR/fail.sock" "top-$bf.qcow2" || rc=1
        must_fail "plugin-backing-$bf" "$msg" -- env "${NBDKIT_ENV[@]}" \
            nbdkit -f -U "$CASE_DIR/fail.sock" "$PLUGIN" file="top-$bf.qcow2" || rc=1
        must_fail "filter-backing-$bf" "$msg" -- env "${NBDKIT_ENV[@]}" \
            nbdkit -f -U "$CASE_DIR/fail.sock" --filter="$FILTER" file "top-$bf.qcow2" \
            backing-dir="$CASE_DIR" || rc=1
    done
    if [[ $fmt != dmg ]]; then
        run qemu-img create -q -f qcow2 -u -b "$img" -F "$fmt" top-fmt.qcow2 $((1 * MiB))
        expect_qcbt_error "layer 1" "backing format '$fmt'" -- cat top-fmt.qcow2 || rc=1
    fi
    # Recorded as raw: QEMU reads the container's bytes; so do we.
    qemu-img convert -f qcow2 -O raw top-raw.qcow2 ref-top.raw ||
        fail "[$CASE] qemu-img convert top-raw.qcow2"
    if ! "$QCBT" cat top-raw.qcow2 >top.raw 2>cat.err || ! cmp -s ref-top.raw top.raw; then
        note "[$CASE] a raw-recorded backing file does not read as qemu-img convert: $(cat cat.err)"
        rc=1
    fi
    return "$rc"
}

# drop_backing_fmt IMG: remove the backing format header extension, so
# that readers probe (qemu-img create no longer writes such images).
drop_backing_fmt() {
    recipe_note "drop_backing_fmt $1 (header extension 0xe2792aca becomes unknown type 0x0fffffff)"
    "$PYTHON" - "$1" <<'PYEOF' || fail "[$CASE] cannot drop the backing format"
import struct, sys
with open(sys.argv[1], "r+b") as f:
    h = f.read(4096)
    ver = struct.unpack(">I", h[4:8])[0]
    pos = struct.unpack(">I", h[100:104])[0] if ver >= 3 else 72
    while pos + 8 <= len(h):
        t, n = struct.unpack(">II", h[pos:pos + 8])
        if t == 0:
            break
        if t == 0xe2792aca:
            f.seek(pos)
            f.write(struct.pack(">I", 0x0fffffff))
            sys.exit(0)
        pos += 8 + (n + 7) // 8 * 8
    sys.exit("no backing format extension")
PYEOF
}

# make_bochs / make_cloop FILE: small images of formats qemu-img cannot
# create, which QEMU opens (checked by the oracle).
make_bochs() {
    recipe_note "make_bochs $1 (512-byte header, one unallocated 4 KiB extent)"
    "$PYTHON" - "$1" <<'PYEOF'
import struct, sys
h = bytearray(512)
h[0:23] = b"Bochs Virtual HD Image\0"
h[32:40] = b"Redolog\0"
h[48:56] = b"Growing\0"
# version, header size, catalog entries, bitmap size, extent size
struct.pack_into("<IIIII", h, 64, 0x00020000, 512, 1, 512, 4096)
struct.pack_into("<IQ", h, 84, 0, 4096)  # reserved, disk size
open(sys.argv[1], "wb").write(bytes(h) + struct.pack("<I", 0xffffffff) + bytes(508))
PYEOF
}

make_cloop() {
    recipe_note "make_cloop $1 (one 512-byte zlib block)"
    "$PYTHON" - "$1" <<'PYEOF'
import struct, sys, zlib
magic = (b"#!/bin/sh\n#V2.0 Format\n"
         b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
c = bytearray(128)
c[:len(magic)] = magic
c += struct.pack(">II", 512, 1)  # block size, blocks
data = zlib.compress(bytes(512))
off0 = len(c) + 16
c += struct.pack(">QQ", off0, off0 + len(data)) + data
open(sys.argv[1], "wb").write(bytes(c))
PYEOF
}

# make_luks FILE: qemu-img's LUKS creation first times 32768 rounds of
# PBKDF2 on the thread's user CPU clock and gives up ("Unable to get
# accurate CPU usage") when it measures 0 ms.  With SHA-256 those rounds
# are short enough that this happened in 11 of 40 runs on a quiet
# machine (and 5 times in a row in one CI run); SHA-512's take longer:
# 0 of 200.  Still, try again.
make_luks() {
    local i
    for i in 1 2 3 4 5; do
        rm -f "$1"
        qemu-img create -q "${SECRET[@]}" -f luks \
            -o key-secret=sec0,iter-time=10,hash-alg=sha512 "$1" 10M &&
            return 0
    done
    return 1
}

make_random() {
    recipe_note "make_random $1 (64 KiB from /dev/urandom)"
    head -c 65536 /dev/urandom >"$1"
}

# format_case NAME FMT FILE CREATE...: create FILE with CREATE (a command,
# or a function), then check the oracle, the refusals, the backing file
# cases and the raw reading.
format_case() {
    local name=$1 fmt=$2 file=$3 rc=0
    shift 3
    want "$name" || return 0
    begin_case "$name"
    run "$@"
    if [[ $fmt == dmg ]]; then
        # QEMU takes any *.dmg for a dmg image; its driver then fails.
        if qemu-img info "$file" >dmg.err 2>&1 || ! grep -qi 'dmg' dmg.err; then
            note "[$CASE] qemu-img info did not try the dmg driver: $(cat dmg.err)"
            rc=1
        fi
    else
        oracle "$file" "$fmt" || rc=1
    fi
    refused "$CASE_DIR/$file" "$fmt" || rc=1
    backing_refused "$file" "$fmt" || rc=1
    raw_ok "$file" || rc=1
    case_result "$rc"
}

SECRET=(--object secret,id=sec0,data=qcbt-test-key)

format_case vmdk vmdk d.vmdk qemu-img create -q -f vmdk d.vmdk 10M
format_case vmdk-flat vmdk desc.vmdk qemu-img create -q -f vmdk -o subformat=monolithicFlat desc.vmdk 10M
format_case vmdk-stream vmdk s.vmdk qemu-img create -q -f vmdk -o subformat=streamOptimized s.vmdk 10M
format_case qed qed d.qed qemu-img create -q -f qed d.qed 10M
format_case vdi vdi d.vdi qemu-img create -q -f vdi d.vdi 10M
format_case vhdx vhdx d.vhdx qemu-img create -q -f vhdx d.vhdx 10M
format_case vpc vpc d.vpc qemu-img create -q -f vpc d.vpc 10M
format_case parallels parallels d.hdd qemu-img create -q -f parallels d.hdd 10M
format_case luks luks d.luks make_luks d.luks
format_case qcow qcow d.qcow qemu-img create -q -f qcow d.qcow 10M
format_case bochs bochs d.bochs make_bochs d.bochs
format_case cloop cloop d.cloop make_cloop d.cloop
format_case dmg dmg x.dmg make_random x.dmg

cd "$TMPD" || exit 1
finish_cases
