#!/bin/bash
# qcbt-server vs qemu-nbd vs nbdkit file, one run, same images, warm cache.
#
#   bench/bench-server.sh SCRATCH_DIR
#
# Images: /work/shared/bench/mkimage.sh SCRATCH_DIR (skipped when a.qcow2,
# a.raw, frag.qcow2, top.qcow2 and their .ext files are already there; ~13 GiB).
# Servers, each on a private unix socket in SCRATCH_DIR, all started up front,
# stopped by PID at the end (idle ones use no CPU):
#   qcbt-server -r -f qcow2 -t -e 16 -k S/qcbt-a.sock -B b0 a.qcow2  (and qcbt-f.sock: -B f0 frag.qcow2)
#   qemu-nbd -r -f qcow2 --persistent --shared=16 -k S/qemu-a.sock -B b0 a.qcow2  (and frag)
#   nbdkit -r -f -U S/nbdkit-a.sock file a.raw
# Measurements (each: WARMUP warm-up rounds, then N counted rounds; in every
# round each server runs the command once, the server order rotating per
# round, so slow drift on this shared 2-CPU machine hits all servers alike):
#   (a) nbdcopy URI null:                          a.qcow2 / a.raw, all three
#   (b) client_pull.py URI BITMAP out $PULL_OPTS   b0 on a.qcow2, f0 on frag.qcow2
#       (default 4 conns x depth 8; $PULL2_OPTS, default 1 conn x depth 16, as
#       extra rows; PULL2_OPTS= to skip); qcbt and qemu-nbd only
#   (c) nbdinfo --map=qemu:dirty-bitmap:f0 URI     (and b0, informational)
# timeit.py (shared harness) records wall, client CPU and server CPU
# (utime+stime of the server PID from /proc/PID/stat before/after each run).
# Every pull's SHA-256 must be the same for every server and equal the one
# computed from a raw copy; qcbt's maps are checked against the .ext files.
#
# Env: N (5), WARMUP (1), PULL_OPTS, PULL2_OPTS, QCBT_SERVER (default: build
# <repo>/build-bench with CMAKE_BUILD_TYPE=Release and use it), SHARED_BENCH
# (/work/shared/bench), QCBT_THREADS (qcbt-server -T; default: its own, 4).
# Output: markdown on stdout; raw records in SCRATCH_DIR/bench-server.jsonl.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 SCRATCH_DIR" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SB=${SHARED_BENCH:-/work/shared/bench}
PY=/usr/bin/python3
N=${N:-5} WARMUP=${WARMUP:-1}
PULL_OPTS=${PULL_OPTS---conns 4 --depth 8}
PULL2_OPTS=${PULL2_OPTS---conns 1 --depth 16}
mkdir -p "$1"
S=$(cd "$1" && pwd)
RES=$S/bench-server.jsonl WARM=$S/bench-server-warmup.jsonl
LOGS=$S/bench-server-logs
log() { echo "bench-server: $*" >&2; }
die() { log "$*"; exit 1; }

for t in qemu-img qemu-nbd nbdkit nbdcopy nbdinfo cmake; do
    command -v $t >/dev/null || die "missing $t"
done
$PY -c 'import nbd' 2>/dev/null || die "$PY has no nbd module (python3-libnbd)"

# --- our server -------------------------------------------------------------
if [ -z "${QCBT_SERVER:-}" ]; then
    log "building qcbt-server (Release) in $REPO/build-bench"
    mkdir -p "$S"
    { cmake -S "$REPO" -B "$REPO/build-bench" -DCMAKE_BUILD_TYPE=Release &&
      cmake --build "$REPO/build-bench" -j2 --target qcbt-server; } \
        >"$S/bench-server-build.log" 2>&1 ||
        { tail -30 "$S/bench-server-build.log" >&2; die "build failed"; }
    QCBT_SERVER=$REPO/build-bench/server/qcbt-server
    SRC_NOTE="built from $REPO at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    SRC_NOTE+=" + $(git -C "$REPO" status --porcelain 2>/dev/null | grep -c . || true) uncommitted paths"
else
    SRC_NOTE="given as QCBT_SERVER"
fi
[ -x "$QCBT_SERVER" ] || die "no qcbt-server at $QCBT_SERVER"

