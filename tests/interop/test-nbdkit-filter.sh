#!/bin/bash
# nbdkit-qcbt-filter under the stock nbdkit (plugins/qcbt-filter): a qcow2
# image decoded from the bytes of the plugin beneath the filter.
#
# Oracles are QEMU's tools and qcbt's own bitmap dump:
#   - over the file plugin: data (nbdcopy + cmp, `qemu-img compare` over
#     NBD) == `qemu-img convert -O raw`, and `nbdinfo --map` == `qemu-img
#     map` allocation, for plain, zlib, zstd, extended L2 images and a
#     3-layer chain with a raw base (backing-dir=; without it, a clear error
#     naming the backing file);
#   - over memory: the data plugin holding the image ('<FILE', sparse and
#     zstd allocators), and the memory plugin (written over NBD, then read
#     through the nbd plugin);
#   - over the nbd plugin in front of qcbt-server -f raw and qemu-nbd -f raw
#     (the qcow2 file's raw bytes, decoded here);
#   - stacked with nbdkit's cache filter below and the readahead filter
#     above; prefetches reach the plugin as host ranges (log filter), and
#     cache is not offered when the plugin cannot cache (nocache filter);
#   - the dirty view (bitmap=) == `qcbt bitmap dump --json`, and dirty-only
#     reads;
#   - flags, -D qcbt.io, export names, an image that changed size;
#   - malformed images (bad magic, unknown incompatible bit, truncated):
#     nbdkit exits non-zero at start with one error naming the reason;
#   - the same errors under nbdkit --run (raw bytes, a chain without
#     backing-dir=, a missing bitmap, a failing plugin, 150 mutated images):
#     the command ends at once, refused, instead of waiting for ever.
# An ASan-built filter (cmake -DQCBT_SANITIZE=ON) is detected and run under
# nbdkit with libasan preloaded; any sanitizer report fails the test.
#
# QCBT_KEEP_TMP=1 keeps the images.  QCBT_CASES=REGEX runs matching cases.

. "$(dirname "$0")/../functions.sh"
requires nbdkit nbdinfo nbdcopy qemu-img qemu-io qemu-nbd cmp truncate ldd nm

MiB=$((1024 * 1024))
BUILD=${QCBT_BUILD_DIR:-$TESTS_DIR/../build}
FILTER=$BUILD/plugins/qcbt-filter/nbdkit-qcbt-filter.so
SERVER=$BUILD/server/qcbt-server
[[ -f $FILTER ]] || fail "filter not built: $FILTER (set QCBT_BUILD_DIR)"
[[ -x $SERVER ]] || fail "qcbt-server not built: $SERVER (set QCBT_BUILD_DIR)"
FILTER=$(cd "$(dirname "$FILTER")" && pwd)/$(basename "$FILTER")
SERVER=$(cd "$(dirname "$SERVER")" && pwd)/$(basename "$SERVER")

want() { [[ -z ${QCBT_CASES:-} || $1 =~ $QCBT_CASES ]]; }

# --- nbdkit, with libasan preloaded for an ASan-built filter ---------------

NBDKIT_ENV=()
if nm -D "$FILTER" 2>/dev/null | grep '__asan_init' >/dev/null ||
    ldd "$FILTER" 2>/dev/null | grep libasan >/dev/null; then
    libasan=$(ldd "$FILTER" | awk '/libasan/ { print $3; exit }')
    [[ -n $libasan && -f $libasan ]] || libasan=$(gcc -print-file-name=libasan.so)
    [[ -f $libasan ]] || fail "ASan-built filter but no libasan found to preload"
    NBDKIT_ENV=(LD_PRELOAD="$libasan" ASAN_OPTIONS=detect_leaks=0
                UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1)
    note "ASan-built filter: nbdkit runs with LD_PRELOAD=$libasan"
fi

