#!/bin/bash
# qcbt-server's command line and the options of issue 11:
#   - a usage error is one line on stderr, "qcbt-server: <what is wrong>
#     (see qcbt-server --help)", exit 1, nothing on stdout (it printed the
#     whole help before);
#   - CAN_MULTI_CONN only when -e lets a second connection in (nbdinfo's
#     can_multi_conn: false with -e 1, true with -e 2 and by default);
#   - --idle-timeout S closes a connection that sent no request for S
#     seconds, and not before.

. "$(dirname "$0")/../functions.sh"
requires qemu-img nbdinfo timeout

SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER"
"$PYTHON" -c 'import nbd' 2>/dev/null || fail "python3-libnbd missing for $PYTHON"

rc=0
cd "$TMPD"
qemu-img create -q -f qcow2 d.qcow2 1M || fail "qemu-img create failed"

bad() {
    note "FAIL: $*"
    rc=1
}

# expect_one_line NEEDLE... -- ARGS...: qcbt-server ARGS fails with exit 1,
# prints nothing on stdout and exactly one line on stderr that starts with
# "qcbt-server: " and holds every NEEDLE (fixed strings).
expect_one_line() {
    local needles=() n st=0
    while [[ $1 != -- ]]; do
        needles+=("$1")
        shift
    done
    shift
    timeout 60 "$SERVER" "$@" >out.txt 2>err.txt </dev/null || st=$?
    if [[ $st -ne 1 ]]; then
        bad "qcbt-server $*: exit $st, expected 1: $(head -n 3 err.txt)"
        return
    fi
    if [[ -s out.txt ]]; then
        bad "qcbt-server $*: wrote to stdout: $(head -n 3 out.txt)"
        return
    fi
    if [[ $(wc -l <err.txt) -ne 1 || -n $(tail -c1 err.txt) ]]; then
        bad "qcbt-server $*: $(wc -l <err.txt) lines on stderr, expected one:
$(head -n 5 err.txt)"
        return
    fi
    if [[ $(head -c13 err.txt) != "qcbt-server: " ]]; then
        bad "qcbt-server $*: the line does not start with 'qcbt-server: ': $(cat err.txt)"
        return
    fi
    for n in "${needles[@]}"; do
        if ! grep -qF -- "$n" err.txt; then
            bad "qcbt-server $*: the line lacks '$n': $(cat err.txt)"
            return
        fi
    done
    note "ok: qcbt-server $*: $(cat err.txt)"
}

hint="(see qcbt-server --help)"

note "usage errors"
expect_one_line "unrecognized option '--bogus'" "$hint" -- --bogus d.qcow2
expect_one_line "unrecognized option '--bogus'" "$hint" -- --bogus=1 d.qcow2
expect_one_line "unrecognized option '-z'" "$hint" -- -z d.qcow2
expect_one_line "unrecognized option '-z'" "$hint" -- -tz d.qcow2
expect_one_line "option '--s' is ambiguous" "--socket" "--shared" "--strict" "$hint" -- --s x d.qcow2
expect_one_line "option '--port' needs a value" "$hint" -- d.qcow2 --port
expect_one_line "option '-p' needs a value" "$hint" -- d.qcow2 -p
expect_one_line "option '--persistent' takes no value" "$hint" -- --persistent=yes d.qcow2
expect_one_line "invalid --shared '0'" "$hint" -- -e 0 d.qcow2
expect_one_line "invalid --threads 'x'" "$hint" -- --threads x d.qcow2
expect_one_line "invalid --port '65536'" "$hint" -- -p 65536 d.qcow2
expect_one_line "invalid --handshake-timeout '0'" "$hint" -- --handshake-timeout 0 d.qcow2
expect_one_line "invalid --idle-timeout '1s'" "$hint" -- --idle-timeout 1s d.qcow2
expect_one_line "nothing to serve" "$hint" --
expect_one_line "expected one IMAGE" "$hint" -- d.qcow2 e.qcow2
expect_one_line "-B/-f apply to IMAGE" "$hint" -- -B b0
expect_one_line "--export: 'x' is not KEY=VALUE" "$hint" -- --export x
expect_one_line "--export: unknown key 'colour'" "$hint" -- --export name=a,image=d.qcow2,colour=red
expect_one_line "--export: all-bitmaps=maybe: expected on or off" "$hint" -- \
    --export name=a,image=d.qcow2,all-bitmaps=maybe