# --- images -----------------------------------------------------------------
cd "$S"
have_images() {
    local f
    for f in a.qcow2 a.raw frag.qcow2 top.qcow2 a.b0.ext frag.f0.ext; do
        [ -s "$f" ] || return 1
    done
}
if have_images; then
    log "images already in $S: not rebuilding"
else
    avail=$(df -Pk "$S" | awk 'NR==2 {print $4}')
    [ "$avail" -gt $((15 * 1024 * 1024)) ] ||
        die "$S: need ~15 GiB free for the images, have $((avail / 1024 / 1024)) GiB"
    log "building images in $S (mkimage.sh, ~1-2 min)"
    rm -f bench-server-ref.sha
    "$SB/mkimage.sh" "$S" >&2
fi

# --- servers ----------------------------------------------------------------
declare -A PID SOCK
SERVERS_TXT=
mkdir -p "$LOGS"
stop_all() {
    local n
    for n in "${!PID[@]}"; do
        kill "${PID[$n]}" 2>/dev/null || true
        wait "${PID[$n]}" 2>/dev/null || true
        unset "PID[$n]"
    done
    rm -f "$S"/*.sock "$S/pull.out" "$S/frag.raw"
}
trap stop_all EXIT
start() {                                   # NAME CMD...
    local name=$1 sock=$S/$1.sock i; shift
    rm -f "$sock"
    SOCK[$name]=$sock
    "$@" >"$LOGS/$name.log" 2>&1 &
    PID[$name]=$!
    for i in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
    [ -S "$sock" ] && kill -0 "${PID[$name]}" ||
        die "server $name did not come up: $* (see $LOGS/$name.log)"
    SERVERS_TXT+="$name: $*"$'\n'
}
uri() { echo "nbd+unix:///?socket=${SOCK[$1]}"; }

QCBT_CMD=("$QCBT_SERVER" -r -f qcow2 -t -e 16 ${QCBT_THREADS:+-T "$QCBT_THREADS"})
QNBD_CMD=(qemu-nbd -r -f qcow2 --persistent --shared=16)
start qcbt-a   "${QCBT_CMD[@]}" -k "$S/qcbt-a.sock" -B b0 a.qcow2
start qcbt-f   "${QCBT_CMD[@]}" -k "$S/qcbt-f.sock" -B f0 frag.qcow2
start qemu-a   "${QNBD_CMD[@]}" -k "$S/qemu-a.sock" -B b0 a.qcow2
start qemu-f   "${QNBD_CMD[@]}" -k "$S/qemu-f.sock" -B f0 frag.qcow2
start nbdkit-a nbdkit -r -f -U "$S/nbdkit-a.sock" file a.raw
log "servers up: $(for n in "${!PID[@]}"; do printf '%s=%s ' "$n" "${PID[$n]}"; done)"

# --- versions ---------------------------------------------------------------
VERSIONS=$(
    echo "$("$QCBT_SERVER" --version) ($QCBT_SERVER, sha256 $(sha256sum "$QCBT_SERVER" | cut -c1-12);" \
         "$SRC_NOTE)"
    qemu-nbd --version | head -1
    nbdkit --version
    nbdcopy --version | head -1
    nbdinfo --version | tr '\n' ' '; echo
    dpkg-query -W -f '${Package} ${Version}\n' python3-libnbd qemu-utils nbdkit libnbd-bin 2>/dev/null || true
    echo "kernel $(uname -r), $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB RAM," \
         "$(df -T "$S" | awk 'NR==2 {print $2}') on $(df "$S" | awk 'NR==2 {print $1}')"
)

# --- sizes, reference digests, map checks -----------------------------------
VIRT=$(stat -c %s a.raw)
DATA=$(qemu-img map -f raw --output=json a.raw |
    $PY -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))')
if [ ! -s bench-server-ref.sha ]; then
    log "reference SHA-256 of the dirty runs from raw copies"
    {
        echo "b0 $($PY "$SB/gen_writes.py" sha a.b0.ext a.raw)"
        qemu-img convert -f qcow2 -O raw frag.qcow2 frag.raw
        echo "f0 $($PY "$SB/gen_writes.py" sha frag.f0.ext frag.raw)"
        rm -f frag.raw
    } > bench-server-ref.sha.tmp
    mv bench-server-ref.sha.tmp bench-server-ref.sha
fi
MAPCHECK=$(
    for x in "qcbt-a b0 a.b0.ext" "qcbt-f f0 frag.f0.ext" "qemu-a b0 a.b0.ext" "qemu-f f0 frag.f0.ext"; do
        set -- $x
        printf '%s %s: ' "$1" "$2"
        nbdinfo --map="qemu:dirty-bitmap:$2" "$(uri "$1")" | $PY "$SB/gen_writes.py" check "$3" || true
    done
)
log "map checks:"; echo "$MAPCHECK" >&2

# --- warm the page cache ----------------------------------------------------
log "warming the page cache"
cat a.qcow2 frag.qcow2 a.raw > /dev/null

# --- measurements -------------------------------------------------------------
FRESH="rm -f $S/pull.out; sync"             # untimed: no old output, no dirty pages
job() {                                     # OUT TEST SERVER
    local out=$1 test=$2 srv=$3 u pid pre=() cmd
    u=$(uri "$srv"); pid=${PID[$srv]}
    case $test in
    copy)    cmd=(nbdcopy "$u" null:) ;;
    pull-b0) cmd=($PY "$SB/client_pull.py" "$u" b0 "$S/pull.out" $PULL_OPTS); pre=(--pre "$FRESH") ;;
    pull-f0) cmd=($PY "$SB/client_pull.py" "$u" f0 "$S/pull.out" $PULL_OPTS); pre=(--pre "$FRESH") ;;
    pull2-b0) cmd=($PY "$SB/client_pull.py" "$u" b0 "$S/pull.out" $PULL2_OPTS); pre=(--pre "$FRESH") ;;
    pull2-f0) cmd=($PY "$SB/client_pull.py" "$u" f0 "$S/pull.out" $PULL2_OPTS); pre=(--pre "$FRESH") ;;
    map-f0)  cmd=(nbdinfo --map=qemu:dirty-bitmap:f0 "$u") ;;
    map-b0)  cmd=(nbdinfo --map=qemu:dirty-bitmap:b0 "$u") ;;
    esac
    $PY "$SB/timeit.py" -n 1 -w 0 --label "$test :: ${srv%-?}" --out "$out" \
        --server-pid "$pid" "${pre[@]}" -- "${cmd[@]}" 2>>"$LOGS/timeit.log" ||
        { tail -5 "$LOGS/timeit.log" >&2; die "measurement failed: $test on $srv"; }
}
TESTS=(copy pull-b0 pull-f0)
[ -n "$PULL2_OPTS" ] && TESTS+=(pull2-b0 pull2-f0)
TESTS+=(map-f0 map-b0)
servers_for() {
    case $1 in
    copy)  echo qcbt-a qemu-a nbdkit-a ;;
    *-f0)  echo qcbt-f qemu-f ;;
    *-b0)  echo qcbt-a qemu-a ;;
    esac
}
rm -f "$RES" "$WARM" "$LOGS/timeit.log"
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
T0=$SECONDS
for ((r = 1 - WARMUP; r <= N; r++)); do
    out=$RES; [ $r -le 0 ] && out=$WARM
    log "round $r of $N$([ $r -le 0 ] && echo ' (warm-up)') ($((SECONDS - T0)) s)"
    for test in "${TESTS[@]}"; do
        read -r -a list <<<"$(servers_for "$test")"
        k=${#list[@]}
        for ((i = 0; i < k; i++)); do
            job "$out" "$test" "${list[(i + r + WARMUP) % k]}"
        done
    done
done
log "measured in $((SECONDS - T0)) s"
VERSIONS+=$'\n'"load average (1/5/15 min) before the rounds: $LOAD0, after: $(cut -d' ' -f1-3 /proc/loadavg); measuring took $((SECONDS - T0)) s"
for n in "${!PID[@]}"; do kill -0 "${PID[$n]}" || die "server $n died during the run"; done
stop_all

# --- report -------------------------------------------------------------------
export BS_SERVERS="$SERVERS_TXT" BS_VERSIONS="$VERSIONS" BS_MAPCHECK="$MAPCHECK"
$PY "$HERE/bench-server-report.py" --results "$RES" --ref "$S/bench-server-ref.sha" \
    --data-bytes "$DATA" --virt-bytes "$VIRT" --n "$N" --warmup "$WARMUP" \
    --pull-opts "$PULL_OPTS" --pull2-opts "$PULL2_OPTS" --scratch "$S"
