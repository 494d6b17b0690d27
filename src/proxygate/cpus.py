"""How many CPUs this process may use: what `--workers auto` starts one serving process per.

The CPUs it may run on (its affinity), capped by a CPU quota of its control
group where one is set. A container limited to 2 CPUs on a 64-core host sees
64 CPUs but gets the time of 2: 64 serving processes there would only take
turns on that time, each with its own memory and upstream pool. (Python
3.13's `os.process_cpu_count` counts the affinity only.)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
OWN_CGROUPS = Path("/proc/self/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, own_cgroups: Path = OWN_CGROUPS) -> int:
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every CPU counts
    count = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    quota = cpu_quota(cgroup_root, own_cgroups)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def cpu_quota(cgroup_root: Path = CGROUP_ROOT, own_cgroups: Path = OWN_CGROUPS) -> float | None:
    """The CPUs' worth of time this process's control group may use (None: no quota, or unknown).

    cgroup v2 says it in `cpu.max` ("200000 100000": 2 CPUs; "max 100000": none),
    v1 in `cpu.cfs_quota_us` over `cpu.cfs_period_us` (a quota of -1: none). The
    group's own folder is looked up from /proc/self/cgroup; inside a container
    with its own cgroup namespace that path is "/", and the mount's root is the group.
    """
    try:
        lines = own_cgroups.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        relative = path.lstrip("/")
        if controllers == "":  # v2: one unified hierarchy
            folders = [cgroup_root / relative, cgroup_root]
            read = _v2_quota
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            mounts = [cgroup_root / m for m in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
            folders = [folder for mount in mounts for folder in (mount / relative, mount)]
            read = _v1_quota
        else:
            continue
        for folder in folders:
            found, quota = read(folder)
            if found:
                return quota
    return None


def _v2_quota(folder: Path) -> tuple[bool, float | None]:
    """(whether the folder says, the quota)."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return False, None
    return True, _ratio(quota, period)


def _v1_quota(folder: Path) -> tuple[bool, float | None]:
    try:
        quota = (folder / "cpu.cfs_quota_us").read_text().strip()
        period = (folder / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return False, None
    return True, _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None  # "max": no quota
    return q / p if q > 0 and p > 0 else None
