#!/usr/bin/python3
"""Reference model of qcbt's chain-aware bitmap merge, built on QEMU facts.

    bitmap-model.py dump [--strict] [--info OUT.json] [--invalid N]... IMAGE NAME
        Expected `qcbt bitmap dump --json [--strict] IMAGE NAME`: a list of
        {"offset","length","type","description"} extents covering the disk.
        When the merge must be refused: prints "model: RULE at layer N" lines
        (every violation) on stderr and exits 2.  --info writes the details
        (facts, sources, granularity, violations) as JSON.  --invalid N adds
        a fact QEMU's tools cannot show directly: layer N holds NAME but its
        bitmaps are unusable (e.g. its bitmaps extension is present with the
        autoclear bit clear, so QEMU ignores it: the test proves the bitmap
        is there by re-setting the bit in a copy).
    bitmap-model.py compare [--size N] [--context TEXT] [--loose]
                            EXPECTED.json ACTUAL.json
        Compare two dirty maps (nbdinfo --map --json shape) over the whole
        disk.  Exit 0 equal, 1 different or ACTUAL malformed (first
        differing extent on stderr), 3 EXPECTED (the oracle's answer)
        malformed or empty: "oracle broke".  ACTUAL must also honour the
        dump contract (exact keys, contiguous, adjacent equal extents
        merged) unless --loose.
    bitmap-model.py digest --granularity G --size N DUMP.json
        SHA-256 of the bitmap a dump describes, computed like QEMU's
        x-debug-block-dirty-bitmap-sha256 (qcow2-format.md 14.9).
    bitmap-model.py qemu-sha256 [--alone] IMAGE NAME...
        QEMU's x-debug-block-dirty-bitmap-sha256 for each NAME, from a
        read-only qemu-storage-daemon (--alone: the layer without its
        backing chain).  One "NAME DIGEST" line per name ("NAME error: ..."
        when QEMU refuses that name, e.g. it has no such bitmap).  Any other
        failure (the daemon does not start, a QMP reply that is not the
        answer, no answer) prints nothing on stdout, the reason on stderr,
        and exits 1; the daemon is killed, never left running.
        $QCBT_QSD replaces qemu-storage-daemon (tests of this oracle).
    bitmap-model.py qemu-add IMAGE GRANULARITY PREFIX COUNT [--disabled]
        Add COUNT persistent bitmaps PREFIX0..PREFIX<COUNT-1> through QMP.
    bitmap-model.py qemu-bitmaps IMAGE
        The layer's bitmaps as QEMU sees them (query-named-block-nodes:
        name, granularity, recording, count, inconsistent), read-only, alone.
    bitmap-model.py text2json < NBDINFO-TEXT
        Turn `nbdinfo --map` text output into the JSON shape.
    bitmap-model.py facts IMAGE NAME
        The per-layer facts (JSON) the model works from.

Every fact comes from QEMU's own tools, each layer opened alone (json:
filename with "backing": null):
  * layers, sizes, bitmap flags and granularity: qemu-img info --backing-chain
  * a layer's bitmap: nbdinfo --map=qemu:dirty-bitmap:NAME of qemu-nbd -r -B
  * alloc(layer): qemu-img map --output=json, ranges with present && depth 0

The merge (DESIGN.md "The merge engine") is plain interval arithmetic:
every contribution is a list of byte ranges, each range marks the result
bits it overlaps ([floor(a/g), ceil(b/g))), and the result is the union of
those bit ranges clipped to the disk size.
"""

import argparse
import atexit
import ctypes
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile

# --------------------------------------------------------------------------
# QEMU facts


def run(argv):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    if p.returncode != 0:
        raise SystemExit("model: command failed (exit %d): %s\n%s" %
                         (p.returncode, " ".join(argv), p.stderr.strip()))
    return p.stdout


def alone(filename, fmt="qcow2"):
    """json: pseudo-filename opening FILENAME without its backing chain."""
    d = {"driver": fmt, "file": {"driver": "file", "filename": filename}}
    if fmt == "qcow2":
        d["backing"] = None
    return "json:" + json.dumps(d)


