#!/usr/bin/python3
"""Hostile NBD clients against qcbt-server (reliability catalogue 3(b)).

    hostile.py --socket SOCK|HOST:PORT --pid PID --ref REF.raw
               [--big-size N --alt-period P --alt-span S] [--max-conn N]
               [--hs-timeout S] [--rss-limit-mib M] [--cases REGEX] [--list]
    hostile.py --socket SOCK --pid PID --sigterm [--shutdown-bound S]

Raw sockets only (no libnbd), so every byte on the wire is ours.  The
server under test is started by test-server-hostile.sh: export "" (REF.raw
is its guest content) with -A and bitmaps b0, b1 (the image also holds
the in-use bitmap "inuse"), export "other" (bitmap c0), export "big"
(bitmap "alt": dirty/clean alternating every ALT_PERIOD bytes over the
first ALT_SPAN bytes), --handshake-timeout HS_TIMEOUT, -e MAX_CONN, -t.

After every case a fresh, well-behaved client must still be served (READs
compared with REF.raw and a BLOCK_STATUS checked) and the server's RSS
must stay within --rss-limit-mib of its RSS after the warm-up.  Each case
prints "ok CASE" or "FAIL CASE: why"; the exit status is 1 if any failed.

--sigterm: open connections mid-handshake, mid-option, in transmission,
mid-BLOCK_STATUS and hung (pipelining without reading), send SIGTERM, and
check that every socket is closed and the process gone within the bound
(the caller checks the exit status).
"""

import argparse
import itertools
import os
import re
import select
import signal
import socket
import struct
import sys
import time
import traceback

NBD_MAGIC = 0x4E42444D41474943
OPTS_MAGIC = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_SR, OPT_LIST_META, OPT_SET_META = 6, 7, 8, 9, 10
OPT_EXT_HEADERS = 11

REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR_UNSUP = 0x80000001
ERR_POLICY = 0x80000002
ERR_INVALID = 0x80000003
ERR_UNKNOWN = 0x80000006
ERR_TOO_BIG = 0x80000009

INFO_EXPORT, INFO_NAME, INFO_DESC, INFO_BLOCK_SIZE = 0, 1, 2, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 4, 5, 6, 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE = 1, 2, 4, 8

TF_READ_ONLY = 2

CHUNK_NONE, CHUNK_DATA, CHUNK_HOLE, CHUNK_BS = 0, 1, 2, 5
CHUNK_ERROR, CHUNK_ERROR_OFFSET = 0x8001, 0x8002
REPLY_DONE = 1

EPERM, EIO, EINVAL, ENOSPC, ESHUTDOWN = 1, 5, 22, 28, 108

MAX_EXTENTS = 131072  # qemu's per-chunk cap, which qcbt documents
MiB = 1 << 20

# The bound on anything that must happen (a reply, a close, a slot coming
# back): generous, so that only a hang exceeds it, even with an ASan server
# on a loaded machine.  Checks that something happens *early enough* (the
# handshake deadline) allow this much slack; the early side stays exact.
WAIT = 120


class Fail(Exception):
    pass


class Closed(Exception):
    """The server closed the connection."""


def check(cond, msg):
    if not cond:
        raise Fail(msg)


# --------------------------------------------------------------------------
# Wire helpers