# nbdkit 1.32 run with libasan preloaded can hang in its exit handlers
# (libp11-kit's destructor waits for glibc's locale lock) after an error
# whose message went through strerror, even with the stock file plugin.
# Probe that once; where it happens, a start failure that printed the
# expected error and then hung in exit is accepted (with a note).
ASAN_EXIT_HANG=
FAIL_TIMEOUT=60
if [[ ${#NBDKIT_ENV[@]} -gt 0 ]]; then
    probe_rc=0
    timeout -k 5 15 env "${NBDKIT_ENV[@]}" nbdkit -f -U "$TMPD/probe.sock" file "$TMPD/no-such-file" \
        >/dev/null 2>&1 </dev/null || probe_rc=$?
    if [[ $probe_rc -eq 124 || $probe_rc -eq 137 ]]; then
        ASAN_EXIT_HANG=1
        FAIL_TIMEOUT=20
        note "nbdkit with libasan preloaded hangs in exit after an error (stock file plugin too)"
    fi
fi

sanitizer_clean() {
    if grep -qE 'AddressSanitizer|LeakSanitizer|runtime error:' "$1"; then
        note "[$CASE] sanitizer report in $1:"
        grep -E -A12 'AddressSanitizer|runtime error:' "$1" | head -n 30 | sed 's/^/    /' >&2
        return 1
    fi
}

# start_bg NAME SOCK CMD...: a helper server (not under test) in the
# background; waits until SOCK answers.
start_bg() {
    local name=$1 sock=$2 i pid
    shift 2
    rm -f "$sock"
    { printf '%q ' "$@"; printf '&\n'; } >>"$CASE_DIR/recipe.txt"
    "$@" >>"$CASE_DIR/$name.log" 2>&1 </dev/null &
    pid=$!
    cleanup_pid "$pid"
    wait_nbd "nbd+unix:///?socket=$sock" "$pid" ||
        fail "[$CASE] $name did not come up: $(cat "$CASE_DIR/$name.log")"
}

# nbdkit_start ARGS...: nbdkit -f --filter=qcbt ARGS on a unix socket in the
# case directory (ARGS: more nbdkit options, the plugin and the parameters,
# as on the nbdkit command line after --filter=qcbt).  Filters listed in
# ABOVE (an array) go before ours, i.e. closer to the client.  Waits until
# it answers; sets URI and NBDKIT_PID; returns 1 if it does not come up.
ABOVE=()
nbdkit_start() {
    local sock=$CASE_DIR/nbdkit.sock log=$CASE_DIR/nbdkit.log i
    rm -f "$sock"
    : >"$log"
    { printf '%q ' env "${NBDKIT_ENV[@]}" nbdkit -f -U "$sock" "${ABOVE[@]}" --filter="$FILTER" "$@"
      printf '&\n'; } >>"$CASE_DIR/recipe.txt"
    env "${NBDKIT_ENV[@]}" nbdkit -f -U "$sock" "${ABOVE[@]}" --filter="$FILTER" "$@" \
        >>"$log" 2>&1 </dev/null &
    NBDKIT_PID=$!
    cleanup_pid "$NBDKIT_PID"
    URI="nbd+unix:///?socket=$sock"
    wait_nbd "$URI" "$NBDKIT_PID" && return 0
    if ! pid_alive "$NBDKIT_PID"; then
        wait "$NBDKIT_PID" 2>/dev/null || true
        note "[$CASE] nbdkit exited at start: $(cat "$log")"
        return 1
    fi
    note "[$CASE] nbdkit did not come up in $QCBT_WAIT s"
    return 1
}

nbdkit_stop() {
    local rc=0 i
    if ! kill -0 "$NBDKIT_PID" 2>/dev/null; then
        note "[$CASE] nbdkit died while serving: $(tail -n 5 "$CASE_DIR/nbdkit.log")"
        rc=1
    fi
    kill -TERM "$NBDKIT_PID" 2>/dev/null || true
    # The bound catches a hang; where nbdkit is known to hang in exit
    # under libasan (probed above), it is short, as such a hang is accepted.
    if ! wait_gone "$NBDKIT_PID" "$([[ -n $ASAN_EXIT_HANG ]] && echo 10 || echo "$QCBT_WAIT")"; then
        note "[$CASE] nbdkit did not exit after SIGTERM: killed"
        kill -KILL "$NBDKIT_PID" 2>/dev/null || true
        [[ -n $ASAN_EXIT_HANG ]] || rc=1
    fi
    wait "$NBDKIT_PID" 2>/dev/null || true
    sanitizer_clean "$CASE_DIR/nbdkit.log" || rc=1
    return "$rc"
}

# expect_start_failure NEEDLE... -- ARGS...: nbdkit -f --filter=qcbt ARGS
# exits non-zero (not by a signal or the timeout) and its stderr has an
# error line containing every NEEDLE.  The filter reads the image after
# nbdkit binds its socket (.after_fork), so -f keeps the error on stderr.
expect_start_failure() {
    local needles=() a rc=0 err=$CASE_DIR/start-failure.err n
    while [[ $# -gt 0 ]]; do
        a=$1
        shift
        [[ $a == -- ]] && break
        needles+=("$a")
    done
    rm -f "$CASE_DIR/fail.sock"
    { printf '%q ' env "${NBDKIT_ENV[@]}" nbdkit -f -U "$CASE_DIR/fail.sock" --filter="$FILTER" "$@"
      printf '  # must fail\n'; } >>"$CASE_DIR/recipe.txt"
    timeout -k 5 "$FAIL_TIMEOUT" env "${NBDKIT_ENV[@]}" nbdkit -f -U "$CASE_DIR/fail.sock" --filter="$FILTER" "$@" \
        >/dev/null 2>"$err" </dev/null || rc=$?
    if [[ ($rc -eq 124 || $rc -eq 137) && -n $ASAN_EXIT_HANG ]] && grep -qF 'error:' "$err"; then
        note "[$CASE] nbdkit failed and then hung in exit (the libasan exit hang probed above)"
    elif [[ $rc -eq 0 || $rc -ge 124 ]]; then
        note "[$CASE] expected nbdkit to fail at start, exit $rc: $(cat "$err")"
        return 1
    fi
    sanitizer_clean "$err" || return 1
    for n in "${needles[@]}"; do
        if ! grep -F 'error:' "$err" | grep -F -- "$n" >/dev/null; then
            note "[$CASE] nbdkit's error lacks '$n': $(cat "$err")"
            return 1
        fi
    done
    note "[$CASE] ok (exit $rc): $(grep -F 'error:' "$err" | head -n 1)"
}

# --- oracles ----------------------------------------------------------------

NBDMAP=$(cd "$(dirname "$0")" && pwd)/nbdkit-map.py

mixed_raw() {
    run "$PYTHON" -c '
import random, sys
path, size = sys.argv[1], int(sys.argv[2])
rng = random.Random(20240608)
out = bytearray()
i = 0
while len(out) < size:
    k = i % 5
    if k == 0:
        blk = rng.randbytes(4096)
    elif k == 1:
        blk = bytes([i & 0xff]) * 4096
    elif k == 2:
        blk = bytes(4096)
    elif k == 3:
        blk = rng.randbytes(2048) + bytes(2048)
    else:
        blk = ((b"qcbt filter %08d " % i) * 256)[:4096]
    out += blk
    i += 1
open(path, "wb").write(out[:size])
' "$1" "$2"
}

pattern() { # IMG FMT C
    local img=$1 fmt=$2 c=$3 size sc
    size=$(virtual_size "$img" "$fmt")
    sc=$((c / 32))
    ((sc >= 512)) || sc=512
    run qemu-io -f "$fmt" \
        -c "write -P 0x11 0 $c" \
        -c "write -P 0x12 $((c + c / 2)) $c" \
        -c "write -P 0x13 $((3 * c + 100)) 300" \
        -c "write -P 0x15 $((9 * c)) $((2 * c))" \
        -c "write -z $((9 * c)) $c" \
        -c "write -z -u $((12 * c)) $((2 * c))" \
        -c "write -z $((16 * c)) $c" \
        -c "write -P 0x17 $((17 * c)) $((3 * c))" \
        -c "discard $((18 * c)) $c" \
        -c "write -P 0x1c $((28 * c + 3 * sc)) $((2 * sc))" \
        -c "write -z $((28 * c + 10 * sc)) $sc" \
        -c "write -P 0x1a $((size - 512)) 512" \
        "$img"
}

# reference IMG: ref.raw and qemu-map.json for IMG; sets SIZE.
reference() {
    SIZE=$(virtual_size "$1")
    run qemu-img convert -O raw "$1" ref.raw
    [[ $(stat -c %s ref.raw) -eq $SIZE ]] || run truncate -s "$SIZE" ref.raw
    qemu-img map --output=json "$1" >qemu-map.json || fail "[$CASE] qemu-img map failed on $1"
}

# check_data [map]: the running server's data equals ref.raw (nbdcopy +
# cmp, qemu-img compare); with "map", nbdinfo --map equals qemu-map.json.
check_data() {
    local rc=0
    if ! timeout 300 nbdcopy "$URI" nbd.raw 2>nbdcopy.err; then
        note "[$CASE] nbdcopy failed: $(cat nbdcopy.err)"
        rc=1
    elif ! cmp ref.raw nbd.raw >cmp.out 2>&1; then
        note "[$CASE] nbdcopy of the export differs from qemu-img convert -O raw: $(cat cmp.out)"
        rc=1
    fi
    rm -f nbd.raw
    if ! timeout 300 qemu-img compare -f raw -F raw ref.raw "$URI" >compare.out 2>&1; then
        note "[$CASE] qemu-img compare ref.raw $URI: $(cat compare.out)"
        rc=1
    fi
    if [[ ${1:-} == map ]]; then
        if ! timeout 300 nbdinfo --map --json "$URI" >nbd-map.json 2>nbdinfo.err; then
            note "[$CASE] nbdinfo --map failed: $(cat nbdinfo.err)"
            rc=1
        elif ! "$PYTHON" "$NBDMAP" alloc qemu-map.json nbd-map.json "$SIZE"; then
            note "[$CASE] nbdinfo --map differs from qemu-img map"
            rc=1
        fi
    fi
    return "$rc"
}

# serve_and_check [map] -- NBDKIT-ARGS...: start, check_data, stop.
serve_and_check() {
    local mode=$1 rc=0
    shift 2
    nbdkit_start "$@" || return 1
    check_data "$mode" || rc=1
    nbdkit_stop || rc=1
    return "$rc"
}

# --- images -----------------------------------------------------------------

begin_case images
recipe_note "images shared by the cases below"
IMG=$TMPD/images
mixed_raw "$IMG/mixed.raw" $((3 * MiB + 5 * 4096 + 512))
run qemu-img create -q -f qcow2 "$IMG/plain.qcow2" $((10000000))
pattern "$IMG/plain.qcow2" qcow2 65536
for ctype in zlib zstd; do
    run qemu-img convert -c -f raw -O qcow2 -o cluster_size=65536,compression_type=$ctype \
        "$IMG/mixed.raw" "$IMG/$ctype.qcow2"
    run qemu-io -f qcow2 -c "write -P 0x5a $((65536 + 100)) 200" -c "write -z $((3 * 65536)) 65536" \
        "$IMG/$ctype.qcow2"
done
run qemu-img create -q -f qcow2 -o cluster_size=65536,extended_l2=on "$IMG/extl2.qcow2" $((8 * MiB))
pattern "$IMG/extl2.qcow2" qcow2 65536
# base.raw <- mid.qcow2 <- top.qcow2, relative names, in one directory
# (backing-dir= stands in for the top image's directory, see
# nbdkit-qcbt-filter(1)).  Every byte of the base is written, so any
# read-through shows; the top is larger than the base.
mkdir -p "$IMG/chain"
run qemu-img create -q -f raw "$IMG/chain/base.raw" $((6 * MiB))
run qemu-io -f raw -c "write -P 0xa5 0 $((6 * MiB))" -c "write -P 0xa6 $((3 * MiB)) 4096" "$IMG/chain/base.raw"
run qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.raw -F raw "$IMG/chain/mid.qcow2" $((6 * MiB))
pattern "$IMG/chain/mid.qcow2" qcow2 4096
run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$IMG/chain/top.qcow2" $((8 * MiB))
pattern "$IMG/chain/top.qcow2" qcow2 65536
# The same with the middle layer in a sub-directory naming its base
# relative to itself: top -> sub/mid.qcow2 -> ../base.raw.
mkdir -p "$IMG/nested/sub"
run cp "$IMG/chain/base.raw" "$IMG/nested/base.raw"
run qemu-img create -q -f qcow2 -o cluster_size=4096 -b ../base.raw -F raw "$IMG/nested/sub/mid.qcow2" $((6 * MiB))
pattern "$IMG/nested/sub/mid.qcow2" qcow2 4096
run qemu-img create -q -f qcow2 -b sub/mid.qcow2 -F qcow2 "$IMG/nested/top.qcow2" $((8 * MiB))
pattern "$IMG/nested/top.qcow2" qcow2 65536

# --- over the file plugin --------------------------------------------------------

for name in plain zlib zstd extl2; do
    want "file-$name" || continue
    begin_case "file-$name"
    reference "$IMG/$name.qcow2"
    rc=0
    serve_and_check map -- file "$IMG/$name.qcow2" || rc=1
    case_result "$rc"
done

if want file-chain; then
    begin_case file-chain
    reference "$IMG/chain/top.qcow2"
    rc=0
    serve_and_check map -- file "$IMG/chain/top.qcow2" backing-dir="$IMG/chain" || rc=1
    # Without backing-dir= no backing file may be opened.
    expect_start_failure "backing file 'mid.qcow2'" "backing-dir" -- file "$IMG/chain/top.qcow2" || rc=1
    # A backing-dir= where the backing file is not.
    expect_start_failure "mid.qcow2" "No such file" -- file "$IMG/chain/top.qcow2" backing-dir="$IMG" || rc=1
    case_result "$rc"
fi

if want file-chain-nested; then
    # Deeper layers resolve their backing names against their own
    # directory, as QEMU does.
    begin_case file-chain-nested
    reference "$IMG/nested/top.qcow2"
    rc=0
    serve_and_check map -- file "$IMG/nested/top.qcow2" backing-dir="$IMG/nested" || rc=1
    case_result "$rc"
fi

# --- over memory ---------------------------------------------------------------

if want data-plugin; then
    begin_case data-plugin
    reference "$IMG/zstd.qcow2"
    rc=0
    run cp "$IMG/zstd.qcow2" img.qcow2 # '<FILE' takes no whitespace
    serve_and_check map -- data "<$CASE_DIR/img.qcow2" || rc=1
    serve_and_check map -- data "<$CASE_DIR/img.qcow2" allocator=zstd || rc=1
    case_result "$rc"
fi

if want memory-plugin; then
    # The memory plugin starts empty: a first nbdkit holds the qcow2 bytes
    # in memory (written over NBD), ours decodes them through the nbd plugin.
    begin_case memory-plugin
    reference "$IMG/zlib.qcow2"
    rc=0
    bytes=$(stat -c %s "$IMG/zlib.qcow2")
    start_bg memory "$CASE_DIR/mem.sock" nbdkit -f -U "$CASE_DIR/mem.sock" memory size="$bytes"
    run nbdcopy "$IMG/zlib.qcow2" "nbd+unix:///?socket=$CASE_DIR/mem.sock"
    serve_and_check map -- nbd socket="$CASE_DIR/mem.sock" || rc=1
    case_result "$rc"
fi

# --- over the nbd plugin, in front of other NBD servers --------------------------

if want nbd-qcbt-server; then
    begin_case nbd-qcbt-server
    reference "$IMG/chain/top.qcow2"
    rc=0
    start_bg qcbt-server "$CASE_DIR/raw.sock" "$SERVER" -f raw -t -k "$CASE_DIR/raw.sock" "$IMG/chain/top.qcow2"
    serve_and_check map -- nbd socket="$CASE_DIR/raw.sock" backing-dir="$IMG/chain" || rc=1
    case_result "$rc"
fi

if want nbd-qemu-nbd; then
    begin_case nbd-qemu-nbd
    reference "$IMG/zstd.qcow2"
    rc=0
    start_bg qemu-nbd "$CASE_DIR/raw.sock" qemu-nbd -r -t -e 16 -f raw -k "$CASE_DIR/raw.sock" "$IMG/zstd.qcow2"
    serve_and_check map -- nbd socket="$CASE_DIR/raw.sock" || rc=1
    case_result "$rc"
fi

# --- stacked with nbdkit's cache and readahead filters ----------------------------

if want stacked; then
    begin_case stacked
    reference "$IMG/chain/top.qcow2"
    rc=0
    # cache below: the qcow2 bytes are cached.
    serve_and_check map -- --filter=cache file "$IMG/chain/top.qcow2" backing-dir="$IMG/chain" || rc=1
    # readahead above (prefetches guest ranges through our .cache), cache below.
    ABOVE=(--filter=readahead)
    serve_and_check map -- --filter=cache file "$IMG/chain/top.qcow2" backing-dir="$IMG/chain" || rc=1
    ABOVE=()
    # A prefetch of the whole guest disk reaches the plugin as prefetches of
    # host ranges, and only of ranges inside the file.
    if nbdkit_start --filter=log file "$IMG/plain.qcow2" logfile="$CASE_DIR/plugin.log"; then
        "$PYTHON" -c '
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
if not h.can_cache():
    sys.exit("cache not offered over the file plugin")
size = h.get_size()
for off in range(0, size, 1 << 20):
    h.cache(min(1 << 20, size - off), off)
h.shutdown()
' "$URI" || rc=1
        nbdkit_stop || rc=1
        fsize=$(stat -c %s "$IMG/plain.qcow2")
        "$PYTHON" - "$CASE_DIR/plugin.log" "$fsize" <<'PYEOF' || rc=1
import re, sys
log, fsize = sys.argv[1], int(sys.argv[2])
n = 0
for line in open(log):
    m = re.search(r"connection=\d+ Cache id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)", line)
    if m:
        off, cnt = int(m[1], 16), int(m[2], 16)
        if off + cnt > fsize:
            sys.exit(f"prefetch past the end of the file: {line.strip()}")
        n += 1
if n == 0:
    sys.exit("no prefetch reached the plugin")
PYEOF
    else
        rc=1
    fi
    # Over a plugin that cannot cache, the filter does not offer it.
    if nbdkit_start --filter=nocache file "$IMG/plain.qcow2" cachemode=none; then
        nbdinfo --json "$URI" | grep '"can_cache": false' >/dev/null ||
            { note "[$CASE] cache offered over a plugin that cannot cache"; rc=1; }
        nbdkit_stop || rc=1
    else
        rc=1
    fi
    case_result "$rc"
fi

# --- the dirty view -------------------------------------------------------------

if want dirty; then
    begin_case dirty
    mkdir -p c
    run qemu-img create -q -f qcow2 c/base.qcow2 $((16 * MiB))
    run qemu-io -f qcow2 -c "write -P 0x01 0 4M" c/base.qcow2
    run qemu-img bitmap --add c/base.qcow2 b0
    run qemu-io -f qcow2 -c "write -P 0x02 1M 64k" -c "write -z $((12 * MiB)) 1M" c/base.qcow2
    run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 c/top.qcow2
    run qemu-img bitmap --add -g 128k c/top.qcow2 b0
    run qemu-io -f qcow2 -c "write -P 0x06 $((7 * MiB + 512)) 1000" -c "discard 0 64k" c/top.qcow2
    reference c/top.qcow2
    rc=0
    "$QCBT" bitmap dump --json c/top.qcow2 b0 >dump.json 2>dump.err ||
        fail "[$CASE] qcbt bitmap dump failed: $(cat dump.err)"
    if nbdkit_start file c/top.qcow2 backing-dir="$CASE_DIR/c" bitmap=b0; then
        if ! timeout 300 nbdinfo --map --json "$URI" >dirty-map.json 2>nbdinfo.err ||
            ! "$PYTHON" "$NBDMAP" dirty dump.json dirty-map.json "$SIZE"; then
            note "[$CASE] the dirty view differs from qcbt bitmap dump: $(cat nbdinfo.err)"
            rc=1
        fi
        timeout 300 nbdcopy --no-extents "$URI" all.raw && cmp ref.raw all.raw ||
            { note "[$CASE] reads through the dirty view are not the guest data"; rc=1; }
        nbdkit_stop || rc=1
    else
        rc=1
    fi
    "$PYTHON" - ref.raw dump.json expected.raw <<'PYEOF'
import json, sys
ref, dump, out = sys.argv[1:4]
data = bytearray(open(ref, "rb").read())
for e in json.load(open(dump)):
    if e["type"] == 0:
        data[e["offset"]:e["offset"] + e["length"]] = bytes(e["length"])
open(out, "wb").write(data)
PYEOF
    if nbdkit_start file c/top.qcow2 backing-dir="$CASE_DIR/c" bitmap=b0 dirty-only=true strict=true; then
        timeout 300 nbdcopy --no-extents "$URI" dirty-only.raw && cmp expected.raw dirty-only.raw ||
            { note "[$CASE] dirty-only reads differ"; rc=1; }
        nbdkit_stop || rc=1
    else
        rc=1
    fi
    case_result "$rc"
fi

# --- flags, debug flags, export names, size change --------------------------------

if want flags; then
    begin_case flags
    run cp "$IMG/plain.qcow2" img.qcow2
    reference img.qcow2
    rc=0
    if nbdkit_start -v -Dqcbt.io=1 file img.qcow2; then
        nbdinfo --json "$URI" >info.json 2>&1 || rc=1
        "$PYTHON" - info.json <<'PYEOF' || rc=1
import json, sys
e = json.load(open(sys.argv[1]))["exports"][0]
want = {"is_read_only": True, "can_multi_conn": True, "can_zero": False,
        "can_fast_zero": False, "can_trim": False, "can_flush": False,
        "can_fua": False, "can_cache": True}
bad = {k: e.get(k) for k, v in want.items() if e.get(k) != v}
if bad:
    sys.exit(f"nbdinfo flags: expected {want}, differing: {bad}")
PYEOF
        # The export name is not passed to the plugin: any name, same image.
        timeout 300 nbdcopy "nbd+unix:///whatever?socket=$CASE_DIR/nbdkit.sock" named.raw && cmp -s ref.raw named.raw ||
            { note "[$CASE] export 'whatever' is not the image"; rc=1; }
        nbdkit_stop || rc=1
        grep -q 'debug: next pread count=' nbdkit.log ||
            { note "[$CASE] -D qcbt.io=1 logged nothing"; rc=1; }
    else
        rc=1
    fi
    # The image grows while nbdkit runs: new connections are refused.
    if nbdkit_start file img.qcow2; then
        run truncate -s +1M img.qcow2
        if nbdinfo --size "$URI" >/dev/null 2>&1; then
            note "[$CASE] a connection to an image that changed size was accepted"
            rc=1
        fi
        nbdkit_stop || rc=1
        grep -q 'changed size' nbdkit.log || { note "[$CASE] no 'changed size' error logged"; rc=1; }
    else
        rc=1
    fi
    expect_start_failure "dirty-only=true needs bitmap=NAME" -- file img.qcow2 dirty-only=true || rc=1
    case_result "$rc"
fi

# --- malformed images ----------------------------------------------------------------

if want malformed; then
    begin_case malformed
    rc=0
    run cp "$IMG/plain.qcow2" magic.qcow2
    printf 'QFI\xfa' | dd of=magic.qcow2 conv=notrunc status=none
    expect_start_failure "bad magic" -- file magic.qcow2 || rc=1
    expect_start_failure "not a qcow2 image" -- data "<$IMG/mixed.raw" || rc=1
    run cp "$IMG/plain.qcow2" incompat.qcow2
    set_header_bit incompat.qcow2 72 20
    expect_start_failure "unsupported incompatible feature" "bit 20" -- file incompat.qcow2 || rc=1
    run cp "$IMG/plain.qcow2" short.qcow2
    run truncate -s 100 short.qcow2
    expect_start_failure "truncated" -- file short.qcow2 || rc=1
    run cp "$IMG/plain.qcow2" nol1.qcow2
    run truncate -s 65536 nol1.qcow2
    expect_start_failure "L1 table" "past the end" -- file nol1.qcow2 || rc=1
    # The same bytes through the nbd plugin.
    start_bg qemu-nbd "$CASE_DIR/raw.sock" qemu-nbd -r -t -f raw -k "$CASE_DIR/raw.sock" incompat.qcow2
    expect_start_failure "unsupported incompatible feature" -- nbd socket="$CASE_DIR/raw.sock" || rc=1
    case_result "$rc"
fi

# --- errors under nbdkit --run (issue 11) ------------------------------------------

# captive NAME CMD -- NBDKIT-ARGS...: nbdkit -U - --filter=qcbt ARGS --run
# CMD; its output in NAME.out, its exit status in CAPTIVE_RC.  Returns 1 if
# it hangs (the bound, $QCBT_WAIT s, only catches hangs) or a sanitizer
# reported.  nbdkit --run forks after binding its socket and the parent
# keeps a copy: a server that exits without answering leaves the
# command's connection queued there for ever.
captive() {
    local name=$1 cmd=$2 marker=$CASE_DIR/$1.cmd-rc pid rc=0
    shift 3
    rm -f "$marker"
    # The command records its status: it ended, whatever nbdkit does next.
    cmd="$cmd"$'\n''r=$?; echo "$r" >'"$(printf %q "$marker")"'; exit "$r"'
    { printf '%q ' env "${NBDKIT_ENV[@]}" nbdkit -U - --filter="$FILTER" "$@" --run "$cmd"
      printf '\n'; } >>"$CASE_DIR/recipe.txt"
    timeout -k 5 "$QCBT_WAIT" env "${NBDKIT_ENV[@]}" nbdkit -U - --filter="$FILTER" "$@" --run "$cmd" \
        >"$name.out" 2>&1 </dev/null &
    pid=$!
    cleanup_pid "$pid"
    if [[ -n $ASAN_EXIT_HANG ]]; then
        # Under libasan nbdkit may hang in exit once the command has ended
        # (probed above; the --run parent then waits for it): not a hang of
        # the filter.  timeout leads its own process group.
        wait_until -t "$QCBT_WAIT" -- captive_ended "$pid" "$marker" || true
        if [[ -s $marker ]] && ! wait_gone "$pid" 10; then
            note "[$CASE] $name: the command ended, nbdkit hung in exit (the libasan exit hang): killed"
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || rc=$?
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        if [[ -z $ASAN_EXIT_HANG || ! -s $marker ]]; then
            note "[$CASE] $name: nbdkit --run hung (killed after ${QCBT_WAIT}s): $(head -n 3 "$name.out")"
            return 1
        fi
        rc=$(cat "$marker")
    fi
    CAPTIVE_RC=$rc
    sanitizer_clean "$name.out"
}
captive_ended() { pid_gone "$1" || [[ -s $2 ]]; }

# captive_refused NAME NEEDLE... -- NBDKIT-ARGS...: a command that connects
# three times (nbdinfo, nbdcopy with 4 connections, nbdinfo) ends promptly
# and non-zero, and an error line of nbdkit names the reason (has every
# NEEDLE).
captive_refused() {
    local name=$1 needles=() n line=
    shift
    while [[ $1 != -- ]]; do
        needles+=("$1")
        shift
    done
    captive "$name" 'nbdinfo --size "$uri"; nbdcopy -C 4 "$uri" null:; nbdinfo --size "$uri"' "$@" || return 1
    if [[ $CAPTIVE_RC -eq 0 ]]; then
        note "[$CASE] $name: nbdkit --run succeeded over a bad image: $(cat "$name.out")"
        return 1
    fi
    while IFS= read -r line; do
        for n in "${needles[@]}"; do
            [[ $line == *"$n"* ]] || continue 2
        done
        note "[$CASE] $name: ok (exit $CAPTIVE_RC): $line"
        return 0
    done < <(grep -F 'nbdkit: error:' "$name.out")
    note "[$CASE] $name: no error line of nbdkit has '${needles[*]}': $(cat "$name.out")"
    return 1
}

if want run-errors; then
    # The filter reads the image in .after_fork, after nbdkit --run has
    # forked: an error there must end the command, not leave it waiting.
    begin_case run-errors
    rc=0
    run truncate -s 10M disk.raw
    captive_refused raw "not a qcow2 image" -- file disk.raw || rc=1
    captive_refused no-backing-dir "backing file 'mid.qcow2'" "backing-dir" -- file "$IMG/chain/top.qcow2" || rc=1
    captive_refused no-bitmap "bitmap 'nope'" -- file "$IMG/chain/top.qcow2" backing-dir="$IMG/chain" bitmap=nope || rc=1
    # The plugin beneath fails in .after_fork too (nothing at socket=).
    captive_refused no-server "cannot open the underlying plugin" -- nbd socket="$CASE_DIR/nothing.sock" || rc=1
    # A good image still serves under --run.
    if captive good 'nbdinfo --size "$uri"' -- file "$IMG/plain.qcow2"; then
        [[ $CAPTIVE_RC -eq 0 && $(head -n 1 good.out) == "$(virtual_size "$IMG/plain.qcow2")" ]] ||
            { note "[$CASE] good: $(cat good.out)"; rc=1; }
    else
        rc=1
    fi
    # Without --run (-f), nbdkit still exits at start with the reason.
    expect_start_failure "not a qcow2 image" -- file disk.raw || rc=1
    expect_start_failure "bitmap 'nope'" -- file "$IMG/chain/top.qcow2" backing-dir="$IMG/chain" bitmap=nope || rc=1
    case_result "$rc"
fi

if want run-malformed; then
    # 150 images mutated from a small qcow2 with bitmaps (fixed seed),
    # copied with nbdcopy (size, extents, reads) under nbdkit --run, half of
    # them with bitmap=: each ends, served or refused with an error; the
    # first hang stops the sweep.
    begin_case run-malformed
    run qemu-img create -q -f qcow2 -o cluster_size=4096 small.qcow2 1M
    run qemu-io -f qcow2 -c "write -P 0x11 0 64k" -c "write -z 128k 64k" small.qcow2
    run qemu-img bitmap --add small.qcow2 b0
    run qemu-io -f qcow2 -c "write -P 0x22 300k 20k" -c "write -P 0x23 900k 4k" small.qcow2
    run "$PYTHON" - small.qcow2 150 <<'PYEOF'
import random, sys
src, n = sys.argv[1], int(sys.argv[2])
data = open(src, "rb").read()
rng = random.Random(20240611)
for i in range(n):
    d = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        if r < 0.5:
            off = rng.randrange(0, 112)  # the header
        elif r < 0.7:
            off = rng.randrange(112, 4096)  # header extensions
        else:
            off = rng.randrange(4096, len(d))  # tables, bitmaps, data
        if rng.random() < 0.5:
            d[off] ^= 1 << rng.randrange(8)
        else:
            d[off] = rng.randrange(256)
    open("m%03d.qcow2" % i, "wb").write(d)
PYEOF
    rc=0 served=0 refused=0
    for ((i = 0; i < 150; i++)); do
        img=$(printf 'm%03d' "$i")
        params=(file "$img.qcow2")
        ((i % 2)) || params+=(bitmap=b0)
        if ! captive "$img" 'nbdcopy -C 1 "$uri" null:' -- "${params[@]}"; then
            rc=1
            break
        fi
        if [[ $CAPTIVE_RC -eq 0 ]]; then
            served=$((served + 1))
        elif grep -q 'error:' "$img.out"; then
            refused=$((refused + 1))
        else
            note "[$CASE] $img: exit $CAPTIVE_RC without an error message: $(head -n 3 "$img.out")"
            rc=1
        fi
    done
    note "[$CASE] $served served, $refused ended with an error"
    # Not vacuous: both outcomes occur.
    if [[ $rc -eq 0 ]] && ((served < 10 || refused < 10)); then
        note "[$CASE] the sweep does not exercise both outcomes"
        rc=1
    fi
    case_result "$rc"
fi

cd "$TMPD" || exit 1
finish_cases
