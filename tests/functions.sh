# shellcheck shell=bash
# Sourced helpers for the bash interop tests (tests/interop/test-*.sh).
#
#   . "$(dirname "$0")/../functions.sh"
#
# Provides:
#   strict mode (set -euo pipefail), $TMPD (private temp dir, removed on
#   exit), cleanup_pid PID (killed on exit), $QCBT, $PYTHON, $TESTS_DIR,
#   requires CMD..., fail MSG..., skip MSG..., note MSG...,
#   expect_qcbt_error NEEDLE -- ARGS... (checks the single-line error contract),
#   waiting for events, never for a fixed time: pid_alive, wait_until,
#   wait_gone, wait_nbd URI [PID]; serve_activated (a TCP server on a port
#   bound before it starts).
#
# Exit status convention (ctest SKIP_RETURN_CODE 77): 77 is used ONLY for a
# tool that cannot exist on this machine.  A missing dependency that the
# setup script installs is a failure, never a skip.

set -euo pipefail
# A command that fails outside any check ends the script (set -e): the ERR
# trap (inherited by functions: -E) remembers where, and the EXIT trap says
# it, so that no run ends without a reason.
set -E
_qcbt_said=
_qcbt_err_where=
trap '_qcbt_err_where="${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND"' ERR

TESTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Python with the Debian packages (python3-libnbd); never a pyenv shim.
PYTHON=${PYTHON:-/usr/bin/python3}

note() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

fail() {
    printf '%s: FAIL: %s\n' "${0##*/}" "$*" >&2
    _qcbt_said=1
    exit 1
}

skip() {
    printf '%s: SKIP: %s\n' "${0##*/}" "$*" >&2
    _qcbt_said=1
    exit 77
}

# --- temp dir and cleanup -------------------------------------------------

_qcbt_cleanup_pids=()

# Register a PID to be killed (TERM, then KILL) when the script exits.
cleanup_pid() {
    _qcbt_cleanup_pids+=("$1")
}

_qcbt_cleanup() {
    local rc=$? pid
    set +e
    if [[ $rc -ne 0 && -z $_qcbt_said ]]; then
        printf '%s: FAIL: the script ended (exit status %d) at %s\n' \
            "${0##*/}" "$rc" "${_qcbt_err_where:-an exit or signal}" >&2
    fi
    for pid in "${_qcbt_cleanup_pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [[ -n ${TMPD:-} && -d $TMPD ]]; then
        if [[ -n ${QCBT_KEEP_TMP:-} ]]; then
            printf '%s: keeping %s\n' "${0##*/}" "$TMPD" >&2
        else
            chmod -R u+rwX "$TMPD" 2>/dev/null
            rm -rf "$TMPD"
        fi
    fi
    exit "$rc"
}

TMPD=$(mktemp -d "${TMPDIR:-/tmp}/qcbt-test.XXXXXXXX")
# For tests that run a server: a unix socket path in the private dir.
export SOCK=$TMPD/nbd.sock
trap _qcbt_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- waiting for events ---------------------------------------------------
#
# Tests run under `ctest -j2` on a loaded 2-core machine, and under ASan:
# never a fixed sleep that assumes something has happened by then.  Wait
# for the event itself, and fail early when the process that should cause
# it has died; the overall bound ($QCBT_WAIT seconds) only catches hangs.

QCBT_WAIT=${QCBT_WAIT:-120}

# pid_alive PID: the process exists and is not a zombie.
pid_alive() {
    local st
    st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    st=${st##*) }
    [[ ${st:0:1} != [ZX] ]]
}

# wait_until [-p PID]... [-t SECONDS] -- CMD...: run CMD until it succeeds.
# Returns 1, with a note saying why, when a PID has exited first or after
# SECONDS (default $QCBT_WAIT).
wait_until() {
    local pids=() bound=$QCBT_WAIT end p delay=0.01
    while [[ $1 != -- ]]; do
        case $1 in
        -p) pids+=("$2") ;;
        -t) bound=$2 ;;
        *) fail "wait_until: bad option $1" ;;
        esac
        shift 2
    done
    shift
    end=$((EPOCHSECONDS + bound))
    while ! "$@"; do
        for p in "${pids[@]}"; do
            if ! pid_alive "$p"; then
                "$@" && return 0 # it happened just before the exit
                note "gave up waiting for '$*': process $p has exited"
                return 1
            fi
        done
        if ((EPOCHSECONDS >= end)); then
            note "gave up waiting for '$*' after ${bound}s"
            return 1
        fi
        sleep "$delay"
        case $delay in
        0.01) delay=0.02 ;;
        0.02) delay=0.05 ;;
        0.05) delay=0.1 ;;
        *) delay=0.2 ;;
        esac
    done
}

# pid_gone PID: the opposite of pid_alive.
pid_gone() { ! pid_alive "$1"; }