class Conn:
    def __init__(self, addr, timeout=WAIT, rcvbuf=None):
        if isinstance(addr, tuple):
            self.s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if rcvbuf:
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.s.settimeout(timeout)
        self.s.connect(addr)
        self.structured = False
        self.pending = {}  # cookie -> (type, length) of every request sent
        self.partial = {}  # cookie -> reply being collected
        self.completed = []

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass

    def send(self, data):
        self.s.sendall(data)

    def recvn(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                b = self.s.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError:
                raise Closed(f"connection reset after {len(buf)} of {n} bytes")
            if not b:
                raise Closed(f"EOF after {len(buf)} of {n} bytes")
            buf += b
        return bytes(buf)

    def wait_closed(self, timeout):
        """True if the server closes the connection within TIMEOUT seconds
        (any data that arrives first is discarded)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([self.s], [], [], left)
            if not r:
                return False
            try:
                b = self.s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not b:
                return True

    def nothing_pending(self, timeout=0.3):
        """True if no byte arrives within TIMEOUT (connection still open)."""
        r, _, _ = select.select([self.s], [], [], timeout)
        if not r:
            return True
        return False

    # -- handshake

    def greet(self, cflags=3):
        g = self.recvn(18)
        magic, opts, hflags = struct.unpack(">QQH", g)
        check(magic == NBD_MAGIC and opts == OPTS_MAGIC,
              f"bad greeting {g.hex()}")
        check(hflags == 3, f"handshake flags 0x{hflags:x}, expected 0x3")
        if cflags is not None:
            self.send(struct.pack(">I", cflags))
        return hflags

    def send_opt(self, opt, data=b"", length=None):
        if length is None:
            length = len(data)
        self.send(struct.pack(">QII", OPTS_MAGIC, opt, length) + data)

    def read_rep(self, opt):
        h = self.recvn(20)
        magic, ropt, rtype, rlen = struct.unpack(">QIII", h)
        check(magic == REP_MAGIC, f"bad option reply magic 0x{magic:x}")
        check(ropt == opt, f"reply for option {ropt}, expected {opt}")
        check(rlen <= 16 * MiB, f"option reply of {rlen} bytes")
        return rtype, self.recvn(rlen)

    def opt(self, opt, data=b"", length=None):
        """Send an option; return ([(type, data)...], final_type, final_data)."""
        self.send_opt(opt, data, length)
        reps = []
        while True:
            t, d = self.read_rep(opt)
            if t in (REP_SERVER, REP_INFO, REP_META):
                reps.append((t, d))
                check(len(reps) < 100000, "endless option replies")
                continue
            return reps, t, d

    def sr(self):
        _, t, d = self.opt(OPT_SR)
        check(t == REP_ACK, f"STRUCTURED_REPLY: 0x{t:x} {d!r}")
        self.structured = True

    def meta(self, opt, export, queries, nq=None):
        body = struct.pack(">I", len(export)) + export
        body += struct.pack(">I", len(queries) if nq is None else nq)
        body += b"".join(struct.pack(">I", len(q)) + q for q in queries)
        reps, t, d = self.opt(opt, body)
        ctx = []
        for rt, rd in reps:
            check(rt == REP_META, f"unexpected reply type {rt} to meta context")
            check(len(rd) >= 4, "short META_CONTEXT reply")
            ctx.append((struct.unpack(">I", rd[:4])[0], rd[4:].decode()))
        return ctx, t, d

    def set_meta(self, export, queries, ok=True):
        ctx, t, d = self.meta(OPT_SET_META, export, queries)
        if ok:
            check(t == REP_ACK, f"SET_META_CONTEXT: 0x{t:x} {d!r}")
        return {i: n for i, n in ctx}, ctx, t

    def info_go(self, opt, export, infos=(), raw=None):
        body = raw if raw is not None else (
            struct.pack(">I", len(export)) + export +
            struct.pack(">H", len(infos)) +
            b"".join(struct.pack(">H", i) for i in infos))
        reps, t, d = self.opt(opt, body)
        info = {}
        for rt, rd in reps:
            check(rt == REP_INFO, f"unexpected reply type {rt} to INFO/GO")
            itype = struct.unpack(">H", rd[:2])[0]
            info[itype] = rd[2:]
        return info, t, d

    def go(self, export=b"", infos=(INFO_BLOCK_SIZE,)):
        info, t, d = self.info_go(OPT_GO, export, infos)
        check(t == REP_ACK, f"GO {export[:40]!r}: 0x{t:x} {d[:200]!r}")
        check(INFO_EXPORT in info and len(info[INFO_EXPORT]) == 10,
              "GO without a well-formed NBD_INFO_EXPORT")
        self.size, self.tflags = struct.unpack(">QH", info[INFO_EXPORT])
        return self.size, self.tflags

    # -- transmission

    def pack_req(self, cmd, flags, cookie, offset, length):
        """A request header to send later (registered as pending)."""
        self.pending[cookie] = (cmd, length)
        return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, offset,
                           length)

    def req(self, cmd, flags=0, cookie=1, offset=0, length=0, payload=b""):
        self.pending[cookie] = (cmd, length)
        self.send(struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie,
                              offset, length) + payload)

    def reply(self):
        """One reply unit: ('simple', cookie, err, data) or
        ('chunk', cookie, flags, type, payload)."""
        m = struct.unpack(">I", self.recvn(4))[0]
        if m == SIMPLE_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recvn(12))
            data = b""
            cmd, length = self.pending.get(cookie, (None, 0))
            if cmd == CMD_READ and err == 0:
                check(not self.structured,
                      "simple reply with data to a READ after "
                      "structured replies were negotiated")
                data = self.recvn(length)
            return ("simple", cookie, err, data)
        if m == STRUCT_MAGIC:
            check(self.structured, "structured chunk without negotiation")
            flags, typ, cookie, length = struct.unpack(">HHQI",
                                                       self.recvn(16))
            check(length <= 64 * MiB, f"chunk payload of {length} bytes")
            return ("chunk", cookie, flags, typ, self.recvn(length))
        raise Fail(f"bad reply magic 0x{m:08x}")

    def result(self, cookie=None):
        """Collect one whole reply (for COOKIE, or the next one to
        complete); chunks of different requests may interleave.  Returns a
        dict: err, msg, chunks [(flags, type, payload)], bs {ctx: [(len,
        flags)]}, reads [(offset, bytes)], data (simple READ), cookie."""
        while True:
            for i, done in enumerate(self.completed):
                if cookie is None or done["cookie"] == cookie:
                    return self.completed.pop(i)
            r = self.reply()
            ck = r[1]
            check(ck in self.pending or ck in self.partial,
                  f"reply for cookie {ck:#x}, which no request carried")
            if r[0] == "simple":
                _, ck, err, data = r
                check(ck not in self.partial,
                      f"simple reply to cookie {ck:#x} after its chunks")
                self.completed.append({"err": err, "msg": b"", "chunks": [],
                                       "bs": {}, "reads": [], "data": data,
                                       "cookie": ck, "simple": True})
                continue
            _, ck, flags, typ, payload = r
            out = self.partial.setdefault(
                ck, {"err": 0, "msg": b"", "chunks": [], "bs": {},
                     "data": None, "reads": [], "cookie": ck})
            out["chunks"].append((flags, typ, payload))
            check(flags & ~REPLY_DONE == 0, f"unknown chunk flags {flags:#x}")
            if typ in (CHUNK_ERROR, CHUNK_ERROR_OFFSET):
                check(len(payload) >= 6, "short error chunk")
                err, mlen = struct.unpack(">IH", payload[:6])
                check(err != 0, "error chunk with error 0")
                check(6 + mlen <= len(payload), "error message overruns chunk")
                check(mlen <= 4096, "error message > 4096 bytes")
                out["err"] = err
                out["msg"] = payload[6:6 + mlen]
            elif typ == CHUNK_BS:
                check(len(payload) >= 12 and (len(payload) - 4) % 8 == 0,
                      f"BLOCK_STATUS chunk of {len(payload)} bytes")
                cid = struct.unpack(">I", payload[:4])[0]
                check(cid not in out["bs"], f"two chunks for context {cid}")
                out["bs"][cid] = list(struct.iter_unpack(">II", payload[4:]))
            elif typ == CHUNK_DATA:
                check(len(payload) > 8, "OFFSET_DATA chunk without data")
                off = struct.unpack(">Q", payload[:8])[0]
                out["reads"].append((off, payload[8:]))
            elif typ == CHUNK_HOLE:
                check(len(payload) == 12, "OFFSET_HOLE chunk length")
                off, hl = struct.unpack(">QI", payload)
                check(hl > 0, "OFFSET_HOLE of length 0")
                out["reads"].append((off, bytes(hl)))
            elif typ == CHUNK_NONE:
                check(flags & REPLY_DONE, "NONE chunk without DONE")
                check(not payload, "NONE chunk with payload")
            else:
                raise Fail(f"unknown chunk type {typ:#x}")
            if flags & REPLY_DONE:
                self.completed.append(self.partial.pop(ck))

    def read(self, offset, length, flags=0, cookie=7):
        self.req(CMD_READ, flags, cookie, offset, length)
        r = self.result(cookie)
        if r["err"]:
            return r
        if self.structured:
            buf = bytearray(length)
            covered = 0
            for off, d in sorted(r["reads"]):
                check(offset <= off and off + len(d) <= offset + length,
                      f"read chunk {off}+{len(d)} outside request "
                      f"{offset}+{length}")
                check(off == offset + covered,
                      f"read chunks overlap or leave a gap at {off}")
                buf[off - offset:off - offset + len(d)] = d
                covered += len(d)
            check(covered == length,
                  f"read chunks cover {covered} of {length} bytes")
            r["data"] = bytes(buf)
        return r


def addr_of(args):
    """--socket is a unix socket path, or HOST:PORT for TCP."""
    if "/" in args.socket or ":" not in args.socket:
        return args.socket
    h, p = args.socket.rsplit(":", 1)
    return (h, int(p))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False


def connect_go(args, export=b"", contexts=(), structured=True, addr=None,
               infos=(INFO_BLOCK_SIZE,)):
    c = Conn(addr or addr_of(args))
    c.greet()
    if structured:
        c.sr()
    ids = {}
    if contexts:
        ids, _, _ = c.set_meta(export, list(contexts))
    c.go(export, infos)
    c.ids = {n: i for i, n in ids.items()}
    return c


# --------------------------------------------------------------------------
# Block-status validation


def check_bs(r, ids, offset, length, size, req_one=False, same_end=True):
    """Check a BLOCK_STATUS reply: one chunk per context, DONE last and
    only last, >= 1 extent, non-zero lengths, contiguous from OFFSET, not
    past SIZE, REQ_ONE rules, extent cap.  Returns {ctx: [(off, len, fl)]}."""
    check(r["err"] == 0, f"block status error {r['err']}: {r['msg']!r}")
    chunks = r["chunks"]
    check(len(chunks) == len(ids),
          f"{len(chunks)} chunks for {len(ids)} contexts")
    for i, (fl, typ, _) in enumerate(chunks):
        check(typ == CHUNK_BS, f"chunk type {typ} in block status reply")
        check(bool(fl & REPLY_DONE) == (i == len(chunks) - 1),
              "DONE flag not exactly on the last chunk")
    check(set(r["bs"]) == set(ids),
          f"contexts {sorted(r['bs'])}, negotiated {sorted(ids)}")
    out, ends = {}, set()
    for cid, ext in r["bs"].items():
        check(len(ext) >= 1, f"context {cid}: no extent")
        check(len(ext) <= MAX_EXTENTS,
              f"context {cid}: {len(ext)} extents > {MAX_EXTENTS}")
        if req_one:
            check(len(ext) == 1, f"REQ_ONE: context {cid} has {len(ext)} "
                  "extents")
            check(ext[0][0] <= length,
                  f"REQ_ONE: extent {ext[0][0]} longer than request {length}")
        pos, lst = offset, []
        for i, (ln, fl) in enumerate(ext):
            check(ln > 0, f"context {cid}: extent {i} has length 0")
            if i < len(ext) - 1:
                check(pos + ln < offset + length,
                      f"context {cid}: extent {i} reaches the request end "
                      "but is not the last")
            lst.append((pos, ln, fl))
            pos += ln
        check(pos <= size, f"context {cid}: extents end at {pos} past the "
              f"export size {size}")
        ends.add(min(pos, offset + length))
        out[cid] = lst
    if same_end:
        check(len(ends) == 1, f"contexts end at different offsets {ends}")
    return out


def ref_read(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        d = f.read(length)
    return d + bytes(length - len(d))


# --------------------------------------------------------------------------
# The fresh-client probe run after every case


def probe(args, tag=""):
    check(alive(args.pid), f"server process {args.pid} is gone {tag}")
    c = connect_go(args, b"", [b"base:allocation", b"qemu:dirty-bitmap:b0"])
    try:
        check(c.size == args.size, f"export size {c.size} != {args.size}")
        for off, ln in ((0, 4096), (args.size - 70000, 70000), (4 * MiB, 65536)):
            r = c.read(off, ln, cookie=0x1234)
            check(r["err"] == 0, f"probe READ error {r['err']}")
            check(r["data"] == ref_read(args.ref, off, ln),
                  f"probe READ {off}+{ln} differs from the reference")
        c.req(CMD_BLOCK_STATUS, 0, 0x99, 0, c.size)
        check_bs(c.result(0x99), set(c.ids.values()), 0, c.size, c.size)
        c.req(CMD_DISC)
        check(c.wait_closed(WAIT), "server did not close after DISC")
    finally:
        c.close()


# --------------------------------------------------------------------------
# Cases.  Each is a function (args) -> None raising Fail.

CASES = []


def case(fn):
    CASES.append(fn)
    return fn


def expect_closed(c, timeout, what):
    check(c.wait_closed(timeout), f"{what}: connection still open after "
          f"{timeout}s")


# B1 ------------------------------------------------------------------------


@case
def b01_idle_dropped(args):
    c = Conn(addr_of(args))
    t0 = time.monotonic()
    try:
        c.greet(cflags=None)
        # While it idles, others are served.
        probe(args, "while a client idles")
        expect_closed(c, args.hs_timeout + WAIT, "idle client")
        dt = time.monotonic() - t0
        check(dt >= args.hs_timeout - 0.5,
              f"idle client dropped after {dt:.1f}s, before the deadline")
    finally:
        c.close()


@case
def b01_slowloris(args):
    c = Conn(addr_of(args))
    t0 = time.monotonic()
    try:
        c.greet(cflags=None)
        msg = struct.pack(">I", 3) + struct.pack(">QII", OPTS_MAGIC, OPT_LIST, 0)
        closed = False
        # One byte every 0.4 s never resets the deadline: the server drops
        # the client (after HS_TIMEOUT; the bound leaves room for load).
        for b in itertools.cycle(msg):
            try:
                c.send(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if c.wait_closed(0.4):
                closed = True
                break
            if time.monotonic() - t0 > args.hs_timeout + WAIT:
                break
        dt = time.monotonic() - t0
        check(closed, f"trickling client still connected after {dt:.1f}s "
              f"(deadline {args.hs_timeout}s)")
    finally:
        c.close()


@case
def b01_options_then_idle(args):
    c = Conn(addr_of(args))
    try:
        c.greet()
        c.sr()
        _, t, _ = c.opt(OPT_LIST)
        check(t == REP_ACK, "LIST failed")
        expect_closed(c, args.hs_timeout + WAIT, "client idle after options")
    finally:
        c.close()


def settle(args, before):
    """Wait until the server has torn down every connection of a case (it
    holds no socket it did not hold BEFORE), so that the probe finds a free
    slot however slowly the server runs."""
    deadline = time.monotonic() + WAIT
    while True:
        extra = server_sockets(args.pid) - before
        if not extra:
            return
        check(time.monotonic() < deadline,
              f"the server still holds {len(extra)} connection(s) of the "
              f"case {WAIT}s after it ended")
        time.sleep(0.05)


def server_sockets(pid):
    """The socket inodes the server process holds open."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:"):
            out.add(link)
    return out


