#!/bin/bash
# A full read over TLS vs plaintext: qcbt-server, qemu-nbd and nbdkit, one
# run, same data, warm page cache.
#
#   bench/bench-tls.sh SCRATCH_DIR > bench/results/tls.md
#
# Data: SCRATCH_DIR/tls.raw, $SIZE (default 4G) bytes of pseudo-random
# data (AES-CTR keystream: nothing compresses or reads as zero), and
# tls.qcow2, the same guest data fully allocated (made once, reused).
# Certificates: tests/interop/tls-pki.sh SCRATCH_DIR/pki (EC P-256).
# Servers, each on a private unix socket in SCRATCH_DIR, all started up
# front and stopped by PID at the end:
#   qcbt-plain   qcbt-server -r -f qcow2 -t -e 16 tls.qcow2
#   qcbt-tls     ... --tls-certificates pki/server   (X.509)
#   qcbt-psk     ... --tls-psk pki/psk/keys.psk      (extra row)
#   qcbt-tls16   qcbt-tls with -T 16, nbdkit's thread count (extra row)
#   qemu-plain   qemu-nbd -r -f qcow2 --persistent --shared=16 tls.qcow2
#   qemu-tls     ... --object tls-creds-x509,...,verify-peer=off --tls-creds
#   nbdkit-plain nbdkit -r -f file tls.raw           (nbdkit 1.32 cannot
#   nbdkit-tls   ... --tls=require --tls-certificates  read qcow2)
# Measurement: `nbdcopy URI null:` (libnbd + GnuTLS, the client backup
# tools use), WARMUP warm-up rounds then N counted rounds; in each round
# every server runs once, in an order rotating per round, so the drift of
# this shared 2-CPU machine hits all alike.  timeit.py (shared harness)
# records wall, client CPU and server CPU; the report adds bytes per CPU
# second (client + server), which a busy machine disturbs less than the
# wall time, and compares it across the TLS servers.  Before measuring, sample reads
# from every server are compared with tls.raw, and the cipher each TLS
# server negotiates with libnbd is recorded (LIBNBD_DEBUG).
#
# Env: N (5), WARMUP (1), SIZE (4G), QCBT_SERVER (default: build
# <repo>/build-bench with CMAKE_BUILD_TYPE=Release and use it),
# SHARED_BENCH (/work/shared/bench).
# Output: markdown on stdout; raw records in SCRATCH_DIR/bench-tls.jsonl.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 SCRATCH_DIR" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SB=${SHARED_BENCH:-/work/shared/bench}
PY=/usr/bin/python3
N=${N:-5} WARMUP=${WARMUP:-1} SIZE=${SIZE:-4G}
mkdir -p "$1"
S=$(cd "$1" && pwd)
RES=$S/bench-tls.jsonl WARM=$S/bench-tls-warmup.jsonl
LOGS=$S/bench-tls-logs
log() { echo "bench-tls: $*" >&2; }
die() { log "$*"; exit 1; }

for t in qemu-img qemu-nbd nbdkit nbdcopy nbdinfo openssl cmake; do
    command -v $t >/dev/null || die "missing $t"
done
$PY -c 'import nbd' 2>/dev/null || die "$PY has no nbd module (python3-libnbd)"

# --- our server -------------------------------------------------------------
if [ -z "${QCBT_SERVER:-}" ]; then
    log "building qcbt-server (Release) in $REPO/build-bench"
    { cmake -S "$REPO" -B "$REPO/build-bench" -DCMAKE_BUILD_TYPE=Release &&
      cmake --build "$REPO/build-bench" -j2 --target qcbt-server; } \
        >"$S/bench-tls-build.log" 2>&1 ||
        { tail -30 "$S/bench-tls-build.log" >&2; die "build failed"; }
    QCBT_SERVER=$REPO/build-bench/server/qcbt-server
    SRC_NOTE="built from $REPO at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    SRC_NOTE+=" + $(git -C "$REPO" status --porcelain 2>/dev/null | grep -c . || true) uncommitted paths"
else
    SRC_NOTE="given as QCBT_SERVER"
fi
[ -x "$QCBT_SERVER" ] || die "no qcbt-server at $QCBT_SERVER"

