#!/bin/bash
# nbdkit-qcbt-plugin under the stock nbdkit (plugins/qcbt).
#
# Oracles are QEMU's tools and qcbt's own bitmap dump:
#   - data: nbdcopy of the export == `qemu-img convert -O raw`, and
#     `qemu-img compare` of the reference against the NBD URI, for a plain
#     image (odd size), zlib and zstd compressed images, extended L2, and a
#     3-layer chain with a raw base;
#   - allocation: `nbdinfo --map --json` == `qemu-img map --output=json`
#     (data <-> no hole flag, zero <-> zero flag) at every byte;
#   - dirty view (bitmap=NAME): `nbdinfo --map` == `qcbt bitmap dump --json`
#     (dirty <-> type 0, clean <-> type 1, or type 3 with dirty-only=true),
#     strict and tolerant, with the strict refusal; dirty-only reads (clean
#     ranges are zeros) with `nbdcopy --no-extents` and
#     `nbdcopy --destination-is-zero`; nbdcopy (extents on) of the dirty
#     view without dirty-only copies the guest data;
#   - flags (read-only, multi-conn, no zero/fast zero, cache), --dump-plugin
#     fields, -D qcbt.* debug flags;
#   - malformed images (bad magic, unknown incompatible bit, truncated,
#     missing backing file): nbdkit exits non-zero at start with one error
#     naming the reason; damage found while reading is an I/O error, and
#     nbdkit keeps serving.
# An ASan-built plugin (cmake -DQCBT_SANITIZE=ON) is detected and run under
# nbdkit with libasan preloaded; any sanitizer report fails the test.
#
# QCBT_KEEP_TMP=1 keeps the images.  QCBT_CASES=REGEX runs matching cases.

. "$(dirname "$0")/../functions.sh"
requires nbdkit nbdinfo nbdcopy qemu-img qemu-io cmp truncate ldd nm

MiB=$((1024 * 1024))
BUILD=${QCBT_BUILD_DIR:-$TESTS_DIR/../build}
PLUGIN=$BUILD/plugins/qcbt/nbdkit-qcbt-plugin.so
[[ -f $PLUGIN ]] || fail "plugin not built: $PLUGIN (set QCBT_BUILD_DIR)"
PLUGIN=$(cd "$(dirname "$PLUGIN")" && pwd)/$(basename "$PLUGIN")

want() { [[ -z ${QCBT_CASES:-} || $1 =~ $QCBT_CASES ]]; }

# --- nbdkit, with libasan preloaded for an ASan-built plugin ---------------

NBDKIT_ENV=()
if nm -D "$PLUGIN" 2>/dev/null | grep '__asan_init' >/dev/null ||
    ldd "$PLUGIN" 2>/dev/null | grep libasan >/dev/null; then
    libasan=$(ldd "$PLUGIN" | awk '/libasan/ { print $3; exit }')
    [[ -n $libasan && -f $libasan ]] || libasan=$(gcc -print-file-name=libasan.so)
    [[ -f $libasan ]] || fail "ASan-built plugin but no libasan found to preload"
    NBDKIT_ENV=(LD_PRELOAD="$libasan" ASAN_OPTIONS=detect_leaks=0
                UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1)
    note "ASan-built plugin: nbdkit runs with LD_PRELOAD=$libasan"
fi

# sanitizer_clean LOG: no sanitizer report in LOG.
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

