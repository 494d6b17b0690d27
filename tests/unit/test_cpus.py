"""How many serving processes `--workers auto` starts: the affinity, capped by a cgroup CPU quota."""

from __future__ import annotations

import os
from pathlib import Path

from proxygate.cpus import cpu_quota, usable_cpus


def tree(tmp_path: Path, own: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    own_file = tmp_path / "self-cgroup"
    own_file.write_text(own)
    return root, own_file


def test_v2_quota_of_the_own_group(tmp_path: Path) -> None:
    root, own = tree(tmp_path, "0::/pods/gw\n", {"pods/gw/cpu.max": "150000 100000\n", "cpu.max": "max 100000\n"})
    assert cpu_quota(root, own) == 1.5
    assert usable_cpus(root, own) == min(len(os.sched_getaffinity(0)), 2)  # 1.5 CPUs' time: 2 processes


def test_v2_without_a_quota_or_inside_a_namespace(tmp_path: Path) -> None:
    root, own = tree(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})
    assert cpu_quota(root, own) is None
    assert usable_cpus(root, own) == len(os.sched_getaffinity(0))
    # In its own cgroup namespace a container sees "/" and its group at the mount's root.
    root, own = tree(tmp_path / "ns", "0::/\n", {"cpu.max": "100000 100000\n"})
    assert usable_cpus(root, own) == 1


def test_v1_cpu_controller(tmp_path: Path) -> None:
    own_text = "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n"
    root, own = tree(
        tmp_path,
        own_text,
        {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
    )
    assert cpu_quota(root, own) == 3.0
    root, own = tree(
        tmp_path / "none",
        own_text,
        {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
    )
    assert cpu_quota(root, own) is None


def test_nothing_readable_means_no_quota(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path / "absent", tmp_path / "absent-self") is None
    root, own = tree(tmp_path, "garbage\n0::/g\n", {"g/cpu.max": "nonsense"})
    assert cpu_quota(root, own) is None
    assert usable_cpus(root, own) == len(os.sched_getaffinity(0))
