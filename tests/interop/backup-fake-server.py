#!/usr/bin/python3
"""A small, deliberately misbehaving NBD server for the backup agent's tests.

    backup-fake-server.py [--socket SOCK] --image RAW [--dirty FILE]
                          [--bitmap NAME] [--bad MODE] [--bad-at OFFSET]
                          [--delay SECONDS] [--stall-after BYTES
                          --stall-file FILE] [--pid-file FILE]

Serves RAW (read-only) over a unix socket -- SOCK, or the listening socket
it is handed by socket activation (LISTEN_FDS=1, LISTEN_PID: see
socket-activate.py; then it is connectable before this starts) -- speaking
just enough of the NBD
protocol for libnbd (fixed newstyle; OPT_STRUCTURED_REPLY,
OPT_SET_META_CONTEXT, OPT_GO/INFO; READ, BLOCK_STATUS, FLUSH, DISC) with
two meta contexts: base:allocation (64 KiB blocks that read as zero are
reported hole|zero, the rest data) and qemu:dirty-bitmap:NAME (flag 1 =
dirty), whose dirty ranges come from FILE (lines "OFFSET LENGTH"; none:
nothing dirty).  nbdkit cannot serve qemu:dirty-bitmap contexts at all,
which is why this exists.

--bad MODE makes the server misbehave (only on requests that reach past
--bad-at, default 0):

  bitmap-past-request   a dirty-bitmap extent that is not the last runs
                        past the end of the request
  alloc-past-request    the same for base:allocation
  final-past-request    the *last* extent of each context runs past the
                        request (allowed by the NBD spec: not an error)
  short-coverage        each reply covers only its first extent (allowed)
  bitmap-zero-length    a zero-length dirty-bitmap extent
  alloc-zero-length     a zero-length base:allocation extent
  bitmap-flags-2        a dirty-bitmap extent with flags 2
  bitmap-flags-3        a dirty-bitmap extent with flags 3
  alloc-flags-4         a base:allocation extent with flags 4
  no-bitmap-context     never grant qemu:dirty-bitmap:NAME
  omit-bitmap-chunk     grant it, but leave it out of block status replies
  dup-bitmap-chunk      send the dirty-bitmap chunk twice
  odd-chunk             a block status chunk whose length is not a
                        multiple of 8 after the context id
  bs-eio                block status fails with EIO
  read-eio              reads fail with EIO
  short-read            reads return only the first half of the data,
                        then DONE
  read-past-request     a read's data chunk runs past the request
  disconnect-read       the connection is closed in the middle of a read
  wrong-size            after the first connection, the export is 1 MiB
                        larger (a size change between connections)

--delay S sleeps S seconds before every read reply.

--stall-after BYTES: once BYTES of read data have been served (over all
connections), every further read hangs for good, and FILE is created: the
signal that a client is now stuck in the middle of its reads (kill -9
tests: a kill after that signal lands mid-backup, however loaded the
machine is).
Each connection is served by its own thread; multi-conn is not advertised.
"""
import argparse
import os
import socket
import struct
import sys
import threading
import time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLYMAGIC = 0x0003E889045565A9
REQMAGIC = 0x25609513
SIMPLE = 0x67446698
STRUCTURED = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST = 1, 2, 3
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 9, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERR_UNSUP, REP_ERR_INVALID = 0x80000001, 0x80000003
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
FLAG_HAS_FLAGS, FLAG_READ_ONLY, FLAG_SEND_FLUSH = 1, 2, 4
CMD_READ, CMD_DISC, CMD_FLUSH, CMD_BLOCK_STATUS = 0, 2, 3, 7
CMD_FLAG_REQ_ONE = 8
R_NONE, R_OFFSET_DATA, R_BLOCK_STATUS, R_ERROR = 0, 1, 5, 0x8001
REPLY_FLAG_DONE = 1
EIO, EINVAL, ENOTSUP = 5, 22, 95
BLOCK = 64 * 1024
CTX_ALLOC, CTX_DIRTY = 1, 2


