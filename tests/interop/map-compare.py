#!/usr/bin/python3
"""Compare two guest extent maps shaped like `qemu-img map --output=json`.

    map-compare.py [--size N] [--no-strict] REFERENCE.json CANDIDATE.json

REFERENCE is normally `qemu-img map --output=json IMG`, CANDIDATE
`qcbt map --json IMG` ("-" reads one of them from stdin).

Both maps are checked to be lists of extents covering [0, size) contiguously
(size is --size when given, else the end of REFERENCE), then compared on
depth/present/zero/data at every guest byte by sweeping the union of their
extent boundaries -- O(number of extents), never per byte, so TiB images are
fine.  "offset" and any other extra key in REFERENCE are ignored.

Unless --no-strict, CANDIDATE must also honour qcbt's contract: exactly the
keys start, length, depth, present, zero, data, and adjacent extents with
equal depth/present/zero/data merged.

Exit 0 when the maps agree, 1 on the first difference or a malformed
CANDIDATE (printed to stderr with the guest range and both extents), 2 on
usage errors, 3 when REFERENCE (the oracle's answer) is malformed, empty or
does not cover the disk: "oracle broke", the candidate cannot be judged.
"""

import argparse
import json
import sys

FIELDS = ("depth", "present", "zero", "data")
CONTRACT_KEYS = {"start", "length"} | set(FIELDS)


class MapError(Exception):
    pass


def fmt_off(n):
    return f"{n} (0x{n:x})"


def fmt_ext(e):
    keys = ("start", "length") + FIELDS
    return "{" + ", ".join(f'"{k}": {json.dumps(e.get(k))}' for k in keys) + "}"


def load(path, label):
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise MapError(f"{label}: cannot read {path}: {e}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        snippet = text[:200].replace("\n", "\\n")
        raise MapError(f"{label}: not valid JSON ({e}); starts with: {snippet!r}") from e
    if not isinstance(data, list):
        raise MapError(f"{label}: top level is {type(data).__name__}, expected a JSON array")
    return data


def validate(exts, label, size, strict):
    """Type- and coverage-check one map; returns its end offset."""
    pos = 0
    prev = None
    for i, e in enumerate(exts):
        where = f"{label}: extent #{i}"
        if not isinstance(e, dict):
            raise MapError(f"{where} is not an object: {e!r}")
        for k in ("start", "length", "depth"):
            v = e.get(k)
            if not isinstance(v, int) or isinstance(v, bool):
                raise MapError(f"{where}: \"{k}\" missing or not an integer: {fmt_ext(e)}")
        for k in ("present", "zero", "data"):
            if not isinstance(e.get(k), bool):
                raise MapError(f"{where}: \"{k}\" missing or not a boolean: {fmt_ext(e)}")
        if strict and set(e) != CONTRACT_KEYS:
            extra = sorted(set(e) - CONTRACT_KEYS)
            raise MapError(f"{where}: keys must be exactly {sorted(CONTRACT_KEYS)}; "
                           f"extra: {extra}")
        if e["length"] <= 0:
            raise MapError(f"{where}: non-positive length: {fmt_ext(e)}")
        if e["depth"] < 0:
            raise MapError(f"{where}: negative depth: {fmt_ext(e)}")
        if e["start"] != pos:
            what = "gap" if e["start"] > pos else "overlap"
            raise MapError(f"{where}: {what}: starts at {fmt_off(e['start'])}, "
                           f"previous extent ends at {fmt_off(pos)}: {fmt_ext(e)}")
        if strict and prev is not None and all(prev[k] == e[k] for k in FIELDS):
            raise MapError(f"{where}: not merged with the previous, equal extent:\n"
                           f"  {fmt_ext(prev)}\n  {fmt_ext(e)}")
        pos = e["start"] + e["length"]
        prev = e
    if size is not None and pos != size:
        raise MapError(f"{label}: covers [0, {fmt_off(pos)}), expected [0, {fmt_off(size)})")
    return pos


def compare(a, b, la, lb):
    """Sweep both maps; returns None or a description of the first difference."""
    i = j = 0
    pos = 0
    end = a[-1]["start"] + a[-1]["length"] if a else 0
    while pos < end:
        ea, eb = a[i], b[j]
        enda = ea["start"] + ea["length"]
        endb = eb["start"] + eb["length"]
        if any(ea[k] != eb[k] for k in FIELDS):
            first_a, first_b = ea, eb
            diff = [k for k in FIELDS if ea[k] != eb[k]]
            key = tuple((ea[k], eb[k]) for k in FIELDS)
            # Extend the differing range while the same disagreement persists.
            dend = min(enda, endb)
            while dend < end:
                if enda == dend:
                    i += 1
                if endb == dend:
                    j += 1
                ea, eb = a[i], b[j]
                if tuple((ea[k], eb[k]) for k in FIELDS) != key:
                    break
                enda = ea["start"] + ea["length"]
                endb = eb["start"] + eb["length"]
                dend = min(enda, endb)
            w = max(len(la), len(lb))
            lines = [
                f"first difference: guest range [{fmt_off(pos)}, {fmt_off(dend)}) "
                f"length {dend - pos}",
                "  fields: " + ", ".join(
                    f"{k} {la}={json.dumps(first_a[k])} {lb}={json.dumps(first_b[k])}"
                    for k in diff),
                f"  {la:<{w}}: {fmt_ext(first_a)}",
                f"  {lb:<{w}}: {fmt_ext(first_b)}",
            ]
            return "\n".join(lines)
        pos = min(enda, endb)
        if enda == pos:
            i += 1
        if endb == pos:
            j += 1
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference", help="qemu-img map --output=json output (or -)")
    p.add_argument("candidate", help="qcbt map --json output (or -)")
    p.add_argument("--size", type=int, help="expected virtual size (default: end of reference)")
    p.add_argument("--labels", default="qemu-img,qcbt",
                   help="names of the two maps in messages (default: qemu-img,qcbt)")
    p.add_argument("--no-strict", action="store_true",
                   help="do not enforce qcbt's key set and merging on the candidate")
    p.add_argument("--context", default="",
                   help="text (e.g. the image recipe) printed with any difference")
    args = p.parse_args()
    if args.reference == "-" and args.candidate == "-":
        p.error("only one map can come from stdin")
    la, lb = (args.labels.split(",", 1) + ["candidate"])[:2]

    prefix = f"map-compare: {args.context}: " if args.context else "map-compare: "
    # The reference is the oracle's answer: if it is not a map of the whole
    # disk, the oracle broke and the candidate cannot be judged (exit 3).
    try:
        a = load(args.reference, la)
        size = args.size
        enda = validate(a, la, size, strict=False)
        if size is None:
            size = enda
        if not a and args.size != 0:
            raise MapError(f"{la}: empty map")
    except MapError as e:
        print(f"{prefix}oracle broke: {e}", file=sys.stderr)
        return 3
    try:
        b = load(args.candidate, lb)
        validate(b, lb, size, strict=not args.no_strict)
        diff = compare(a, b, la, lb)
    except MapError as e:
        diff = f"malformed map: {e}"
    if diff is not None:
        print(prefix + diff, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