@case
def b01_not_reading_handshake(args):
    """A client with a tiny receive window sends a burst of options and
    never reads the replies: the handshake deadline still ends it (the
    server closes its socket; with a zero window the client may not see
    the FIN, so watch the server's file descriptors)."""
    before = server_sockets(args.pid)
    c = Conn(addr_of(args), rcvbuf=1024)
    t0 = time.monotonic()
    try:
        c.recvn(18)
        ours = server_sockets(args.pid) - before
        check(ours, "cannot find the connection among the server's sockets")
        c.send(struct.pack(">I", 3))
        opt = struct.pack(">QII", OPTS_MAGIC, OPT_LIST_META, 8) + \
            struct.pack(">II", 0, 0)
        c.s.settimeout(0.2)
        for _ in range(250):
            try:
                c.send(opt)
            except (socket.timeout, BlockingIOError, BrokenPipeError,
                    ConnectionResetError):
                break
        c.s.settimeout(WAIT)
        check(ours & server_sockets(args.pid),
              "the server closed the connection before the deadline")
        while ours & server_sockets(args.pid):
            check(time.monotonic() - t0 < args.hs_timeout + WAIT,
                  "client not reading option replies still connected after "
                  f"{time.monotonic() - t0:.1f}s (handshake deadline "
                  f"{args.hs_timeout}s)")
            time.sleep(0.1)
    finally:
        c.close()


# B2 ------------------------------------------------------------------------


@case
def b02_connection_flood(args):
    good = connect_go(args, b"", [b"base:allocation"])
    flood = []
    try:
        for _ in range(args.max_conn * 6):
            try:
                flood.append(Conn(addr_of(args), timeout=5))
            except OSError:
                break
        greeted, refused = 0, 0
        # Each is greeted or closed; the bound only catches a server that
        # does neither.
        deadline = time.monotonic() + WAIT
        for f in flood:
            r, _, _ = select.select([f.s], [], [],
                                    max(0.0, deadline - time.monotonic()))
            try:
                b = f.s.recv(18) if r else None
            except OSError:
                b = b""
            if b:
                greeted += 1
            elif b == b"":
                refused += 1
        check(greeted <= args.max_conn - 1,
              f"{greeted} flood sockets greeted with -e {args.max_conn} and "
              "one client connected")
        check(greeted + refused == len(flood),
              f"{len(flood) - greeted - refused} excess sockets neither "
              f"greeted nor closed within {WAIT}s")
        # The established client keeps being served.
        r = good.read(0, 4096)
        check(r["err"] == 0 and r["data"] == ref_read(args.ref, 0, 4096),
              "established client not served during the flood")
        for f in flood:
            f.close()
        flood = []
        # Slots come back.
        deadline = time.monotonic() + WAIT
        while True:
            try:
                probe(args, "after the flood")
                break
            except (Fail, Closed, OSError) as e:
                if time.monotonic() > deadline:
                    raise Fail(f"no slot after the flood sockets closed: {e}")
                time.sleep(0.2)
    finally:
        for f in flood:
            f.close()
        good.close()


