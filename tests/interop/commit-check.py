#!/usr/bin/python3
"""Oracle helpers for test-commit.sh.

    commit-check.py norm G SIZE MAP
        The dirty extents of MAP (lines "offset length type description",
        as nbdinfo --map and qcbt bitmap dump print them) seen at
        granularity G: a bit is dirty when any dirty byte lies in it (the
        merge engine's conservative mapping).  Prints "start end" per run.

    commit-check.py names CHAIN.json B
        Every bitmap name of layers 0..B of `qemu-img info --backing-chain
        --output=json`, one per line.

    commit-check.py expect CHAIN.json B NAME
        What the base should hold for NAME after the commit when the merge
        is usable: "inbase" when layer B holds NAME (merged, flags kept),
        else "GRANULARITY auto|-" of the top-most layer whose NAME is not
        in use (created with its granularity and recording state).

    commit-check.py clusters CS OLD NEW NOW
        Raw images: every CS-byte chunk of NOW equals that of OLD or NEW.
        Prints how many are new; exits 1 naming the first chunk that is
        neither.
"""

import json
import sys


def dirty_runs(path):
    for line in open(path):
        f = line.split()
        if len(f) >= 4 and f[-1] == "dirty":
            yield int(f[0]), int(f[1])


def norm(g, size, path):
    runs = []
    for off, n in dirty_runs(path):
        s = off // g * g
        e = min(-(-(off + n) // g) * g, size)
        if runs and s <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], e)
        else:
            runs.append([s, e])
    for s, e in runs:
        print(s, e)


def layer_bitmaps(chain, i):
    fs = chain[i].get("format-specific", {}).get("data", {})
    return fs.get("bitmaps", [])


def main():
    cmd = sys.argv[1]
    if cmd == "norm":
        norm(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    elif cmd in ("names", "expect"):
        chain = json.load(open(sys.argv[2]))
        b = int(sys.argv[3])
        if cmd == "names":
            seen = []
            for i in range(b + 1):
                for bm in layer_bitmaps(chain, i):
                    if bm["name"] not in seen:
                        seen.append(bm["name"])
            print("\n".join(seen))
            return
        name = sys.argv[4]
        if any(bm["name"] == name for bm in layer_bitmaps(chain, b)):
            print("inbase")
            return
        for i in range(b):
            for bm in layer_bitmaps(chain, i):
                if bm["name"] == name and "in-use" not in bm["flags"]:
                    print(bm["granularity"], "auto" if "auto" in bm["flags"] else "-")
                    return
        sys.exit("no usable holder of %s" % name)
    elif cmd == "clusters":
        cs = int(sys.argv[2])
        old, new, now = (open(p, "rb") for p in sys.argv[3:6])
        k = nnew = 0
        while True:
            a, b, c = old.read(cs), new.read(cs), now.read(cs)
            if not a and not c:
                break
            if c == b:
                nnew += 1
            elif c != a:
                sys.exit("cluster %d (offset %d) is neither old nor new" % (k, k * cs))
            k += 1
        print(nnew)
    else:
        sys.exit(__doc__)


main()
