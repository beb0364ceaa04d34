#!/usr/bin/python3
"""TLS abuse against qcbt-server (reliability catalogue B14-B16).

    tls-hostile.py wait SOCK [TIMEOUT]
    tls-hostile.py --socket SOCK --pid PID --ref REF.raw --export NAME
                   --certs DIR --mode require|on [--hs-timeout S]
                   [--cases REGEX] [--list]

wait: return once a client can really connect to SOCK and read an NBD
greeting (any server: qcbt-server, qemu-nbd, nbdkit), exit 1 after
TIMEOUT seconds (default 20).

Otherwise: raw-socket cases against a qcbt-server started with X.509
credentials (DIR/ca-cert.pem verifies it; no client certificate is
asked) serving REF.raw as export NAME, with --tls=MODE and
--handshake-timeout S.  Around every case a good client (libnbd, TLS)
is connected before the case and must still read correct data after
it, and a new good client must be served: a bad client costs only its
own connection.  Prints "ok CASE" or "FAIL CASE: why"; exit 1 if any
failed.
"""

import argparse
import os
import re
import socket
import ssl
import struct
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostile import (  # noqa: E402
    CMD_BLOCK_STATUS, CMD_DISC, CMD_READ, Closed, Conn, ERR_INVALID, Fail,
    INFO_BLOCK_SIZE, MiB, NBD_MAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO,
    OPT_INFO, OPT_LIST, OPT_LIST_META, OPT_SET_META, OPT_SR, OPT_STARTTLS,
    OPTS_MAGIC, REP_ACK, REP_MAGIC, REP_SERVER, SIMPLE_MAGIC, WAIT, alive,
    check, ref_read)

ERR_TLS_REQD = 0x80000005
# A refused client must be hung up on at once; this bound (seconds) only
# catches a server that keeps it (a loaded machine, ASan).
CLOSE_BOUND = 30
OPT_EXT_HEADERS = 11
EINVAL = 22


def wait_ready(path, timeout):
    """Connect and read the 18-byte greeting; retry until TIMEOUT."""
    end = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect(path)
            g = b""
            while len(g) < 18:
                b = s.recv(18 - len(g))
                if not b:
                    break
                g += b
            s.close()
            if len(g) == 18 and struct.unpack(">QQ", g[:16]) == (NBD_MAGIC,
                                                                 OPTS_MAGIC):
                return 0
        except OSError:
            pass
        if time.monotonic() > end:
            print(f"tls-hostile.py: {path}: no NBD greeting after "
                  f"{timeout} s", file=sys.stderr)
            return 1
        time.sleep(0.05)


# --------------------------------------------------------------------------
# Helpers


def tls_context(args, **kw):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(args.certs, "ca-cert.pem"))
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def starttls(c, args, ctx=None):
    """STARTTLS, expect ACK, run the handshake on the same socket."""
    _, t, d = c.opt(OPT_STARTTLS)
    check(t == REP_ACK, f"STARTTLS: 0x{t:x} {d!r}")
    c.s = (ctx or tls_context(args)).wrap_socket(c.s,
                                                 server_hostname="localhost")
    return c.s


def goodbye(c):
    try:
        c.req(CMD_DISC)
    except (OSError, Closed):
        pass
    c.close()


def closed_without_reply(c, timeout, what):
    """The server must hang up without sending an NBD option reply."""
    end = time.monotonic() + timeout
    got = b""
    while time.monotonic() < end:
        c.s.settimeout(max(0.05, end - time.monotonic()))
        try:
            b = c.s.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            b = b""
        if not b:
            check(struct.pack(">Q", REP_MAGIC) not in got,
                  f"{what}: an option reply came before the close")
            return
        got += b
    raise Fail(f"{what}: connection still open after {timeout} s")


def opt_body_export(args, infos=()):
    e = args.export.encode()
    return (struct.pack(">I", len(e)) + e + struct.pack(">H", len(infos)) +
            b"".join(struct.pack(">H", i) for i in infos))


def meta_body(args, queries):
    e = args.export.encode()
    return (struct.pack(">I", len(e)) + e + struct.pack(">I", len(queries)) +
            b"".join(struct.pack(">I", len(q)) + q for q in queries))


def tls_go(args, c=None, ctx=None):
    c = c or Conn(args.socket)
    c.greet()
    starttls(c, args, ctx)
    c.sr()
    c.go(args.export.encode(), (INFO_BLOCK_SIZE,))
    return c


def check_read(c, args, off=0, ln=65536):
    r = c.read(off, ln, cookie=0x51)
    check(r["err"] == 0, f"READ error {r['err']}")
    check(r["data"] == ref_read(args.ref, off, ln),
          f"READ {off}+{ln} differs from the reference")


# The good clients: libnbd (GnuTLS), as real backup clients are.