def fd_limit(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return 1 << 20


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@case
def b02_fd_exhaustion(args):
    """With a low RLIMIT_NOFILE (test-server-hostile.sh runs one server
    so), connect more sockets than the server has descriptors: it must
    not spin on accept() (EMFILE), and must serve again once they go."""
    lim = fd_limit(args.pid)
    if lim > 256:
        print("#   (b02_fd_exhaustion: needs a server with a low fd limit)",
              flush=True)
        return
    cpu0 = cpu_seconds(args.pid)
    socks = []
    try:
        for _ in range(lim + 40):
            socks.append(Conn(addr_of(args), timeout=5))
        time.sleep(2)
        cpu = cpu_seconds(args.pid) - cpu0
        check(cpu < 0.5, f"server used {cpu:.2f}s of CPU in 2s with its "
              "descriptors exhausted (spinning on accept?)")
        check(alive(args.pid), "server died on EMFILE")
    finally:
        for c in socks:
            c.close()
    deadline = time.monotonic() + WAIT
    while True:
        try:
            probe(args, "after descriptor exhaustion")
            break
        except (Fail, Closed, OSError) as e:
            if time.monotonic() > deadline:
                raise Fail(f"not serving after descriptor exhaustion: {e}")
            time.sleep(0.3)


# B3 ------------------------------------------------------------------------


@case
def b03_unknown_client_flags(args):
    for fl in (4, 0x80000000, 0xFFFFFFFF, 7):
        c = Conn(addr_of(args))
        try:
            c.greet(cflags=fl)
            try:
                c.send_opt(OPT_LIST)
            except (BrokenPipeError, ConnectionResetError):
                continue
            check(c.wait_closed(WAIT), f"client flags 0x{fl:x} accepted")
        finally:
            c.close()


@case
def b03_export_name_zeroes(args):
    for cflags, want in ((3, 10), (1, 134)):
        c = Conn(addr_of(args))
        try:
            c.greet(cflags)
            c.send_opt(OPT_EXPORT_NAME, b"")
            d = c.recvn(want)
            size, tf = struct.unpack(">QH", d[:10])
            check(size == args.size, f"EXPORT_NAME size {size}")
            check(tf & 1 and tf & TF_READ_ONLY, f"transmission flags {tf:#x}")
            check(d[10:] == bytes(want - 10), "padding not zero")
            # Exactly WANT bytes: a READ reply comes next, nothing else.
            c.req(CMD_READ, 0, 5, 0, 512)
            r = c.result(5)
            check(r["err"] == 0 and r["data"] == ref_read(args.ref, 0, 512),
                  f"READ after EXPORT_NAME (cflags {cflags}) failed")
        finally:
            c.close()


@case
def b03_oldstyle_newstyle_client(args):
    # Client without FIXED_NEWSTYLE: EXPORT_NAME works ...
    c = Conn(addr_of(args))
    try:
        c.greet(0)
        c.send_opt(OPT_EXPORT_NAME, b"")
        d = c.recvn(134)
        check(struct.unpack(">Q", d[:8])[0] == args.size, "size")
    finally:
        c.close()
    # ... anything else may end the connection, but must not crash.
    c = Conn(addr_of(args))
    try:
        c.greet(0)
        c.send_opt(OPT_LIST)
        try:
            c.read_rep(OPT_LIST)
        except (Closed, Fail):
            pass
    finally:
        c.close()


# B4 ------------------------------------------------------------------------


@case
def b04_option_too_long(args):
    before = rss_kib(args.pid)
    for length in (0xFFFFFFFF, 64 * MiB + 1, MiB + 1):
        c = Conn(addr_of(args))
        try:
            c.greet()
            c.send(struct.pack(">QII", OPTS_MAGIC, 42, length))
            try:
                c.send(b"x" * 1000)
            except (BrokenPipeError, ConnectionResetError):
                continue
            check(c.wait_closed(WAIT),
                  f"option length {length:#x}: connection not closed")
        finally:
            c.close()
    grew = rss_kib(args.pid) - before
    check(grew < 16 * 1024, f"RSS grew {grew} KiB on oversized options")


@case
def b04_option_max_len_consumed(args):
    c = Conn(addr_of(args))
    try:
        c.greet()
        # An unknown option of exactly the limit (1 MiB) is consumed.
        _, t, _ = c.opt(42, b"\xff" * MiB)
        check(t == ERR_UNSUP, f"1 MiB unknown option: 0x{t:x}")
        # Options that take no data, with data: ERR_INVALID, in sync.
        for o in (OPT_SR, OPT_LIST):
            _, t, _ = c.opt(o, b"abcd")
            check(t == ERR_INVALID, f"option {o} with data: 0x{t:x}")
        _, t, _ = c.opt(OPT_STARTTLS)
        check(t in (ERR_UNSUP, ERR_POLICY), f"STARTTLS without TLS: 0x{t:x}")
        _, t, _ = c.opt(OPT_EXT_HEADERS)
        check(t == ERR_UNSUP, f"EXTENDED_HEADERS: 0x{t:x}")
        c.sr()
        _, t, _ = c.opt(OPT_SR)
        check(t == ERR_INVALID, f"second STRUCTURED_REPLY: 0x{t:x}")
        c.go()
        r = c.read(0, 4096)
        check(r["data"] == ref_read(args.ref, 0, 4096), "READ after options")
    finally:
        c.close()


@case
def b04_bad_option_magic(args):
    c = Conn(addr_of(args))
    try:
        c.greet()
        c.send(struct.pack(">QII", 0x1122334455667788, OPT_LIST, 0))
        expect_closed(c, WAIT, "bad option magic")
    finally:
        c.close()


# B5 ------------------------------------------------------------------------


@case
def b05_endless_options(args):
    for opt, data in ((42, b"abc"), (OPT_LIST, b""),
                      (OPT_INFO, struct.pack(">IH", 0, 0))):
        c = Conn(addr_of(args))
        t0 = time.monotonic()
        answered = 0
        try:
            c.greet()
            for _ in range(100000):
                try:
                    reps, t, _ = c.opt(opt, data)
                except (Closed, BrokenPipeError, ConnectionResetError):
                    break
                if opt == 42:
                    check(t == ERR_UNSUP, f"unknown option: 0x{t:x}")
                else:
                    check(t == REP_ACK, f"option {opt}: 0x{t:x}")
                answered += 1
            dt = time.monotonic() - t0
            check(answered < 100000, f"option {opt}: no option budget "
                  f"({answered} answered)")
            check(answered >= 32, f"option {opt}: only {answered} answered")
            check(dt < WAIT, f"option {opt}: {dt:.1f}s to hit the budget")
        finally:
            c.close()


# B6/B7 ---------------------------------------------------------------------


@case
def b06_long_names(args):
    c = Conn(addr_of(args))
    try:
        c.greet()
        for name, want in ((b"n" * 4096, ERR_UNKNOWN),
                           (b"n" * 4097, ERR_INVALID),
                           (b"n" * 65535, ERR_INVALID),
                           (b"a\0b", (ERR_UNKNOWN, ERR_INVALID)),
                           (b"\xff\xfe\x80", (ERR_UNKNOWN, ERR_INVALID))):
            for o in (OPT_INFO, OPT_GO):
                info, t, d = c.info_go(o, name, (INFO_NAME,))
                ok = t in want if isinstance(want, tuple) else t == want
                check(ok, f"{'INFO' if o == OPT_INFO else 'GO'} name of "
                      f"{len(name)} bytes: 0x{t:x}")
                check(not info, "INFO replies before an error")
                check(len(d) <= 4096, f"error message of {len(d)} bytes")
                check(len(d) < 1024 or name[:1] != b"n",
                      "error message echoes the whole long name")
            # LIST_META / SET_META with a long export name.
            ctx, t, d = c.meta(OPT_LIST_META, name, [])
            ok = t in want if isinstance(want, tuple) else t == want
            check(ok and not ctx, f"LIST_META name {len(name)}: 0x{t:x}")
        # 0xffffffff name length (more than the option).
        info, t, _ = c.info_go(OPT_INFO, b"", raw=struct.pack(">IH", 0xFFFFFFFF, 0))
        check(t == ERR_INVALID, f"name length 0xffffffff: 0x{t:x}")
        # Still in sync.
        c.sr()
        c.go()
    finally:
        c.close()
    for name in (b"n" * 4097, b"n" * 4096, b"zz"):
        c = Conn(addr_of(args))
        try:
            c.greet()
            c.send_opt(OPT_EXPORT_NAME, name)
            expect_closed(c, WAIT, f"EXPORT_NAME of an unknown {len(name)}-byte "
                          "name")
        finally:
            c.close()


@case
def b07_long_bitmap_query(args):
    c = Conn(addr_of(args))
    try:
        c.greet()
        c.sr()
        long_leaf = b"qemu:dirty-bitmap:" + b"x" * (4096 - 18)
        ctx, t, _ = c.meta(OPT_LIST_META, b"", [long_leaf])
        check(t == REP_ACK and not ctx, f"4096-byte query: 0x{t:x} {ctx}")
        ctx, t, _ = c.meta(OPT_LIST_META, b"", [long_leaf + b"x"])
        check(t in (REP_ACK, ERR_INVALID, ERR_TOO_BIG) and not ctx,
              f"4097-byte query: 0x{t:x} {ctx}")
        # Five queries of ~4 KiB each (nbdkit's test-long-name).
        qs = [b"qemu:dirty-bitmap:" + bytes([65 + i]) * 4000 for i in range(5)]
        _, _, t = c.set_meta(b"", qs, ok=False)
        check(t == REP_ACK, f"five 4 KiB queries: 0x{t:x}")
        ids, _, _ = c.set_meta(b"", qs + [b"qemu:dirty-bitmap:b1"])
        check(list(ids.values()) == ["qemu:dirty-bitmap:b1"],
              f"long queries + b1 selected {ids}")
        c.go()
    finally:
        c.close()


# B8 ------------------------------------------------------------------------


@case
def b08_info_go_bad_lengths(args):
    c = Conn(addr_of(args))
    try:
        c.greet()
        bad = [
            struct.pack(">IH", 10, 0),                    # namelen > optlen
            struct.pack(">I", 2) + b"ab",                 # no request count
            struct.pack(">IH", 0, 5) + b"\0\1",           # count too large
            struct.pack(">IH", 0, 1) + b"\0\1\0\2",       # count too small
            struct.pack(">IH", 0, 0) + b"\0",             # odd trailing byte
            struct.pack(">I", 0xFFFFFFF0) + b"\0\0",      # huge namelen
            b"\0\0",                                      # too short
            b"",
        ]
        for i, raw in enumerate(bad):
            for o in (OPT_INFO, OPT_GO):
                info, t, _ = c.info_go(o, b"", raw=raw)
                check(t == ERR_INVALID,
                      f"malformed INFO/GO #{i} ({raw.hex()}): 0x{t:x}")
                check(not info, f"malformed INFO/GO #{i}: INFO replies sent")
            # In sync: a valid option works.
            _, t, _ = c.opt(OPT_LIST)
            check(t == REP_ACK, f"LIST after malformed INFO/GO #{i}: 0x{t:x}")
        # Duplicate and unknown info requests are harmless.
        info, t, _ = c.info_go(OPT_INFO, b"", (3, 3, 1, 999, 0xFFFF))
        check(t == REP_ACK and INFO_EXPORT in info, f"INFO dup: 0x{t:x}")
        c.sr()
        info, t, _ = c.info_go(OPT_GO, b"", (INFO_BLOCK_SIZE, INFO_NAME))
        check(t == REP_ACK, f"GO: 0x{t:x}")
        check(info.get(INFO_NAME) == b"", f"NBD_INFO_NAME {info.get(INFO_NAME)!r}")
        bs = info.get(INFO_BLOCK_SIZE, b"")
        check(len(bs) == 12, "NBD_INFO_BLOCK_SIZE missing or malformed")
        mn, pref, mx = struct.unpack(">III", bs)
        check(mn == 1 and pref == 4096 and mx == 32 * MiB,
              f"block sizes {mn}/{pref}/{mx}")
        c.structured = True
        r = c.read(0, 512)
        check(r["data"] == ref_read(args.ref, 0, 512), "READ after GO")
    finally:
        c.close()


# B9 ------------------------------------------------------------------------


@case
def b09_meta_before_structured(args):
    c = Conn(addr_of(args))
    try:
        c.greet()
        ctx, t, _ = c.meta(OPT_SET_META, b"", [b"base:allocation"])
        check(t == ERR_INVALID and not ctx, f"SET before SR: 0x{t:x} {ctx}")
        ctx, t, _ = c.meta(OPT_LIST_META, b"", [])
        check(t in (REP_ACK, ERR_INVALID), f"LIST before SR: 0x{t:x}")
        info, t, _ = c.info_go(OPT_INFO, b"", (INFO_BLOCK_SIZE,))
        check(t == REP_ACK, f"INFO: 0x{t:x}")
        tf = struct.unpack(">QH", info[INFO_EXPORT])[1]
        check(not tf & 0x80, f"SEND_DF advertised without structured replies "
              f"(flags {tf:#x})")
        c.go()  # no SR: simple replies, no block status
        c.req(CMD_BLOCK_STATUS, 0, 9, 0, 4096)
        r = c.result(9)
        check(r.get("simple") and r["err"] == EINVAL,
              f"BLOCK_STATUS without SR: {r['err']}")
        r = c.read(0, 4096)
        check(r["err"] == 0 and r["data"] == ref_read(args.ref, 0, 4096),
              "simple READ")
    finally:
        c.close()


# B10 -----------------------------------------------------------------------


def meta_raw(c, opt, body):
    reps, t, d = c.opt(opt, body)
    return reps, t


@case
def b10_set_meta_bad_counts(args):
    c = Conn(addr_of(args))
    try:
        c.greet()
        c.sr()
        exp = struct.pack(">I", 0)
        cases = [
            exp + struct.pack(">I", 0xFFFFFFFF),                      # nq huge
            exp + struct.pack(">I", 1) + struct.pack(">I", 100) + b"base:",
            exp + struct.pack(">I", 2) + struct.pack(">I", 5) + b"base:",
            exp + struct.pack(">I", 1) + struct.pack(">I", 0xFFFFFFFF),
            exp + struct.pack(">I", 0) + b"junk",                     # trailing
            struct.pack(">I", 100) + b"ab",                           # name
            b"\0\0",
        ]
        for i, body in enumerate(cases):
            for o in (OPT_SET_META, OPT_LIST_META):
                reps, t = meta_raw(c, o, body)
                check(t == ERR_INVALID and not reps,
                      f"malformed meta option #{i} (opt {o}): 0x{t:x}, "
                      f"{len(reps)} replies")
            _, t, _ = c.opt(OPT_LIST)
            check(t == REP_ACK, f"LIST after malformed meta #{i}")
        # 100k tiny queries: bounded parsing, nothing selected.
        t0 = time.monotonic()
        ids, _, t = c.set_meta(b"", [b"x"] * 100000, ok=False)
        check(t == REP_ACK and not ids, f"100k tiny queries: 0x{t:x} {ids}")
        ctx, t, _ = c.meta(OPT_LIST_META, b"", [b"q:"] * 100000)
        check(t == REP_ACK and not ctx, f"100k LIST queries: 0x{t:x}")
        # Quadratic parsing would take hours; ASan and load, seconds.
        check(time.monotonic() - t0 < WAIT, f"100k queries took > {WAIT}s")
        # The same bitmap 40k times: selected once, one id.
        q = b"qemu:dirty-bitmap:b0"
        ids, ctx, t = c.set_meta(b"", [q] * 40000 + [b"base:allocation"] * 100)
        check(len(ctx) == 2, f"duplicate queries gave {len(ctx)} replies")
        check(sorted(ids.values()) == ["base:allocation",
                                       "qemu:dirty-bitmap:b0"],
              f"duplicates selected {ids}")
        check(len(set(ids)) == 2, "ids not unique")
        c.go()
        c.req(CMD_BLOCK_STATUS, 0, 3, 0, 1 * MiB)
        check_bs(c.result(3), set(ids), 0, MiB, c.size)
    finally:
        c.close()


@case
def b10_failed_set_clears_selection(args):
    """proto.md: SET replaces the previous selection even when it fails."""
    c = Conn(addr_of(args))
    try:
        c.greet()
        c.sr()
        ids, _, _ = c.set_meta(b"", [b"base:allocation"])
        check(len(ids) == 1, "first SET")
        body = struct.pack(">II", 0, 0xFFFFFFFF)
        reps, t = meta_raw(c, OPT_SET_META, body)
        check(t == ERR_INVALID, f"bad SET: 0x{t:x}")
        c.go()
        c.req(CMD_BLOCK_STATUS, 0, 4, 0, 4096)
        r = c.result(4)
        check(r["err"] == EINVAL, "BLOCK_STATUS after a failed SET still "
              f"uses the earlier selection (err {r['err']}, contexts "
              f"{sorted(r['bs'])})")
    finally:
        c.close()


# B11/B12 -------------------------------------------------------------------


@case
def b11_wildcards(args):
    c = Conn(addr_of(args))
    try:
        c.greet()
        c.sr()
        for q in (b"qemu:dirty-bitmap:", b"qemu:", b"base:", b"", b"qemu",
                  b"x-foo:", b"nocolon", b"qemu:dirty-bitmap:*"):
            ids, _, t = c.set_meta(b"", [q], ok=False)
            check(t == REP_ACK and not ids,
                  f"SET {q!r} selected {ids} (0x{t:x})")
        allctx = ["base:allocation", "qemu:allocation-depth",
                  "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
        want = {
            (): allctx,
            (b"base:",): ["base:allocation"],
            (b"qemu:",): allctx[1:],
            (b"qemu:dirty-bitmap:",): allctx[2:],
            (b"qemu:dirty-bitmap:b0",): ["qemu:dirty-bitmap:b0"],
            (b"qemu:allocation-depth",): ["qemu:allocation-depth"],
            (b"qemu:bogus",): [],
            (b"x-foo:",): [],
            (b"nocolon",): [],
            (b"qemu:dirty-bitmap:inuse",): [],
            (b"qemu:dirty-bitmap:B0",): [],
            (b"QEMU:dirty-bitmap:b0",): [],
            (b"base:", b"base:allocation"): ["base:allocation"],
        }
        for qs, names in want.items():
            ctx, t, _ = c.meta(OPT_LIST_META, b"", list(qs))
            check(t == REP_ACK, f"LIST {qs}: 0x{t:x}")
            check(all(i == 0 for i, _ in ctx), f"LIST {qs}: non-zero ids")
            got = [n for _, n in ctx]
            check(sorted(got) == sorted(names) and len(got) == len(set(got)),
                  f"LIST {qs}: {got}, expected {names}")
        ctx, t, _ = c.meta(OPT_LIST_META, b"other", [])
        check(sorted(n for _, n in ctx) == ["base:allocation",
                                            "qemu:dirty-bitmap:c0"],
              f"LIST on export other: {ctx}")
        ctx, t, _ = c.meta(OPT_LIST_META, b"nosuch", [])
        check(t == ERR_UNKNOWN and not ctx, f"LIST on unknown export 0x{t:x}")
        ctx, t, _ = c.meta(OPT_SET_META, b"nosuch", [b"base:allocation"])
        check(t == ERR_UNKNOWN and not ctx, f"SET on unknown export 0x{t:x}")
    finally:
        c.close()


@case
def b12_unusable_bitmaps_not_selected(args):
    c = Conn(addr_of(args))
    try:
        c.greet()
        c.sr()
        qs = [b"qemu:dirty-bitmap:inuse", b"qemu:dirty-bitmap:nosuch",
              b"qemu:dirty-bitmap:B0", b"qemu:dirty-bitmap:b0 ",
              b"qemu:dirty-bitmap:c0", b"qemu:dirty-bitmap:alt",
              b"qemu:dirty-bitmap:b\xef\xbc\x90"]
        ids, _, t = c.set_meta(b"", qs, ok=False)
        check(t == REP_ACK and not ids, f"unusable bitmaps selected: {ids}")
        c.go()
        c.req(CMD_BLOCK_STATUS, 0, 11, 0, 4096)
        r = c.result(11)
        check(r["err"] == EINVAL and not r["bs"],
              f"BLOCK_STATUS with nothing selected: err {r['err']}")
        r = c.read(0, 512)
        check(r["err"] == 0, "connection unusable after EINVAL")
    finally:
        c.close()


# B13 -----------------------------------------------------------------------


@case
def b13_set_a_go_b(args):
    # SET on "" (b1 -> id 3), GO "other": never bitmap data from "".
    c = Conn(addr_of(args))
    try:
        c.greet()
        c.sr()
        ids, _, _ = c.set_meta(b"", [b"qemu:dirty-bitmap:b1",
                                     b"base:allocation"])
        c.go(b"other")
        c.req(CMD_BLOCK_STATUS, 0, 12, 0, 4096)
        r = c.result(12)
        if r["err"]:
            check(r["err"] == EINVAL, f"err {r['err']}")
        else:
            check(False, f"block status on 'other' with contexts of '': "
                  f"{r['bs']}")
    finally:
        c.close()
    # SET on "other" then GO "other": its own bitmap.
    c = Conn(addr_of(args))
    try:
        c.greet()
        c.sr()
        ids, _, _ = c.set_meta(b"other", [b"qemu:dirty-bitmap:c0"])
        check(list(ids.values()) == ["qemu:dirty-bitmap:c0"], f"{ids}")
        size, _ = c.go(b"other")
        c.req(CMD_BLOCK_STATUS, 0, 13, 0, size)
        check_bs(c.result(13), set(ids), 0, size, size)
    finally:
        c.close()
    # SET on "", then EXPORT_NAME "other".
    c = Conn(addr_of(args))
    try:
        c.greet()
        c.sr()
        c.set_meta(b"", [b"qemu:dirty-bitmap:b0", b"base:allocation"])
        c.send_opt(OPT_EXPORT_NAME, b"other")
        size, _ = struct.unpack(">QH", c.recvn(10))
        c.req(CMD_BLOCK_STATUS, 0, 15, 0, 4096)
        r = c.result(15)
        check(r["err"] == EINVAL, "EXPORT_NAME: contexts of '' applied to "
              f"'other' (err {r['err']}, {r['bs']})")
    finally:
        c.close()
    # SET on "other", INFO "", GO "" : selection was for other.
    c = Conn(addr_of(args))
    try:
        c.greet()
        c.sr()
        c.set_meta(b"other", [b"base:allocation"])
        c.go(b"")
        c.req(CMD_BLOCK_STATUS, 0, 14, 0, 4096)
        r = c.result(14)
        check(r["err"] == EINVAL, "contexts of 'other' applied to ''")
    finally:
        c.close()


# B18/B19 -------------------------------------------------------------------


@case
def b18_bad_request_magic(args):
    for magic in (0xDEADBEEF, 0x25609514, 0x12560953, 0x21E41C71):
        c = connect_go(args, b"", [b"base:allocation"])
        try:
            c.send(struct.pack(">IHHQQI", magic, 0, CMD_READ, 1, 0, 512))
            # An error reply before closing is allowed (qemu sends one).
            end = time.monotonic() + WAIT
            closed = False
            while time.monotonic() < end:
                try:
                    r = c.reply()
                    check(r[0] == "simple" and r[2] or r[0] == "chunk" and
                          r[3] & 0x8000, f"non-error reply to bad magic {r}")
                except Closed:
                    closed = True
                    break
            check(closed, f"bad request magic 0x{magic:x}: still connected")
        finally:
            c.close()


@case
def b19_unknown_commands_and_flags(args):
    c = connect_go(args, b"", [b"base:allocation"])
    try:
        bad = [
            (0, 99, 0, 512),                  # unknown command
            (0, 8, 0, 0),                     # RESIZE: not advertised
            (0, 0xFFFF, 0, 512),
            (0x8000, CMD_READ, 0, 512),       # unknown flag
            (0x20, CMD_READ, 0, 512),         # PAYLOAD_LEN flag
            (FLAG_REQ_ONE, CMD_READ, 0, 512), # flag for another command
            (FLAG_NO_HOLE, CMD_READ, 0, 512),
            (0x10, CMD_READ, 0, 512),         # FAST_ZERO on READ
            (FLAG_DF, CMD_BLOCK_STATUS, 0, 512),
            (0x8000, CMD_BLOCK_STATUS, 0, 512),
            (0x8000, CMD_FLUSH, 0, 0),
            (FLAG_REQ_ONE, CMD_CACHE, 0, 512),
        ]
        for i, (fl, cmd, off, ln) in enumerate(bad):
            c.req(cmd, fl, 100 + i, off, ln)
            r = c.result(100 + i)
            check(r["err"] == EINVAL, f"cmd {cmd} flags {fl:#x}: err "
                  f"{r['err']} (expected EINVAL)")
            r = c.read(4096, 512, cookie=200 + i)
            check(r["err"] == 0 and r["data"] == ref_read(args.ref, 4096, 512),
                  f"READ after bad cmd {cmd} flags {fl:#x}")
        for cmd in (CMD_FLUSH, CMD_CACHE):
            c.req(cmd, 0, 300 + cmd, 0, 4096 if cmd == CMD_CACHE else 0)
            r = c.result(300 + cmd)
            check(r["err"] == 0, f"cmd {cmd}: err {r['err']}")
        r = c.read(0, 65536, flags=FLAG_DF, cookie=400)
        check(r["err"] == 0 and len(r["chunks"]) == 1 and
              r["data"] == ref_read(args.ref, 0, 65536), "DF READ")
    finally:
        c.close()


# B20/B21 -------------------------------------------------------------------


@case
def b20_writes_on_read_only(args):
    for structured in (True, False):
        c = connect_go(args, b"", [b"base:allocation"] if structured else [],
                       structured=structured)
        try:
            check(c.tflags & TF_READ_ONLY, "export not advertised read-only")
            for i, (cmd, ln, payload) in enumerate((
                    (CMD_WRITE, 4096, b"\xaa" * 4096),
                    (CMD_WRITE, 1, b"\xaa"),
                    (CMD_WRITE, 0, b""),
                    (CMD_WRITE, 32 * MiB, b"\x55" * (32 * MiB)),
                    (CMD_TRIM, 4096, b""),
                    (CMD_WRITE_ZEROES, 4096, b""),
                    (CMD_WRITE, 4096, (struct.pack(">IHHQQI", REQ_MAGIC, 0,
                                                   CMD_DISC, 0, 0, 0) * 147)[:4096]))):
                c.req(cmd, 0, 500 + i, 0, ln, payload)
                r = c.result(500 + i)
                check(r["err"] == EPERM, f"cmd {cmd} len {ln} on read-only: "
                      f"err {r['err']} (expected EPERM)")
                r = c.read(0, 4096, cookie=600 + i)
                check(r["err"] == 0 and r["data"] == ref_read(args.ref, 0, 4096),
                      f"READ after refused cmd {cmd} len {ln} (payload not "
                      "consumed?)")
        finally:
            c.close()


@case
def b21_oversized_requests(args):
    before = rss_kib(args.pid)
    c = connect_go(args, b"", [b"base:allocation"])
    try:
        for i, ln in enumerate((32 * MiB + 1, 0xFFFFFFFF, 0x80000000)):
            for fl in (0, FLAG_DF):
                c.req(CMD_READ, fl, 700 + i, 0, ln)
                r = c.result(700 + i)
                check(r["err"] == EINVAL, f"READ of {ln:#x}: err {r['err']}")
                check(not r["reads"], "data sent with an error")
        # exactly 32 MiB is fine (when the export is that large)
        if args.size >= 32 * MiB:
            r = c.read(0, 32 * MiB, cookie=710)
            check(r["err"] == 0 and r["data"] == ref_read(args.ref, 0, 32 * MiB),
                  "32 MiB READ")
        # BLOCK_STATUS beyond 32 MiB is only a hint: fine.
        c.req(CMD_BLOCK_STATUS, 0, 711, 0, args.size)
        check_bs(c.result(711), set(c.ids.values()), 0, args.size, args.size)
    finally:
        c.close()
    for ln in (0xFFFFFFFF, 32 * MiB + 1, 0x80000000):
        c = connect_go(args, b"", [b"base:allocation"])
        try:
            c.req(CMD_WRITE, 0, 720, 0, ln, b"\x11" * 1024)
            closed = False
            end = time.monotonic() + WAIT
            while time.monotonic() < end:
                try:
                    r = c.reply()
                    check(r[0] == "simple" and r[2] or r[0] == "chunk" and
                          r[3] & 0x8000, f"non-error reply to WRITE {ln:#x}")
                except Closed:
                    closed = True
                    break
            check(closed, f"WRITE announcing {ln:#x} bytes: still connected")
        finally:
            c.close()
    grew = rss_kib(args.pid) - before
    check(grew < 200 * 1024, f"RSS grew by {grew} KiB")


# B22/B23 -------------------------------------------------------------------


@case
def b22_bounds(args):
    c = connect_go(args, b"", [b"base:allocation", b"qemu:dirty-bitmap:b0"])
    size = c.size
    try:
        bad = [(2**64 - 512, 1024), (2**64 - 1, 1), (size + 1, 0),
               (size, 1), (size - 512, 1024), (2**63, 512), (size + 4096, 512)]
        for i, (off, ln) in enumerate(bad):
            for cmd in (CMD_READ, CMD_BLOCK_STATUS, CMD_CACHE):
                ck = 800 + 10 * i + cmd
                c.req(cmd, 0, ck, off, ln)
                r = c.result(ck)
                check(r["err"] == EINVAL, f"cmd {cmd} offset {off:#x} len "
                      f"{ln}: err {r['err']} (expected EINVAL)")
        # len 0: READ succeeds with no data (or EINVAL); BLOCK_STATUS EINVAL
        c.req(CMD_READ, 0, 900, 4096, 0)
        r = c.result(900)
        check(r["err"] in (0, EINVAL) and not r["reads"], "READ len 0")
        c.req(CMD_READ, 0, 901, size, 0)
        r = c.result(901)
        check(r["err"] in (0, EINVAL) and not r["reads"], "READ len 0 at EOF")
        c.req(CMD_BLOCK_STATUS, 0, 902, 0, 0)
        r = c.result(902)
        check(r["err"] == EINVAL, f"BLOCK_STATUS len 0: err {r['err']}")
        # Right up to the end, and one byte short of it.
        for off, ln in ((size - 4096, 4096), (size - 4096, 4095), (0, size - 1),
                        (size - 1, 1), (1, size - 1)):
            r = c.read(off, min(ln, 1 << 20), cookie=903)
            check(r["err"] == 0 and r["data"] == ref_read(args.ref, off,
                                                          min(ln, 1 << 20)),
                  f"READ {off}+{ln}")
            for fl in (0, FLAG_REQ_ONE):
                c.req(CMD_BLOCK_STATUS, fl, 904, off, ln)
                check_bs(c.result(904), set(c.ids.values()), off, ln, size,
                         req_one=bool(fl))
    finally:
        c.close()


@case
def b23_block_status_without_contexts(args):
    c = connect_go(args, b"", [])
    try:
        c.req(CMD_BLOCK_STATUS, 0, 950, 0, 4096)
        r = c.result(950)
        check(r["err"] == EINVAL, f"no contexts: err {r['err']}")
        r = c.read(0, 512)
        check(r["err"] == 0, "READ after EINVAL")
    finally:
        c.close()


# B24 -----------------------------------------------------------------------


@case
def b24_req_one(args):
    c = connect_go(args, b"", [b"base:allocation", b"qemu:allocation-depth",
                               b"qemu:dirty-bitmap:b0",
                               b"qemu:dirty-bitmap:b1"])
    try:
        ids = set(c.ids.values())
        check(len(ids) == 4, f"negotiated {c.ids}")
        for off, ln in ((0, c.size), (66048, 4096), (65536, 1), (4 * MiB, 1000),
                        (10 * MiB - 1, 3), (c.size - 512, 512)):
            c.req(CMD_BLOCK_STATUS, FLAG_REQ_ONE, 960, off, ln)
            check_bs(c.result(960), ids, off, ln, c.size, req_one=True)
    finally:
        c.close()


@case
def b24_worst_case_bitmap(args):
    """Export 'big': bitmap 'alt' alternates dirty/clean every
    ALT_PERIOD bytes over the first ALT_SPAN bytes, then is all dirty
    or clean (see the shell script).  Walk the whole export without
    REQ_ONE: every chunk within the caps, contiguous, correct."""
    c = connect_go(args, b"big", [b"base:allocation", b"qemu:dirty-bitmap:alt"])
    try:
        ids = c.ids
        size = c.size
        check(size == args.big_size, f"big export size {size}")
        alt = ids["qemu:dirty-bitmap:alt"]
        base = ids["base:allocation"]
        p, span = args.alt_period, args.alt_span
        off, requests, max_n = 0, 0, 0
        t0 = time.monotonic()
        while off < size:
            ln = min(size - off, 0xFFFFFFFF - 511)
            c.req(CMD_BLOCK_STATUS, 0, 970 + requests, off, ln)
            r = c.result(970 + requests)
            got = check_bs(r, {alt, base}, off, ln, size)
            max_n = max(max_n, len(r["bs"][alt]), len(r["bs"][base]))
            # Check the bitmap content against the model.
            for (eo, el, fl) in got[alt]:
                check(fl in (0, 1), f"bitmap flags {fl}")
                if eo < span:
                    # Inside the alternating span every extent is exactly
                    # one period (or clipped at the span end / request).
                    k = eo // p
                    want = 1 if k % 2 == 0 else 0
                    check(fl == want and eo % p == 0 and
                          (el == p or eo + el >= span or eo + el >= off + ln),
                          f"alt extent {eo}+{el} flags {fl} (period {p})")
            for (eo, el, fl) in got[base]:
                check(fl in (0, 1, 2, 3), f"base:allocation flags {fl}")
            end = min(got[alt][-1][0] + got[alt][-1][1], off + ln)
            check(end > off, "no progress")
            off = end
            requests += 1
            check(requests < 1000, "too many requests")
        dt = time.monotonic() - t0
        check(max_n >= MAX_EXTENTS - 1 or span // p < MAX_EXTENTS,
              f"largest chunk {max_n} extents; the worst case did not reach "
              "the cap (test image too small?)")
        print(f"#   big: {requests} requests, largest chunk {max_n} extents, "
              f"{dt:.1f}s", flush=True)
        # REQ_ONE in the alternating span.
        for o in (0, p, 3 * p + 7, span - p):
            c.req(CMD_BLOCK_STATUS, FLAG_REQ_ONE, 990, o, 10 * p)
            got = check_bs(c.result(990), {alt, base}, o, 10 * p, size,
                           req_one=True)
            eo, el, fl = got[alt][0]
            check(0 < el <= p - (o % p) or o + p >= span,
                  f"REQ_ONE alt extent {el} at {o}")
    finally:
        c.close()


# B25 -----------------------------------------------------------------------


@case
def b25_pipeline_flood(args):
    before = rss_kib(args.pid)
    c = connect_go(args, b"", [b"base:allocation", b"qemu:dirty-bitmap:b1"])
    try:
        c.s.setblocking(False)
        reqs = b"".join(
            struct.pack(">IHHQQI", REQ_MAGIC, 0,
                        CMD_READ if i % 3 else CMD_BLOCK_STATUS, i,
                        (i * 65536) % (c.size - 65536), 65536)
            for i in range(20000))
        sent = 0
        t0 = time.monotonic()
        while sent < len(reqs) and time.monotonic() - t0 < 5:
            try:
                sent += c.s.send(reqs[sent:sent + 65536])
            except BlockingIOError:
                time.sleep(0.05)
        c.s.setblocking(True)
        print(f"#   pipelined {sent // 28} requests without reading "
              f"(the server stopped reading: {sent < len(reqs)})", flush=True)
        time.sleep(0.5)
        mid = rss_kib(args.pid)
        # Others are not starved.
        t1 = time.monotonic()
        probe(args, "while a client floods without reading")
        check(time.monotonic() - t1 < 30, "probe starved by the flood")
        check(mid - before < 256 * 1024,
              f"RSS grew {mid - before} KiB during the flood")
    finally:
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                       struct.pack("ii", 1, 0))
        c.close()
    time.sleep(0.5)
    # Same again, closing politely (FIN) instead of RST.
    c = connect_go(args, b"", [b"base:allocation"])
    c.s.setblocking(False)
    try:
        for i in range(5000):
            try:
                c.s.send(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_READ, i,
                                     0, 1 << 20))
            except BlockingIOError:
                break
    finally:
        c.close()