def chain_info(image):
    out = run(["qemu-img", "info", "-U", "--backing-chain", "--output=json",
               image])
    info = json.loads(out)
    return info if isinstance(info, list) else [info]


def layer_bitmap_extents(filename, name):
    """Dirty byte ranges of NAME stored in FILENAME (layer alone)."""
    out = run(["nbdinfo", "--map=qemu:dirty-bitmap:" + name, "--json", "--",
               "[", "qemu-nbd", "-r", "-B", name, alone(filename), "]"])
    return [(e["offset"], e["offset"] + e["length"])
            for e in json.loads(out) if e["type"] & 1]


def layer_alloc(filename, fmt):
    """Everything FILENAME itself allocates (zero clusters included)."""
    out = run(["qemu-img", "map", "-U", "--output=json", alone(filename, fmt)])
    return [(e["start"], e["start"] + e["length"])
            for e in json.loads(out) if e["present"] and e["depth"] == 0]


def facts(image, name):
    layers = []
    for i, l in enumerate(chain_info(image)):
        fmt = l["format"]
        bms = (l.get("format-specific", {}).get("data", {}).get("bitmaps")
               or []) if fmt == "qcow2" else []
        lay = {"depth": i, "filename": l["filename"], "format": fmt,
               "size": l["virtual-size"], "has": False}
        for b in bms:
            if b["name"] == name:
                lay.update(has=True, granularity=b["granularity"],
                           in_use="in-use" in b["flags"],
                           enabled="auto" in b["flags"])
        layers.append(lay)
    return layers


def fill_facts(layers, name, needed):
    """Fetch the extents the merge needs (bitmap or allocation) per layer."""
    for lay in layers:
        what = needed.get(lay["depth"])
        if what == "bitmap":
            lay["bitmap"] = layer_bitmap_extents(lay["filename"], name)
        elif what == "allocation":
            lay["alloc"] = layer_alloc(lay["filename"], lay["format"])


# --------------------------------------------------------------------------
# The merge (DESIGN.md)


def plan(layers, strict):
    """-> (sources {depth: "bitmap"|"allocation"}, deepest k, violations)."""
    holders = [l["depth"] for l in layers if l["has"]]
    if not holders:
        return {}, None, [("missing everywhere", 0)]
    k = max(holders)
    by = {l["depth"]: l for l in layers}
    violations = []
    if strict:
        if not by[0]["has"]:
            violations.append(("missing in top", 0))
        for j in range(1, k):
            if not by[j]["has"]:
                violations.append(("gap at layer %d" % j, j))
        for j in range(0, k + 1):
            if by[j]["has"] and by[j]["in_use"]:
                violations.append(("in use at layer %d" % j, j))
            elif by[j]["has"] and by[j].get("invalid"):
                violations.append(("invalid at layer %d" % j, j))
        sources = {j: "bitmap" for j in range(k + 1)}
        violations.sort(key=lambda v: v[1])     # first = topmost
    else:
        if by[k]["in_use"]:
            violations.append(("in use at layer %d" % k, k))
        elif by[k].get("invalid"):
            violations.append(("invalid at layer %d" % k, k))
        sources = {j: ("bitmap" if by[j]["has"] and not by[j]["in_use"]
                       and not by[j].get("invalid") else "allocation")
                   for j in range(k)}
        sources[k] = "bitmap"
    return sources, k, violations


