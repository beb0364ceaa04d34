#!/usr/bin/python3
"""Build one random qcow2 chain for test-commit.sh.

    commit-random.py SEED DIR

Creates DIR/l<depth>.qcow2 (l0 = top; below the deepest qcow2 layer
sometimes a raw l<n>.raw) with qemu-img and qemu-io only, appends every
command to DIR/recipe.txt, and prints one JSON line:
    {"top": PATH, "base": PATH, "desc": TEXT}
"base" is the deepest qcow2 layer: what test-commit.sh commits into, so
that the merge over the whole chain (qcbt bitmap dump) is the merge over
the committed range.

Per seed: 2-4 qcow2 layers, one disk size (not a multiple of 64 KiB), per
layer a cluster size (512 B .. 2 MiB), random data/zero/discard writes
(bitmap-random.py's io_cmds) plus whole compressed clusters, bitmaps X
and Y each absent, enabled, disabled, added late or left in use (a killed
qemu-io), with a random granularity.  The base is sometimes almost empty,
so that most of its L1 entries are empty.
"""

import importlib.util
import json
import os
import sys

_spec = importlib.util.spec_from_file_location(
    "bitmap_random", os.path.join(os.path.dirname(__file__), "bitmap-random.py"))
br = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(br)

MiB = 1 << 20


def compressed_cmds(rng, size, cluster, n):
    """n writes of distinct whole compressed clusters inside [0, size)
    (QEMU compresses only into unallocated clusters: run them first)."""
    out = []
    nclusters = size // cluster
    for c in sorted(rng.sample(range(nclusters), min(n, nclusters))):
        out += ["-c", "write -c -P 0x%02x %d %d" % (rng.randint(1, 255),
                                                     c * cluster, cluster)]
    return out


def build(seed, d):
    import random
    rng = random.Random(seed)
    b = br.Builder(d)
    b.recipe.write("# commit-random.py %d: run in an empty directory\n" % seed)
    nl = rng.randint(2, 4)
    size = rng.randint(2, 40) * MiB + rng.randrange(1, 128) * 512
    raw_below = rng.random() < 0.15
    desc = []
    below = None
    if raw_below:
        below = "l%d.raw" % nl
        b.run("qemu-img", "create", "-q", "-f", "raw", below, str(size))
        b.run("qemu-io", "-f", "raw", *br.io_cmds(rng, size, rng.randint(1, 4)), below)
        desc.append("L%d raw" % nl)
    for depth in range(nl - 1, -1, -1):
        img = "l%d.qcow2" % depth
        c = rng.choice([512, 4096, 65536, 65536, 2 * MiB])
        opts = ["-o", "cluster_size=%d" % c]
        if below:
            fmt = "raw" if below.endswith(".raw") else "qcow2"
            opts += ["-b", below, "-F", fmt]
        b.run("qemu-img", "create", "-q", "-f", "qcow2", *opts, img, str(size))
        sparse = depth == nl - 1 and rng.random() < 0.3
        states = {}
        for name in ("X", "Y"):
            states[name] = rng.choices(
                ["none", "ok", "disabled", "late", "inuse"],
                [3, 6, 1, 1, 1] if name == "X" else [6, 3, 1, 1, 1])[0]
        g = {n: rng.choices([512, 4096, 65536, MiB], [2, 3, 4, 2])[0]
             for n in states}
        pre = compressed_cmds(rng, size, c, rng.randint(0, 4))
        pre += br.io_cmds(rng, size, rng.randint(0, 1 if sparse else 4))
        main = br.io_cmds(rng, size, rng.randint(1, 2 if sparse else 10))
        late = [n for n in states if states[n] == "late"]
        if late and pre:
            b.run("qemu-io", "-f", "qcow2", *pre, img)
        for n in states:
            if states[n] not in ("none", "late"):
                b.run("qemu-img", "bitmap", "--add", "-g", str(g[n]), img, n)
        if not late and pre:
            b.run("qemu-io", "-f", "qcow2", *pre, img)
        for n in late:
            b.run("qemu-img", "bitmap", "--add", "-g", str(g[n]), img, n)
        for n in states:
            if states[n] == "disabled":
                b.run("qemu-img", "bitmap", "--disable", img, n)
        if "inuse" in states.values():
            b.crash(img, main)
        else:
            b.run("qemu-io", "-f", "qcow2", *main, img)
        desc.append("L%d c%d%s %s" % (depth, c, " sparse" if sparse else "",
                                      " ".join("%s:%s/g%d" % (n, states[n], g[n])
                                               for n in states
                                               if states[n] != "none")))
        below = img
    b.recipe.close()
    return {"top": os.path.join(d, "l0.qcow2"),
            "base": os.path.join(d, "l%d.qcow2" % (nl - 1)),
            "desc": "seed %d, size %d: %s" % (seed, size, ", ".join(reversed(desc)))}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(json.dumps(build(int(sys.argv[1]), sys.argv[2])))
