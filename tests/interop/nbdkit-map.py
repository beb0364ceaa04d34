#!/usr/bin/python3
"""nbdmap.py MODE REF.json NBD.json SIZE

alloc: REF is `qemu-img map --output=json`; NBD `nbdinfo --map --json`:
       at every byte, data == !(type & 1) and zero == bool(type & 2).
dirty: REF is `qcbt bitmap dump --json`: dirty (type 1) must be type 0 in
       NBD, clean (type 0) type 1 (hole; not zero: reads return the data).
dirty-only: the same, but clean must be type 3 (hole, reads as zeros).
Both maps must cover [0, SIZE) contiguously.  Exit 1 on a difference.
"""
import json
import sys

mode, refp, nbdp, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def runs(path, key, startk):
    out, pos = [], 0
    for e in json.load(open(path)):
        s, n = e[startk], e["length"]
        if s != pos or n <= 0:
            sys.exit(f"{path}: extent at {s} (length {n}) does not follow {pos}")
        out.append((s, s + n, key(e)))
        pos = s + n
    if pos != size:
        sys.exit(f"{path}: covers [0, {pos}), the disk is {size} bytes")
    return out


if mode == "alloc":
    ref = runs(refp, lambda e: f"data={e['data']} zero={e['zero']}", "start")
    nbd = runs(nbdp, lambda e: f"data={not e['type'] & 1} zero={bool(e['type'] & 2)}",
               "offset")
elif mode in ("dirty", "dirty-only"):
    clean = 3 if mode == "dirty-only" else 1
    ref = runs(refp, lambda e: "dirty" if e["type"] == 1 else "clean", "offset")
    nbd = runs(nbdp, lambda e: {0: "dirty", clean: "clean"}.get(e["type"], f"type {e['type']}"),
               "offset")
else:
    sys.exit(f"unknown mode {mode}")

i = j = pos = diffs = 0
while pos < size:
    while ref[i][1] <= pos:
        i += 1
    while nbd[j][1] <= pos:
        j += 1
    end = min(ref[i][1], nbd[j][1])
    if ref[i][2] != nbd[j][2]:
        print(f"  [{pos}, {end}): reference {ref[i][2]}, nbdkit {nbd[j][2]}", file=sys.stderr)
        diffs += 1
        if diffs >= 8:
            break
    pos = end
if diffs:
    sys.exit(f"{mode} maps differ ({len(ref)} reference extents, {len(nbd)} nbdkit extents)")
