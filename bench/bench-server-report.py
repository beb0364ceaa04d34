#!/usr/bin/python3
"""Render bench-server.sh's records (timeit.py JSON lines, one record per run,
label "TEST :: SERVER") as markdown: a summary table with medians (min-max),
ratios qcbt/qemu-nbd and qcbt/nbdkit and the team's targets, the SHA-256
check, the exact commands, versions.  Environment: BS_SERVERS, BS_VERSIONS,
BS_MAPCHECK (text blocks from bench-server.sh)."""
import argparse, json, os, statistics, sys

SRV = ("qcbt", "qemu", "nbdkit")
NAME = {"qcbt": "qcbt-server", "qemu": "qemu-nbd", "nbdkit": "nbdkit file"}


def load(path):
    recs, cmds = {}, {}
    for line in open(path):
        r = json.loads(line)
        test, srv = r["label"].split(" :: ")
        g = recs.setdefault(test, {}).setdefault(srv, {"m": {}, "s": {}})
        for k, v in r["metrics"].items():
            g["m"].setdefault(k, []).extend(v)
        for k, v in r["strings"].items():
            for x in v:
                if x not in g["s"].setdefault(k, []):
                    g["s"][k].append(x)
        cmds[(test, srv)] = (r["cmd"], r.get("pre"))
    return recs, cmds


def fmt(v):
    if v is None:
        return ""
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return f"{v:.3g}"


def cell(vals):
    if not vals:
        return ""
    return f"{fmt(statistics.median(vals))} ({fmt(min(vals))}-{fmt(max(vals))})"