# --- data and certificates --------------------------------------------------
cd "$S"
BYTES=$(numfmt --from=iec "$SIZE")
if [ "$(stat -c %s tls.raw 2>/dev/null || echo 0)" != "$BYTES" ] || [ ! -s tls.qcow2 ]; then
    log "making $SIZE of data (tls.raw, tls.qcow2)"
    rm -f tls.raw tls.qcow2
    # head closes the pipe: openssl's SIGPIPE is expected.
    { openssl enc -aes-128-ctr -nosalt -pass pass:qcbt-bench-tls \
        -in /dev/zero 2>/dev/null || true; } | head -c "$BYTES" >tls.raw
    [ "$(stat -c %s tls.raw)" = "$BYTES" ] || die "could not make tls.raw"
    qemu-img convert -f raw -O qcow2 tls.raw tls.qcow2
fi
[ -d pki/server ] || bash "$REPO/tests/interop/tls-pki.sh" pki
CERTS=$S/pki/client-anon

# --- servers ----------------------------------------------------------------
declare -A PID SOCK URI
SERVERS_TXT=
mkdir -p "$LOGS"
stop_all() {
    local n
    for n in "${!PID[@]}"; do
        kill "${PID[$n]}" 2>/dev/null || true
        wait "${PID[$n]}" 2>/dev/null || true
        unset "PID[$n]"
    done
    rm -f "$S"/*.sock
}
trap stop_all EXIT
start() {                                   # NAME URI-QUERY-TAIL CMD...
    local name=$1 tail=$2 sock=$S/$1.sock; shift 2
    rm -f "$sock"
    SOCK[$name]=$sock
    "$@" >"$LOGS/$name.log" 2>&1 &
    PID[$name]=$!
    $PY "$REPO/tests/interop/tls-hostile.py" wait "$sock" 30 ||
        die "server $name did not come up: $* (see $LOGS/$name.log)"
    URI[$name]="$tail"
    SERVERS_TXT+="$name: $*"$'\n'
}
Q=("$QCBT_SERVER" -r -f qcow2 -t -e 16)
QN=(qemu-nbd -r -f qcow2 --persistent --shared=16)
QX="tls-creds-x509,id=tls0,dir=$S/pki/server,endpoint=server,verify-peer=off"
start qcbt-plain "nbd+unix:///?socket=$S/qcbt-plain.sock" \
    "${Q[@]}" -k "$S/qcbt-plain.sock" tls.qcow2
start qcbt-tls "nbds+unix:///?socket=$S/qcbt-tls.sock&tls-certificates=$CERTS" \
    "${Q[@]}" -v -k "$S/qcbt-tls.sock" --tls-certificates "$S/pki/server" tls.qcow2
start qcbt-psk "nbds+unix://alice@/?socket=$S/qcbt-psk.sock&tls-psk-file=$S/pki/psk/keys.psk" \
    "${Q[@]}" -v -k "$S/qcbt-psk.sock" --tls-psk "$S/pki/psk/keys.psk" tls.qcow2
start qcbt-tls16 "nbds+unix:///?socket=$S/qcbt-tls16.sock&tls-certificates=$CERTS" \
    "${Q[@]}" -T 16 -v -k "$S/qcbt-tls16.sock" --tls-certificates "$S/pki/server" tls.qcow2
start qemu-plain "nbd+unix:///?socket=$S/qemu-plain.sock" \
    "${QN[@]}" -k "$S/qemu-plain.sock" tls.qcow2
start qemu-tls "nbds+unix:///?socket=$S/qemu-tls.sock&tls-certificates=$CERTS" \
    "${QN[@]}" -k "$S/qemu-tls.sock" --object "$QX" --tls-creds tls0 tls.qcow2
start nbdkit-plain "nbd+unix:///?socket=$S/nbdkit-plain.sock" \
    nbdkit -r -f -U "$S/nbdkit-plain.sock" file tls.raw
start nbdkit-tls "nbds+unix:///?socket=$S/nbdkit-tls.sock&tls-certificates=$CERTS" \
    nbdkit -r -f -U "$S/nbdkit-tls.sock" --tls=require --tls-certificates="$S/pki/server" file tls.raw
ALL=(qcbt-plain qcbt-tls qcbt-psk qcbt-tls16 qemu-plain qemu-tls nbdkit-plain nbdkit-tls)
log "servers up: $(for n in "${ALL[@]}"; do printf '%s=%s ' "$n" "${PID[$n]}"; done)"

# --- checks: data and ciphers ------------------------------------------------
CHECKS=$(
    for n in "${ALL[@]}"; do
        printf '%s: ' "$n"
        $PY - "${URI[$n]}" tls.raw <<'EOF'
import nbd, os, sys
uri, ref = sys.argv[1:]
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
size = os.path.getsize(ref)
assert h.get_size() == size, f"size {h.get_size()} != {size}"
with open(ref, "rb") as f:
    for i in range(16):
        off = (size - (1 << 20)) * i // 15 // 4096 * 4096
        f.seek(off)
        assert h.pread(1 << 20, off) == f.read(1 << 20), f"data differs at {off}"
print(f"16 reads of 1 MiB equal tls.raw; multi-conn {h.can_multi_conn()}", end="")
h.shutdown()
EOF
        case $n in
        *-plain) echo ;;
        *) echo ", cipher: $(LIBNBD_DEBUG=1 nbdinfo --size "${URI[$n]}" 2>&1 |
            sed -n 's/.*connection is using TLS: //p' | head -1)" ;;
        esac
    done
) || die "data check failed: $CHECKS"
log "checks:"; echo "$CHECKS" >&2

VERSIONS=$(
    echo "$("$QCBT_SERVER" --version) ($QCBT_SERVER, sha256 $(sha256sum "$QCBT_SERVER" | cut -c1-12);" \
         "$SRC_NOTE), $(openssl version)"
    qemu-nbd --version | head -1
    nbdkit --version
    nbdcopy --version | head -1
    dpkg-query -W -f '${Package} ${Version}\n' libgnutls30 libssl3 qemu-utils nbdkit libnbd-bin 2>/dev/null || true
    echo "kernel $(uname -r), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')," \
         "AES-NI $(grep -qw aes /proc/cpuinfo && echo yes || echo no), VAES $(grep -qw vaes /proc/cpuinfo && echo yes || echo no))," \
         "$(free -g | awk '/Mem:/ {print $2}') GiB RAM"
    echo "kTLS: $(grep -qw tls /proc/sys/net/ipv4/tcp_available_ulp 2>/dev/null && echo available || echo 'not available (no tls ULP)'); unix sockets carry no kTLS anyway"
)

# --- measurements ---------------------------------------------------------------
log "warming the page cache"
cat tls.raw tls.qcow2 >/dev/null
rm -f "$RES" "$WARM" "$LOGS/timeit.log"
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
T0=$SECONDS
k=${#ALL[@]}
for ((r = 1 - WARMUP; r <= N; r++)); do
    out=$RES; [ $r -le 0 ] && out=$WARM
    log "round $r of $N$([ $r -le 0 ] && echo ' (warm-up)') ($((SECONDS - T0)) s)"
    for ((i = 0; i < k; i++)); do
        n=${ALL[(i + r + WARMUP) % k]}
        $PY "$SB/timeit.py" -n 1 -w 0 --label "$n" --out "$out" \
            --server-pid "${PID[$n]}" -- nbdcopy "${URI[$n]}" null: 2>>"$LOGS/timeit.log" ||
            { tail -5 "$LOGS/timeit.log" >&2; die "measurement failed: $n"; }
    done
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
log "measured in $((SECONDS - T0)) s"
for n in "${ALL[@]}"; do kill -0 "${PID[$n]}" || die "server $n died during the run"; done
stop_all

# --- report -----------------------------------------------------------------------
export BT_SERVERS="$SERVERS_TXT" BT_VERSIONS="$VERSIONS" BT_CHECKS="$CHECKS" \
    BT_LOAD="load average (1/5/15 min) before the rounds: $LOAD0, after: $LOAD1; measuring took $((SECONDS - T0)) s" \
    BT_S="$S" BT_N="$N" BT_WARMUP="$WARMUP" BT_BYTES="$BYTES"
$PY - "$RES" <<'EOF'
import collections, json, os, statistics, sys

recs = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    r = json.loads(line)
    for k, v in r["metrics"].items():
        recs[r["label"]][k] += v
S, n, w = os.environ["BT_S"], os.environ["BT_N"], os.environ["BT_WARMUP"]
gb = int(os.environ["BT_BYTES"]) / 1e9
med = lambda l, k: statistics.median(recs[l][k])

def cell(l, k, f=lambda x: x):
    v = [f(x) for x in recs[l][k]]
    return f"{statistics.median(v):.3g} ({min(v):.3g}-{max(v):.3g})"

print("## TLS: a full read, qcbt-server vs qemu-nbd vs nbdkit\n")
print(f"`nbdcopy URI null:` of {gb:.2f} GB of data (every byte allocated, "
      f"pseudo-random), warm page cache, unix sockets.  Median (min-max) of "
      f"{n} runs after {w} warm-up round(s); in each round every server "
      "runs once, the order rotating per round.\n")
names = {"qcbt-plain": "qcbt-server plain", "qcbt-tls": "qcbt-server TLS X.509",
         "qcbt-psk": "qcbt-server TLS PSK",
         "qcbt-tls16": "qcbt-server TLS X.509, -T 16",
         "qemu-plain": "qemu-nbd plain",
         "qemu-tls": "qemu-nbd TLS X.509", "nbdkit-plain": "nbdkit file plain",
         "nbdkit-tls": "nbdkit file TLS X.509"}
print("| server | wall s | GB/s | server CPU s | client CPU s | "
      "server CPU s per GB | GB per CPU s (client + server) |")
print("|---|---:|---:|---:|---:|---:|---:|")
cpu = lambda l: med(l, "srv_cpu_s") + med(l, "cpu_s")
for l in names:
    if l not in recs:
        continue
    print(f"| {names[l]} | {cell(l, 'wall_s')} | "
          f"{cell(l, 'wall_s', lambda x: gb / x)} | {cell(l, 'srv_cpu_s')} | "
          f"{cell(l, 'cpu_s')} | {med(l, 'srv_cpu_s') / gb:.3f} | "
          f"{gb / cpu(l):.2f} |")

thr = lambda l: gb / med(l, "wall_s")
print("\n### Targets\n")
print("| target | measured | verdict |")
print("|---|---|---|")
def row(what, a, b, floor):
    ratio = thr(a) / thr(b)
    print(f"| {what} | {thr(a):.2f} vs {thr(b):.2f} GB/s (ratio {ratio:.2f}) "
          f"| {'MET' if ratio >= floor else 'NOT MET'} |")
row("qcbt TLS >= 0.8x qcbt plain", "qcbt-tls", "qcbt-plain", 0.8)
row("qcbt TLS >= qemu-nbd TLS", "qcbt-tls", "qemu-tls", 1.0)
row("qcbt TLS >= nbdkit TLS", "qcbt-tls", "nbdkit-tls", 1.0)
print(f"| (less load-dependent) qcbt TLS CPU per byte <= qemu-nbd's and "
      f"nbdkit's, client + server | {gb / cpu('qcbt-tls'):.2f} vs "
      f"{gb / cpu('qemu-tls'):.2f} and {gb / cpu('nbdkit-tls'):.2f} GB per "
      f"CPU s | {'MET' if cpu('qcbt-tls') <= min(cpu('qemu-tls'), cpu('nbdkit-tls')) else 'NOT MET'} |")
sc = lambda l: med(l, "srv_cpu_s")
print(f"\nServer CPU per byte, TLS: qcbt {sc('qcbt-tls') / gb:.3f} s/GB, "
      f"qemu-nbd {sc('qemu-tls') / gb:.3f}, nbdkit {sc('nbdkit-tls') / gb:.3f}; "
      f"the client (nbdcopy, GnuTLS) used {med('qcbt-tls', 'cpu_s'):.2f} s "
      f"against qcbt's TLS and {med('qcbt-plain', 'cpu_s'):.2f} s against "
      "its plaintext.")
print("\n### Checks\n\n```")
print(os.environ["BT_CHECKS"])
print("```\n\n### Exact commands\n\n```")
print(f"# scratch S={S}; servers (cwd $S):")
print(os.environ["BT_SERVERS"].replace(S, "$S").rstrip())
print("# measured, one timeit.py -n 1 -w 0 --server-pid PID call per run:")
for l in names:
    for line in open(sys.argv[1]):
        r = json.loads(line)
        if r["label"] == l:
            print(f"[{l}] {r['cmd'].replace(S, '$S')}")
            break
print("```\n\n### Versions and machine\n\n```")
print(os.environ["BT_VERSIONS"])
print(os.environ["BT_LOAD"])
print("```")
EOF