# wait_gone PID [SECONDS]: until PID has exited (default bound $QCBT_WAIT);
# returns 1 if it is still running then.
wait_gone() {
    wait_until -t "${2:-$QCBT_WAIT}" -- pid_gone "$1"
}

# wait_nbd URI [PID]: until an NBD server accepts a connection at URI
# (nbd+unix:///...?socket=PATH, nbd://HOST:PORT/..., a socket path or
# HOST:PORT) and sends its greeting.  A socket file alone proves nothing:
# it exists from bind(), before listen().  The probe reads the greeting and
# closes, so it never reaches transmission (a server without -t does not
# take it for its last client).  Returns 1, with a note, if PID exits first
# or after $QCBT_WAIT seconds.
wait_nbd() {
    "$PYTHON" - "$1" "${2:-0}" "$QCBT_WAIT" "${0##*/}" <<'PYEOF'
import socket, sys, time, urllib.parse
uri, pid, bound, me = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
u = urllib.parse.urlsplit(uri)
if u.scheme in ("nbd+unix", "nbds+unix"):
    addr = urllib.parse.parse_qs(u.query)["socket"][0]
elif u.scheme in ("nbd", "nbds"):
    addr = (u.hostname, u.port or 10809)
elif "/" in uri or ":" not in uri:
    addr = uri
else:
    h, p = uri.rsplit(":", 1)
    addr = (h, int(p))


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


end = time.monotonic() + bound
delay, why = 0.01, "nothing tried"
while True:
    left = end - time.monotonic()
    if left <= 0:
        sys.exit("%s: wait_nbd: %s does not answer after %gs (%s)" %
                 (me, uri, bound, why))
    s = socket.socket(socket.AF_UNIX if isinstance(addr, str)
                      else socket.AF_INET)
    s.settimeout(left)
    try:
        s.connect(addr)
        g = b""
        while len(g) < 8:
            b = s.recv(8 - len(g))
            if not b:
                break
            g += b
        if g == b"NBDMAGIC":
            sys.exit(0)
        why = "greeting %r" % g
    except socket.timeout:
        why = "no greeting"
    except OSError as e:
        why = e.strerror or str(e)
    finally:
        s.close()
    if pid and not alive(pid):
        sys.exit("%s: wait_nbd: %s: server process %d has exited (%s)" %
                 (me, uri, pid, why))
    time.sleep(delay)
    delay = min(delay * 2, 0.2)
PYEOF
}

# serve_activated [--unix PATH] LOG CMD...: start the NBD server CMD
# (qcbt-server, qemu-nbd, nbdkit: all take systemd socket activation) in the
# background, on a TCP socket on 127.0.0.1 that socket-activate.py binds to
# a free port (or a unix socket at PATH) and hands over as descriptor 3
# (LISTEN_FDS=1, LISTEN_PID).  The port is never released between choosing
# it and serving, so no other process can take it, and a client that
# connects before CMD is ready waits in the backlog: no readiness wait is
# needed.  CMD's stdout and stderr are appended to LOG.  Sets ACT_PORT (the
# port, or PATH), and ACT_PID (CMD's pid: kill and wait work on it; it is
# registered with cleanup_pid).
serve_activated() {
    local unix=() log fd
    if [[ $1 == --unix ]]; then
        unix=(--unix "$2")
        shift 2
    fi
    log=$1
    shift
    exec {fd}< <(exec "$PYTHON" "$TESTS_DIR/interop/socket-activate.py" "${unix[@]}" -- "$@" </dev/null 2>>"$log")
    ACT_PID=$!
    cleanup_pid "$ACT_PID"
    if ! read -r ACT_PORT <&"$fd"; then
        exec {fd}<&-
        fail "socket activation of $1 failed: $(tail -n 5 "$log")"
    fi
    exec {fd}<&-
}

# --- tools ----------------------------------------------------------------

# Tools that may legitimately be absent (not part of qcbt's setup, cannot be
# installed here).  Anything else that is missing is a broken setup: FAIL.
_qcbt_optional_tools=" qemu-system-x86_64 qemu-storage-daemon virsh "

requires() {
    local cmd
    for cmd in "$@"; do
        if ! command -v "$cmd" >/dev/null 2>&1; then
            if [[ $_qcbt_optional_tools == *" $cmd "* ]]; then
                skip "$cmd is not available on this machine"
            fi
            fail "required tool '$cmd' is missing (it is installed by the setup script)"
        fi
    done
}

# --- the binary under test ------------------------------------------------