def med(vals):
    return statistics.median(vals) if vals else None


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b not in (None, 0) else \
        ("inf" if a and b == 0 else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--data-bytes", type=int, required=True)
    ap.add_argument("--virt-bytes", type=int, required=True)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pull-opts", default="")
    ap.add_argument("--pull2-opts", default="")
    ap.add_argument("--scratch", default="")
    a = ap.parse_args()
    recs, cmds = load(a.results)
    ref = dict(l.split() for l in open(a.ref) if l.strip())

    def m(test, srv, key):
        return recs.get(test, {}).get(srv, {}).get("m", {}).get(key, [])

    # per-run derived metrics
    for srv in SRV:
        if m("copy", srv, "wall_s"):
            g = recs["copy"][srv]["m"]
            g["gbps_data"] = [a.data_bytes / 1e9 / w for w in g["wall_s"]]
            g["gbps_virt"] = [a.virt_bytes / 1e9 / w for w in g["wall_s"]]
        for t in ("pull-b0", "pull-f0", "pull2-b0", "pull2-f0"):
            if m(t, srv, "wall_s"):
                g = recs[t][srv]["m"]
                g["cpu_ms_per_gib"] = [c / (b / 2**30) * 1e3
                                       for c, b in zip(g["srv_cpu_s"], g["bytes"])]
                g["gbps_pull"] = [b / 1e9 / p for b, p in zip(g["bytes"], g["pull_s"])]

    rows = []   # (test, metric, key, higher_better, target)
    po, po2 = a.pull_opts.strip(), a.pull2_opts.strip()
    tests = [
        ("copy", "(a) full read a.qcow2 / a.raw: `nbdcopy URI null:`",
         [("wall s", "wall_s"), ("GB/s of data (%.2f GB)" % (a.data_bytes / 1e9), "gbps_data"),
          ("GB/s of virtual disk (%.2f GB)" % (a.virt_bytes / 1e9), "gbps_virt"),
          ("server CPU s", "srv_cpu_s")]),
        ("pull-b0", f"(b) pull b0 dirty runs of a.qcow2, client_pull {po}",
         [("wall s (process)", "wall_s"), ("pull s (reads only)", "pull_s"),
          ("GB/s pulled", "gbps_pull"), ("server CPU s", "srv_cpu_s"),
          ("server CPU ms per GiB pulled", "cpu_ms_per_gib")]),
        ("pull-f0", f"(b) pull f0 dirty runs of frag.qcow2, client_pull {po}",
         [("wall s (process)", "wall_s"), ("pull s (reads only)", "pull_s"),
          ("GB/s pulled", "gbps_pull"), ("server CPU s", "srv_cpu_s"),
          ("server CPU ms per GiB pulled", "cpu_ms_per_gib")]),
    ]
    if po2:
        for bm, img in (("b0", "a.qcow2"), ("f0", "frag.qcow2")):
            tests.append((f"pull2-{bm}", f"(b') pull {bm} of {img}, client_pull {po2} (extra)",
                          [("wall s (process)", "wall_s"), ("pull s (reads only)", "pull_s"),
                           ("server CPU s", "srv_cpu_s"),
                           ("server CPU ms per GiB pulled", "cpu_ms_per_gib")]))
    tests += [
        ("map-f0", "(c) `nbdinfo --map=qemu:dirty-bitmap:f0 URI` (frag.qcow2)",
         [("wall s", "wall_s"), ("server CPU s", "srv_cpu_s")]),
        ("map-b0", "(c') `nbdinfo --map=qemu:dirty-bitmap:b0 URI` (a.qcow2, extra)",
         [("wall s", "wall_s"), ("server CPU s", "srv_cpu_s")]),
    ]

    print(f"## qcbt-server vs qemu-nbd vs nbdkit file\n")
    print(f"Median (min-max) of {a.n} runs after {a.warmup} warm-up round(s), "
          "warm page cache; in each round every server runs each command once, "
          "server order rotating per round.  Ratios are of the medians.\n")
    print("| test | metric | qcbt-server | qemu-nbd | nbdkit file | qcbt/qemu-nbd | qcbt/nbdkit |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for test, title, metrics in tests:
        if test not in recs:
            continue
        for i, (mname, key) in enumerate(metrics):
            vals = {s: m(test, s, key) for s in SRV}
            meds = {s: med(v) for s, v in vals.items()}
            print(f"| {title if i == 0 else ''} | {mname} | "
                  + " | ".join(cell(vals[s]) if vals[s] else "n/a" for s in SRV)
                  + f" | {ratio(meds['qcbt'], meds['qemu'])} | {ratio(meds['qcbt'], meds['nbdkit'])} |")

    # targets
    def mm(t, s, k):
        return med(m(t, s, k))

    def overlap(t, k, s1, s2):
        a1, a2 = m(t, s1, k), m(t, s2, k)
        return a1 and a2 and min(a1) <= max(a2) and min(a2) <= max(a1)

    print("\n### Targets\n")
    print("| target | measured | verdict |")
    print("|---|---|---|")
    q, k = mm("copy", "qcbt", "gbps_data"), mm("copy", "nbdkit", "gbps_data")
    if q and k:
        print(f"| (a) full read >= nbdkit file throughput | {fmt(q)} vs {fmt(k)} GB/s of data "
              f"(ratio {q / k:.2f}) | {'MET' if q >= k else 'MISSED'}"
              f"{' (wall ranges overlap)' if overlap('copy', 'wall_s', 'qcbt', 'nbdkit') else ''} |")
    for t in ("pull-b0", "pull-f0", "pull2-b0", "pull2-f0"):
        if t not in recs:
            continue
        cq, cn = mm(t, "qcbt", "cpu_ms_per_gib"), mm(t, "qemu", "cpu_ms_per_gib")
        wq, wn = mm(t, "qcbt", "wall_s"), mm(t, "qemu", "wall_s")
        if None in (cq, cn, wq, wn):
            continue
        cr, wr = (cq / cn if cn else float("inf")), wq / wn
        ok = cr <= 0.5 and wr <= 1.0
        extra = "" if t.startswith("pull-") else " (extra config, not the target run)"
        print(f"| (b) {t[-2:]} {po if t.startswith('pull-') else po2}: server CPU/byte <= 0.5x qemu-nbd, "
              f"wall <= qemu-nbd{extra} | CPU {fmt(cq)} vs {fmt(cn)} ms/GiB (ratio {cr:.2f}); "
              f"wall {fmt(wq)} vs {fmt(wn)} s (ratio {wr:.2f}) | "
              f"{'MET' if ok else 'MISSED'}"
              f"{'' if ok else ' (' + ', '.join(x for x, bad in (('CPU', cr > 0.5), ('wall', wr > 1.0)) if bad) + ')'}"
              f"{' (wall ranges overlap)' if wr > 1.0 and overlap(t, 'wall_s', 'qcbt', 'qemu') else ''} |")
    q, n = mm("map-f0", "qcbt", "wall_s"), mm("map-f0", "qemu", "wall_s")
    if q and n:
        print(f"| (c) nbdinfo --map f0 <= qemu-nbd time | {fmt(q)} vs {fmt(n)} s (ratio {q / n:.2f}) | "
              f"{'MET' if q <= n else 'MISSED'}"
              f"{' (ranges overlap)' if q > n and overlap('map-f0', 'wall_s', 'qcbt', 'qemu') else ''} |")

    # SHA check
    print("\n### Pulled data check (SHA-256 of all dirty runs, in offset order)\n")
    print("| bitmap | reference (from raw copy) | per server and config: distinct digests over all runs | conns used | verdict |")
    print("|---|---|---|---|---|")
    bad = 0
    for bm in ("b0", "f0"):
        seen, conns, parts = set(), set(), []
        for t in (f"pull-{bm}", f"pull2-{bm}"):
            for s in SRV:
                g = recs.get(t, {}).get(s)
                if not g:
                    continue
                shas = g["s"].get("sha256", [])
                seen.update(shas)
                conns.update(f"{s} {t.split('-')[0]}: {int(c)}" for c in g["m"].get("conns", []))
                parts.append(f"{NAME[s]} {t.split('-')[0]}: {'/'.join(x[:12] for x in shas)} "
                             f"({len(g['m']['wall_s'])} runs)")
        ok = seen == {ref.get(bm)}
        bad += not ok
        print(f"| {bm} | {ref.get(bm, '?')[:16]}... | {'; '.join(parts)} | "
              f"{', '.join(sorted(conns))} | {'OK: all equal' if ok else 'MISMATCH'} |")
    mc = os.environ.get("BS_MAPCHECK", "").strip()
    if mc:
        print("\nDirty maps checked against the expected extents (gen_writes.py check):\n")
        print("```\n" + mc + "\n```")

    print("\n### Exact commands\n")
    print("```")
    print(f"# scratch S={a.scratch}; images: /work/shared/bench/mkimage.sh $S; servers (cwd $S):")
    print(os.environ.get("BS_SERVERS", "").strip().replace(a.scratch + "/", "$S/"))
    print("# measured (one timeit.py -n 1 -w 0 --server-pid PID call per run; "
          "pre = untimed before each run):")
    done = set()
    for (t, s), (cmd, pre) in cmds.items():
        if (t, s) in done:
            continue
        done.add((t, s))
        c = cmd.replace(a.scratch + "/", "$S/")
        print(f"[{t} / {NAME[s]}] {c}" + (f"    # pre: {pre.replace(a.scratch + '/', '$S/')}" if pre else ""))
    print("```")
    print("\n### Versions\n")
    print("```\n" + os.environ.get("BS_VERSIONS", "").strip() + "\n```")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
