#!/bin/bash
# TLS: qcbt-server and the backup agent with the GnuTLS peers of QEMU and
# libnbd, over private unix sockets.  Certificates and keys are made here
# (tls-pki.sh, openssl).
#
#   1. X.509, nbdkit's spelling (--tls-certificates, require by default):
#      nbdinfo and nbdcopy with nbds+unix://, qemu-img with
#      tls-creds-x509 in TLS 1.3 and 1.2, qcbt backup (full, then
#      incremental over a dirty bitmap) and verify --against over TLS;
#      a plaintext nbdinfo is refused; qemu-img trusting another CA and
#      qemu-img expecting another host name refuse us; tls-hostile.py
#      (plaintext options get TLS_REQD and no export, STARTTLS injection,
#      garbage and stalled handshakes, old TLS versions...), each with a
#      good client connected throughout.
#   2. --tls-verify-peer: a client certificate from our CA is let in; none,
#      one from another CA, an expired one and (ca-crl.pem) a revoked one
#      are refused, with the reason in the log.
#   2b. TCP (socket activation): nbdinfo, nbdcopy, qcbt backup and verify
#      with nbds://HOST:PORT against a server given --tls-cert, --tls-key,
#      --tls-ca one by one with --tls-verify-peer.
#   3. qemu-nbd's spelling: --object tls-creds-x509 (verify-peer on by
#      default, as qemu-nbd; verify-peer=off) and tls-creds-psk, --tls-creds.
#   4. PSK (--tls-psk, psktool's format): nbdinfo, nbdcopy, qemu-img in
#      TLS 1.3 and 1.2, qcbt backup/verify; a wrong key and an unknown
#      identity refused.
#   5. An expired server certificate: a warning at start, qemu-img refuses.
#   6. --tls=on: plaintext and TLS clients both served; plaintext state is
#      forgotten at STARTTLS (tls-hostile.py).
#   6b. --idle-timeout under TLS: pipelined reads served, the idle TLS
#      connection closed after 2 s, not before.
#   7. qemu-nbd with --tls-creds as the source of qcbt backup (X.509 with a
#      client certificate, and PSK), and as the target of qcbt restore.
#   8. Start-up errors: each a one-line message and exit status 1.
#
# QCBT_KEEP_TMP=1 keeps the directory; HOSTILE_TRACE=1 prints tracebacks.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo nbdcopy openssl cmp timeout

SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER"
"$PYTHON" -c 'import nbd' 2>/dev/null || fail "python3-libnbd missing for $PYTHON"
TLSPY=$TESTS_DIR/interop/tls-hostile.py

MiB=$((1024 * 1024))
HS=3 # --handshake-timeout of the servers under test
rc=0
cd "$TMPD"

ok() { note "ok: $*"; }
bad() {
    note "FAIL: $*"
    rc=1
}

bash "$TESTS_DIR/interop/tls-pki.sh" pki
P=$TMPD/pki
printf 'carol:%s\n' "$(openssl rand -hex 32)" >"$P/carol.psk"

# disk.qcow2: 64 MiB, data in two places, then checkpoint ck and more
# writes after it (what an incremental backup must copy).
qemu-img create -q -f qcow2 disk.qcow2 64M
qemu-io -c 'write -P 0x11 0 3M' -c 'write -P 0x22 20M 1M' disk.qcow2 >/dev/null
qemu-img bitmap --add disk.qcow2 ck
qemu-io -c 'write -P 0x33 40M 2M' -c 'write -P 0x44 1M 64k' disk.qcow2 >/dev/null
qemu-img convert -f qcow2 -O raw disk.qcow2 ref.raw

# --- helpers -------------------------------------------------------------

