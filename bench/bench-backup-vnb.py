#!/usr/bin/python3
"""A virtnbdbackup-style incremental backup client, for bench-backup.sh.

    bench-backup-vnb.py URI BITMAP OUTPUT

Does what virtnbdbackup 2.x does for an incremental backup of one disk
(nbdcli/client.py, extenthandler.py, backup/disk.py; see
docs/backup-tools-landscape.md in the team notes, section 1.2):

  - one libnbd handle, synchronous calls, one request in flight;
  - meta contexts base:allocation and qemu:dirty-bitmap:BITMAP;
  - block status with no flags, length 4 GiB - minimum block size (clipped
    to the disk), advancing by the sum of the dirty-bitmap extents; every
    extent of the whole disk is collected before any data is read;
  - adjacent extents of one kind merged; dirty extents intersected with
    base:allocation data extents ("sparse detection": dirty ranges that
    now read as zero are dropped);
  - each data extent read with pread() in requests of at most the
    server's maximum block size (32 MiB by default) and written at its
    offset into OUTPUT, a sparse raw file of the disk's size ("-t raw").

Prints one JSON line: bytes, extents, requests, map_s, pull_s, MiBps.
"""
import json
import os
import sys
import time

import nbd

ALLOC = "base:allocation"
MAX_REQ = 32 << 20


def merge(ext, want):
    """Runs [start, end) of extents whose flag test is true, merged."""
    out, pos = [], 0
    for length, flags in ext:
        if want(flags):
            if out and out[-1][1] == pos:
                out[-1][1] = pos + length
            else:
                out.append([pos, pos + length])
        pos += length
    return out


def intersect(a, b):
    """Two-pointer intersection of two sorted run lists (virtnbdbackup
    2.28's O(L) overlap)."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    uri, bitmap, output = sys.argv[1:]
    ctx = "qemu:dirty-bitmap:" + bitmap

    t0 = time.perf_counter()
    h = nbd.NBD()
    h.add_meta_context(ALLOC)
    h.add_meta_context(ctx)
    h.connect_uri(uri)
    if not h.can_meta_context(ctx):
        sys.exit(f"server did not agree to {ctx}")
    size = h.get_size()
    max_req = h.get_block_size(nbd.SIZE_MAXIMUM) or MAX_REQ
    max_req = min(max_req, MAX_REQ)
    min_blk = h.get_block_size(nbd.SIZE_MINIMUM) or 1
    bs_len = 4294967295 - min_blk + 1

    # The whole map first, in lists (as virtnbdbackup does).
    extents = {ALLOC: [], ctx: []}
    offset = 0
    while offset < size:
        got = {}

        def cb(metacontext, off, entries, err):
            got[metacontext] = list(zip(entries[0::2], entries[1::2]))
            return 0

        h.block_status(min(bs_len, size - offset), offset, cb)
        step = 0
        for c in (ALLOC, ctx):
            ext, total = got.get(c, []), 0
            for length, flags in ext:
                if offset + total + length > size:
                    length = size - offset - total
                if length <= 0:
                    break
                extents[c].append((length, flags))
                total += length
            if c == ctx:
                step = total
        if step == 0:
            sys.exit(f"no progress at {offset}")
        offset += step

    dirty = merge(extents[ctx], lambda f: f & 1)
    data = merge(extents[ALLOC], lambda f: not f & nbd.STATE_ZERO)
    todo = intersect(dirty, data)
    t_map = time.perf_counter() - t0

    if os.path.isfile(output):
        os.unlink(output)
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.ftruncate(fd, size)
    t1 = time.perf_counter()
    nbytes = nreq = 0
    for s, e in todo:
        pos = s
        while pos < e:
            n = min(max_req, e - pos)
            buf = h.pread(n, pos)
            os.pwrite(fd, buf, pos)
            nreq += 1
            nbytes += n
            pos += n
    os.fsync(fd)
    os.close(fd)
    t_pull = time.perf_counter() - t1
    h.shutdown()
    print(json.dumps({
        "bytes": nbytes, "extents": len(todo), "requests": nreq,
        "map_s": round(t_map, 4), "pull_s": round(t_pull, 4),
        "MiBps": round(nbytes / 2**20 / t_pull, 1) if t_pull else 0}))


if __name__ == "__main__":
    main()
