# bench-lib.sh -- helpers the bench scripts share (source it).
#
#   bench_images S      build the anchor images (mkimage.sh: a.qcow2 with
#                       bitmap b0, a.raw, frag.qcow2, the c0 chain) into S
#                       unless a.qcow2 and a.raw are there
#   bench_wait_sock SOCK PID
#                       wait until SOCK exists (the server listens); fail
#                       at once if PID died, after 20 s if it hangs
#   bench_full_prep QCBT URI DIR IMAGE
#                       DIR holds one full backup of URI (untimed), made
#                       again if IMAGE is newer than it: what an
#                       incremental (--since) starts from
# Needs ANCHOR (/work/shared/bench by default) and set -e in the caller.
ANCHOR=${ANCHOR:-/work/shared/bench}

bench_images() {
    if [[ ! -f $1/a.qcow2 || ! -f $1/a.raw ]]; then
        echo "== building the anchor images in $1 (mkimage.sh)" >&2
        "$ANCHOR/mkimage.sh" "$1" >&2
    fi
}

bench_wait_sock() {
    local i
    for i in $(seq 400); do
        [[ -S $1 ]] && return 0
        kill -0 "$2" 2>/dev/null || { echo "bench: server $2 died before listening on $1" >&2; return 1; }
        sleep 0.05
    done
    echo "bench: nothing listens on $1 after 20 s" >&2
    return 1
}

bench_full_prep() {
    if [[ ! -f $3/manifest.json || $4 -nt $3/manifest.json ]]; then
        rm -rf "$3"
        echo "== preparing a full backup of $4 in $3 (untimed)" >&2
        "$1" backup --full --no-progress "$2" "$3" >&2
    fi
}