# B26 -----------------------------------------------------------------------


@case
def b26_half_close(args):
    # Mid write payload.
    c = connect_go(args, b"", [b"base:allocation"])
    try:
        c.send(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_WRITE, 1, 0, MiB) +
               b"\0" * 100000)
        c.s.shutdown(socket.SHUT_WR)
        expect_closed(c, WAIT, "half-close mid write payload")
    finally:
        c.close()
    # Mid request header.
    c = connect_go(args, b"", [b"base:allocation"])
    try:
        c.send(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_READ, 1, 0, 512)[:13])
        c.s.shutdown(socket.SHUT_WR)
        expect_closed(c, WAIT, "half-close mid request header")
    finally:
        c.close()
    # Half-close after complete requests: they are answered, then EOF.
    c = connect_go(args, b"", [b"base:allocation"])
    try:
        c.req(CMD_READ, 0, 2, 0, 4096)
        c.s.shutdown(socket.SHUT_WR)
        r = c.read_pending = c.result(2)
        check(r["err"] == 0, "READ before half-close not answered")
        expect_closed(c, WAIT, "half-close after a request")
    finally:
        c.close()
    # Mid option payload.
    c = Conn(addr_of(args))
    try:
        c.greet()
        c.send(struct.pack(">QII", OPTS_MAGIC, OPT_GO, 1000) + b"\0" * 10)
        c.s.shutdown(socket.SHUT_WR)
        expect_closed(c, WAIT, "half-close mid option")
    finally:
        c.close()
    # RST while the server writes a large read reply.
    for _ in range(3):
        c = connect_go(args, b"", [b"base:allocation"])
        c.req(CMD_READ, 0, 3, 0, min(32 * MiB, c.size))
        c.recvn(1000)
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                       struct.pack("ii", 1, 0))
        c.close()
    time.sleep(0.3)


