#!/usr/bin/python3
"""Read a qemu:dirty-bitmap context with libnbd's python binding.

    read-dirty-bitmap.py URI BITMAP

Maps the export at URI (e.g. nbd+unix:///?socket=/tmp/s.sock) with
qemu:dirty-bitmap:BITMAP (flag 1 = dirty) together with base:allocation
(flag 2 = reads as zero), as virtnbdbackup and 'qcbt backup' do, and
prints one line per dirty extent:

    dirty OFFSET LENGTH data|zero

"zero" means the range changed since checkpoint BITMAP and now reads as
zeros: a backup must record it as zeros, not skip it.  Extents are
printed as they arrive, one window of block status at a time (nothing is
held for the whole disk).

Against qcbt-server:   qcbt-server -B ckpt -k /tmp/s.sock top.qcow2 &
                       read-dirty-bitmap.py nbd+unix:///?socket=/tmp/s.sock ckpt
"""
import sys

import nbd

WINDOW = 1 << 30            # bytes of block status per request


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    uri, name = sys.argv[1], sys.argv[2]
    dirty_ctx, alloc_ctx = "qemu:dirty-bitmap:" + name, "base:allocation"

    h = nbd.NBD()
    h.add_meta_context(alloc_ctx)
    h.add_meta_context(dirty_ctx)
    h.connect_uri(uri)
    if not h.can_meta_context(dirty_ctx):
        sys.exit(f"the server did not grant {dirty_ctx}: a full backup is needed")
    size = h.get_size()

    pending = [0, 0, ""]            # merge touching pieces of one kind

    def emit(offset, length, kind):
        if pending[2] == kind and pending[0] + pending[1] == offset:
            pending[1] += length
            return
        if pending[1]:
            print("dirty %d %d %s" % tuple(pending))
        pending[:] = [offset, length, kind]

    pos = 0
    while pos < size:
        want = min(WINDOW, size - pos)
        got = {}

        def extents(metacontext, offset, entries, err):
            # entries = [length, flags, length, flags, ...] from OFFSET on.
            got[metacontext] = list(zip(entries[0::2], entries[1::2]))
            return 0

        h.block_status(want, pos, extents)
        if dirty_ctx not in got or alloc_ctx not in got:
            sys.exit(f"the server left a context out of its reply at {pos}")

        # Both contexts start at pos; each may stop short of the window or
        # run past it.  Walk them side by side up to the nearer end.
        def ends(ext):
            o = pos
            for length, flags in ext:
                yield o, o + length, flags
                o += length
        end = min(pos + want,
                  sum(l for l, _ in got[dirty_ctx]) + pos,
                  sum(l for l, _ in got[alloc_ctx]) + pos)
        alloc = list(ends(got[alloc_ctx]))
        ai = 0
        for start, stop, flags in ends(got[dirty_ctx]):
            stop = min(stop, end)
            if start >= stop:
                break
            if not flags & 1:               # clean
                continue
            o = start                       # split by zero / data
            while o < stop:
                while alloc[ai][1] <= o:
                    ai += 1
                a_start, a_stop, a_flags = alloc[ai]
                piece_end = min(stop, a_stop)
                kind = "zero" if a_flags & nbd.STATE_ZERO else "data"
                emit(o, piece_end - o, kind)
                o = piece_end
        if end <= pos:
            sys.exit(f"the server returned no extents at {pos}")
        pos = end
    emit(size, 0, "")               # flush
    h.shutdown()


if __name__ == "__main__":
    main()