if [[ -z ${QCBT:-} ]]; then
    QCBT=${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/client/qcbt
fi
[[ $QCBT == */* ]] || QCBT=$(command -v "$QCBT") || fail "qcbt not found on PATH"
[[ -x $QCBT ]] || fail "qcbt binary not found or not executable: $QCBT (set \$QCBT)"
# Absolute, so tests may run it from any directory.
QCBT=$(cd "$(dirname "$QCBT")" && pwd)/$(basename "$QCBT")
[[ -x $PYTHON ]] || fail "python interpreter $PYTHON missing"

# --- error contract -------------------------------------------------------

# expect_qcbt_error NEEDLE... -- ARGS...
# Runs "$QCBT ARGS..." and asserts: non-zero exit (not a signal), stderr is
# exactly one newline-terminated line, it starts with "qcbt: " and contains
# every NEEDLE (fixed strings; "A|B" accepts either A or B; a NEEDLE of the
# form "re:REGEX" must match as an extended regex).  Returns 0 if all hold,
# otherwise prints why and returns 1 (so callers can count failures instead
# of stopping).
expect_qcbt_error() {
    local needles=() a rc=0 err nlines n
    while [[ $# -gt 0 ]]; do
        a=$1
        shift
        [[ $a == -- ]] && break
        needles+=("$a")
    done
    err=$TMPD/.expect-err.$$
    "$QCBT" "$@" >/dev/null 2>"$err" </dev/null || rc=$?
    if [[ $rc -eq 0 ]]; then
        note "expected failure, got exit 0: qcbt $*"
        return 1
    fi
    if [[ $rc -ge 128 ]]; then
        note "qcbt died by signal (exit $rc): qcbt $*"
        sed 's/^/    stderr: /' "$err" >&2
        return 1
    fi
    nlines=$(wc -l <"$err")
    if [[ $nlines -ne 1 ]] || [[ -n $(tail -c1 "$err") ]]; then
        note "expected exactly one newline-terminated stderr line, got $nlines: qcbt $*"
        sed 's/^/    stderr: /' "$err" >&2
        return 1
    fi
    if [[ $(head -c6 "$err") != "qcbt: " ]]; then
        note "stderr line does not start with 'qcbt: ': $(cat "$err")"
        return 1
    fi
    local alt found alts
    for n in "${needles[@]}"; do
        if [[ $n == re:* ]]; then
            if ! grep -qE -- "${n#re:}" "$err"; then
                note "stderr line does not match /${n#re:}/: $(cat "$err")"
                return 1
            fi
            continue
        fi
        found=
        IFS='|' read -r -a alts <<<"$n"
        for alt in "${alts[@]}"; do
            grep -qF -- "$alt" "$err" && found=1
        done
        if [[ -z $found ]]; then
            note "stderr line lacks '$n': $(cat "$err")"
            return 1
        fi
    done
    note "ok (exit $rc): $(cat "$err")"
    return 0
}

# --- differential checks against qemu (reader tests) ----------------------

MAP_COMPARE=$TESTS_DIR/interop/map-compare.py

# Case bookkeeping: begin_case NAME makes and enters $TMPD/NAME and starts a
# recipe; run CMD... logs CMD to the recipe, then runs it (a failing recipe
# step is a broken test, so it fails the script); recipe_note TEXT logs text.
CASE=
CASE_DIR=
_qcbt_pass=()
_qcbt_fail=()

begin_case() {
    CASE=$1
    CASE_DIR=$TMPD/$CASE
    mkdir -p "$CASE_DIR"
    cd "$CASE_DIR"
    : >"$CASE_DIR/recipe.txt"
}

recipe_note() {
    printf '# %s\n' "$*" >>"$CASE_DIR/recipe.txt"
}

run() {
    { printf '%q ' "$@"; printf '\n'; } >>"$CASE_DIR/recipe.txt"
    "$@" >>"$CASE_DIR/run.log" 2>&1 ||
        fail "[$CASE] recipe step failed: $* (see below)
$(tail -n 20 "$CASE_DIR/run.log")"
}

print_recipe() {
    printf '    recipe (run in %s):\n' "$CASE_DIR" >&2
    sed 's/^/      /' "$CASE_DIR/recipe.txt" >&2
}

case_result() {
    if [[ $1 -eq 0 ]]; then
        _qcbt_pass+=("$CASE")
        note "PASS $CASE"
    else
        _qcbt_fail+=("$CASE")
        note "FAIL $CASE"
        print_recipe
    fi
}

# Summary at the end of a test script; exit 1 if any case failed.
finish_cases() {
    note "${#_qcbt_pass[@]} case(s) passed, ${#_qcbt_fail[@]} failed"
    if [[ ${#_qcbt_fail[@]} -gt 0 ]]; then
        note "failed: ${_qcbt_fail[*]}"
        _qcbt_said=1
        exit 1
    fi
}

# set_header_bit IMG OFFSET BIT: set bit BIT of the big-endian u64 at
# OFFSET in place (72 incompatible, 80 compatible, 88 autoclear features).
set_header_bit() {
    recipe_note "set_header_bit $1 $2 $3 (big-endian u64 at offset $2 |= 1 << $3)"
    "$PYTHON" - "$@" <<'PYEOF'
import struct, sys
path, off, bit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "r+b") as f:
    f.seek(off)
    v = struct.unpack(">Q", f.read(8))[0] | (1 << bit)
    f.seek(off)
    f.write(struct.pack(">Q", v))
PYEOF
}

# virtual_size IMG [FMT]: what qemu thinks the guest size is.
virtual_size() {
    local fopt=()
    [[ -n ${2:-} ]] && fopt=(-f "$2")
    qemu-img info "${fopt[@]}" --output=json "$1" |
        "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])'
}

# check_image IMG [FMT]
# Differential read check in the current directory: qcbt cat == qemu-img
# convert -O raw (cmp), qcbt map --json agrees with qemu-img map (sweep), and
# qcbt cat --offset/--length on a few ranges.  FMT (when given) is passed as
# -f to both tools; otherwise both probe.  Leaves ref.raw (the reference
# guest image) in the current directory.  Returns 1 with details on any
# difference (never exits), so the caller can go on to the next case.
check_image() {
    local img=$1 fmt=${2:-} fopt=() size rc=0 ranges r off len got
    [[ -n $fmt ]] && fopt=(-f "$fmt")
    size=$(virtual_size "$img" "$fmt")

    qemu-img convert "${fopt[@]}" -O raw "$img" ref.raw ||
        fail "[$CASE] qemu-img convert failed on $img"
    # qemu-img convert leaves a sparse file; make sure its size is the
    # virtual size even if the tail is a hole.
    [[ $(stat -c %s ref.raw) -eq $size ]] || truncate -s "$size" ref.raw

    if "$QCBT" cat "${fopt[@]}" "$img" >qcbt.raw 2>qcbt-cat.err; then
        if ! cmp ref.raw qcbt.raw >cmp.out 2>&1; then
            note "[$CASE] qcbt cat differs from qemu-img convert -O raw: $(cat cmp.out)"
            cmp -l ref.raw qcbt.raw 2>/dev/null | head -n 4 |
                awk '{ printf "    byte %d (0x%x): qemu=%s qcbt=%s (octal)\n", $1-1, $1-1, $2, $3 }' >&2 || true
            rc=1
        fi
    else
        note "[$CASE] qcbt cat failed: $(cat qcbt-cat.err)"
        rc=1
    fi

    qemu-img map "${fopt[@]}" --output=json "$img" >qemu-map.json ||
        fail "[$CASE] qemu-img map failed on $img"
    if "$QCBT" map --json "${fopt[@]}" "$img" >qcbt-map.json 2>qcbt-map.err; then
        local mrc=0
        "$PYTHON" "$MAP_COMPARE" --size "$size" --context "$CASE" \
            qemu-map.json qcbt-map.json || mrc=$?
        [[ $mrc -le 1 ]] || fail "[$CASE] oracle broke: qemu-img map of $img (map-compare exit $mrc, see above)"
        [[ $mrc -eq 0 ]] || rc=1
    else
        note "[$CASE] qcbt map failed: $(cat qcbt-map.err)"
        rc=1
    fi

    # Sub-ranges: first byte, unaligned middle, last 1000 bytes, and an
    # --offset without --length (to the end).
    ranges=("0 1" "513 1537" "$((size / 3 + 7)) $((size - size / 3 - 7 < 100000 ? size - size / 3 - 7 : 100000))"
            "$((size > 1000 ? size - 1000 : 0)) $((size > 1000 ? 1000 : size))"
            "$((size > 777 ? size - 777 : 0)) -")
    for r in "${ranges[@]}"; do
        read -r off len <<<"$r"
        if [[ $len == - ]]; then
            got=$("$QCBT" cat "${fopt[@]}" --offset "$off" "$img" 2>qcbt-cat.err | cmp -i "$off:0" ref.raw - 2>&1) ||
                { note "[$CASE] qcbt cat --offset $off differs: $got $(cat qcbt-cat.err)"; rc=1; }
            len=$((size - off))
        else
            ((off + len <= size)) || continue
            "$QCBT" cat "${fopt[@]}" --offset "$off" --length "$len" "$img" >part.raw 2>qcbt-cat.err ||
                { note "[$CASE] qcbt cat --offset $off --length $len failed: $(cat qcbt-cat.err)"; rc=1; continue; }
            if [[ $(stat -c %s part.raw) -ne $len ]]; then
                note "[$CASE] qcbt cat --offset $off --length $len gave $(stat -c %s part.raw) bytes"
                rc=1
            elif ! got=$(cmp -i "$off:0" -n "$len" ref.raw part.raw 2>&1); then
                note "[$CASE] qcbt cat --offset $off --length $len differs: $got"
                rc=1
            fi
        fi
    done
    return "$rc"
}