# B27 -----------------------------------------------------------------------


@case
def b27_disc_with_requests_in_flight(args):
    """16 requests then DISC in one write: all 16 answered, then EOF.
    Then the same followed by requests and garbage after DISC (a client
    bug): nothing after DISC is answered, and the 16 replies still all
    arrive, also over TCP, where closing with those bytes unread would
    be a reset that can discard replies still queued (the server reads
    and drops them before it closes: a lingering close)."""
    for after in (False, True):
        c = connect_go(args, b"", [b"base:allocation",
                                   b"qemu:dirty-bitmap:b0"])
        try:
            n = 16
            data = b""
            for i in range(n):
                cmd = CMD_READ if i % 2 else CMD_BLOCK_STATUS
                data += struct.pack(">IHHQQI", REQ_MAGIC, 0, cmd, 1000 + i,
                                    i * 65536, 65536)
                c.pending[1000 + i] = (cmd, 65536)
            data += struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_DISC, 2000, 0, 0)
            if after:
                for i in range(5):
                    data += struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_READ,
                                        3000 + i, 0, 512)
                data += b"garbage after DISC" * 10
            c.send(data)
            done = set()
            while True:
                try:
                    r = c.result()
                except Closed:
                    break
                check(1000 <= r["cookie"] < 1000 + n,
                      f"reply to cookie {r['cookie']} (after DISC?)")
                check(r["err"] == 0,
                      f"error {r['err']} for cookie {r['cookie']}")
                done.add(r["cookie"])
            check(len(done) == n, f"{len(done)} of {n} in-flight "
                  "requests answered before the close"
                  f"{' (data after DISC)' if after else ''}")
        finally:
            c.close()


