#!/bin/bash
# Full reads of one qcow2 image: `nbdkit qcbt` vs qcbt-server vs qemu-nbd
# (and `nbdkit --filter=qcbt file`), in one run, warm page cache.
#
#   bench/bench-nbdkit.sh [SCRATCH_DIR]      (default /tmp/qcbt-bench-nbdkit)
#
# Image (deterministic, rebuilt unless REUSE=1 and it exists; ~2.3 GiB of
# scratch): img.qcow2, 4 GiB virtual, 64 KiB clusters, made with one qemu-io
# run: in each 64 MiB region i, 40 MiB written with pattern i and 8 MiB
# written as zeros (write -z), except every 8th region, left unallocated:
# 2240 MiB of data, 448 MiB of zero clusters, the rest holes.
#
# Servers (unix sockets in SCRATCH_DIR, all started up front, read-only):
#   nbdkit-qcbt     nbdkit -f -U S nbdkit-qcbt-plugin.so file=img.qcow2
#   nbdkit-filter   nbdkit -f -U S --filter=nbdkit-qcbt-filter.so file img.qcow2
#   qcbt-server     qcbt-server -f qcow2 -t -e 16 -k S img.qcow2
#   qemu-nbd        qemu-nbd -r -f qcow2 -t -e 16 -k S img.qcow2
#   nbdkit-file-raw nbdkit -f -r -U S file img.raw   (baseline: nbdkit's own
#                   cost on the same guest bytes as a sparse raw file; BASELINE=0
#                   skips it and its ~2.3 GiB of scratch)
# Each server is read once end to end first and its SHA-256 compared with
# `qemu-img convert -O raw` (a correctness gate, untimed).  Then ROUNDS
# rounds (default 5), the server order rotating per round, time
#   (a) nbdcopy URI null:               (maps extents: reads the data only)
#   (b) nbdcopy --no-extents URI null:  (reads all 4 GiB)
# and report median/min/max wall seconds, MiB/s of the bytes read, and the
# ratio of each median to qemu-nbd's.  Markdown on stdout.
#
# Env: QCBT_BUILD_DIR (default: build <repo>/build-nbdkit-bench,
# CMAKE_BUILD_TYPE=Release, and use it), ROUNDS (5), REUSE (0), NBDCOPY_OPTS
# (extra nbdcopy options, e.g. "--connections=1").
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
S=${1:-/tmp/qcbt-bench-nbdkit}
ROUNDS=${ROUNDS:-5}
PY=/usr/bin/python3
MiB=$((1024 * 1024))
read -r -a COPY_OPTS <<<"${NBDCOPY_OPTS:-}"

log() { echo "bench-nbdkit: $*" >&2; }
die() { log "$*"; exit 1; }
for t in qemu-img qemu-io qemu-nbd nbdkit nbdcopy nbdinfo cmake sha256sum; do
    command -v $t >/dev/null || die "missing $t"
done

# --- build ------------------------------------------------------------------
mkdir -p "$S"
S=$(cd "$S" && pwd)
if [[ -z ${QCBT_BUILD_DIR:-} ]]; then
    QCBT_BUILD_DIR=$REPO/build-nbdkit-bench
    log "building qcbt-server and the nbdkit plugin/filter (Release) in $QCBT_BUILD_DIR"
    { cmake -S "$REPO" -B "$QCBT_BUILD_DIR" -DCMAKE_BUILD_TYPE=Release &&
      cmake --build "$QCBT_BUILD_DIR" -j2 \
          --target qcbt-server nbdkit-qcbt-plugin nbdkit-qcbt-filter; } \
        >"$S/build.log" 2>&1 || { tail -30 "$S/build.log" >&2; die "build failed"; }
fi
PLUGIN=$QCBT_BUILD_DIR/plugins/qcbt/nbdkit-qcbt-plugin.so
FILTER=$QCBT_BUILD_DIR/plugins/qcbt-filter/nbdkit-qcbt-filter.so
SERVER=$QCBT_BUILD_DIR/server/qcbt-server
for f in "$PLUGIN" "$FILTER" "$SERVER"; do [[ -f $f ]] || die "missing $f"; done

# --- image ------------------------------------------------------------------
cd "$S"
IMG=$S/img.qcow2
if [[ ${REUSE:-0} == 1 && -s $IMG ]]; then
    log "reusing $IMG"
else
    avail=$(df -Pk "$S" | awk 'NR==2 {print $4}')
    ((avail > 4 * 1024 * 1024)) || die "$S: need ~4 GiB free"
    log "building $IMG (4 GiB virtual, ~2.3 GiB of data)"
    rm -f "$IMG"
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$IMG" 4G
    cmds=()
    for ((i = 0; i < 64; i++)); do
        ((i % 8 == 7)) && continue
        base=$((i * 64 * MiB))
        cmds+=(-c "write -P $((i & 0xff)) $base 40M" -c "write -z $((base + 48 * MiB)) 8M")
    done
    qemu-io -f qcow2 "${cmds[@]}" "$IMG" >/dev/null
fi
VIRT=$(qemu-img info --output=json "$IMG" | $PY -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
DATA=$(qemu-img map --output=json "$IMG" |
    $PY -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))')