def union_bits(ranges, g):
    """Byte ranges -> sorted disjoint bit ranges of granularity G."""
    bits = sorted((a // g, -(-b // g)) for a, b in ranges if b > a)
    out = []
    for lo, hi in bits:
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def to_dump(bitranges, g, size):
    """Bit ranges -> dump extents covering [0, size), clean/dirty alternating."""
    ext, pos = [], 0
    for lo, hi in bitranges:
        a, b = min(lo * g, size), min(hi * g, size)
        if a >= b:
            continue
        if a > pos:
            ext.append(extent(pos, a - pos, 0))
        ext.append(extent(a, b - a, 1))
        pos = b
    if pos < size:
        ext.append(extent(pos, size - pos, 0))
    return ext


def extent(off, length, t):
    return {"offset": off, "length": length, "type": t,
            "description": "dirty" if t else "clean"}


def merge(layers, name, strict, fetch=True):
    sources, k, violations = plan(layers, strict)
    info = {"name": name, "mode": "strict" if strict else "tolerant",
            "deepest-layer": k, "violations": [v[0] for v in violations],
            "violation-layers": [v[1] for v in violations],
            "size": layers[0]["size"], "layers": layers}
    if violations:
        info["sources"] = {}
        return None, info
    if fetch:
        fill_facts(layers, name, sources)
    g = next(layers[j]["granularity"] for j in sorted(sources)
             if sources[j] == "bitmap")
    ranges = []
    for j, src in sorted(sources.items()):
        ranges += layers[j]["bitmap" if src == "bitmap" else "alloc"]
    size = layers[0]["size"]
    info.update(granularity=g, sources={str(j): s for j, s in sources.items()})
    return to_dump(union_bits(ranges, g), g, size), info


# --------------------------------------------------------------------------
# Comparing dumps


class DumpError(Exception):
    pass


def load_dump(path, label, contract):
    try:
        with (sys.stdin if path == "-" else open(path)) as f:
            text = f.read()
        d = json.loads(text)
    except (OSError, ValueError) as e:
        raise DumpError("%s: cannot load %s: %s" % (label, path, e))
    if not isinstance(d, list):
        raise DumpError("%s: top level is not a list" % label)
    pos = 0
    for i, e in enumerate(d):
        if not isinstance(e, dict) or not all(
                isinstance(e.get(k), int) for k in ("offset", "length", "type")):
            raise DumpError("%s: extent %d malformed: %r" % (label, i, e))
        if e["offset"] != pos or e["length"] <= 0:
            raise DumpError("%s: extent %d %r does not start at %d or is empty"
                            % (label, i, e, pos))
        pos += e["length"]
        if contract:
            if set(e) != {"offset", "length", "type", "description"}:
                raise DumpError("%s: extent %d has keys %s" %
                                (label, i, sorted(e)))
            if e["type"] not in (0, 1) or e["description"] != (
                    "dirty" if e["type"] else "clean"):
                raise DumpError("%s: extent %d bad type/description: %r" %
                                (label, i, e))
            if i and d[i - 1]["type"] == e["type"]:
                raise DumpError("%s: extents %d and %d not merged: %r %r" %
                                (label, i - 1, i, d[i - 1], e))
    return d, pos


def compare(exp, act, size=None, context="", loose=False, out=sys.stderr):
    """Exit status 0/1; reports the first differing range.  3 when EXPECTED
    (an oracle's answer) is not a map: the oracle broke, qcbt is not to
    blame."""
    pre = "[%s] " % context if context else ""
    try:
        e, esize = load_dump(exp, "expected", False)
    except DumpError as err:
        print("%soracle broke: %s" % (pre, err), file=out)
        return 3
    try:
        a, asize = load_dump(act, "actual", not loose)
    except DumpError as err:
        print(pre + str(err), file=out)
        return 1
    size = esize if size is None else size
    if esize != size or (not e and size):
        print("%soracle broke: expected map ends at %d, disk size is %d" %
              (pre, esize, size), file=out)
        return 3
    if asize != size:
        print("%sactual map ends at %d, disk size is %d" % (pre, asize, size),
              file=out)
        return 1
    i = j = 0
    pos = 0
    while pos < size:
        ea, aa = e[i], a[j]
        eend, aend = ea["offset"] + ea["length"], aa["offset"] + aa["length"]
        end = min(eend, aend)
        if (ea["type"] & 1) != (aa["type"] & 1):
            # extend to the whole differing run
            stop, ii, jj = end, i, j
            while stop < size:
                if e[ii]["offset"] + e[ii]["length"] == stop:
                    ii += 1
                if a[jj]["offset"] + a[jj]["length"] == stop:
                    jj += 1
                if (e[ii]["type"] & 1) == (a[jj]["type"] & 1):
                    break
                stop = min(e[ii]["offset"] + e[ii]["length"],
                           a[jj]["offset"] + a[jj]["length"])
            print("%sfirst difference at [%d, %d) = offset %d (0x%x) length %d:"
                  " expected %s, actual %s\n    expected extent %s\n"
                  "    actual extent   %s" %
                  (pre, pos, stop, pos, pos, stop - pos,
                   "dirty" if ea["type"] & 1 else "clean",
                   "dirty" if aa["type"] & 1 else "clean",
                   json.dumps(ea), json.dumps(aa)), file=out)
            return 1
        pos = end
        if eend == end:
            i += 1
        if aend == end:
            j += 1
    return 0


# --------------------------------------------------------------------------
# Digest (qcow2-format.md 14.9, 64-bit little-endian host)


def digest(dump, g, size):
    nbits = -(-size // g)
    nwords = max(1, -(-nbits // 64))
    buf = bytearray(nwords * 8)
    for lo, hi in union_bits([(x["offset"], x["offset"] + x["length"])
                              for x in dump if x["type"] & 1], g):
        set_bits(buf, lo, hi)
    return hashlib.sha256(buf).hexdigest()


def set_bits(buf, lo, hi):
    while lo < hi and lo % 8:
        buf[lo // 8] |= 1 << (lo % 8)
        lo += 1
    nbytes = (hi - lo) // 8
    if nbytes:
        buf[lo // 8:lo // 8 + nbytes] = b"\xff" * nbytes
        lo += nbytes * 8
    while lo < hi:
        buf[lo // 8] |= 1 << (lo % 8)
        lo += 1


# --------------------------------------------------------------------------
# QMP through qemu-storage-daemon
#
# The daemon gets one end of a socketpair as its monitor (--chardev
# socket,fd=N): the connection exists before the monitor does, so QEMU
# raises the monitor's "opened" event once.  With a listening socket and a
# client polling until it connects, QEMU 7.2 could raise it twice (the
# accept in the main loop racing the monitor's setup in its I/O thread):
# a second greeting, and the session dropped back into capabilities
# negotiation after qmp_capabilities, so every later command was refused.
# Every reply is checked; anything unexpected (a second greeting, a reply
# that is not ours, a refused command, EOF, no answer within QMP_TIMEOUT)
# kills the daemon and exits non-zero with the reason and the daemon's
# stderr, so callers can tell "the oracle broke" from "qcbt is wrong".

QMP_TIMEOUT = 300       # per reply; only catches a hung daemon


class QmpError(Exception):
    pass


class Daemon:
    live = set()        # daemons to kill if this process exits early

    def __init__(self, blockdev):
        self.proc = None
        self.err = tempfile.TemporaryFile(mode="w+")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [QSD, "--blockdev", json.dumps(blockdev),
                 "--chardev", "socket,id=c0,fd=%d" % theirs.fileno(),
                 "--monitor", "chardev=c0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self.err, pass_fds=(theirs.fileno(),),
                preexec_fn=die_with_parent)
        except OSError as e:
            ours.close()
            raise SystemExit("model: cannot start %s: %s" % (QSD, e))
        finally:
            theirs.close()
        Daemon.live.add(self)
        self.s = ours
        self.s.settimeout(QMP_TIMEOUT)
        self.rbuf = b""
        self.next_id = 0
        try:
            g = self.read_msg("the greeting")
            if "QMP" not in g:
                raise QmpError("expected the QMP greeting, got %s" % dumps1(g))
            r = self.cmd("qmp_capabilities")
            if r.get("return") != {}:
                raise QmpError("qmp_capabilities: %s" % dumps1(r))
        except QmpError as e:
            self.fail(e)

    def fail(self, why):
        """Kill the daemon; exit with WHY and what the daemon said."""
        self.kill()
        raise SystemExit("model: qemu-storage-daemon: %s%s" % (why,
                         self.stderr_text(" (its stderr: %s)")))

    def stderr_text(self, fmt):
        try:
            self.err.seek(0)
            t = self.err.read().strip()
        except (OSError, ValueError):
            t = ""
        return fmt % t if t else ""

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            try:
                self.proc.wait(timeout=QMP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        Daemon.live.discard(self)
        self.s.close()

    def read_msg(self, what):
        """The next QMP message; events are skipped, a second greeting is
        an error."""
        while True:
            while b"\n" not in self.rbuf:
                try:
                    b = self.s.recv(65536)
                except socket.timeout:
                    raise QmpError("no answer to %s in %d s" %
                                   (what, QMP_TIMEOUT))
                except OSError as e:
                    raise QmpError("waiting for %s: %s" % (what, e))
                if not b:
                    raise QmpError("connection closed waiting for %s%s" %
                                   (what, self.exit_text()))
                self.rbuf += b
            line, self.rbuf = self.rbuf.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                raise QmpError("not JSON waiting for %s: %r" % (what, line))
            if not isinstance(msg, dict):
                raise QmpError("not a QMP message: %r" % line)
            if "event" in msg:
                continue
            if "QMP" in msg and self.next_id > 0:
                raise QmpError("a second greeting waiting for %s: the "
                               "monitor restarted its session" % what)
            return msg

    def exit_text(self):
        rc = self.proc.poll()
        return "" if rc is None else " (the daemon exited with status %d)" % rc

    def cmd(self, execute, **args):
        """Send one command; return its reply ({"return": ...} or, for a
        command QEMU ran and refused, {"error": ...}).  Replies are matched
        by id: any other reply means the session is out of step."""
        self.next_id += 1
        msg = {"execute": execute, "id": self.next_id}
        if args:
            msg["arguments"] = args
        try:
            self.s.sendall((json.dumps(msg) + "\n").encode())
        except OSError as e:
            raise QmpError("sending %s: %s%s" % (execute, e, self.exit_text()))
        r = self.read_msg(execute)
        if r.get("id") != self.next_id:
            raise QmpError("reply %s to %s (id %d) is not its own" %
                           (dumps1(r), execute, self.next_id))
        if "return" not in r and "error" not in r:
            raise QmpError("malformed reply to %s: %s" % (execute, dumps1(r)))
        if "error" in r and r["error"].get("class") != "GenericError":
            # CommandNotFound (e.g. a session back in capabilities
            # negotiation), a malformed command: the oracle is broken.
            raise QmpError("%s refused: %s" % (execute, dumps1(r["error"])))
        return r

    def run(self, execute, **args):
        """cmd(), with any QMP failure fatal (the daemon is killed)."""
        try:
            return self.cmd(execute, **args)
        except QmpError as e:
            self.fail(e)

    def quit(self):
        r = self.run("quit")
        if "error" in r:
            self.fail("quit refused: %s" % dumps1(r["error"]))
        try:
            rc = self.proc.wait(timeout=QMP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail("still running %d s after quit" % QMP_TIMEOUT)
        Daemon.live.discard(self)
        self.s.close()
        if rc != 0:
            raise SystemExit("model: qemu-storage-daemon exit %d%s" %
                             (rc, self.stderr_text(": %s")))


LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
ORACLE_PID = os.getpid()


def die_with_parent():
    """In the daemon, before exec: SIGKILL when the oracle dies, however
    it dies (no orphan daemons)."""
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != ORACLE_PID:      # the oracle died before prctl
        os._exit(1)


def kill_daemons():
    for d in list(Daemon.live):
        d.kill()


def on_signal(sig, frame):
    raise SystemExit("model: killed by signal %d" % sig)


def dumps1(v):
    t = json.dumps(v)
    return t if len(t) <= 500 else t[:500] + "..."


QSD = os.environ.get("QCBT_QSD", "qemu-storage-daemon")
atexit.register(kill_daemons)


def blockdev(image, read_only, no_backing):
    d = {"driver": "qcow2", "node-name": "n0", "read-only": read_only,
         "file": {"driver": "file", "filename": image, "read-only": read_only}}
    if no_backing:
        d["backing"] = None
    return d


def qemu_sha256(image, names, no_backing):
    d = Daemon(blockdev(image, True, no_backing))
    out = []
    for n in names:
        r = d.run("x-debug-block-dirty-bitmap-sha256", node="n0", name=n)
        if "return" in r:
            out.append("%s %s" % (n, r["return"]["sha256"]))
        else:
            out.append("%s error: %s" % (n, r["error"]["desc"]))
    d.quit()
    return out


def qemu_bitmaps(image):
    d = Daemon(blockdev(image, True, True))
    r = d.run("query-named-block-nodes", flat=True)
    if "error" in r:
        d.fail("query-named-block-nodes: %s" % dumps1(r["error"]))
    d.quit()
    for n in r["return"]:
        if n["node-name"] == "n0":
            return n.get("dirty-bitmaps") or []
    raise SystemExit("model: node n0 not found")


def text2json(lines):
    out = []
    for ln in lines:
        f = ln.split(None, 3)
        if not f:
            continue
        if len(f) < 3:
            raise SystemExit("model: bad map line: %r" % ln)
        out.append({"offset": int(f[0]), "length": int(f[1]), "type": int(f[2]),
                    "description": f[3].strip() if len(f) > 3 else ""})
    return out


def dumps(ext):
    return "[\n" + ",\n".join(json.dumps(e) for e in ext) + "\n]"


def qemu_add(image, gran, prefix, count, disabled):
    d = Daemon(blockdev(image, False, True))
    batch = 256
    for start in range(0, count, batch):
        actions = [{"type": "block-dirty-bitmap-add",
                    "data": {"node": "n0", "name": "%s%d" % (prefix, i),
                             "granularity": gran, "persistent": True,
                             "disabled": disabled}}
                   for i in range(start, min(count, start + batch))]
        r = d.run("transaction", actions=actions)
        if "error" in r:
            d.fail("transaction failed: %s" % dumps1(r["error"]))
    d.quit()


# --------------------------------------------------------------------------


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("dump")
    s.add_argument("--strict", action="store_true")
    s.add_argument("--info")
    s.add_argument("--invalid", type=int, action="append", default=[])
    s.add_argument("image")
    s.add_argument("name")
    s = sub.add_parser("facts")
    s.add_argument("image")
    s.add_argument("name")
    s = sub.add_parser("compare")
    s.add_argument("--size", type=int)
    s.add_argument("--context", default="")
    s.add_argument("--loose", action="store_true")
    s.add_argument("expected")
    s.add_argument("actual")
    s = sub.add_parser("digest")
    s.add_argument("--granularity", type=int, required=True)
    s.add_argument("--size", type=int, required=True)
    s.add_argument("dump")
    s = sub.add_parser("qemu-sha256")
    s.add_argument("--alone", action="store_true")
    s.add_argument("image")
    s.add_argument("names", nargs="+")
    s = sub.add_parser("qemu-bitmaps")
    s.add_argument("image")
    sub.add_parser("text2json")
    s = sub.add_parser("qemu-add")
    s.add_argument("--disabled", action="store_true")
    s.add_argument("image")
    s.add_argument("granularity", type=int)
    s.add_argument("prefix")
    s.add_argument("count", type=int)
    a = p.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    if a.cmd == "dump":
        layers = facts(a.image, a.name)
        for n in a.invalid:
            layers[n].update(has=True, in_use=False, invalid=True)
        dump, info = merge(layers, a.name, a.strict)
        if a.info:
            with open(a.info, "w") as f:
                json.dump(info, f, indent=1)
        if dump is None:
            for v in info["violations"]:
                print("model: %s" % v, file=sys.stderr)
            return 2
        print(dumps(dump))
        return 0
    if a.cmd == "facts":
        layers = facts(a.image, a.name)
        fill_facts(layers, a.name, {l["depth"]: ("bitmap" if l["has"] and
                                                 not l["in_use"] else "allocation")
                                    for l in layers})
        print(json.dumps(layers, indent=1))
        return 0
    if a.cmd == "compare":
        return compare(a.expected, a.actual, a.size, a.context, a.loose)
    if a.cmd == "digest":
        with open(a.dump) as f:
            print(digest(json.load(f), a.granularity, a.size))
        return 0
    if a.cmd == "qemu-sha256":
        print("\n".join(qemu_sha256(a.image, a.names, a.alone)))
        return 0
    if a.cmd == "qemu-bitmaps":
        print(json.dumps(qemu_bitmaps(a.image), indent=1))
        return 0
    if a.cmd == "text2json":
        print(dumps(text2json(sys.stdin)))
        return 0
    if a.cmd == "qemu-add":
        qemu_add(a.image, a.granularity, a.prefix, a.count, a.disabled)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
