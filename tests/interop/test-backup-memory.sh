#!/bin/bash
# The backup agent's memory does not grow with the disk (issue 13): the
# same 16384 dirty runs of 64 KiB (1024 with data, the others written as
# zeros: dirty, cheap to make and to read), spread evenly over a 64 GiB
# and over a 512 GiB disk (one per 32 MiB of the larger: every page of
# every L2 table), backed up incrementally from qcbt-server; qcbt's peak
# RSS (/usr/bin/time) may differ by at most 16 MiB.  The writer used to
# keep every L2 table it touched: 8 MiB of them for the smaller disk, 64
# MiB for the larger.  Each backup equals its source (qemu-img compare)
# and passes qemu-img check.
#
# Environment: QCBT (client), QCBT_SERVER or QCBT_BUILD_DIR (server),
# QCBT_KEEP_TMP=1 to keep the files.
. "$(dirname "$0")/../functions.sh"

requires qemu-img qemu-io
[[ -x /usr/bin/time ]] || fail "/usr/bin/time is missing (Debian package time)"
SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER (set QCBT_SERVER or QCBT_BUILD_DIR)"
SERVER=$(cd "$(dirname "$SERVER")" && pwd)/$(basename "$SERVER")
NZERO=16384 # dirty runs of 64 KiB: one per 4 KiB of L2 table on 512 GiB
NDATA=1024  # of which written with data, the others with zeros
LIMIT_KIB=$((16 << 10))
# Under ASan freed memory sits in a quarantine (256 MiB by default) and
# would count as if it were still held.
export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}quarantine_size_mb=0

CASE_RC=0
bad() {
    note "[$CASE] FAIL: $*"
    CASE_RC=1
}

# serve SOCK IMG ARGS...: qcbt-server on SOCK; sets SRV_PID.
serve() {
    local sock=$1 img=$2
    shift 2
    { printf '%q ' "$SERVER" -t -f qcow2 "$@" -k "$sock" "$img"; printf '&\n'; } >>"$CASE_DIR/recipe.txt"
    "$SERVER" -t -f qcow2 "$@" -k "$sock" "$img" >>"$CASE_DIR/server.log" 2>&1 &
    SRV_PID=$!
    cleanup_pid "$SRV_PID"
    wait_nbd "$sock" "$SRV_PID" || fail "[$CASE] qcbt-server did not start: $(tail -n 5 "$CASE_DIR/server.log")"
}

stop() {
    kill -TERM "$SRV_PID" 2>/dev/null || true
    wait_gone "$SRV_PID" || kill -KILL "$SRV_PID" 2>/dev/null || true
    wait "$SRV_PID" 2>/dev/null || true
}

# peak_rss GIB: a GIB GiB disk with bitmap b0, a full backup, then the
# writes, then an incremental backup whose peak RSS (KiB) is printed.
peak_rss() {
    local g=$1 img=$CASE_DIR/d$1.qcow2 sock=$CASE_DIR/d$1.sock i rss
    local step=$(($1 * 1024 * 1024 / NZERO)) # KiB between zero writes
    run qemu-img create -q -f qcow2 "$img" "${g}G"
    run qemu-img bitmap --add -g 64K "$img" b0
    serve "$sock" "$img"
    run "$QCBT" backup --full --no-progress "nbd+unix:///?socket=$sock" "$CASE_DIR/bk$g"
    stop
    for ((i = 0; i < NZERO; i++)); do
        if ((i % (NZERO / NDATA) == 0)); then
            printf 'write -q -P %d %dK 64K\n' $((i % 250 + 1)) $((i * step))
        else
            printf 'write -q -z %dK 64K\n' $((i * step))
        fi
    done >"$CASE_DIR/d$g.qio"
    run sh -c "qemu-io -f qcow2 '$img' <'$CASE_DIR/d$g.qio'"
    serve "$sock" "$img" -B b0
    run /usr/bin/time -f 'rss %M' -o "$CASE_DIR/d$g.time" \
        "$QCBT" backup --since b0 --no-progress "nbd+unix:///?socket=$sock" "$CASE_DIR/bk$g"
    stop
    rss=$(sed -n 's/^rss \([0-9]*\)$/\1/p' "$CASE_DIR/d$g.time")
    [[ -n $rss ]] || fail "[$CASE] oracle broke: no RSS in $(cat "$CASE_DIR/d$g.time")"
    recipe_note "peak RSS of the ${g} GiB incremental: $rss KiB"
    run qemu-img check -q "$CASE_DIR/bk$g/backup-0001.qcow2"
    qemu-img compare -q "$CASE_DIR/bk$g/backup-0001.qcow2" "$img" ||
        bad "the backup of the $g GiB disk differs from it"
    echo "$rss"
}

begin_case rss-vs-size
small=$(peak_rss 64)
large=$(peak_rss 512)
note "[$CASE] peak RSS: 64 GiB disk $small KiB, 512 GiB disk $large KiB"
((large - small <= LIMIT_KIB)) ||
    bad "peak RSS grew by $((large - small)) KiB from a 64 GiB to a 512 GiB disk with the same writes (limit $LIMIT_KIB KiB)"
case_result $CASE_RC
finish_cases
