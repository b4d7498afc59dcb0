#!/usr/bin/env python3
"""Prints a perf/disk JSON result (default: the newest): guest, host and their ratio per
pattern, against the targets, and how long each write phase's final flush took on each
side (flush_ms_*, newer results); `--svg FILE` also draws the ratios as a bar chart."""
import glob
import json
import os
import sys

args = [a for a in sys.argv[1:] if a != "--svg"]
svg = None
if "--svg" in sys.argv:
    svg = sys.argv[sys.argv.index("--svg") + 1]
    args.remove(svg)
path = args[0] if args else max(glob.glob(os.path.join(os.path.dirname(__file__), "results/disk-*.json")), key=os.path.getmtime)
d = json.load(open(path))
print(path, d["git_revision"], d["platform"], "%d runs" % d.get("runs", 1))
targets = {"seq": d["targets"]["sequential_ratio"], "qd32": d["targets"]["random_qd32_ratio"]}
rows = []
for name in sorted(d["host"]):
    flush = name.startswith("flush_ms")
    target = None if flush else targets["seq"] if name.startswith("seq") else targets["qd32"] if name.endswith("qd32") else None
    ratio = d["guest_over_host"][name]
    verdict = "" if target is None else ("meets %.1f" % target if ratio >= target else "below %.1f" % target)
    unit = "ms" if flush else "MB/s" if name.endswith("mbps") else "IOPS"
    print("  %-22s guest %10.0f  host %10.0f %-4s  %.2f  %s" % (name, d["guest"][name], d["host"][name], unit, ratio, verdict))
    if not flush:
        rows.append((name, ratio, target))
if svg:
    width, bar = 640, 28
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">' % (width, 40 + bar * len(rows))]
    parts.append('<text x="10" y="20">guest / host (%s, %s)</text>' % (d["git_revision"], d["platform"]))
    for i, (name, ratio, target) in enumerate(rows):
        y = 32 + i * bar
        length = min(ratio, 1.5) / 1.5 * (width - 220)
        parts.append('<text x="10" y="%d">%s</text>' % (y + 16, name))
        parts.append('<rect x="190" y="%d" width="%.0f" height="18" fill="#4a7"/>' % (y + 3, length))
        parts.append('<text x="%.0f" y="%d">%.2f</text>' % (196 + length, y + 16, ratio))
        if target:
            x = 190 + target / 1.5 * (width - 220)
            parts.append('<line x1="%.0f" x2="%.0f" y1="%d" y2="%d" stroke="#c33"/>' % (x, x, y, y + 24))
    parts.append("</svg>")
    open(svg, "w").write("\n".join(parts))
    print("wrote", svg)