expect_one_line "export name 'a' used twice" "$hint" -- \
    --export name=a,image=d.qcow2 --export name=a,image=d.qcow2
# Not a usage error, still one line (and no hint).
expect_one_line "nosuch.qcow2" -- -k "$SOCK" nosuch.qcow2

st=0
"$SERVER" --help >help.txt 2>err.txt || st=$?
if [[ $st -eq 0 && ! -s err.txt ]] && grep -q -- '--idle-timeout' help.txt &&
    grep -q -- '--read-only' help.txt; then
    note "ok: --help: exit 0, on stdout, lists --idle-timeout and --read-only"
else
    bad "--help: exit $st, stderr: $(head -n 2 err.txt)"
fi

# start_server LOG ARGS...: qcbt-server in the background ($SPID).
start_server() {
    local log=$1
    shift
    rm -f "$SOCK"
    "$SERVER" "$@" 2>"$log" &
    SPID=$!
    cleanup_pid "$SPID"
}

stop_server() {
    kill -TERM "$SPID" 2>/dev/null || true
    wait "$SPID" || true
}

# multi_conn LOG: can_multi_conn from nbdinfo --json, retried until the
# server answers (it may not listen yet); with -e 1 this is the only
# client, so it is never turned away.
multi_conn() {
    local i
    for i in $(seq 1200); do
        if nbdinfo --json "nbd+unix:///?socket=$SOCK" >info.json 2>info.err; then
            "$PYTHON" -c 'import json; print(str(json.load(open("info.json"))["exports"][0]["can_multi_conn"]).lower())'
            return 0
        fi
        kill -0 "$SPID" 2>/dev/null || fail "server exited: $(cat "$1")"
        sleep 0.05
    done
    fail "nbdinfo could not connect within 60 s: $(cat info.err) $(cat "$1")"
}

note "CAN_MULTI_CONN and -e"
for e in 1 2 default; do
    eopt=(-e "$e")
    want=true
    [[ $e == default ]] && eopt=()
    [[ $e == 1 ]] && want=false
    start_server "mc-$e.log" -t "${eopt[@]}" -k "$SOCK" d.qcow2
    got=$(multi_conn "mc-$e.log")
    stop_server
    if [[ $got == "$want" ]]; then
        note "ok: -e $e: can_multi_conn $got"
    else
        bad "-e $e: can_multi_conn $got, expected $want"
    fi
done

note "--idle-timeout"
# The server closes a connection once it has been idle for 2 s: the client
# sees the connection end (no fixed sleep: it polls until then), not
# earlier than 2 s after its last request, and the log says why.
start_server idle.log -t -v --idle-timeout 2 -k "$SOCK" d.qcow2
if "$PYTHON" - "$SOCK" "$SPID" <<'EOF'; then
import os, sys, time
import nbd

sock, pid = sys.argv[1], sys.argv[2]
h = nbd.NBD()
end = time.monotonic() + 60
while True:
    try:
        h.connect_unix(sock)
        break
    except nbd.Error:
        if not os.path.exists(f"/proc/{pid}"):
            sys.exit("the server exited")
        if time.monotonic() > end:
            sys.exit("could not connect within 60 s")
        h = nbd.NBD()
        time.sleep(0.05)
h.pread(4096, 0)
t0 = time.monotonic()  # the server's idle time starts after this
h.pread(4096, 4096)
t1 = time.monotonic()
while not (h.aio_is_closed() or h.aio_is_dead()):
    if time.monotonic() - t1 > 60:
        sys.exit("the idle connection is still open after 60 s")
    try:
        h.poll(1000)
    except nbd.Error:
        break
idle = time.monotonic() - t0
if idle < 1.9:
    sys.exit(f"closed after {idle:.2f} s of idleness, expected 2 s")
print(f"closed after {time.monotonic() - t1:.2f} s idle", file=sys.stderr)
EOF
    if grep -q "idle for 2 s: disconnecting" idle.log; then
        note "ok: --idle-timeout 2 closes an idle connection"
    else
        bad "--idle-timeout: no log line: $(cat idle.log)"
    fi
else
    bad "--idle-timeout 2 did not close the idle connection as expected: $(cat idle.log)"
fi
stop_server

exit "$rc"
