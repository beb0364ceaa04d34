#!/bin/bash
# The front ends that read local images (qcbt info, map, cat, bitmap
# list/check/dump/sha256, qcbt-server, the nbdkit plugin) take the image
# locks qemu-img info and qemu-nbd -r take, against real QEMU processes:
#   - qemu-io writes the image: each front end is refused, exit status as
#     for other open errors, one line naming the file, saying another
#     process holds it and that -U/--force-share (the plugin:
#     force-share=true) reads it anyway at the cost of consistency; with
#     that option each one reads it (the bitmap commands see the in-use
#     flag the writer set: proof they read the image being written).
#   - qemu-io writes the BASE of a chain: refused too, naming layer 1.
#   - qemu-nbd -r serves the image: each front end reads it without -U.
#   - qcbt-server or the plugin serves the image: `qemu-img bitmap --add`
#     and a qemu-io write fail with QEMU's lock message, `qemu-img info`
#     works (read locks share reads); served with -U, qemu-img bitmap works.
# The nbdkit filter reads through another plugin and takes no locks.
# qemu-io is known to hold the image when /proc/locks shows its write lock
# (test-locks.sh says why not qemu-img info).
#
# QCBT_KEEP_TMP=1 keeps the images.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd nbdkit nbdinfo ldd nm

BUILD=${QCBT_BUILD_DIR:-$TESTS_DIR/../build}
SERVER=${QCBT_SERVER:-$BUILD/server/qcbt-server}
PLUGIN=$BUILD/plugins/qcbt/nbdkit-qcbt-plugin.so
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER (set \$QCBT_SERVER)"
[[ -f $PLUGIN ]] || fail "plugin not built: $PLUGIN (set QCBT_BUILD_DIR)"
PLUGIN=$(cd "$(dirname "$PLUGIN")" && pwd)/$(basename "$PLUGIN")

# An ASan-built plugin runs under nbdkit with libasan preloaded.  nbdkit
# may then hang in its exit handlers after a start error
# (test-nbdkit-plugin.sh probes and explains it): a refused start that
# printed its error and then hung is accepted there.
NBDKIT_ENV=()
if nm -D "$PLUGIN" 2>/dev/null | grep -q '__asan_init' ||
    ldd "$PLUGIN" 2>/dev/null | grep -q libasan; then
    libasan=$(ldd "$PLUGIN" | awk '/libasan/ { print $3; exit }')
    [[ -n $libasan && -f $libasan ]] || libasan=$(gcc -print-file-name=libasan.so)
    [[ -f $libasan ]] || fail "ASan-built plugin but no libasan found to preload"
    NBDKIT_ENV=(LD_PRELOAD="$libasan" ASAN_OPTIONS=detect_leaks=0)
