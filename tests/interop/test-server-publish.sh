#!/bin/bash
# What qcbt-server publishes and what it tells the user, now that the rules
# live in common/publish: -B NAME=ALIAS, --all-bitmaps, --strict, the
# warnings for a layer that contributes its allocation map and for a bitmap
# that is skipped, and the one-line refusals at start.
#
# The chain, made with qemu-img and qemu-io (real QEMU bitmaps):
#   base.qcow2: broken (in use: qemu-io killed), ck, good, "e<ESC>[2Jvil"
#   top.qcow2 (backing base): broken (in use too), good; data written
# so ck and "e<ESC>[2Jvil" fall back to top's allocation (tolerant) or
# are refused (strict), good merges cleanly, broken is never usable.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io nbdinfo timeout

SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER"

rc=0
cd "$TMPD"
U=$TMPD/s.sock
EVIL=$'e\x1b[2Jvil'

bad() {
    note "FAIL: $*"
    rc=1
}
ok() { note "ok: $*"; }

# in_use IMAGE NAME: add bitmap NAME and leave it in use (qemu-io killed
# while it holds the image open for writing).
in_use() {
    qemu-img bitmap --add "$1" "$2" || fail "oracle broke: qemu-img bitmap --add $1 $2"
    sh -c 'qemu-io -f qcow2 -c "write -P 0x61 1M 64k" -c flush -c "sigraise 9" "$1" >/dev/null 2>&1; exit 0' sh "$1"
    qemu-img info -U --output=json "$1" | grep '"in-use"' >/dev/null ||
        fail "oracle broke: $1: bitmap $2 not in use after qemu-io was killed"
}

qemu-img create -q -f qcow2 base.qcow2 16M || fail "oracle broke: qemu-img create"
in_use base.qcow2 broken
for b in ck good "$EVIL"; do
    qemu-img bitmap --add base.qcow2 "$b" || fail "oracle broke: qemu-img bitmap --add base.qcow2"
done
qemu-io -f qcow2 -c 'write -P 0x62 2M 64k' base.qcow2 >/dev/null || fail "oracle broke: qemu-io base"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 || fail "oracle broke: qemu-img create top"
in_use top.qcow2 broken
qemu-img bitmap --add top.qcow2 good || fail "oracle broke: qemu-img bitmap --add top.qcow2 good"
qemu-io -f qcow2 -c 'write -P 0x63 4M 64k' top.qcow2 >/dev/null || fail "oracle broke: qemu-io top"

# serve LOG ARGS...: start the server on $U; stop_served stops it (exit 0).
serve() {
    local log=$1
    shift
    rm -f "$U"
    "$SERVER" -t -k "$U" "$@" 2>"$log" &
    SPID=$!
    cleanup_pid "$SPID"
    wait_nbd "nbd+unix:///?socket=$U" "$SPID" || fail "server did not start ($*): $(cat "$log")"
}
stop_served() {
    local st=0
    kill -TERM "$SPID"
    wait_gone "$SPID" || { bad "server ignores SIGTERM"; kill -KILL "$SPID"; }
    wait "$SPID" || st=$?
    [[ $st -eq 0 ]] || bad "server exit status $st after SIGTERM"
}
contexts() {
    nbdinfo --list --content "nbd+unix:///?socket=$U" | awk '/contexts:/ {on=1; next}
        on && /^\t\t/ {gsub(/\t/, ""); print; next} {on=0}' | sort
}
# count LOG TEXT: lines of LOG holding the fixed string TEXT.
count() { grep -cF -- "$2" "$1" || true; }
no_control() {
    if LC_ALL=C grep -q $'[\x01-\x08\x0b-\x1f\x7f]' "$1"; then
        bad "$2: a control character reached stderr: $(cat -v "$1")"
    else
        ok "$2: no control character on stderr"
    fi
}

# --- --all-bitmaps: every usable bitmap once, each skip warned once -------
serve all.log --all-bitmaps top.qcow2
got=$(contexts)
want=$(printf '%s\n' base:allocation "qemu:dirty-bitmap:e?[2Jvil" qemu:dirty-bitmap:ck \
    qemu:dirty-bitmap:good | sort)
