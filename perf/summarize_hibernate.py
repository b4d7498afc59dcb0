#!/usr/bin/env python3
"""Prints the main numbers of a perf/hibernate JSON result (default: the newest)."""
import glob
import json
import os
import sys

path = sys.argv[1] if len(sys.argv) > 1 else max(glob.glob(os.path.join(os.path.dirname(__file__), "results/hibernate-*.json")), key=os.path.getmtime)
d = json.load(open(path))
print(path, d["git_revision"])
for s in d["sizes"]:
    print("== %d MiB guest, %d MiB dirty" % (s["size_mib"], s["dirty_mib"]))
    print("  disk O_DIRECT write      %7.0f MB/s%s" % (s["disk_o_direct_write_mb_s"], " (median of the rounds)" if "rounds" in s["full_snapshot"] else ""))
    f = s["full_snapshot"]
    print("  full snapshot            %7.1f ms paused, %.0f MiB at %.0f MB/s = %.2f of the disk"
          % (f["snapshot"]["paused_ms"], f["snapshot"]["memory_bytes"] / 2**20, f["memory_write_mb_s"], f["fraction_of_disk_speed"]))
    if "rounds" in f:
        print("    rounds (disk MB/s, snapshot MB/s, fraction): "
              + "; ".join("%.0f, %.0f, %.2f" % (r["disk_o_direct_write_mb_s"], r["memory_write_mb_s"], r["fraction_of_disk_speed"]) for r in f["rounds"]))
    dd = s["diff_snapshot_after_typing"]
    print("  diff after typing        %7.1f ms paused (median), %d KiB" % (dd["paused"]["median_ms"], dd["each"][0]["memory_bytes"] // 1024))
    print("  hibernate                %7.1f ms to process end" % s["hibernate"]["request_to_process_end_ms"])
    print("  hibernated screenshot    %7.1f ms (median, CLI)" % s["screenshot_of_hibernated_vm_cli"]["median_ms"])
    for k, v in sorted(s["restore"].items()):
        if isinstance(v, dict):
            print("  restore %-11s vCPUs %6.1f  screenshot %6.1f  agent ping %6.1f ms (medians)"
                  % (k, v["to_vcpus_running"]["median_ms"], v["to_first_screenshot"]["median_ms"], v["to_first_agent_ping"]["median_ms"]))
    q = s["qemu"]
    print("  QEMU migrate to file     %7.1f ms + fsync %.1f ms, %.0f MiB; incoming restore %.1f ms (median)"
          % (q["migrate_to_file_ms"], q["fsync_after_ms"], q["file_bytes"] / 2**20, q["incoming_restore"]["median_ms"]))
    fc = s.get("firecracker")
    if isinstance(fc, dict) and "full_snapshot" in fc:
        f, r = fc["full_snapshot"], fc["restore_spawn_to_resumed"]
        print("  Firecracker full snapshot %7.1f ms, %.0f MiB written; diff (idle guest) %.1f ms, %d KiB; restore spawn to resumed %s"
              % (f["create_ms"], f["files"]["memory_file_allocated_bytes"] / 2**20, fc["diff_snapshot_idle_guest"]["create"]["median_ms"],
                 fc["diff_snapshot_idle_guest"]["each"][0]["memory_file_allocated_bytes"] // 1024,
                 ", ".join("%s %.1f ms" % (k.replace("file_backend_", ""), v["median_ms"]) for k, v in sorted(r.items()) if isinstance(v, dict))))
    elif fc is not None:
        print("  Firecracker             ", fc if isinstance(fc, str) else fc.get("error"))