# B28 -----------------------------------------------------------------------


@case
def b28_cookies(args):
    c = connect_go(args, b"", [b"base:allocation"])
    try:
        for ck in (0, 2**64 - 1, 0x8000000000000000, 1):
            r = c.read(512, 512, cookie=ck)
            check(r["cookie"] == ck and r["err"] == 0, f"cookie {ck:#x}")
            c.req(CMD_BLOCK_STATUS, 0, ck, 0, 4096)
            r = c.result()
            check(r["cookie"] == ck, f"block status cookie {ck:#x}")
        # Duplicates in flight: every reply carries the cookie.
        ck = 0x4242
        for i in range(8):
            c.req(CMD_READ, 0, ck, i * 4096, 4096)
        datas = []
        for i in range(8):
            r = c.result()
            check(r["cookie"] == ck and r["err"] == 0, "duplicate cookie")
            buf = bytearray(4096)
            offs = [o for o, _ in r["reads"]]
            base = min(offs)
            for o, d in r["reads"]:
                buf[o - base:o - base + len(d)] = d
            datas.append((base, bytes(buf)))
        for base, d in datas:
            check(d == ref_read(args.ref, base, 4096),
                  f"duplicate-cookie read at {base} mixed up")
        check(sorted(b for b, _ in datas) == [i * 4096 for i in range(8)],
              "duplicate-cookie reads: wrong offsets")
    finally:
        c.close()


# Extra: valid requests interleaved with errors, many in flight ------------


@case
def x_parallel_mixed(args):
    c = connect_go(args, b"", [b"base:allocation", b"qemu:dirty-bitmap:b1"])
    try:
        want = {}
        data = b""
        for i in range(200):
            kind = i % 4
            if kind == 0:
                data += c.pack_req(CMD_READ, 0, i, i * 8192, 8192)
                want[i] = ("read", i * 8192)
            elif kind == 1:
                data += c.pack_req(99, 0, i, 0, 0)
                want[i] = ("err", EINVAL)
            elif kind == 2:
                data += c.pack_req(CMD_WRITE, 0, i, 0, 700) + b"\x77" * 700
                want[i] = ("err", EPERM)
            else:
                data += c.pack_req(CMD_BLOCK_STATUS, 0, i, i * 4096, 1 << 20)
                want[i] = ("bs", i * 4096)
        c.send(data)
        got = 0
        while got < len(want):
            r = c.result()
            ck = r["cookie"]
            check(ck in want, f"unexpected cookie {ck}")
            kind, v = want.pop(ck)
            if kind == "err":
                check(r["err"] == v, f"cookie {ck}: err {r['err']} != {v}")
            elif kind == "read":
                check(r["err"] == 0, f"read {ck}: {r['err']}")
                buf = bytearray(8192)
                for o, d in r["reads"]:
                    buf[o - v:o - v + len(d)] = d
                check(bytes(buf) == ref_read(args.ref, v, 8192),
                      f"read {ck} data")
            else:
                check_bs(r, set(c.ids.values()), v, 1 << 20, c.size)
    finally:
        c.close()


