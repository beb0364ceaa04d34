#!/usr/bin/python3
"""Checks for the backup agent's interop tests.

  backup-check.py json OUT DIR [KEY=VALUE | KEY~SUBSTRING | KEY>=N ...]
      OUT is the stdout of 'qcbt backup --json': one JSON object with every
      documented field, of the right type, and agreeing with the newest
      entry of DIR/manifest.json (file, type, virtual size, digest, byte
      counts).  Then each condition: KEY=VALUE (VALUE 'null' for null),
      KEY~SUBSTRING (a string containing SUBSTRING), KEY>=N, KEY<=N.
  backup-check.py count DIR
      print the number of backups in DIR/manifest.json (0 if none).
  backup-check.py files DIR
      print the backup files of DIR/manifest.json, one per line, in order.
  backup-check.py zeros FILE OFFSET LENGTH
      FILE reads as zeros in [OFFSET, OFFSET+LENGTH).
  backup-check.py map-compare MAP_JSON DUMP_TXT [RAW]
      MAP_JSON: 'qcbt bitmap dump --json' or 'nbdinfo --json --map'
      output (type bit 0 = dirty); DUMP_TXT: the dirty extents printed by
      examples/read-dirty-bitmap.py ("dirty OFFSET LENGTH data|zero").
      The dirty ranges must be equal (adjacent ranges merged), and with
      RAW (the guest view) every "zero" piece must read as zeros.  Exit 3
      ("oracle broke") when MAP_JSON, the reference, is not a map.
Exit 0 when everything holds; otherwise one line per problem and exit 1.
"""
import json
import os
import sys

FIELDS = {"file": str, "type": str, "reason": (str, type(None)),
          "virtual-size": int, "data-bytes": int, "zero-bytes": int,
          "extents": int, "requests": int, "connections": int,
          "seconds": (int, float), "guest-digest": (str, type(None))}


def load_manifest(d):
    p = os.path.join(d, "manifest.json")
    if not os.path.exists(p):
        return []
    with open(p) as f:
        m = json.load(f)
    return m["backups"]


def check_json(out, d, conds):
    bad = []
    with open(out) as f:
        lines = [l for l in f.read().splitlines() if l.strip()]
    if len(lines) != 1:
        return [f"expected one line of JSON on stdout, got {len(lines)}"]
    try:
        j = json.loads(lines[0])
    except ValueError as e:
        return [f"stdout is not JSON ({e}): {lines[0][:200]!r}"]
    if not isinstance(j, dict):
        return [f"stdout is not a JSON object: {lines[0][:200]!r}"]
    for k, t in FIELDS.items():
        if k not in j:
            bad.append(f"field {k!r} missing")
        elif not isinstance(j[k], t) or isinstance(j[k], bool):
            bad.append(f"field {k!r} has the wrong type: {j[k]!r}")
    if bad:
        return bad
    if j["type"] not in ("full", "incremental"):
        bad.append(f"type {j['type']!r}")
    if j["type"] == "incremental" and j["reason"] is not None:
        bad.append(f"an incremental backup with a reason: {j['reason']!r}")
    if j["connections"] < 1 or j["seconds"] < 0:
        bad.append("connections < 1 or seconds < 0")
    backups = load_manifest(d)
    if not backups:
        bad.append("manifest has no backups")
        return bad
    e = backups[-1]
    for jk, mk in (("file", "file"), ("type", "type"),
                   ("virtual-size", "virtual-size"),
                   ("data-bytes", "data-bytes"), ("zero-bytes", "zero-bytes"),
                   ("extents", "extents"), ("requests", "requests"),
                   ("guest-digest", "guest-digest")):
        if e.get(mk) != j[jk]:
            bad.append(f"{jk} {j[jk]!r} but the manifest says {e.get(mk)!r}")
    if not os.path.isfile(os.path.join(d, j["file"])):
        bad.append(f"{j['file']} does not exist in {d}")
    for c in conds:
        for op in (">=", "<=", "~", "="):
            if op in c:
                k, v = c.split(op, 1)
                break
        else:
            bad.append(f"bad condition {c!r}")
            continue
        got = j.get(k, "<missing>")
        if op == "=":
            ok = (got is None) if v == "null" else str(got) == v
        elif op == "~":
            ok = isinstance(got, str) and v in got
        elif op == ">=":
            ok = isinstance(got, int) and got >= int(v, 0)
        else:
            ok = isinstance(got, int) and got <= int(v, 0)
        if not ok:
            bad.append(f"{k}: expected {op}{v}, got {got!r}")
    return bad


def merged(runs):
    out = []
    for s, l in sorted(runs):
        if l == 0:
            continue
        if out and out[-1][0] + out[-1][1] == s:
            out[-1][1] += l
        else:
            out.append([s, l])
    return out


def main():
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    cmd = a[0]
    bad = []
    if cmd == "json":
        bad = check_json(a[1], a[2], a[3:])
    elif cmd == "count":
        print(len(load_manifest(a[1])))
    elif cmd == "files":
        for e in load_manifest(a[1]):
            print(e["file"])
    elif cmd == "zeros":
        off, ln = int(a[2], 0), int(a[3], 0)
        with open(a[1], "rb") as f:
            f.seek(off)
            data = f.read(ln)
        if len(data) != ln:
            bad.append(f"{a[1]}: short file")
        elif data.count(0) != ln:
            i = next(i for i, b in enumerate(data) if b)
            bad.append(f"{a[1]}: byte {off + i} is not zero")
    elif cmd == "map-compare":
        # MAP_JSON is the reference: if it is not a map, the oracle broke
        # and the example cannot be judged (exit 3).
        try:
            with open(a[1]) as f:
                m = json.load(f)
            want = merged([e["offset"], e["length"]] for e in m
                          if e["type"] & 1)
            if not m:
                raise ValueError("empty map")
        except (OSError, ValueError, TypeError, KeyError) as e:
            print(f"backup-check: oracle broke: {a[1]}: {e}")
            return 3
        got, zeros = [], []
        with open(a[2]) as f:
            for line in f:
                w = line.split()
                if w and w[0] == "dirty":
                    got.append([int(w[1]), int(w[2])])
                    if w[3:] == ["zero"]:
                        zeros.append((int(w[1]), int(w[2])))
        got = merged(got)
        if len(a) > 3:
            with open(a[3], "rb") as f:
                for off, ln in zeros:
                    f.seek(off)
                    if f.read(ln).count(0) != ln:
                        bad.append(f"dirty {off} {ln} is labelled zero "
                                   "but does not read as zeros")
        if got != want:
            bad.append(f"dirty extents differ: example {got[:4]}..."
                       f" ({len(got)}), nbdinfo {want[:4]}... ({len(want)})")
    else:
        sys.exit(f"unknown command {cmd}")
    for b in bad:
        print(f"backup-check: {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