# nbdkit_start ARGS...: nbdkit -f on a unix socket in the case directory;
# ARGS starting with '-' are nbdkit options, the others plugin parameters.
# Waits until it answers.  Sets URI and NBDKIT_PID.  Returns 1 (and prints
# the log) if it does not come up.
nbdkit_start() {
    local sock=$CASE_DIR/nbdkit.sock log=$CASE_DIR/nbdkit.log i a opts=() params=()
    for a in "$@"; do
        if [[ $a == -* ]]; then opts+=("$a"); else params+=("$a"); fi
    done
    rm -f "$sock"
    : >"$log"
    { printf '%q ' env "${NBDKIT_ENV[@]}" nbdkit -f "${opts[@]}" -U "$sock" "$PLUGIN" "${params[@]}"
      printf '&\n'; } >>"$CASE_DIR/recipe.txt"
    env "${NBDKIT_ENV[@]}" nbdkit -f "${opts[@]}" -U "$sock" "$PLUGIN" "${params[@]}" \
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

# nbdkit_stop: stop the server; 1 if it had died or reported a sanitizer
# error.
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

# expect_start_failure NEEDLE... -- ARGS...: nbdkit with the plugin and ARGS
# exits non-zero (not by a signal) without serving, and its stderr has an
# error line containing every NEEDLE (fixed strings).
expect_start_failure() {
    local needles=() a rc=0 err=$CASE_DIR/start-failure.err n
    while [[ $# -gt 0 ]]; do
        a=$1
        shift
        [[ $a == -- ]] && break
        needles+=("$a")
    done
    { printf '%q ' env "${NBDKIT_ENV[@]}" nbdkit -f -U "$CASE_DIR/fail.sock" "$PLUGIN" "$@"; printf '  # must fail\n'; } \
        >>"$CASE_DIR/recipe.txt"
    timeout -k 5 "$FAIL_TIMEOUT" env "${NBDKIT_ENV[@]}" nbdkit -f -U "$CASE_DIR/fail.sock" "$PLUGIN" "$@" \
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

# dirty_only_expected REF.raw DUMP.json OUT: REF with clean ranges zeroed.
dirty_only_expected() {
    "$PYTHON" - "$@" <<'PYEOF'
import json, sys
ref, dump, out = sys.argv[1:4]
data = bytearray(open(ref, "rb").read())
for e in json.load(open(dump)):
    if e["type"] == 0:
        data[e["offset"]:e["offset"] + e["length"]] = bytes(e["length"])
open(out, "wb").write(data)
PYEOF
}

# mixed_raw FILE SIZE: deterministic data mixing incompressible, compressible
# and zero 4 KiB blocks.
mixed_raw() {
    run "$PYTHON" -c '
import random, sys
path, size = sys.argv[1], int(sys.argv[2])
rng = random.Random(20240607)
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
        blk = ((b"qcbt nbdkit %08d " % i) * 256)[:4096]
    out += blk
    i += 1
open(path, "wb").write(out[:size])
' "$1" "$2"
}

# pattern IMG FMT C: deterministic qemu-io writes scaled to cluster size C:
# full, partial and straddling writes, zero writes with and without -u,
# discards, subcluster-sized writes, and the last sector.
pattern() {
    local img=$1 fmt=$2 c=$3 size sc
    size=$(virtual_size "$img" "$fmt")
    sc=$((c / 32))
    ((sc >= 512)) || sc=512
    run qemu-io -f "$fmt" \
        -c "write -P 0x11 0 $c" \
        -c "write -P 0x12 $((c + c / 2)) $c" \
        -c "write -P 0x13 $((3 * c + 100)) 300" \
        -c "write -P 0x14 $((5 * c - 700)) 1400" \
        -c "write -P 0x15 $((9 * c)) $((2 * c))" \
        -c "write -z $((9 * c)) $c" \
        -c "write -z -u $((12 * c)) $((2 * c))" \
        -c "write -P 0x16 $((14 * c)) $c" \
        -c "write -z $((16 * c)) $c" \
        -c "write -P 0x17 $((17 * c)) $((3 * c))" \
        -c "discard $((18 * c)) $c" \
        -c "write -P 0x1c $((28 * c + 3 * sc)) $((2 * sc))" \
        -c "write -z $((28 * c + 10 * sc)) $sc" \
        -c "write -P 0x1d $((30 * c + 7 * sc)) $((3 * sc))" \
        -c "write -P 0x1a $((size - 512)) 512" \
        "$img"
}

# check_served IMG [PLUGIN-ARGS...]: serve IMG with the plugin and compare
# data (nbdcopy + cmp, qemu-img compare) and allocation (nbdinfo --map)
# with qemu.  Returns 1 on any difference.
check_served() {
    local img=$1 size rc=0
    shift
    size=$(virtual_size "$img")
    run qemu-img convert -O raw "$img" ref.raw
    [[ $(stat -c %s ref.raw) -eq $size ]] || run truncate -s "$size" ref.raw
    qemu-img map --output=json "$img" >qemu-map.json ||
        fail "[$CASE] qemu-img map failed on $img"
    nbdkit_start "file=$img" "$@" || return 1
    if ! timeout 300 nbdcopy "$URI" nbd.raw 2>nbdcopy.err; then
        note "[$CASE] nbdcopy failed: $(cat nbdcopy.err)"
        rc=1
    elif ! cmp ref.raw nbd.raw >cmp.out 2>&1; then
        note "[$CASE] nbdcopy of the export differs from qemu-img convert -O raw: $(cat cmp.out)"
        rc=1
    fi
    if ! timeout 300 qemu-img compare -f raw -F raw ref.raw "$URI" >compare.out 2>&1; then
        note "[$CASE] qemu-img compare ref.raw $URI: $(cat compare.out)"
        rc=1
    fi
    if ! timeout 300 nbdinfo --map --json "$URI" >nbd-map.json 2>nbdinfo.err; then
        note "[$CASE] nbdinfo --map failed: $(cat nbdinfo.err)"
        rc=1
    elif ! "$PYTHON" "$NBDMAP" alloc qemu-map.json nbd-map.json "$size"; then
        note "[$CASE] nbdinfo --map differs from qemu-img map"
        rc=1
    fi
    nbdkit_stop || rc=1
    return "$rc"
}

# --- data and allocation ------------------------------------------------------

if want plain; then
    begin_case plain
    run qemu-img create -q -f qcow2 img.qcow2 $((10000000))
    pattern img.qcow2 qcow2 65536
    rc=0
    check_served img.qcow2 || rc=1
    case_result "$rc"
fi

begin_case src
recipe_note "source data for the compress-* cases"
mixed_raw "$TMPD/src/mixed.raw" $((3 * MiB + 5 * 4096 + 512))

for ctype in zlib zstd; do
    name=compress-$ctype
    want "$name" || continue
    begin_case "$name"
    run qemu-img convert -c -f raw -O qcow2 -o cluster_size=65536,compression_type=$ctype \
        "$TMPD/src/mixed.raw" img.qcow2
    # Overwrite parts of compressed clusters too (COW of compressed data).
    run qemu-io -f qcow2 -c "write -P 0x5a $((65536 + 100)) 200" -c "write -z $((3 * 65536)) 65536" \
        -c "discard $((5 * 65536)) 65536" img.qcow2
    rc=0
    check_served img.qcow2 || rc=1
    case_result "$rc"
done

if want extl2; then
    begin_case extl2
    run qemu-img create -q -f qcow2 -o cluster_size=65536,extended_l2=on img.qcow2 $((8 * MiB))
    pattern img.qcow2 qcow2 65536
    rc=0
    check_served img.qcow2 || rc=1
    case_result "$rc"
fi

if want chain3-rawbase; then
    # base.raw <- mid.qcow2 <- top.qcow2, relative names, every byte of the
    # base written so any read-through shows; top is larger than the base.
    begin_case chain3-rawbase
    mkdir -p sub
    run qemu-img create -q -f raw sub/base.raw $((6 * MiB))
    run qemu-io -f raw -c "write -P 0xa5 0 $((6 * MiB))" -c "write -P 0xa6 $((3 * MiB)) 4096" sub/base.raw
    run qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.raw -F raw sub/mid.qcow2 $((6 * MiB))
    pattern sub/mid.qcow2 qcow2 4096
    run qemu-img create -q -f qcow2 -b sub/mid.qcow2 -F qcow2 top.qcow2 $((8 * MiB))
    pattern top.qcow2 qcow2 65536
    run qemu-io -f qcow2 -c "write -P 0x77 $((5 * MiB)) 100000" -c "write -z $((2 * MiB)) 300000" top.qcow2
    rc=0
    check_served top.qcow2 || rc=1
    # The format is recorded: format=auto (probe) serves the same.
    nbdkit_start file=top.qcow2 format=auto || rc=1
    timeout 300 nbdcopy "$URI" auto.raw && cmp ref.raw auto.raw || { note "[$CASE] format=auto differs"; rc=1; }
    nbdkit_stop || rc=1
    case_result "$rc"
fi

# --- the dirty view -------------------------------------------------------------

# A 3-layer chain made the libvirt way: bitmap b0 created in the base, a
# same-named empty bitmap added to each overlay when it is created (the top
# one at a coarser granularity), writes in every layer.  chainx: the same
# but the middle layer was made by a tool that does not propagate bitmaps.
make_bitmap_chain() { # DIR MID-HAS-BITMAP
    local d=$1 midbm=$2
    mkdir -p "$d"
    run qemu-img create -q -f qcow2 "$d/base.qcow2" $((16 * MiB))
    run qemu-io -f qcow2 -c "write -P 0x01 0 4M" "$d/base.qcow2"
    run qemu-img bitmap --add "$d/base.qcow2" b0
    run qemu-io -f qcow2 -c "write -P 0x02 1M 64k" -c "write -P 0x03 $((9 * MiB + 5000)) 70000" \
        -c "write -z $((12 * MiB)) 1M" "$d/base.qcow2"
    run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$d/mid.qcow2"
    [[ $midbm == yes ]] && run qemu-img bitmap --add "$d/mid.qcow2" b0
    run qemu-io -f qcow2 -c "write -P 0x04 $((5 * MiB)) 300k" -c "discard 0 64k" \
        -c "write -P 0x05 $((15 * MiB)) 1M" "$d/mid.qcow2"
    run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$d/top.qcow2"
    run qemu-img bitmap --add -g 256k "$d/top.qcow2" b0
    run qemu-io -f qcow2 -c "write -P 0x06 $((7 * MiB + 512)) 1000" -c "write -z $((2 * MiB)) 128k" \
        "$d/top.qcow2"
}

# check_dirty IMG DUMP-ARGS -- PLUGIN-ARGS: the dirty view's map equals
# `qcbt bitmap dump --json DUMP-ARGS IMG b0`.
check_dirty() {
    local img=$1 dargs=() size rc=0
    shift
    while [[ $1 != -- ]]; do
        dargs+=("$1")
        shift
    done
    shift
    size=$(virtual_size "$img")
    "$QCBT" bitmap dump --json "${dargs[@]}" "$img" b0 >dump.json 2>dump.err ||
        fail "[$CASE] qcbt bitmap dump failed: $(cat dump.err)"
    nbdkit_start "file=$img" bitmap=b0 "$@" || return 1
    if ! timeout 300 nbdinfo --map --json "$URI" >dirty-map.json 2>nbdinfo.err; then
        note "[$CASE] nbdinfo --map failed: $(cat nbdinfo.err)"
        rc=1
    elif ! "$PYTHON" "$NBDMAP" dirty dump.json dirty-map.json "$size"; then
        note "[$CASE] the dirty view differs from qcbt bitmap dump ${dargs[*]}"
        rc=1
    fi
    # Without dirty-only, reads are the real data everywhere.
    if ! timeout 300 nbdcopy --no-extents "$URI" all.raw 2>nbdcopy.err || ! cmp -s ref.raw all.raw; then
        note "[$CASE] reads through the dirty view are not the guest data $(cat nbdcopy.err)"
        rc=1
    fi
    nbdkit_stop || rc=1
    return "$rc"
}

if want dirty-chain; then
    begin_case dirty-chain
    make_bitmap_chain c yes
    run qemu-img convert -O raw c/top.qcow2 ref.raw
    rc=0
    check_dirty c/top.qcow2 -- || rc=1
    check_dirty c/top.qcow2 --strict -- strict=true || rc=1
    # A dirty view is not empty here (sanity of the oracle).
    grep -q '"type": 1' dump.json || { note "[$CASE] dump has no dirty extent"; rc=1; }

    # dirty-only: every read of a clean range is zeros (nbdcopy reads
    # everything with --no-extents), and a copier that skips holes copies
    # just the changes into an empty destination.
    dirty_only_expected ref.raw dump.json expected.raw
    size=$(virtual_size c/top.qcow2)
    if nbdkit_start file=c/top.qcow2 bitmap=b0 dirty-only=true; then
        if ! timeout 300 nbdcopy --no-extents "$URI" dirty-only.raw 2>nbdcopy.err ||
            ! cmp expected.raw dirty-only.raw >cmp.out 2>&1; then
            note "[$CASE] dirty-only reads: $(cat nbdcopy.err cmp.out)"
            rc=1
        fi
        run truncate -s "$size" dest.raw
        if ! timeout 300 nbdcopy --destination-is-zero "$URI" dest.raw 2>nbdcopy.err ||
            ! cmp expected.raw dest.raw >cmp.out 2>&1; then
            note "[$CASE] nbdcopy --destination-is-zero of the dirty-only view: $(cat nbdcopy.err cmp.out)"
            rc=1
        fi
        nbdkit_stop || rc=1
    else
        rc=1
    fi
    case_result "$rc"
fi

if want dirty-tolerant; then
    begin_case dirty-tolerant
    make_bitmap_chain c no
    run qemu-img convert -O raw c/top.qcow2 ref.raw
    rc=0
    # Tolerant (default): the middle layer contributes its allocation.
    check_dirty c/top.qcow2 -- || rc=1
    # -v logs the fallback layer.
    { nbdkit_start -v file=c/top.qcow2 bitmap=b0 && nbdkit_stop; } || rc=1
    grep -q "mid.qcow2.*contributes its allocation map" nbdkit.log ||
        { note "[$CASE] -v does not log the fallback layer"; rc=1; }
    # Strict: refused at start, naming the bitmap and the layer.
    expect_start_failure "b0" "strict" "layer 1" -- file=c/top.qcow2 bitmap=b0 strict=true || rc=1
    expect_start_failure "nosuch" -- file=c/top.qcow2 bitmap=nosuch || rc=1
    case_result "$rc"
fi

# --- flags, dump-plugin, debug flags, parameters -------------------------------

if want flags; then
    begin_case flags
    run qemu-img create -q -f qcow2 img.qcow2 $((4 * MiB))
    pattern img.qcow2 qcow2 65536
    rc=0
    env "${NBDKIT_ENV[@]}" nbdkit "$PLUGIN" --dump-plugin >dump-plugin.txt 2>&1 ||
        { note "[$CASE] --dump-plugin failed: $(cat dump-plugin.txt)"; rc=1; }
    for f in 'qcbt_version=[0-9]+\.[0-9]+' 'qcbt_meta_contexts=base:allocation' \
             'qcbt_bitmap=yes' 'qcbt_compression=.*zstd' 'thread_model=parallel' \
             'has_extents=1'; do
        grep -qE "^$f" dump-plugin.txt || { note "[$CASE] --dump-plugin lacks /$f/"; rc=1; }
    done
    if nbdkit_start -v -Dqcbt.extents=1 -Dqcbt.reads=1 file=img.qcow2; then
        nbdinfo --json "$URI" >info.json 2>&1 || rc=1
        "$PYTHON" - info.json <<'PYEOF' || rc=1
import json, sys
e = json.load(open(sys.argv[1]))["exports"][0]
want = {"is_read_only": True, "can_multi_conn": True, "can_zero": False,
        "can_fast_zero": False, "can_trim": False, "can_cache": True}
bad = {k: e.get(k) for k, v in want.items() if e.get(k) != v}
if bad:
    sys.exit(f"nbdinfo flags: expected {want}, differing: {bad}")
if "qcbt" not in e.get("description", ""):
    sys.exit(f"no qcbt export description: {e.get('description')!r}")
PYEOF
        nbdinfo --map "$URI" >/dev/null 2>&1 || rc=1
        timeout 300 nbdcopy "$URI" null: || rc=1
        # A write must be refused.
        if "$PYTHON" -c '
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    h.pwrite(b"x" * 512, 0)
except nbd.Error:
    sys.exit(0)
sys.exit("a write succeeded")
' "$URI" 2>write.err; then :; else
            note "[$CASE] write: $(cat write.err)"
            rc=1
        fi
        nbdkit_stop || rc=1
        grep -q 'debug: extent offset=' nbdkit.log ||
            { note "[$CASE] -D qcbt.extents=1 logged nothing"; rc=1; }
        grep -q 'debug: guest read count=' nbdkit.log ||
            { note "[$CASE] -D qcbt.reads=1 logged nothing"; rc=1; }
    else
        rc=1
    fi
    # Without the debug flags, requests are not logged.
    if nbdkit_start -v file=img.qcow2; then
        nbdinfo --map "$URI" >/dev/null 2>&1 || rc=1
        nbdkit_stop || rc=1
        ! grep -q 'debug: extent offset=' nbdkit.log ||
            { note "[$CASE] extents logged without -D qcbt.extents=1"; rc=1; }
    else
        rc=1
    fi
    expect_start_failure "dirty-only=true needs bitmap=NAME" -- file=img.qcow2 dirty-only=true || rc=1
    expect_start_failure "file=IMAGE" -- format=qcow2 || rc=1
    expect_start_failure "format" -- file=img.qcow2 format=vmdk || rc=1
    case_result "$rc"
fi

# --- malformed images -------------------------------------------------------------

if want malformed; then
    begin_case malformed
    run qemu-img create -q -f qcow2 good.qcow2 $((4 * MiB))
    pattern good.qcow2 qcow2 65536
    rc=0
    run cp good.qcow2 magic.qcow2
    printf 'QFI\xfa' | dd of=magic.qcow2 conv=notrunc status=none
    expect_start_failure "bad magic" "magic.qcow2" -- file=magic.qcow2 || rc=1
    run cp good.qcow2 incompat.qcow2
    set_header_bit incompat.qcow2 72 20
    expect_start_failure "unsupported incompatible feature" "bit 20" -- file=incompat.qcow2 || rc=1
    run cp good.qcow2 short.qcow2
    run truncate -s 100 short.qcow2
    expect_start_failure "truncated" -- file=short.qcow2 || rc=1
    run cp good.qcow2 nol1.qcow2
    run truncate -s 65536 nol1.qcow2
    expect_start_failure "L1 table" "past the end" -- file=nol1.qcow2 || rc=1
    run qemu-img create -q -u -f qcow2 -b gone.qcow2 -F qcow2 orphan.qcow2 $((4 * MiB))
    expect_start_failure "gone.qcow2" "cannot open backing file" -- file=orphan.qcow2 || rc=1
    expect_start_failure "nonexistent.qcow2" -- file=nonexistent.qcow2 || rc=1
    # A raw file is not served as qcow2 unless asked for.
    run qemu-img create -q -f raw plain.raw $((1 * MiB))
    expect_start_failure "not a qcow2 image" -- file=plain.raw || rc=1
    # Damage found only when reading (an L2 table past the end of the
    # file): an I/O error for that request, and nbdkit keeps serving.
    run cp good.qcow2 nol2.qcow2
    run truncate -s 200000 nol2.qcow2
    if nbdkit_start file=nol2.qcow2; then
        if nbdcopy "$URI" bad.raw 2>nbdcopy.err; then
            note "[$CASE] reading an image whose L2 table is missing succeeded"
            rc=1
        fi
        nbdinfo --size "$URI" >/dev/null 2>&1 ||
            { note "[$CASE] nbdkit stopped serving after a read error"; rc=1; }
        nbdkit_stop || rc=1
        grep -q 'L2 table offset .* past the end of the file' nbdkit.log ||
            { note "[$CASE] the read error was not logged: $(tail -n 3 nbdkit.log)"; rc=1; }
    else
        rc=1
    fi
    case_result "$rc"
fi

# --- the dirty view's zero flag (issue 11) -------------------------------------

if want dirty-zero-flag; then
    # NBD_STATE_ZERO promises that reads return zeros.  Without dirty-only
    # reads of clean ranges return the guest data, so clean is a hole
    # without the zero flag, and nbdcopy (which trusts the flag and writes
    # zeros there) copies the guest data.  With dirty-only=true clean reads
    # are zeros, and the flag is back.
    begin_case dirty-zero-flag
    make_bitmap_chain c yes
    run qemu-img convert -O raw c/top.qcow2 ref.raw
    size=$(virtual_size c/top.qcow2)
    "$QCBT" bitmap dump --json c/top.qcow2 b0 >dump.json 2>dump.err ||
        fail "[$CASE] qcbt bitmap dump failed: $(cat dump.err)"
    dirty_only_expected ref.raw dump.json expected.raw
    rc=0
    for view in all dirty-only; do
        params=(file=c/top.qcow2 bitmap=b0)
        [[ $view == dirty-only ]] && params+=(dirty-only=true)
        cmd='nbdcopy "$uri" '"$view"'.raw && nbdinfo --map --json "$uri" >'"$view"'-map.json'
        { printf '%q ' env "${NBDKIT_ENV[@]}" nbdkit -U - "$PLUGIN" "${params[@]}" --run "$cmd"
          printf '\n'; } >>"$CASE_DIR/recipe.txt"
        if ! timeout 300 env "${NBDKIT_ENV[@]}" nbdkit -U - "$PLUGIN" "${params[@]}" --run "$cmd" \
            >run.out 2>&1 </dev/null; then
            note "[$CASE] $view: nbdkit --run nbdcopy, nbdinfo failed: $(cat run.out)"
            rc=1
            continue
        fi
        sanitizer_clean run.out || rc=1
        if [[ $view == all ]]; then
            cmp ref.raw all.raw >cmp.out 2>&1 ||
                { note "[$CASE] nbdcopy of the dirty view is not the guest data: $(cat cmp.out)"; rc=1; }
            "$PYTHON" "$NBDMAP" dirty dump.json all-map.json "$size" ||
                { note "[$CASE] clean ranges of the dirty view are not hole-only (type 1)"; rc=1; }
        else
            cmp expected.raw dirty-only.raw >cmp.out 2>&1 ||
                { note "[$CASE] nbdcopy of the dirty-only view: $(cat cmp.out)"; rc=1; }
            "$PYTHON" "$NBDMAP" dirty-only dump.json dirty-only-map.json "$size" ||
                { note "[$CASE] clean ranges of the dirty-only view are not hole+zero (type 3)"; rc=1; }
        fi
    done
    # Not vacuous: clean ranges hold data (zeroing them changes the disk).
    if cmp -s ref.raw expected.raw; then
        note "[$CASE] no clean range holds data: the case tests nothing"
        rc=1
    fi
    case_result "$rc"
fi

cd "$TMPD" || exit 1
finish_cases