# start NAME CMD...: run CMD (a server on $TMPD/NAME.sock) in the
# background, log in NAME.log; wait until a client really reads its
# greeting.  Sets SPID.
start() {
    local name=$1
    shift
    rm -f "$TMPD/$name.sock"
    "$@" 2>"$name.log" &
    SPID=$!
    cleanup_pid "$SPID"
    wait_nbd "$TMPD/$name.sock" "$SPID" ||
        fail "$name did not start: $* ($(cat "$name.log"))"
}
stop() {
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
sock() { echo "$TMPD/$1.sock"; }

# qimg_read LOG OBJECT IMAGE-OPTS: qemu-img convert the export to q.raw
# and compare with ref.raw.
qimg_read() {
    local log=$1 obj=$2 iopts=$3
    rm -f q.raw
    timeout 60 qemu-img convert --object "$obj" --image-opts "$iopts" \
        -O raw q.raw >"$log" 2>&1 && cmp -s q.raw ref.raw
}

# expect_log LOG TEXT WHAT: TEXT appears in LOG (the server logs a
# refusal after the client has seen it, so it is waited for).
expect_log() {
    if wait_until -- grep -qF -- "$2" "$1"; then
        ok "$3 (log: $(grep -F -m1 -- "$2" "$1" | sed 's/^qcbt-server: //'))"
    else
        bad "$3: no '$2' in $1"
    fi
}

hostile() {
    local mode=$1 certs=$2 pid=$3 s=$4
    if "$PYTHON" "$TLSPY" --socket "$s" --pid "$pid" --ref ref.raw \
            --export disk --certs "$certs" --mode "$mode" \
            --hs-timeout "$HS" >"hostile-$mode.out" 2>&1; then
        ok "tls-hostile.py --mode $mode: $(grep -c '^ok' "hostile-$mode.out") cases"
    else
        bad "tls-hostile.py --mode $mode:"$'\n'"$(grep -v '^ok' "hostile-$mode.out")"
    fi
}

# --- 1. X.509, nbdkit's spelling -------------------------------------------
start x509 "$SERVER" -t -v -e 16 --handshake-timeout "$HS" -k "$(sock x509)" \
    -x disk -B ck --tls-certificates "$P/server" disk.qcow2
X=$SPID
U="nbds+unix:///disk?socket=$(sock x509)&tls-certificates=$P/client-anon"

if [[ $(nbdinfo --size "$U" 2>&1) == $((64 * MiB)) ]]; then
    ok "nbdinfo --size nbds+unix:// (X.509)"
else
    bad "nbdinfo --size over TLS: $(nbdinfo --size "$U" 2>&1)"
fi
nbdinfo --list "$U" >list.out 2>&1 && grep -q 'export="disk"' list.out &&
    ok "nbdinfo --list over TLS shows the export" ||
    bad "nbdinfo --list over TLS: $(cat list.out)"
nbdinfo --map=qemu:dirty-bitmap:ck "$U" >map.out 2>&1 &&
    grep -Eq '^ *41943040 +2097152 +1 +dirty' map.out &&
    ok "nbdinfo --map=qemu:dirty-bitmap:ck over TLS" ||
    bad "nbdinfo --map over TLS: $(cat map.out)"
rm -f copy.raw
if nbdcopy "$U" copy.raw 2>copy.err && cmp -s copy.raw ref.raw; then
    ok "nbdcopy nbds+unix:// (X.509) reads the guest data"
else
    bad "nbdcopy over TLS: $(cat copy.err)"
fi
XOPTS="driver=nbd,server.type=unix,server.path=$(sock x509),export=disk,tls-creds=t0,tls-hostname=localhost"
for prio in NORMAL NORMAL:-VERS-ALL:+VERS-TLS1.2; do
    if qimg_read qimg.log "tls-creds-x509,id=t0,dir=$P/client-anon,endpoint=client,priority=$prio" "$XOPTS"; then
        ok "qemu-img convert, tls-creds-x509, priority $prio"
    else
        bad "qemu-img tls-creds-x509 $prio: $(cat qimg.log)"
    fi
done
grep -q 'TLS: TLSv1.2 ECDHE-ECDSA-AES128-GCM-SHA256' x509.log &&
    ok "TLS 1.2 negotiated with qemu (ECDHE-ECDSA-AES128-GCM-SHA256)" ||
    bad "no TLS 1.2 session in x509.log"
grep -q 'TLS: TLSv1.3 TLS_AES_128_GCM_SHA256' x509.log &&
    ok "TLS 1.3 negotiated (TLS_AES_128_GCM_SHA256)" ||
    bad "no TLS 1.3 session in x509.log"

# The backup agent over TLS: full, then incremental since ck.
if "$QCBT" backup --full --no-progress --tls-certificates "$P/client-anon" \
        "nbd+unix:///disk?socket=$(sock x509)" bk-x509 >bk.out 2>&1 &&
    "$QCBT" backup --since ck --no-progress "$U" bk-x509 >>bk.out 2>&1 &&
    grep -q 'incremental backup, 2162688 bytes of data' bk.out &&
    "$QCBT" verify --against "nbds+unix:///disk?socket=$(sock x509)" \
        --tls-certificates "$P/client-anon" bk-x509 >>bk.out 2>&1; then
    ok "qcbt backup (full + incremental) and verify --against over TLS"
else
    bad "qcbt backup over TLS from qcbt-server: $(cat bk.out)"
fi
"$QCBT" restore bk-x509 restored.raw >/dev/null 2>&1 && cmp -s restored.raw ref.raw &&
    ok "the TLS backup restores to the guest data" || bad "restore of the TLS backup"

# Refusals.
if nbdinfo --size "nbd+unix:///disk?socket=$(sock x509)" >plain.out 2>&1; then
    bad "a plaintext client was served by a --tls=require server"
else
    grep -qi 'requires TLS' plain.out &&
        ok "plaintext nbdinfo refused ($(grep -io 'server requires TLS[^:]*' plain.out | head -1))" ||
        bad "plaintext nbdinfo: $(cat plain.out)"
fi
if qimg_read qimg.log "tls-creds-x509,id=t0,dir=$P/trust-otherca,endpoint=client" "$XOPTS"; then
    bad "qemu-img trusting another CA accepted our certificate"
else
    ok "wrong CA: qemu-img refuses us ($(tail -1 qimg.log | sed 's/.*: //'))"
fi
if qimg_read qimg.log "tls-creds-x509,id=t0,dir=$P/client-anon,endpoint=client" \
        "${XOPTS/tls-hostname=localhost/tls-hostname=elsewhere}"; then
    bad "qemu-img accepted our certificate for another host name"
else
    ok "wrong host name: qemu-img refuses us"
fi
hostile require "$P/client-anon" "$X" "$(sock x509)"
kill -0 "$X" || bad "the X.509 server died"
stop "$X"

# --- 2. client certificates (--tls-verify-peer) ----------------------------
start peer "$SERVER" -t -v --handshake-timeout "$HS" -k "$(sock peer)" \
    --tls-certificates "$P/server" --tls-verify-peer disk.qcow2
V=$SPID
vu() { echo "nbds+unix:///?socket=$(sock peer)&tls-certificates=$P/$1"; }
# A good client stays connected while the bad ones are refused.
"$PYTHON" -c '
import nbd, sys, time
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
print(h.get_size(), flush=True)
while not __import__("os").path.exists(sys.argv[2]):
    time.sleep(0.05)  # until the refusals are done (touch peer.done)
assert h.pread(4096, 0) == open(sys.argv[3], "rb").read(4096)
h.shutdown()
print("still served")' "$(vu client)" peer.done ref.raw >held.out 2>&1 &
HELD=$!
wait_until -p "$HELD" -- test -s held.out || bad "the held client did not connect: $(cat held.out)"
nbdinfo --size "$(vu client)" >/dev/null 2>peer.err &&
    ok "verify-peer: a client certificate from our CA is let in" ||
    bad "verify-peer: good client refused: $(cat peer.err)"
for c in client-anon client-otherca client-expired; do
    if nbdinfo --size "$(vu $c)" >/dev/null 2>peer.err; then
        bad "verify-peer: $c was let in"
    else
        ok "verify-peer: $c refused"
    fi
done
expect_log peer.log "peer did not return a certificate" "no client certificate"
expect_log peer.log "client certificate refused: unable to get local issuer certificate" "client certificate from another CA"
expect_log peer.log "client certificate refused: certificate has expired" "expired client certificate"
touch peer.done
wait "$HELD" || true
grep -q "still served" held.out && ok "a client connected throughout was served" ||
    bad "the connected client was hurt: $(cat held.out)"
stop "$V"
# ca-crl.pem in the directory is honoured.
start crl "$SERVER" -t -v --handshake-timeout "$HS" -k "$(sock crl)" \
    --tls-certificates "$P/server-crl" --tls-verify-peer disk.qcow2
cu() { echo "nbds+unix:///?socket=$(sock crl)&tls-certificates=$P/$1"; }
nbdinfo --size "$(cu client)" >/dev/null 2>crl.err &&
    ok "CRL: a certificate it does not list is let in" || bad "CRL: good client refused: $(cat crl.err)"
nbdinfo --size "$(cu client-revoked)" >/dev/null 2>&1 &&
    bad "CRL: a revoked client certificate was let in" || ok "CRL: revoked client certificate refused"
expect_log crl.log "client certificate refused: certificate revoked" "revoked client certificate"
stop "$SPID"

# --- 2b. TCP (nbds://), the files named one by one ---------------------------
# Socket activation hands the server a bound port; libnbd checks the
# certificate against the URI's host name (localhost, 127.0.0.1).
serve_activated tcp.log "$SERVER" -t -v --handshake-timeout "$HS" -x disk \
    --tls-cert "$P/server/server-cert.pem" --tls-key "$P/server/server-key.pem" \
    --tls-ca "$P/ca/ca-cert.pem" --tls-verify-peer disk.qcow2
T=$ACT_PID
for h in localhost 127.0.0.1; do
    [[ $(nbdinfo --size "nbds://$h:$ACT_PORT/disk?tls-certificates=$P/client" 2>tcp.err) == $((64 * MiB)) ]] &&
        ok "nbdinfo nbds://$h:PORT (--tls-cert/--tls-key/--tls-ca, client certificate)" ||
        bad "nbdinfo nbds://$h over TCP: $(cat tcp.err)"
done
rm -f copy.raw
nbdcopy "nbds://localhost:$ACT_PORT/disk?tls-certificates=$P/client" copy.raw 2>copy.err &&
    cmp -s copy.raw ref.raw && ok "nbdcopy nbds://localhost:PORT reads the guest data" ||
    bad "nbdcopy over TCP and TLS: $(cat copy.err)"
nbdinfo --size "nbds://localhost:$ACT_PORT/disk?tls-certificates=$P/client-anon" >/dev/null 2>&1 &&
    bad "TCP, --tls-ca --tls-verify-peer: a client without a certificate was let in" ||
    ok "TCP, --tls-ca --tls-verify-peer: a client without a certificate is refused"
nbdinfo --size "nbd://localhost:$ACT_PORT/disk" >/dev/null 2>&1 &&
    bad "TCP: a plaintext client was served" || ok "TCP: a plaintext client is refused"
if "$QCBT" backup --full --no-progress --tls-certificates "$P/client" \
        "nbds://localhost:$ACT_PORT/disk" bk-tcp >bk.out 2>&1 &&
    "$QCBT" verify --tls-certificates "$P/client" --against "nbds://127.0.0.1:$ACT_PORT/disk" \
        bk-tcp >>bk.out 2>&1; then
    ok "qcbt backup and verify --against nbds://HOST:PORT"
else
    bad "qcbt backup over TCP and TLS: $(cat bk.out)"
fi
stop "$T"

# --- 3. qemu-nbd's spelling --------------------------------------------------
start qx "$SERVER" -t --handshake-timeout "$HS" -k "$(sock qx)" \
    --object "tls-creds-x509,id=tls0,dir=$P/server,endpoint=server" \
    --tls-creds tls0 disk.qcow2
nbdinfo --size "nbds+unix:///?socket=$(sock qx)&tls-certificates=$P/client" >/dev/null 2>qx.err &&
    ok "--object tls-creds-x509 --tls-creds: client certificate accepted" ||
    bad "--object tls-creds-x509: $(cat qx.err)"
nbdinfo --size "nbds+unix:///?socket=$(sock qx)&tls-certificates=$P/client-anon" >/dev/null 2>&1 &&
    bad "--object tls-creds-x509: verify-peer is not on by default (qemu-nbd's default)" ||
    ok "--object tls-creds-x509: verify-peer on by default, as qemu-nbd"
nbdinfo --size "nbd+unix:///?socket=$(sock qx)" >/dev/null 2>&1 &&
    bad "--tls-creds: plaintext served" || ok "--tls-creds means TLS required, as qemu-nbd"
stop "$SPID"
start qx2 "$SERVER" -t --handshake-timeout "$HS" -k "$(sock qx2)" \
    --object "tls-creds-x509,id=tls0,dir=$P/server,endpoint=server,verify-peer=off" \
    --tls-creds tls0 disk.qcow2
nbdinfo --size "nbds+unix:///?socket=$(sock qx2)&tls-certificates=$P/client-anon" >/dev/null 2>qx.err &&
    ok "--object tls-creds-x509,verify-peer=off: no client certificate needed" ||
    bad "verify-peer=off: $(cat qx.err)"
stop "$SPID"
start qp "$SERVER" -t --handshake-timeout "$HS" -k "$(sock qp)" \
    --object "tls-creds-psk,id=psk0,dir=$P/psk,endpoint=server" --tls-creds psk0 disk.qcow2
if qimg_read qimg.log "tls-creds-psk,id=t0,dir=$P/psk,endpoint=client,username=alice" \
        "driver=nbd,server.type=unix,server.path=$(sock qp),tls-creds=t0"; then
    ok "--object tls-creds-psk: qemu-img with tls-creds-psk reads the data"
else
    bad "--object tls-creds-psk: $(cat qimg.log)"
fi
stop "$SPID"

# --- 4. PSK -------------------------------------------------------------------
start psk "$SERVER" -t -v -e 16 --handshake-timeout "$HS" -k "$(sock psk)" \
    -B ck --tls-psk "$P/psk/keys.psk" disk.qcow2
K=$SPID
pu() { echo "nbds+unix://$1@/?socket=$(sock psk)&tls-psk-file=$2"; }
[[ $(nbdinfo --size "$(pu alice "$P/psk/keys.psk")" 2>&1) == $((64 * MiB)) ]] &&
    ok "nbdinfo nbds+unix:// with PSK (alice)" || bad "nbdinfo PSK: $(nbdinfo --size "$(pu alice "$P/psk/keys.psk")" 2>&1)"
rm -f copy.raw
nbdcopy "$(pu bob "$P/psk/keys.psk")" copy.raw 2>copy.err && cmp -s copy.raw ref.raw &&
    ok "nbdcopy with PSK (bob) reads the guest data" || bad "nbdcopy PSK: $(cat copy.err)"
POPTS="driver=nbd,server.type=unix,server.path=$(sock psk),tls-creds=t0"
for prio in NORMAL NORMAL:-VERS-ALL:+VERS-TLS1.2; do
    qimg_read qimg.log "tls-creds-psk,id=t0,dir=$P/psk,endpoint=client,username=alice,priority=$prio" "$POPTS" &&
        ok "qemu-img convert, tls-creds-psk, priority $prio" || bad "qemu-img PSK $prio: $(cat qimg.log)"
done
grep -q "TLS: TLSv1.3 TLS_AES_128_GCM_SHA256, PSK identity 'alice'" psk.log &&
    ok "TLS 1.3 external PSK with GnuTLS (TLS_AES_128_GCM_SHA256)" || bad "no TLS 1.3 PSK session in psk.log"
grep -q "TLS: TLSv1.2 DHE-PSK-AES128-GCM-SHA256, PSK identity 'alice'" psk.log &&
    ok "TLS 1.2 PSK with GnuTLS (DHE-PSK-AES128-GCM-SHA256)" || bad "no TLS 1.2 PSK session in psk.log"
if "$QCBT" backup --no-progress --tls-psk-file "$P/psk/keys.psk" --tls-username alice \
        "nbd+unix:///?socket=$(sock psk)" bk-psk >bk.out 2>&1 &&
    "$QCBT" verify --against "$(pu bob "$P/psk/keys.psk")" bk-psk >>bk.out 2>&1; then
    ok "qcbt backup --tls-psk-file --tls-username, verify --against a PSK URI"
else
    bad "qcbt backup with PSK: $(cat bk.out)"
fi
nbdinfo --size "$(pu alice "$P/psk-wrong/keys.psk")" >/dev/null 2>&1 &&
    bad "a wrong PSK was let in" || ok "wrong PSK refused"
expect_log psk.log "TLS handshake failed for PSK identity 'alice' (wrong key?)" "wrong PSK"
nbdinfo --size "$(pu carol "$P/carol.psk")" >/dev/null 2>&1 &&
    bad "an unknown PSK identity was let in" || ok "unknown PSK identity refused"
expect_log psk.log "unknown PSK identity 'carol'" "unknown identity"
"$QCBT" backup --no-progress --tls-psk-file "$P/psk-wrong/keys.psk" --tls-username alice \
    "nbd+unix:///?socket=$(sock psk)" bk-bad >bk.out 2>&1 &&
    bad "qcbt backup with a wrong PSK succeeded" ||
    ok "qcbt backup with a wrong PSK fails: $(cat bk.out)"
nbdinfo --size "$(pu alice "$P/psk/keys.psk")" >/dev/null 2>&1 &&
    ok "the PSK server still serves after the refusals" || bad "PSK server hurt"
stop "$K"

# --- 5. expired server certificate ------------------------------------------
start exp "$SERVER" -t --handshake-timeout "$HS" -k "$(sock exp)" \
    --tls-certificates "$P/server-expired" disk.qcow2
grep -q "warning: certificate .* has expired" exp.log &&
    ok "an expired server certificate is warned about at start" ||
    bad "no warning for the expired certificate: $(cat exp.log)"
if qimg_read qimg.log "tls-creds-x509,id=t0,dir=$P/client-anon,endpoint=client" \
        "driver=nbd,server.type=unix,server.path=$(sock exp),tls-creds=t0,tls-hostname=localhost"; then
    bad "qemu-img accepted an expired server certificate"
else
    ok "expired server certificate: qemu-img refuses ($(tail -1 qimg.log | sed 's/.*: //'))"
fi
stop "$SPID"

# --- 6. --tls=on ----------------------------------------------------------------
start on "$SERVER" -t -v --handshake-timeout "$HS" -k "$(sock on)" -x disk \
    --tls=on --tls-certificates "$P/server" disk.qcow2
nbdinfo --size "nbd+unix:///disk?socket=$(sock on)" >/dev/null 2>on.err &&
    ok "--tls=on: plaintext client served" || bad "--tls=on plaintext: $(cat on.err)"
nbdinfo --size "nbds+unix:///disk?socket=$(sock on)&tls-certificates=$P/client-anon" >/dev/null 2>on.err &&
    ok "--tls=on: TLS client served" || bad "--tls=on TLS: $(cat on.err)"
hostile on "$P/client-anon" "$SPID" "$(sock on)"
stop "$SPID"

# --- 6b. --idle-timeout under TLS ---------------------------------------------
# Requests that OpenSSL read ahead are served at once; a TLS connection
# idle for 2 s is closed, not earlier.
start idle "$SERVER" -t -v --idle-timeout 2 -k "$(sock idle)" -x disk \
    --tls-certificates "$P/server" disk.qcow2
if "$PYTHON" - "nbds+unix:///disk?socket=$(sock idle)&tls-certificates=$P/client-anon" ref.raw \
        >idle.out 2>&1 <<'EOF'; then
import sys, time
import nbd

h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
ref = open(sys.argv[2], "rb").read(1 << 20)
# 16 reads in flight at once: several arrive in one TLS record.
bufs = [nbd.Buffer(65536) for _ in range(16)]
for i in range(16):
    h.aio_pread(bufs[i], i * 65536)
end = time.monotonic() + 60
while h.aio_in_flight() > 0:
    if time.monotonic() > end:
        sys.exit("16 pipelined reads not answered within 60 s")
    h.poll(1000)
for i in range(16):
    if bufs[i].to_bytearray() != ref[i * 65536:(i + 1) * 65536]:
        sys.exit(f"pipelined read {i} differs")
t0 = time.monotonic()  # the server's idle time starts after this
while not (h.aio_is_closed() or h.aio_is_dead()):
    if time.monotonic() - t0 > 60:
        sys.exit("the idle TLS connection is still open after 60 s")
    try:
        h.poll(1000)
    except nbd.Error:
        break
idle = time.monotonic() - t0
if idle < 1.9:
    sys.exit(f"closed after {idle:.2f} s of idleness, expected 2 s")
print(f"closed after {idle:.2f} s idle")
EOF
    ok "--idle-timeout under TLS: 16 pipelined reads served, then $(cat idle.out)"
    expect_log idle.log "idle for 2 s: disconnecting" "--idle-timeout under TLS"
else
    bad "--idle-timeout under TLS: $(cat idle.out)"
fi
stop "$SPID"

# --- 7. qemu-nbd with TLS as source and target ------------------------------
start qemu-x qemu-nbd -r -t -f qcow2 -B ck -k "$(sock qemu-x)" \
    --object "tls-creds-x509,id=tls0,dir=$P/server,endpoint=server" --tls-creds tls0 disk.qcow2
if "$QCBT" backup --full --no-progress --tls-certificates "$P/client" \
        "nbd+unix:///?socket=$(sock qemu-x)" bk-qemu >bk.out 2>&1 &&
    "$QCBT" backup --since ck --no-progress \
        "nbds+unix:///?socket=$(sock qemu-x)&tls-certificates=$P/client" bk-qemu >>bk.out 2>&1 &&
    grep -q 'incremental backup, 2162688 bytes of data' bk.out &&
    "$QCBT" verify --tls-certificates "$P/client" \
        --against "nbd+unix:///?socket=$(sock qemu-x)" bk-qemu >>bk.out 2>&1; then
    ok "qcbt backup (full + incremental) and verify over TLS from qemu-nbd --tls-creds (X.509)"
else
    bad "qcbt backup from qemu-nbd over TLS: $(cat bk.out)"
fi
stop "$SPID"
start qemu-p qemu-nbd -r -t -f qcow2 -k "$(sock qemu-p)" \
    --object "tls-creds-psk,id=tls0,dir=$P/psk,endpoint=server" --tls-creds tls0 disk.qcow2
"$QCBT" backup --full --no-progress "nbds+unix://bob@/?socket=$(sock qemu-p)&tls-psk-file=$P/psk/keys.psk" \
    bk-qemu-psk >bk.out 2>&1 && "$QCBT" verify bk-qemu-psk >>bk.out 2>&1 &&
    ok "qcbt backup over TLS from qemu-nbd --tls-creds (PSK)" || bad "qcbt backup from qemu-nbd PSK: $(cat bk.out)"
stop "$SPID"
qemu-img create -q -f raw target.raw 64M
start qemu-w qemu-nbd -t -f raw -k "$(sock qemu-w)" \
    --object "tls-creds-psk,id=tls0,dir=$P/psk,endpoint=server" --tls-creds tls0 target.raw
if "$QCBT" restore --tls-psk-file "$P/psk/keys.psk" --tls-username alice bk-x509 \
        "nbd+unix:///?socket=$(sock qemu-w)" >rs.out 2>&1; then
    stop "$SPID"
    cmp -s target.raw ref.raw && ok "qcbt restore to qemu-nbd over TLS (PSK)" ||
        bad "restore over TLS: the target differs from the guest data"
else
    bad "qcbt restore over TLS: $(cat rs.out)"
    stop "$SPID"
fi

# --- 8. start-up errors -------------------------------------------------------
expect_start_error() {
    local what=$1 needle=$2 err
    shift 2
    if "$SERVER" -k "$TMPD/never.sock" "$@" disk.qcow2 >/dev/null 2>start.err; then
        bad "$what: the server started"
        return
    fi
    err=$(cat start.err)
    if [[ $(wc -l <start.err) -eq 1 && $err == "qcbt-server: "*"$needle"* ]]; then
        ok "$what: $err"
    else
        bad "$what: expected one line with '$needle', got: $err"
    fi
}
expect_start_error "--tls=require without credentials" "needs credentials" --tls=require
expect_start_error "--tls=bogus" "expected off, on or require" --tls=bogus
expect_start_error "credentials with --tls=off" "--tls=off" --tls=off --tls-psk "$P/psk/keys.psk"
expect_start_error "missing directory" "$TMPD/nodir" --tls-certificates "$TMPD/nodir"
expect_start_error "key of another certificate" "does not match" \
    --tls-cert "$P/server/server-cert.pem" --tls-key "$P/client/client-key.pem"
expect_start_error "--tls-verify-peer without a CA" "needs a CA" \
    --tls-cert "$P/server/server-cert.pem" --tls-key "$P/server/server-key.pem" --tls-verify-peer
printf 'alice:xyz\n' >bad.psk
expect_start_error "PSK file with a bad key" "line 1" --tls-psk bad.psk
expect_start_error "PSK and certificates together" "cannot be combined" \
    --tls-psk "$P/psk/keys.psk" --tls-certificates "$P/server"
expect_start_error "--tls-creds of no object" "no --object" --tls-creds nope
expect_start_error "--object endpoint=client" "endpoint=server" \
    --object "tls-creds-x509,id=t,dir=$P/server,endpoint=client" --tls-creds t
expect_start_error "--object of another type" "tls-creds-x509 and tls-creds-psk" \
    --object "secret,id=s,data=x"
for cmd in "backup nbd+unix:///?socket=x bk-none" "restore bk-x509 nbd+unix:///?socket=x" \
    "verify bk-x509"; do
    # shellcheck disable=SC2086 # the words of the command line
    expect_qcbt_error "${cmd%% *}: --tls=maybe: expected off, on or require" "see qcbt ${cmd%% *} --help" \
        -- ${cmd%% *} --tls=maybe ${cmd#* } && ok "qcbt ${cmd%% *} --tls=maybe: a usage error" ||
        bad "qcbt ${cmd%% *} --tls=maybe"
done
"$QCBT" verify --tls=off --against "nbds+unix:///?socket=$TMPD/never.sock" bk-x509 >qb.err 2>&1 &&
    bad "qcbt verify --tls=off accepted an nbds:// URI" ||
    { grep -q "not permitted" qb.err && ok "qcbt --tls=off refuses nbds:// URIs" ||
        bad "qcbt verify --tls=off nbds://: $(cat qb.err)"; }

exit "$rc"