class Conn:
    def __init__(self, sock, a, nconn):
        self.s, self.a, self.nconn = sock, a, nconn
        self.structured = False
        self.contexts = {}              # id -> name
        self.f = open(a.image, "rb")
        self.size = os.fstat(self.f.fileno()).st_size
        if a.bad == "wrong-size" and nconn > 0:
            self.size += 1 << 20

    def recv(self, n):
        b = b""
        while len(b) < n:
            c = self.s.recv(n - len(b))
            if not c:
                raise EOFError
            b += c
        return b

    def send(self, *parts):
        self.s.sendall(b"".join(parts))

    def opt_reply(self, opt, rtype, data=b""):
        self.send(struct.pack(">QIII", REPLYMAGIC, opt, rtype, len(data)), data)

    # ---- handshake -------------------------------------------------------

    def handshake(self):
        self.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
        self.recv(4)                                    # client flags
        while True:
            magic, opt, ln = struct.unpack(">QII", self.recv(16))
            if magic != IHAVEOPT:
                raise EOFError
            data = self.recv(ln)
            if opt == OPT_STRUCTURED_REPLY:
                self.structured = True
                self.opt_reply(opt, REP_ACK)
            elif opt in (OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT):
                self.meta_context(opt, data)
            elif opt in (OPT_GO, OPT_INFO):
                self.opt_reply(opt, REP_INFO, struct.pack(
                    ">HQH", INFO_EXPORT, self.size,
                    FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH))
                self.opt_reply(opt, REP_INFO, struct.pack(
                    ">HIII", INFO_BLOCK_SIZE, 1, 4096, 32 << 20))
                self.opt_reply(opt, REP_ACK)
                if opt == OPT_GO:
                    return
            elif opt == OPT_ABORT:
                self.opt_reply(opt, REP_ACK)
                raise EOFError
            else:
                self.opt_reply(opt, REP_ERR_UNSUP)

    def meta_context(self, opt, data):
        nlen = struct.unpack(">I", data[:4])[0]
        pos = 4 + nlen
        nq = struct.unpack(">I", data[pos:pos + 4])[0]
        pos += 4
        queries = []
        for _ in range(nq):
            ql = struct.unpack(">I", data[pos:pos + 4])[0]
            queries.append(data[pos + 4:pos + 4 + ql].decode())
            pos += 4 + ql
        dirty = "qemu:dirty-bitmap:" + self.a.bitmap
        granted = {}
        for q in queries:
            if q == "base:allocation":
                granted[CTX_ALLOC] = q
            elif q == dirty and self.a.bad != "no-bitmap-context":
                granted[CTX_DIRTY] = q
        for cid, name in sorted(granted.items()):
            self.opt_reply(opt, REP_META_CONTEXT,
                           struct.pack(">I", cid) + name.encode())
        if opt == OPT_SET_META_CONTEXT:
            self.contexts = granted
        self.opt_reply(opt, REP_ACK)

    # ---- transmission ----------------------------------------------------

    def chunk(self, flags, rtype, cookie, payload=b""):
        self.send(struct.pack(">IHHQI", STRUCTURED, flags, rtype, cookie,
                              len(payload)), payload)

    def error(self, cookie, err, msg="injected error"):
        if self.structured:
            m = msg.encode()
            self.chunk(REPLY_FLAG_DONE, R_ERROR, cookie,
                       struct.pack(">IH", err, len(m)) + m)
        else:
            self.send(struct.pack(">IIQ", SIMPLE, err, cookie))

    def bad_here(self, off, ln):
        return self.a.bad and off + ln > self.a.bad_at

    def serve(self):
        while True:
            magic, flags, typ, cookie, off, ln = struct.unpack(
                ">IHHQQI", self.recv(28))
            if magic != REQMAGIC:
                return
            if typ == CMD_DISC:
                return
            if typ == CMD_FLUSH:
                self.send(struct.pack(">IIQ", SIMPLE, 0, cookie))
            elif off + ln > self.size or ln == 0:
                self.error(cookie, EINVAL, "out of range")
            elif typ == CMD_READ:
                self.read(cookie, off, ln)
            elif typ == CMD_BLOCK_STATUS:
                self.block_status(cookie, flags, off, ln)
            else:
                self.error(cookie, ENOTSUP, "not supported")

    def read(self, cookie, off, ln):
        if self.a.delay:
            time.sleep(self.a.delay)
        if self.a.stall_after is not None:
            self.a.stall_gate(ln)
        bad = self.bad_here(off, ln) and self.a.bad
        if bad == "read-eio":
            return self.error(cookie, EIO, "injected read error")
        self.f.seek(off)
        data = self.f.read(ln).ljust(ln, b"\0")
        if bad == "disconnect-read":
            self.send(struct.pack(">IHHQI", STRUCTURED, 0, R_OFFSET_DATA,
                                  cookie, 8 + ln), struct.pack(">Q", off),
                      data[:ln // 2])
            raise EOFError
        if not self.structured:
            return self.send(struct.pack(">IIQ", SIMPLE, 0, cookie), data)
        if bad == "short-read":
            data = data[:max(1, ln // 2)]
        elif bad == "read-past-request":
            data += b"\xaa" * 4096
        self.chunk(REPLY_FLAG_DONE, R_OFFSET_DATA, cookie,
                   struct.pack(">Q", off) + data)

    def alloc_extents(self, off, ln):
        ext, pos, end = [], off, off + ln
        self.f.seek(off)
        while pos < end:
            n = min(BLOCK - pos % BLOCK, end - pos)
            blk = self.f.read(n)
            fl = 3 if blk.count(0) == len(blk) else 0
            if ext and ext[-1][1] == fl:
                ext[-1][0] += n
            else:
                ext.append([n, fl])
            pos += n
        return ext

    def dirty_extents(self, off, ln):
        ext, pos, end = [], off, off + ln
        for s, l in self.a.dirty_runs:
            s, e = max(s, pos), min(s + l, end)
            if s >= e:
                continue
            if s > pos:
                ext.append([s - pos, 0])
            ext.append([e - s, 1])
            pos = e
        if pos < end:
            ext.append([end - pos, 0])
        return ext

    def block_status(self, cookie, flags, off, ln):
        if not self.structured or not self.contexts:
            return self.error(cookie, EINVAL, "no contexts")
        bad = self.bad_here(off, ln) and self.a.bad
        if bad == "bs-eio":
            return self.error(cookie, EIO, "injected block status error")
        chunks = []
        for cid in sorted(self.contexts):
            if cid == CTX_DIRTY and bad == "omit-bitmap-chunk":
                continue
            ext = (self.alloc_extents if cid == CTX_ALLOC
                   else self.dirty_extents)(off, ln)
            ext = self.mangle(cid, ext, bad)
            if flags & CMD_FLAG_REQ_ONE:
                ext = ext[:1]
            payload = struct.pack(">I", cid) + b"".join(
                struct.pack(">II", l, f) for l, f in ext)
            if bad == "odd-chunk":
                payload += b"\0\0\0\0"
            chunks.append(payload)
            if cid == CTX_DIRTY and bad == "dup-bitmap-chunk":
                chunks.append(payload)
        for i, p in enumerate(chunks):
            last = i == len(chunks) - 1
            self.chunk(REPLY_FLAG_DONE if last else 0, R_BLOCK_STATUS,
                       cookie, p)

    @staticmethod
    def mangle(cid, ext, bad):
        is_dirty = cid == CTX_DIRTY
        target = CTX_DIRTY if (bad or "").startswith("bitmap-") else CTX_ALLOC
        if bad == "short-coverage":
            return ext[:1]
        if bad == "final-past-request":
            ext[-1][0] += 1 << 20
            return ext
        if cid != target:
            return ext
        if bad in ("bitmap-past-request", "alloc-past-request"):
            # A middle extent that alone runs past the request.
            total = sum(l for l, _ in ext)
            ext = [[1 << 20, 0], [total + (2 << 20), int(is_dirty)],
                   [65536, 0]]
        elif bad in ("bitmap-zero-length", "alloc-zero-length"):
            ext.insert(1 if len(ext) > 1 else 0, [0, 1 if is_dirty else 0])
        elif bad == "bitmap-flags-2":
            ext[0][1] = 2
        elif bad == "bitmap-flags-3":
            ext[-1][1] = 3
        elif bad == "alloc-flags-4":
            ext[0][1] = 4
        return ext


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--socket")
    ap.add_argument("--image", required=True)
    ap.add_argument("--dirty")
    ap.add_argument("--bitmap", default="X")
    ap.add_argument("--bad", default="")
    ap.add_argument("--bad-at", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--stall-after", type=int)
    ap.add_argument("--stall-file")
    ap.add_argument("--pid-file")
    a = ap.parse_args()
    a.dirty_runs = []
    if a.dirty:
        with open(a.dirty) as f:
            a.dirty_runs = sorted(tuple(int(x, 0) for x in line.split())
                                  for line in f if line.strip())

    if (a.stall_after is None) != (a.stall_file is None):
        ap.error("--stall-after and --stall-file go together")
    served, lock = [0], threading.Lock()

    def stall_gate(ln):
        with lock:
            if served[0] < a.stall_after:
                served[0] += ln
                return
            if not os.path.exists(a.stall_file):
                with open(a.stall_file + ".tmp", "w") as f:
                    f.write(f"{served[0]}\n")
                os.rename(a.stall_file + ".tmp", a.stall_file)
        threading.Event().wait()        # for good
    a.stall_gate = stall_gate

    if (os.environ.get("LISTEN_PID") == str(os.getpid()) and
            os.environ.get("LISTEN_FDS") == "1"):
        ls = socket.socket(fileno=3)        # socket activation
    elif a.socket:
        if os.path.exists(a.socket):
            os.unlink(a.socket)
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(a.socket)
        ls.listen(16)
    else:
        ap.error("--socket is required without socket activation")
    if a.pid_file:
        with open(a.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    nconn = 0

    def handle(sock, n):
        c = Conn(sock, a, n)
        try:
            c.handshake()
            c.serve()
        except (EOFError, ConnectionError, BrokenPipeError):
            pass
        finally:
            c.f.close()
            sock.close()

    while True:
        s, _ = ls.accept()
        threading.Thread(target=handle, args=(s, nconn), daemon=True).start()
        nconn += 1


if __name__ == "__main__":
    sys.exit(main())