def good_client(args):
    import nbd
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(args.certs)
    h.set_export_name(args.export)
    h.connect_unix(args.socket)
    return h


def good_read(h, args, tag):
    size = h.get_size()
    for off, ln in ((0, 65536), (size // 2, 1 * MiB), (size - 4096, 4096)):
        check(h.pread(ln, off) == ref_read(args.ref, off, ln),
              f"good client: READ {off}+{ln} differs {tag}")


# --------------------------------------------------------------------------
# Cases

CASES = []


def case(*modes):
    def deco(fn):
        fn.modes = modes
        CASES.append(fn)
        return fn
    return deco


@case("require")
def plaintext_options_refused(args):
    """FORCEDTLS: every option but STARTTLS/ABORT gets TLS_REQD, with
    nothing about the exports in the reply."""
    c = Conn(args.socket)
    try:
        c.greet()
        name = args.export.encode()
        tries = [
            (OPT_LIST, b""),
            (OPT_INFO, opt_body_export(args, (INFO_BLOCK_SIZE,))),
            (OPT_GO, opt_body_export(args)),
            (OPT_SR, b""),
            (OPT_LIST_META, meta_body(args, [b"qemu:"])),
            (OPT_SET_META, meta_body(args, [b"base:allocation"])),
            (OPT_EXT_HEADERS, b""),
            (42, b"x" * 100),
            (OPT_INFO, opt_body_export(args)[:-1]),  # malformed
        ]
        for opt, body in tries:
            reps, t, d = c.opt(opt, body)
            check(not reps, f"option {opt}: {len(reps)} replies before TLS")
            check(t == ERR_TLS_REQD, f"option {opt}: 0x{t:x}, expected "
                  "NBD_REP_ERR_TLS_REQD")
            check(name not in d, f"option {opt}: the reply names the export")
        # A large payload is skipped unread and the stream stays in step.
        _, t, _ = c.opt(43, os.urandom(1 * MiB))
        check(t == ERR_TLS_REQD, f"1 MiB option: 0x{t:x}")
        _, t, _ = c.opt(OPT_ABORT)
        check(t == REP_ACK, f"ABORT before TLS: 0x{t:x}")
        check(c.wait_closed(CLOSE_BOUND), "not closed after ABORT")
    finally:
        c.close()


@case("require")
def export_name_before_tls_closes(args):
    c = Conn(args.socket)
    try:
        c.greet()
        c.send_opt(OPT_EXPORT_NAME, args.export.encode())
        closed_without_reply(c, CLOSE_BOUND, "EXPORT_NAME before TLS")
    finally:
        c.close()


@case("require")
def not_fixed_newstyle_closes(args):
    c = Conn(args.socket)
    try:
        c.greet(cflags=0)
        closed_without_reply(c, CLOSE_BOUND, "client without fixed newstyle")
    finally:
        c.close()


@case("require", "on")
def starttls_with_data_invalid(args):
    c = Conn(args.socket)
    try:
        c.greet()
        _, t, _ = c.opt(OPT_STARTTLS, b"abcd")
        check(t == ERR_INVALID, f"STARTTLS with data: 0x{t:x}")
        starttls(c, args)
        c.sr()
        c.go(args.export.encode())
        check_read(c, args)
        goodbye(c)
    finally:
        c.close()


@case("require", "on")
def second_starttls_invalid(args):
    c = Conn(args.socket)
    try:
        c.greet()
        starttls(c, args)
        _, t, d = c.opt(OPT_STARTTLS)
        check(t == ERR_INVALID, f"second STARTTLS: 0x{t:x} {d!r}")
        c.sr()
        c.go(args.export.encode())
        check_read(c, args)
        goodbye(c)
    finally:
        c.close()


@case("require", "on")
def injection_same_write(args):
    """STARTTLS and plaintext options in one write: the options must never
    be taken as if they came under TLS (CVE-2021-3716 class).  qcbt-server
    hangs up without even an ACK."""
    for extra in (struct.pack(">QII", OPTS_MAGIC, OPT_LIST, 0),
                  struct.pack(">QII", OPTS_MAGIC, OPT_SR, 0) +
                  struct.pack(">QII", OPTS_MAGIC, OPT_GO, 6) +
                  struct.pack(">IH", 0, 0)):
        c = Conn(args.socket)
        try:
            c.greet()
            c.send(struct.pack(">QII", OPTS_MAGIC, OPT_STARTTLS, 0) + extra)
            closed_without_reply(c, CLOSE_BOUND, "STARTTLS with options behind it")
        finally:
            c.close()


@case("require", "on")
def injection_after_ack(args):
    """Plaintext where the ClientHello should be: the TLS handshake fails,
    the option is never answered."""
    c = Conn(args.socket)
    try:
        c.greet()
        _, t, _ = c.opt(OPT_STARTTLS)
        check(t == REP_ACK, f"STARTTLS: 0x{t:x}")
        c.send(struct.pack(">QII", OPTS_MAGIC, OPT_LIST, 0))
        closed_without_reply(c, CLOSE_BOUND, "plaintext option instead of TLS")
    finally:
        c.close()


@case("require", "on")
def garbage_handshake(args):
    for junk in (os.urandom(16384),
                 b"\x16\x03\x01\x40\x00" + os.urandom(16384),
                 b"\x16\x03\x03\x00\x05\x01\x00\x00\x01\x00",
                 b"GET / HTTP/1.0\r\n\r\n"):
        c = Conn(args.socket)
        try:
            c.greet()
            _, t, _ = c.opt(OPT_STARTTLS)
            check(t == REP_ACK, f"STARTTLS: 0x{t:x}")
            try:
                c.send(junk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            closed_without_reply(c, CLOSE_BOUND, f"garbage {junk[:8].hex()}")
        finally:
            c.close()


@case("require", "on")
def stalled_handshake_dropped(args):
    """Nothing, or half a ClientHello, after the ACK: dropped by the
    handshake deadline."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls_context(args).wrap_bio(inc, out, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    check(len(hello) > 100, "no ClientHello from python's ssl")
    for sent in (b"", hello[:len(hello) // 2]):
        c = Conn(args.socket, timeout=args.hs_timeout + 10)
        try:
            c.greet()
            _, t, _ = c.opt(OPT_STARTTLS)
            check(t == REP_ACK, f"STARTTLS: 0x{t:x}")
            t0 = time.monotonic()
            c.send(sent)
            closed_without_reply(c, args.hs_timeout + CLOSE_BOUND,
                                 f"stalled handshake ({len(sent)} bytes)")
            dt = time.monotonic() - t0
            # By the handshake deadline, well before any other timeout
            # (send: 120 s) could be what closed it.
            check(dt <= args.hs_timeout + CLOSE_BOUND,
                  f"stalled handshake closed after {dt:.1f} s "
                  f"(--handshake-timeout {args.hs_timeout:g})")
        finally:
            c.close()


@case("require", "on")
def old_tls_versions_refused(args):
    warnings.simplefilter("ignore", DeprecationWarning)
    for ver in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        ctx = tls_context(args)
        try:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            ctx.minimum_version = ver
            ctx.maximum_version = ver
        except (ValueError, ssl.SSLError):
            continue  # this python cannot even offer it
        c = Conn(args.socket)
        try:
            c.greet()
            try:
                starttls(c, args, ctx)
            except (ssl.SSLError, OSError):
                continue  # refused: good
            raise Fail(f"the server accepted {ver.name}")
        finally:
            c.close()


@case("require", "on")
def tls12_works(args):
    c = Conn(args.socket)
    try:
        tls_go(args, c=c, ctx=tls_context(
            args, maximum_version=ssl.TLSVersion.TLSv1_2))
        check(c.s.version() == "TLSv1.2", f"negotiated {c.s.version()}")
        check_read(c, args, 1 * MiB, 2 * MiB)
        goodbye(c)
    finally:
        c.close()


@case("require", "on")
def close_mid_request(args):
    """close_notify in the middle of a request header, and a raw close in
    the middle of a TLS record."""
    c = tls_go(args)
    try:
        hdr = struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 9, 0, 4096)
        c.send(hdr[:10])
        c.s = c.s.unwrap()
    except (OSError, ssl.SSLError):
        pass
    finally:
        c.close()
    c = tls_go(args)
    try:
        raw = c.s.detach() if hasattr(c.s, "detach") else None
        if raw is not None:
            s = socket.socket(fileno=raw)
            s.sendall(b"\x17\x03\x03\x40\x00" + os.urandom(100))
            s.close()
    finally:
        c.close()


@case("require", "on")
def pipelined_requests(args):
    """Requests sent together arrive in one TLS record: OpenSSL reads them
    from the socket with the first, so the server must serve them from its
    buffer, not wait for the socket to have more (it never will).  Then
    the same with one request per record, written at once."""
    c = tls_go(args)
    try:
        n = 8
        for one_record in (True, False):
            hdrs = [c.pack_req(CMD_READ, 0, 0x100 + i, i * 65536, 4096)
                    for i in range(n)]
            if one_record:
                c.send(b"".join(hdrs))
            else:
                for h in hdrs:
                    c.send(h)
            for i in range(n):
                try:
                    r = c.result(0x100 + i)
                except socket.timeout:
                    raise Fail(f"no reply to request {i + 1} of {n} sent "
                               f"together (one record: {one_record}) "
                               f"after {WAIT} s")
                check(r["err"] == 0, f"READ {i}: error {r['err']}")
                got = b"".join(d for _, d in sorted(r["reads"]))
                check(got == ref_read(args.ref, i * 65536, 4096),
                      f"READ {i} differs from the reference")
        goodbye(c)
    finally:
        c.close()


@case("on")
def plaintext_state_forgotten(args):
    """--tls=on: structured replies and meta contexts negotiated in
    plaintext do not survive STARTTLS (CVE-2021-3716)."""
    c = Conn(args.socket)
    try:
        c.greet()
        c.sr()
        c.set_meta(args.export.encode(), [b"base:allocation"])
        starttls(c, args)
        c.structured = False
        c.go(args.export.encode())
        c.req(CMD_READ, 0, 0x77, 0, 4096)
        m = struct.unpack(">I", c.recvn(4))[0]
        check(m == SIMPLE_MAGIC, f"reply magic 0x{m:08x}: structured "
              "replies negotiated before TLS were kept")
        c.recvn(12 + 4096)
        goodbye(c)
    finally:
        c.close()
    c = Conn(args.socket)
    try:
        c.greet()
        c.sr()
        c.set_meta(args.export.encode(), [b"base:allocation"])
        starttls(c, args)
        _, t, d = c.opt(OPT_SR)
        check(t == REP_ACK, f"STRUCTURED_REPLY after TLS: 0x{t:x} {d!r} "
              "(the plaintext one was kept)")
        c.structured = True
        c.go(args.export.encode())
        c.req(CMD_BLOCK_STATUS, 0, 0x78, 0, 65536)
        r = c.result(0x78)
        check(r["err"] == EINVAL, f"BLOCK_STATUS without a context after "
              f"TLS: error {r['err']} (the plaintext selection was kept)")
        goodbye(c)
    finally:
        c.close()


@case("on")
def plaintext_served_with_on(args):
    c = Conn(args.socket)
    try:
        c.greet()
        reps, t, _ = c.opt(OPT_LIST)
        check(t == REP_ACK and any(rt == REP_SERVER for rt, _ in reps),
              "--tls=on: LIST in plaintext")
        c.sr()
        c.go(args.export.encode())
        check_read(c, args)
        goodbye(c)
    finally:
        c.close()


@case("require", "on")
def handshake_churn(args):
    """Many connections that stop at every stage: the server's memory and
    descriptors stay flat."""
    def fds():
        return len(os.listdir(f"/proc/{args.pid}/fd"))

    def rss():
        with open(f"/proc/{args.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def churn(n):
        for i in range(n):
            c = Conn(args.socket)
            try:
                c.greet()
                if i % 3 == 0:
                    c.close()
                    continue
                _, t, _ = c.opt(OPT_STARTTLS)
                if i % 3 == 1:
                    c.send(os.urandom(64))
                else:
                    c.s = tls_context(args).wrap_socket(
                        c.s, server_hostname="localhost")
            except (OSError, ssl.SSLError, Closed):
                pass
            finally:
                c.close()

    def settled(limit):
        """Until the server has closed what the churn left open (it may
        still be finishing the last connections); the bound only catches
        a leak."""
        deadline = time.monotonic() + WAIT
        while fds() > limit and time.monotonic() < deadline:
            time.sleep(0.05)
        return fds()

    f_start = fds()
    churn(30)  # warm up: the allocator's arenas, OpenSSL's tables
    f0, r0 = settled(f_start), rss()
    churn(150)
    check(settled(f0 + 2) <= f0 + 2, f"descriptors {f0} -> {fds()} after "
          "150 connections")
    check(rss() <= r0 + 20 * 1024, f"RSS {r0} -> {rss()} KiB after 150 "
          "connections")


# --------------------------------------------------------------------------


def run(args):
    failed = 0
    pat = re.compile(args.cases) if args.cases else None
    for fn in CASES:
        if args.mode not in fn.modes or (pat and not pat.search(fn.__name__)):
            continue
        name = fn.__name__
        try:
            h = good_client(args)  # already in transmission
            try:
                fn(args)
                check(alive(args.pid), "the server died")
                good_read(h, args, "on the connection made before the case")
            finally:
                try:
                    h.shutdown()
                except Exception:
                    pass
                del h
            h = good_client(args)
            good_read(h, args, "on a new connection")
            h.shutdown()
            del h
            print(f"ok {name}")
        except Exception as e:  # noqa: BLE001 - report every failure
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            if os.environ.get("HOSTILE_TRACE"):
                traceback.print_exc()
        sys.stdout.flush()
    return 1 if failed else 0


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "wait":
        return wait_ready(sys.argv[2],
                          float(sys.argv[3]) if len(sys.argv) > 3 else 20)
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--export", default="")
    ap.add_argument("--certs", required=True)
    ap.add_argument("--mode", choices=("require", "on"), required=True)
    ap.add_argument("--hs-timeout", type=float, default=3)
    ap.add_argument("--cases")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for fn in CASES:
            print(fn.__name__, ",".join(fn.modes))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