log "reference digest (qemu-img convert -O raw)"
rm -f "$S/img.raw"
qemu-img convert -O raw "$IMG" "$S/img.raw"
REF_SHA=$(sha256sum "$S/img.raw" | cut -d' ' -f1)

# --- servers ------------------------------------------------------------------
declare -A PID CMD
NAMES=(nbdkit-qcbt nbdkit-filter qcbt-server qemu-nbd)
[[ ${BASELINE:-1} == 1 ]] && NAMES+=(nbdkit-file-raw)
stop_all() {
    local n
    for n in "${!PID[@]}"; do
        kill "${PID[$n]}" 2>/dev/null || true
        wait "${PID[$n]}" 2>/dev/null || true
    done
    rm -f "$S"/*.sock "$S/img.raw"
}
trap stop_all EXIT
start() { # NAME CMD...
    local name=$1 sock=$S/$1.sock i
    shift
    rm -f "$sock"
    CMD[$name]="$*"
    "$@" >"$S/$name.log" 2>&1 </dev/null &
    PID[$name]=$!
    for ((i = 0; i < 600; i++)); do
        kill -0 "${PID[$name]}" 2>/dev/null || die "$name exited: $(cat "$S/$name.log")"
        [[ -S $sock ]] && nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$name did not come up"
}
uri() { echo "nbd+unix:///?socket=$S/$1.sock"; }
start nbdkit-qcbt nbdkit -f -r -U "$S/nbdkit-qcbt.sock" "$PLUGIN" file="$IMG"
start nbdkit-filter nbdkit -f -r -U "$S/nbdkit-filter.sock" --filter="$FILTER" file "$IMG"
start qcbt-server "$SERVER" -f qcow2 -t -e 16 -k "$S/qcbt-server.sock" "$IMG"
start qemu-nbd qemu-nbd -r -f qcow2 -t -e 16 -k "$S/qemu-nbd.sock" "$IMG"
if [[ ${BASELINE:-1} == 1 ]]; then
    start nbdkit-file-raw nbdkit -f -r -U "$S/nbdkit-file-raw.sock" file "$S/img.raw"
else
    rm -f "$S/img.raw"
fi

# --- correctness gate (also warms the page cache) -------------------------------
for n in "${NAMES[@]}"; do
    sha=$(nbdcopy "$(uri "$n")" - | sha256sum | cut -d' ' -f1)
    [[ $sha == "$REF_SHA" ]] || die "$n: sha256 $sha != qemu-img convert $REF_SHA"
    log "$n: data ok"
done

# --- timed rounds -----------------------------------------------------------------
RES=$S/results.txt
: >"$RES"
now() { date +%s.%N; }
for ((r = 0; r < ROUNDS; r++)); do
    for ((k = 0; k < ${#NAMES[@]}; k++)); do
        n=${NAMES[$(((k + r) % ${#NAMES[@]}))]}
        for mode in extents no-extents; do
            opts=("${COPY_OPTS[@]}")
            [[ $mode == no-extents ]] && opts+=(--no-extents)
            t0=$(now)
            nbdcopy "${opts[@]}" "$(uri "$n")" null:
            t1=$(now)
            echo "$mode $n $t0 $t1" >>"$RES"
        done
    done
    log "round $((r + 1))/$ROUNDS done"
done

# --- report -----------------------------------------------------------------------
echo "## nbdkit qcbt vs qcbt-server vs qemu-nbd: full reads with nbdcopy"
echo
echo "Image: 4 GiB virtual qcow2, 64 KiB clusters, $((DATA / MiB)) MiB data" \
     "(qemu-io patterns), the rest zero clusters and holes; warm page cache;" \
     "$ROUNDS rounds, server order rotating; wall seconds of one nbdcopy to null:."
echo
echo "Servers:"
for n in "${NAMES[@]}"; do echo "- $n: \`${CMD[$n]}\`"; done
echo
echo "Versions: $(nbdkit --version), $(qemu-nbd --version | head -1), $(nbdcopy --version | head -1);" \
     "qcbt $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?') + working tree;" \
     "$(nproc) CPUs; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)."
echo
$PY - "$RES" "$DATA" "$VIRT" "${NAMES[@]}" <<'PYEOF'
import statistics, sys
res, data, virt, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
t = {}
for line in open(res):
    mode, n, t0, t1 = line.split()
    t.setdefault((mode, n), []).append(float(t1) - float(t0))
for mode, nbytes, title in (("extents", data, "nbdcopy URI null: (reads the data extents)"),
                            ("no-extents", virt, "nbdcopy --no-extents URI null: (reads all 4 GiB)")):
    print(f"### {title}\n")
    print("| server | median s | min s | max s | MiB/s (median) | median / qemu-nbd |")
    print("|---|---:|---:|---:|---:|---:|")
    base = statistics.median(t[(mode, "qemu-nbd")])
    for n in names:
        v = t[(mode, n)]
        m = statistics.median(v)
        print(f"| {n} | {m:.3f} | {min(v):.3f} | {max(v):.3f} | {nbytes / 2**20 / m:.0f} | {m / base:.2f} |")
    print()
PYEOF