def big_ref(args, off, ln):
    """Guest bytes of export 'big': 0x5a in the first 512 bytes of every
    KiB below ALT_SPAN, zero elsewhere."""
    p, span = args.alt_period, args.alt_span
    out = bytearray(ln)
    pos = off
    while pos < off + ln:
        k = pos // p
        nxt = min((k + 1) * p, off + ln)
        if pos < span and k % 2 == 0:
            out[pos - off:nxt - off] = b"\x5a" * (nxt - pos)
        pos = nxt
    return bytes(out)


@case
def x_parallel_stress(args):
    """Several connections at once, each with many requests in flight:
    random reads (data checked) and block status (checked against a
    quiet single request) on two exports -- races in shared state would
    show as wrong bytes or extents."""
    import random
    import threading
    rnd = random.Random(1234)
    # Reference block status, one request at a time.
    ref_bs = {}
    c = connect_go(args, b"", [b"base:allocation", b"qemu:dirty-bitmap:b1",
                               b"qemu:allocation-depth"])
    probes = [(rnd.randrange(0, args.size - 4096) & ~511,
               rnd.choice([4096, 65536, 1 << 20])) for _ in range(20)]
    for i, (o, l) in enumerate(probes):
        c.req(CMD_BLOCK_STATUS, 0, i, o, min(l, args.size - o))
        ref_bs[(o, l)] = c.result(i)["bs"]
    c.close()
    errors = []

    def worker(seed):
        r = random.Random(seed)
        big = seed % 2 == 1
        try:
            if big:
                cc = connect_go(args, b"big", [b"qemu:dirty-bitmap:alt"])
            else:
                cc = connect_go(args, b"", [b"base:allocation",
                                            b"qemu:dirty-bitmap:b1",
                                            b"qemu:allocation-depth"])
            size = cc.size
            for rnd_round in range(4):
                want = {}
                batch = b""
                for j in range(48):
                    ck = rnd_round * 1000 + j
                    if not big and j % 6 == 5:
                        o, l = probes[r.randrange(len(probes))]
                        batch += cc.pack_req(CMD_BLOCK_STATUS, 0, ck, o,
                                             min(l, size - o))
                        want[ck] = ("bs", o, l)
                        continue
                    l = r.choice([1, 511, 4096, 65536, 200000, 1 << 20])
                    o = r.randrange(0, size - l)
                    fl = FLAG_DF if r.random() < 0.2 else 0
                    batch += cc.pack_req(CMD_READ, fl, ck, o, l)
                    want[ck] = ("read", o, l)
                cc.send(batch)
                while want:
                    res = cc.result()
                    kind, o, l = want.pop(res["cookie"])
                    if res["err"]:
                        raise Fail(f"{kind} {o}+{l}: error {res['err']}")
                    if kind == "bs":
                        if res["bs"] != ref_bs[(o, l)]:
                            raise Fail(f"block status {o}+{l} differs under "
                                       "load")
                        continue
                    buf = bytearray(l)
                    for ro, d in res["reads"]:
                        buf[ro - o:ro - o + len(d)] = d
                    exp = big_ref(args, o, l) if big else ref_read(args.ref, o, l)
                    if bytes(buf) != exp:
                        raise Fail(f"{'big' if big else 'main'} read {o}+{l} "
                                   "differs under load")
            cc.close()
        except Exception as e:  # reported by the main thread
            errors.append(f"worker {seed}: {type(e).__name__}: {e}")

    ts = [threading.Thread(target=worker, args=(i,))
          for i in range(args.max_conn - 2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(3 * WAIT)
    check(not any(t.is_alive() for t in ts), "stress workers hung")
    check(not errors, "; ".join(errors[:3]))


# --------------------------------------------------------------------------
# SIGTERM with clients in every state (B30)


def sigterm(args):
    conns = []
    # Mid-handshake: greeted, nothing sent.
    for _ in range(3):
        c = Conn(addr_of(args))
        c.greet(cflags=None)
        conns.append(("idle handshake", c))
    # Mid-handshake after some options.
    c = Conn(addr_of(args))
    c.greet()
    c.sr()
    conns.append(("handshake after SR", c))
    # Mid option payload.
    c = Conn(addr_of(args))
    c.greet()
    c.send(struct.pack(">QII", OPTS_MAGIC, OPT_GO, 100) + b"\0" * 10)
    conns.append(("mid option", c))
    # In transmission, idle.
    c = connect_go(args, b"", [b"base:allocation"])
    conns.append(("transmission idle", c))
    # Hung: pipelines reads and never reads replies.
    c = connect_go(args, b"", [b"base:allocation"])
    c.s.setblocking(False)
    for i in range(3000):
        try:
            c.s.send(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_READ, i, 0,
                                 1 << 20))
        except BlockingIOError:
            break
    c.s.setblocking(True)
    conns.append(("hung (not reading)", c))
    # Mid block status on the big export.
    c = connect_go(args, b"big", [b"base:allocation", b"qemu:dirty-bitmap:alt"])
    for i in range(8):
        c.req(CMD_BLOCK_STATUS, 0, i, 0, c.size)
    conns.append(("mid block status", c))
    time.sleep(0.3)
    t0 = time.monotonic()
    os.kill(args.pid, signal.SIGTERM)
    # Nothing is read from the hung client while the server shuts down
    # (reading would un-hang it).
    bad = []
    for what, c in conns:
        if what.startswith("hung"):
            continue
        left = max(0.1, args.shutdown_bound - (time.monotonic() - t0))
        if not c.wait_closed(left):
            bad.append(what)
    dt = time.monotonic() - t0
    while alive(args.pid) and time.monotonic() - t0 < args.shutdown_bound:
        time.sleep(0.1)
    gone = time.monotonic() - t0
    still = alive(args.pid)
    for what, c in conns:
        # With the server gone the kernel has closed its end: wait for
        # the EOF behind the replies still queued.
        if what.startswith("hung") and not c.wait_closed(1 if still else WAIT):
            bad.append(what)
        c.close()
    print(f"# sockets closed after {dt:.1f}s; server "
          f"{'still running' if still else 'gone'} after {gone:.1f}s",
          flush=True)
    if bad:
        print(f"FAIL sigterm: still open after {args.shutdown_bound}s: "
              f"{', '.join(bad)}")
        return 1
    if still:
        print(f"FAIL sigterm: server still running after "
              f"{args.shutdown_bound}s")
        return 1
    print("ok sigterm")
    return 0


# --------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--ref")
    ap.add_argument("--big-size", type=int, default=0)
    ap.add_argument("--alt-period", type=int, default=512)
    ap.add_argument("--alt-span", type=int, default=0)
    ap.add_argument("--max-conn", type=int, default=8)
    ap.add_argument("--hs-timeout", type=float, default=2)
    ap.add_argument("--rss-limit-mib", type=int, default=300)
    ap.add_argument("--shutdown-bound", type=float, default=35)
    ap.add_argument("--cases")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--sigterm", action="store_true")
    args = ap.parse_args()
    if args.list:
        for fn in CASES:
            print(fn.__name__)
        return 0
    if args.sigterm:
        return sigterm(args)
    args.size = os.path.getsize(args.ref) & ~511

    probe(args, "(warm-up)")
    # Warm up every code path once so RSS reflects steady state.
    if args.big_size:
        c = connect_go(args, b"big", [b"base:allocation",
                                      b"qemu:dirty-bitmap:alt"])
        c.req(CMD_BLOCK_STATUS, 0, 1, 0, c.size)
        c.result(1)
        c.close()
    rss0 = rss_kib(args.pid)
    print(f"# server RSS after warm-up: {rss0} KiB", flush=True)
    failed = []
    for fn in CASES:
        name = fn.__name__
        if args.cases and not re.search(args.cases, name):
            continue
        t0 = time.monotonic()
        try:
            before = server_sockets(args.pid)
            fn(args)
            settle(args, before)
            probe(args, f"after {name}")
            rss = rss_kib(args.pid)
            check(rss - rss0 < args.rss_limit_mib * 1024,
                  f"server RSS {rss} KiB, {rss - rss0} KiB above the "
                  f"warm-up ({args.rss_limit_mib} MiB allowed)")
            print(f"ok {name} ({time.monotonic() - t0:.1f}s, RSS {rss} KiB)",
                  flush=True)
        except (Fail, Closed, OSError, struct.error) as e:
            failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            if os.environ.get("HOSTILE_TRACE"):
                traceback.print_exc()
            if not alive(args.pid):
                print("FAIL: the server died; stopping", flush=True)
                break
    if failed:
        print(f"# {len(failed)} case(s) failed: {' '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
