#!/usr/bin/python3
"""Build one random qcow2 chain with bitmaps for test-bitmap-random.sh.

    bitmap-random.py SEED DIR [--compress]

Creates DIR/l<depth>.qcow2 (l0 = top) with qemu-img and qemu-io only,
appends every command to DIR/recipe.txt (a shell script that rebuilds the
chain from scratch in DIR), and prints one JSON line:
    {"top": PATH, "name": "X", "model_opts": [...], "desc": TEXT}
model_opts carries the facts QEMU's tools cannot show (--invalid N for a
layer whose bitmaps extension QEMU ignores because autoclear bit 0 is clear).

Per seed: 2-4 layers (the base sometimes raw), one disk size (not a
multiple of 64 KiB), per layer a cluster size, a state for bitmap X (absent,
enabled, disabled part-way, added after some writes, left in-use by a
killed qemu-io, or hidden behind a cleared autoclear bit), a granularity
(512 B .. 2 GiB), sometimes another bitmap, and random data/zero/discard
writes.  --compress first writes a few compressed clusters (qemu-io write -c)
into each new qcow2 layer, drawn from a second generator so the chain is
otherwise the one the seed gives without it.
"""

import json
import os
import random
import shlex
import subprocess
import sys

MiB = 1 << 20


class Builder:
    def __init__(self, d):
        self.dir = d
        self.recipe = open(os.path.join(d, "recipe.txt"), "a")

    def log(self, argv, note=""):
        self.recipe.write(" ".join(shlex.quote(a) for a in argv) +
                          (" " + note if note else "") + "\n")
        self.recipe.flush()

    def run(self, *argv):
        self.log(argv)
        p = subprocess.run(argv, cwd=self.dir, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            sys.exit("bitmap-random: failed: %s\n%s" % (" ".join(argv), p.stderr))

    def crash(self, img, cmds):
        argv = ["qemu-io", "-f", "qcow2"] + cmds + ["-c", "flush", "-c",
                                                    "sigraise 9", img]
        self.log(argv, "# killed by SIGKILL: bitmaps stay in-use")
        subprocess.run(argv, cwd=self.dir, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def toggle_autoclear(self, img):
        self.recipe.write("# toggle autoclear bit 0 (header byte 95)\n")
        self.log(["python3", "-c", "import sys; f = open(sys.argv[1], 'r+b'); "
                  "f.seek(95); b = f.read(1)[0]; f.seek(95); f.write(bytes([b ^ 1]))",
                  img])
        with open(os.path.join(self.dir, img), "r+b") as f:
            f.seek(95)
            b = f.read(1)[0]
            f.seek(95)
            f.write(bytes([b ^ 1]))


def io_cmds(rng, size, n):
    """n random qemu-io commands inside [0, size)."""
    out = []
    for _ in range(n):
        op = rng.choices(["write", "zero", "zero-u", "discard", "small"],
                         [5, 2, 1, 2, 2])[0]
        if op == "small":
            length = rng.randint(1, 700)
        else:
            length = rng.choice([rng.randint(1, 8192), rng.randint(4096, 300000),
                                 rng.randint(64 << 10, 3 * MiB)])
        length = min(length, size)
        off = rng.randrange(0, size - length + 1)
        if op in ("zero", "zero-u", "discard"):
            # qemu-io wants sector alignment for these
            off -= off % 512
            length = max(512, length - length % 512)
            if off + length > size:
                off = size - length
        if op in ("write", "small"):
            out += ["-c", "write -P 0x%02x %d %d" % (rng.randint(1, 255), off, length)]
        elif op == "zero":
            out += ["-c", "write -z %d %d" % (off, length)]
        elif op == "zero-u":
            out += ["-c", "write -z -u %d %d" % (off, length)]
        else:
            out += ["-c", "discard %d %d" % (off, length)]
    return out


def compressed_cmds(crng, size, c):
    """1-3 compressed writes of whole clusters inside [0, size)."""
    out = []
    n = size // c
    for k in crng.sample(range(n), min(n, crng.randint(1, 3))):
        out += ["-c", "write -c -P 0x%02x %d %d" % (crng.randint(1, 255), k * c, c)]
    return out


def build(seed, d, compress=False):
    rng = random.Random(seed)
    crng = random.Random(seed * 7919 + 13)
    b = Builder(d)
    b.recipe.write("# bitmap-random.py %d: run in an empty directory\n" % seed)
    nl = rng.randint(2, 4)
    size = rng.randint(2, 80) * MiB + rng.randrange(1, 128) * 512
    raw_base = rng.random() < 0.12
    desc, invalid = [], []
    below = None
    for depth in range(nl - 1, -1, -1):
        img = "l%d.qcow2" % depth
        if depth == nl - 1 and raw_base:
            img = "l%d.raw" % depth
            b.run("qemu-img", "create", "-q", "-f", "raw", img, str(size))
            b.run("qemu-io", "-f", "raw", *io_cmds(rng, size, rng.randint(1, 6)), img)
            desc.append("L%d raw" % depth)
            below = img
            continue
        c = rng.choice([512, 4096, 65536, 65536, 2 * MiB])
        opts = ["-o", "cluster_size=%d" % c]
        if below:
            fmt = "raw" if below.endswith(".raw") else "qcow2"
            opts += ["-b", below, "-F", fmt]
        b.run("qemu-img", "create", "-q", "-f", "qcow2", *opts, img, str(size))
        if compress and size >= c:
            # first, while the layer is empty: QEMU never compresses into
            # an allocated cluster
            b.run("qemu-io", "-f", "qcow2", *compressed_cmds(crng, size, c), img)
        state = rng.choices(["none", "ok", "disabled", "late", "inuse", "autoclear"],
                            [3, 6, 1, 1, 2, 1])[0]
        g = rng.choices([512, 4096, 65536, MiB, 1 << 31], [2, 3, 4, 2, 1])[0]
        if rng.random() < 0.3:
            b.run("qemu-img", "bitmap", "--add", "-g", str(rng.choice([512, 65536])),
                  img, "other")
        pre = io_cmds(rng, size, rng.randint(0, 4))
        main = io_cmds(rng, size, rng.randint(1, 10))
        if state == "late" and pre:
            b.run("qemu-io", "-f", "qcow2", *pre, img)
        if state != "none":
            b.run("qemu-img", "bitmap", "--add", "-g", str(g), img, "X")
        if state != "late" and pre:
            b.run("qemu-io", "-f", "qcow2", *pre, img)
        if state == "disabled":
            b.run("qemu-img", "bitmap", "--disable", img, "X")
        if state == "inuse":
            b.crash(img, main)
        else:
            b.run("qemu-io", "-f", "qcow2", *main, img)
        if state == "autoclear":
            invalid.append(depth)
        desc.append("L%d c%d X:%s%s" % (depth, c, state,
                                        "" if state == "none" else "/g%d" % g))
        below = img
    # last: bitmap-unaware writers (no qcow2 opens of these layers after this)
    for depth in invalid:
        b.toggle_autoclear("l%d.qcow2" % depth)
    opts = []
    for depth in invalid:
        opts += ["--invalid", str(depth)]
    b.recipe.close()
    return {"top": os.path.join(d, "l0.qcow2"), "name": "X", "model_opts": opts,
            "desc": "seed %d, size %d: %s" % (seed, size, ", ".join(reversed(desc)))}


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[3:] not in ([], ["--compress"]):
        sys.exit(__doc__)
    print(json.dumps(build(int(sys.argv[1]), sys.argv[2], len(sys.argv) == 4)))
