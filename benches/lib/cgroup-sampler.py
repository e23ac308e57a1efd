#!/usr/bin/env python3
"""Sample the processes of a node's units from the host, for benches/first-boot.

usage: cgroup-sampler.py SLICE_DIR OUT.json STOP_FILE [PREFIX...]

Every 5 ms, for each unit cgroup under SLICE_DIR (the node's system.slice in the host's cgroup2
tree) whose name starts with a PREFIX: every process in it, its CPU time so far (utime + stime
of all its threads, /proc/PID/stat) and its peak resident set (VmHWM). The last values seen of
each process are written to OUT.json once STOP_FILE exists. A process's CPU after its last
sample (at most 5 ms of it) and processes that live less than 5 ms are not seen: the units'
CPUUsageNSec (exact) is the total; this splits it by process.
"""
import json
import os
import sys
import time

slice_dir, out, stop = sys.argv[1:4]
prefixes = tuple(sys.argv[4:]) or ("",)
tick_ms = 1000.0 / os.sysconf("SC_CLK_TCK")
seen = {}  # (pid, starttime) -> record


def sample():
    try:
        units = os.listdir(slice_dir)
    except OSError:
        return
    for unit in units:
        if not unit.startswith(prefixes):
            continue
        try:
            with open(os.path.join(slice_dir, unit, "cgroup.procs")) as f:
                pids = f.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{pid}/status") as f:
                    status = f.read()
            except OSError:
                continue
            r = stat.rindex(")")
            comm = stat[stat.index("(") + 1 : r]
            fields = stat[r + 2 :].split()
            key = (pid, fields[19])
            cpu_ms = (int(fields[11]) + int(fields[12])) * tick_ms
            hwm = 0
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
            rec = seen.get(key)
            if rec is None or rec["comm"] != comm:
                # New, or it exec'd another program since (a fork that runs apt-get).
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    cmd = ""
                if rec is None:
                    rec = seen[key] = {"pid": int(pid), "unit": unit, "cpu_ms": 0.0, "hwm_kib": 0}
                rec["comm"], rec["cmd"] = comm, cmd[:200]
            rec["cpu_ms"] = max(rec["cpu_ms"], cpu_ms)
            rec["hwm_kib"] = max(rec["hwm_kib"], hwm)


while not os.path.exists(stop):
    sample()
    time.sleep(0.005)
sample()
with open(out, "w") as f:
    json.dump(list(seen.values()), f, indent=1)