# nbdinfo prints the context name as it is: compare without the ESC.
[[ ${got//$'\x1b'/?} == "$want" ]] && ok "--all-bitmaps: contexts" ||
    bad "--all-bitmaps: contexts $(echo "$got" | cat -v)"
stop_served
n=$(count all.log "bitmap 'broken' cannot be used (tolerant mode)")
[[ $n -eq 1 ]] && [[ $(count all.log "(skipped)") -eq 1 ]] &&
    ok "--all-bitmaps: the in-use bitmap of two layers is skipped with one warning" ||
    bad "--all-bitmaps: $n warnings about broken: $(cat -v all.log)"
grep -qxF "qcbt-server: warning: export '', bitmap 'ck': layer 0 (top.qcow2) contributes its allocation map: bitmap 'ck' missing: the layer was created without it" all.log &&
    ok "--all-bitmaps: the fallback of ck is reported" ||
    bad "--all-bitmaps: no fallback line for ck: $(cat -v all.log)"
grep -qF "bitmap 'e?[2Jvil': layer 0 (top.qcow2) contributes its allocation map" all.log &&
    ok "--all-bitmaps: a bitmap name from the image is escaped" ||
    bad "--all-bitmaps: no escaped fallback line: $(cat -v all.log)"
no_control all.log --all-bitmaps

# --- an alias takes a chain bitmap's name: it is left out, and said so ----
serve alias.log -B good=ck --all-bitmaps top.qcow2
got=$(contexts | grep -v 'e.\[2Jvil' || true)
[[ $got == $'base:allocation\nqemu:dirty-bitmap:ck' ]] &&
    ok "alias over a name: qemu:dirty-bitmap:ck is good's" ||
    bad "alias over a name: contexts $(echo "$got")"
stop_served
grep -qxF "qcbt-server: warning: export '': bitmap 'ck': its name is taken by the alias of bitmap 'good' (skipped)" alias.log &&
    ok "alias over a name: warned" || bad "alias over a name: $(cat -v alias.log)"

# --- refusals: exit 1 before listening, the lines the user sees ------------
# refused TAG LINES -- ARGS...: exit 1, nothing on stdout, stderr is LINES.
refused() {
    local tag=$1 want=$2 st=0
    shift 3
    rm -f "$U"
    timeout 300 "$SERVER" -k "$U" "$@" >out.txt 2>err.txt </dev/null || st=$?
    if [[ $st -ne 1 ]]; then
        bad "$tag: exit $st, expected 1: $(cat -v err.txt)"
    elif [[ -S $U || -s out.txt ]]; then
        bad "$tag: listened or wrote to stdout"
    elif [[ $(cat err.txt) != "$want" ]]; then
        bad "$tag: stderr
$(cat -v err.txt)
expected
$want"
    else
        ok "$tag: $(cat -v err.txt)"
    fi
}
refused "alias twice" "qcbt-server: export '': bitmaps 'ck' and 'good' are both published as 'x'" \
    -- -B ck=x -B good=x top.qcow2
refused "alias twice, --all-bitmaps" "qcbt-server: export 'e': bitmaps 'ck' and 'good' are both published as 'x'" \
    -- --export name=e,image=top.qcow2,bitmap=ck=x,bitmap=good=x,all-bitmaps=on
refused "empty alias" "qcbt-server: invalid bitmap argument 'ck=' (NAME or NAME=ALIAS)" \
    -- -B ck= top.qcow2
long=$(printf 'a%.0s' {1..4079})
refused "alias longer than a context name may be" "qcbt-server: export '': bitmap alias 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...' too long" \
    -- -B "ck=$long" top.qcow2
refused "alias not UTF-8" "qcbt-server: export '': bitmap alias 'a?' is not UTF-8" \
    -- -B "ck=a"$'\xff' top.qcow2
refused "strict" "qcbt-server: export '': bitmap 'ck' cannot be used (strict mode): bitmap 'ck' is missing in the top layer 0 (top.qcow2) but present in layer 1 (strict mode)" \
    -- --strict -B ck top.qcow2
refused "fallback, then a refusal" "qcbt-server: warning: export '', bitmap 'ck': layer 0 (top.qcow2) contributes its allocation map: bitmap 'ck' missing: the layer was created without it
qcbt-server: export '': bitmap 'broken' cannot be used (tolerant mode): bitmap 'broken' is in use at layer 1 (base.qcow2): the image was not closed cleanly" \
    -- -B ck -B broken -B good top.qcow2

# An alias of exactly the longest context name is served.
serve long.log -B "ck=${long%a}" top.qcow2
[[ $(contexts | grep -c "qemu:dirty-bitmap:a") -eq 1 ]] &&
    ok "a 4096-byte context name is published" || bad "4096-byte context: $(cat long.log)"
stop_served

exit $rc