fi
# nbdkit 1.32 with libasan preloaded can hang in its exit handlers (the
# stock file plugin too; test-nbdkit-plugin.sh says why): probed once,
# where it happens such an nbdkit is killed after a short bound.
ASAN_EXIT_HANG=
if [[ ${#NBDKIT_ENV[@]} -gt 0 ]]; then
    probe_rc=0
    timeout -k 5 15 env "${NBDKIT_ENV[@]}" nbdkit -f -U "$TMPD/probe.sock" file "$TMPD/no-such-file" \
        >/dev/null 2>&1 </dev/null || probe_rc=$?
    if [[ $probe_rc -eq 124 || $probe_rc -eq 137 ]]; then
        ASAN_EXIT_HANG=1
        note "nbdkit with libasan preloaded hangs in exit after an error (stock file plugin too)"
    fi
fi

cd "$TMPD"
failures=0
bad() {
    note "FAIL: $*"
    failures=$((failures + 1))
}

qemu-img create -q -f qcow2 base.qcow2 64M || fail "oracle broke: qemu-img create"
qemu-io -f qcow2 -c 'write -P 0x11 0 1M' base.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 || fail "oracle broke: qemu-img create -b"
qemu-img bitmap --add top.qcow2 b0 || fail "oracle broke: qemu-img bitmap --add"
qemu-io -f qcow2 -c 'write -P 0x22 4M 1M' top.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
# The image qemu-io writes (its bitmap is in use from then on).
qemu-img create -q -f qcow2 w.qcow2 64M || fail "oracle broke: qemu-img create"
qemu-img bitmap --add w.qcow2 b0 || fail "oracle broke: qemu-img bitmap --add"

# The exit status of an open error that is not a lock.
open_rc=0
"$QCBT" info "$TMPD/no-such.qcow2" >/dev/null 2>&1 || open_rc=$?
[[ $open_rc -ne 0 ]] || fail "qcbt info on a missing file succeeded"
srv_open_rc=0
"$SERVER" -k "$TMPD/none.sock" "$TMPD/no-such.qcow2" >/dev/null 2>&1 || srv_open_rc=$?
[[ $srv_open_rc -ne 0 ]] || fail "qcbt-server on a missing file started"

# holds_write IMG: an OFD lock on IMG covers byte 101 ("write" held).
holds_write() {
    local id
    id=$(printf '%02x:%02x:%s' "$(stat -c %Hd "$1")" "$(stat -c %Ld "$1")" "$(stat -c %i "$1")")
    awk -v id="$id" '$2 == "OFDLCK" && $6 == id && $7 <= 101 && $8 >= 101 { f = 1 }
                     END { exit !f }' /proc/locks
}

stop() {
    kill -TERM "$1" 2>/dev/null || true
    wait_gone "$1" || {
        kill -KILL "$1" 2>/dev/null || true
        bad "$CASE: process $1 does not exit after SIGTERM"
    }
    wait "$1" 2>/dev/null || true
}

# stop_nbdkit PID: stop; the probed libasan exit hang is killed, not failed.
stop_nbdkit() {
    if [[ -z $ASAN_EXIT_HANG ]]; then
        stop "$1"
        return
    fi
    kill -TERM "$1" 2>/dev/null || true
    wait_gone "$1" 10 || {
        note "$CASE: nbdkit hung in exit (the libasan hang probed above): killed"
        kill -KILL "$1" 2>/dev/null || true
    }
    wait "$1" 2>/dev/null || true
}

# qemu_io_hold IMG: a qemu-io session writing IMG; sets $qpid.
qemu_io_hold() {
    qemu-io -f qcow2 -c 'sleep 3600000' "$1" </dev/null >qemu-io.log 2>&1 &
    qpid=$!
    cleanup_pid "$qpid"
    wait_until -p "$qpid" -- holds_write "$1" ||
        fail "oracle broke: qemu-io never held $1: $(cat qemu-io.log)"
}

# The qcbt commands that open a local image read-only (IMAGE substituted).
COMMANDS=("info @" "map @" "cat @" "bitmap list @" "bitmap check @ b0"
          "bitmap dump @ b0" "bitmap sha256 @ b0")

# cmd_args CMD IMAGE: the words of CMD with @ replaced by IMAGE.
cmd_args() {
    local w
    ARGS=()
    for w in $1; do
        [[ $w == @ ]] && w=$2
        ARGS+=("$w")
    done
}

# refused_line RC ERRFILE WANT_RC HELD OPTION WHO: RC is WANT_RC, ERRFILE is
# one line naming the held file HELD, "held by another process", OPTION
# and the cost.
refused_line() {
    local rc=$1 err=$2 want=$3 held=$4 option=$5 who=$6 line
    line=$(cat "$err")
    if [[ $rc -ne $want ]]; then
        bad "$CASE: $who: exit $rc, expected $want as for other open errors ($line)"
    elif [[ $(wc -l <"$err") -ne 1 ]]; then
        bad "$CASE: $who: not one line: $line"
    elif [[ $line != *"$held: held by another process"* ||
            $line != *"$option reads it anyway, but its data may be inconsistent"* ]]; then
        bad "$CASE: $who: unexpected message: $line"
    else
        note "$CASE: $who refused: $line"
    fi
}

# expect_cmds_refused IMAGE HELD: every command refused; with -U and with
# --force-share each one reads (exit 0, or 2 with the writer's in-use
# flag for check/dump/sha256).
expect_cmds_refused() {
    local img=$1 held=$2 c rc opt
    for c in "${COMMANDS[@]}"; do
        cmd_args "$c" "$img"
        rc=0
        "$QCBT" "${ARGS[@]}" >out 2>err || rc=$?
        refused_line "$rc" err "$open_rc" "$held" "-U/--force-share" "qcbt $c"
        for opt in -U --force-share; do
            rc=0
            "$QCBT" "${ARGS[@]:0:${#ARGS[@]}-1}" "$opt" "${ARGS[-1]}" >out 2>err || rc=$?
            case $c in
            "bitmap check"* | "bitmap dump"* | "bitmap sha256"*)
                [[ $rc -eq 2 ]] && grep -qF "bitmap 'b0' is in use" err ||
                    bad "$CASE: qcbt $c $opt: exit $rc, expected 2 for the in-use bitmap: $(cat err)"
                ;;
            *)
                [[ $rc -eq 0 && ! -s err ]] ||
                    bad "$CASE: qcbt $c $opt: exit $rc: $(cat err)"
                ;;
            esac
        done
    done
}

# expect_cmds_ok IMAGE: every command reads without -U.
expect_cmds_ok() {
    local c rc
    for c in "${COMMANDS[@]}"; do
        cmd_args "$c" "$1"
        rc=0
        "$QCBT" "${ARGS[@]}" >out 2>err || rc=$?
        [[ $rc -eq 0 ]] || bad "$CASE: qcbt $c: exit $rc: $(cat err)"
    done
}

# server_start LOG ARGS...: qcbt-server ARGS on $SOCK, serving; sets $spid.
server_start() {
    local log=$1
    shift
    rm -f "$SOCK"
    "$SERVER" -t -k "$SOCK" "$@" </dev/null >"$log" 2>&1 &
    spid=$!
    cleanup_pid "$spid"
    wait_nbd "$SOCK" "$spid"
}

# nbdkit_start LOG PARAMS...: nbdkit -f with the plugin on $SOCK; sets $spid.
nbdkit_start() {
    local log=$1
    shift
    rm -f "$SOCK"
    env "${NBDKIT_ENV[@]}" nbdkit -f -U "$SOCK" "$PLUGIN" "$@" </dev/null >"$log" 2>&1 &
    spid=$!
    cleanup_pid "$spid"
    wait_nbd "$SOCK" "$spid"
}

# expect_server_refused IMAGE HELD: qcbt-server exits like for other open
# errors with the one line; with -U and --force-share it serves.
expect_server_refused() {
    local img=$1 held=$2 rc=0 opt
    rm -f "$SOCK"
    timeout -k 5 "$QCBT_WAIT" "$SERVER" -k "$SOCK" "$img" </dev/null >out 2>err || rc=$?
    refused_line "$rc" err "$srv_open_rc" "$held" "-U/--force-share" "qcbt-server"
    for opt in -U --force-share; do
        if server_start server.log "$opt" "$img"; then
            nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1 ||
                bad "$CASE: qcbt-server $opt: nbdinfo failed"
            stop "$spid"
        else
            bad "$CASE: qcbt-server $opt did not serve: $(cat server.log)"
        fi
    done
    if server_start server.log --export "name=x,image=$img,force-share=on"; then
        stop "$spid"
    else
        bad "$CASE: qcbt-server --export ...,force-share=on did not serve: $(cat server.log)"
    fi
}

# expect_plugin_refused IMAGE HELD: nbdkit fails to start with the line in
# its error; with force-share=true it serves.
expect_plugin_refused() {
    local img=$1 held=$2 rc=0 line
    rm -f "$SOCK"
    timeout -k 5 "$([[ -n $ASAN_EXIT_HANG ]] && echo 20 || echo "$QCBT_WAIT")" \
        env "${NBDKIT_ENV[@]}" nbdkit -f -U "$SOCK" "$PLUGIN" "file=$img" \
        </dev/null >out 2>err || rc=$?
    line=$(grep -F 'error:' err || true)
    if [[ $rc -eq 0 || ($rc -ge 124 && -z $ASAN_EXIT_HANG) ]]; then
        bad "$CASE: nbdkit plugin: exit $rc, expected a start failure: $(cat err)"
    elif [[ $(grep -c . <<<"$line") -ne 1 || $line != *"$held: held by another process"* ||
            $line != *"force-share=true reads it anyway, but its data may be inconsistent"* ]]; then
        bad "$CASE: nbdkit plugin: unexpected error: $(cat err)"
    else
        note "$CASE: nbdkit plugin refused (exit $rc): $line"
    fi
    if nbdkit_start nbdkit.log "file=$img" force-share=true; then
        nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1 ||
            bad "$CASE: plugin force-share=true: nbdinfo failed"
        stop_nbdkit "$spid"
    else
        bad "$CASE: plugin force-share=true did not serve: $(cat nbdkit.log)"
    fi
}

# --- qemu-io writes the image -----------------------------------------------

CASE=writer
qemu_io_hold w.qcow2
qemu-img info w.qcow2 >/dev/null 2>&1 && bad "$CASE: oracle: qemu-img info works while qemu-io writes"
expect_cmds_refused w.qcow2 w.qcow2
expect_server_refused w.qcow2 w.qcow2
expect_plugin_refused w.qcow2 w.qcow2
stop "$qpid"
# Gone, the writer leaves the image to us: the lock was the reason.
"$QCBT" info w.qcow2 >out 2>err || bad "$CASE: qcbt info after qemu-io exited: $(cat err)"

# --- qemu-io writes the base ----------------------------------------------

CASE=writer-base
qemu_io_hold base.qcow2
for c in "info @" "map @" "cat @" "bitmap list @"; do
    cmd_args "$c" top.qcow2
    rc=0
    "$QCBT" "${ARGS[@]}" >out 2>err || rc=$?
    refused_line "$rc" err "$open_rc" "layer 1: base.qcow2" "-U/--force-share" "qcbt $c"
    rc=0
    "$QCBT" "${ARGS[@]:0:${#ARGS[@]}-1}" -U top.qcow2 >out 2>err || rc=$?
    [[ $rc -eq 0 ]] || bad "$CASE: qcbt $c -U: exit $rc: $(cat err)"
done
rc=0
rm -f "$SOCK"
timeout -k 5 "$QCBT_WAIT" "$SERVER" -k "$SOCK" top.qcow2 </dev/null >out 2>err || rc=$?
refused_line "$rc" err "$srv_open_rc" "layer 1: base.qcow2" "-U/--force-share" "qcbt-server"
expect_plugin_refused top.qcow2 "layer 1: $TMPD/base.qcow2"
stop "$qpid"

# After the writer is gone, everything reads: the lock was the reason.
CASE=idle
expect_cmds_ok top.qcow2

# --- qemu-nbd -r reads the image: reads share ------------------------------

CASE=qemu-nbd-r
rm -f "$TMPD/qn.sock"
qemu-nbd -r -t -k "$TMPD/qn.sock" -f qcow2 top.qcow2 </dev/null >qemu-nbd.log 2>&1 &
qnpid=$!
cleanup_pid "$qnpid"
wait_nbd "$TMPD/qn.sock" "$qnpid" || fail "oracle broke: qemu-nbd -r did not start: $(cat qemu-nbd.log)"
expect_cmds_ok top.qcow2
if server_start server.log top.qcow2; then
    nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1 || bad "$CASE: qcbt-server: nbdinfo failed"
    stop "$spid"
else
    bad "$CASE: qcbt-server refused beside qemu-nbd -r: $(cat server.log)"
fi
if nbdkit_start nbdkit.log file=top.qcow2; then
    nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1 || bad "$CASE: plugin: nbdinfo failed"
    stop_nbdkit "$spid"
else
    bad "$CASE: plugin refused beside qemu-nbd -r: $(cat nbdkit.log)"
fi
stop "$qnpid"

# --- we serve the image: QEMU's writers are kept out -----------------------

# expect_qemu_refused NEEDLE CMD...: CMD fails saying NEEDLE.
expect_qemu_refused() {
    local needle=$1 rc=0
    shift
    "$@" >qout 2>&1 || rc=$?
    if [[ $rc -eq 0 ]]; then
        bad "$CASE: '$*' succeeded while we serve the image"
    elif ! grep -qF -- "$needle" qout; then
        bad "$CASE: '$*' failed without '$needle': $(cat qout)"
    fi
}

# expect_writers_out: while $spid serves top.qcow2 (and base.qcow2 under it).
expect_writers_out() {
    expect_qemu_refused 'Failed to get "write" lock' qemu-img bitmap --add top.qcow2 b1
    expect_qemu_refused 'Failed to get "write" lock' qemu-io -f qcow2 -c 'write 0 64k' top.qcow2
    expect_qemu_refused 'Failed to get "write" lock' qemu-io -f qcow2 -c 'write 0 64k' base.qcow2
    qemu-img info top.qcow2 >qout 2>&1 || bad "$CASE: qemu-img info failed while we serve: $(cat qout)"
}

CASE=server-serves
server_start server.log top.qcow2 || fail "$CASE: qcbt-server did not start: $(cat server.log)"
expect_writers_out
stop "$spid"

CASE=plugin-serves
nbdkit_start nbdkit.log file=top.qcow2 || fail "$CASE: plugin did not start: $(cat nbdkit.log)"
expect_writers_out
stop_nbdkit "$spid"

# With -U nothing is kept out (and once the server is gone, b1 is added).
CASE=server-serves-U
server_start server.log -U top.qcow2 || fail "$CASE: qcbt-server -U did not start: $(cat server.log)"
qemu-img bitmap --add top.qcow2 b1 >qout 2>&1 || bad "$CASE: qemu-img bitmap --add failed beside -U: $(cat qout)"
stop "$spid"
qemu-img bitmap --remove top.qcow2 b1 >qout 2>&1 || fail "oracle broke: qemu-img bitmap --remove: $(cat qout)"

CASE=after
qemu-img bitmap --add top.qcow2 b1 >qout 2>&1 || bad "$CASE: qemu-img bitmap --add failed after we stopped: $(cat qout)"

[[ $failures -eq 0 ]] || fail "$failures check(s) failed"
note "all lock checks of the front ends passed"
