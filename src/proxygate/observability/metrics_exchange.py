"""One /metrics for a gateway served by several processes.

Each process keeps its metrics in its own registry (nothing shared on the
hot path) and publishes a snapshot of them to a directory about once a
second. The process that answers a scrape merges its live metrics with the
others' snapshots: counters, histograms and gauges of process-local things
(open connections, queue depth) are summed; gauges that observe the same
external thing from every process (a model worker's health) take the
largest value; `_created` takes the earliest. The snapshot also carries the
process's recent errors, for the status page. Before a scrape the answering
process asks the others to publish at once (`snapshot_requests.py`), so a
scrape is as current as one process's would be.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .snapshot_requests import SnapshotRequests

Family = dict[str, Any]  # {"name", "doc", "type", "samples": [[name, labels, value], ...]}
ErrorEntry = dict[str, Any]  # one recent error, as the status page shows it


def snapshot(collector: Collector) -> list[Family]:
    return [
        {
            "name": m.name,
            "doc": m.documentation,
            "type": m.type,
            "samples": [[s.name, s.labels, s.value] for s in m.samples],
        }
        for m in collector.collect()
    ]


class MetricsExchange:
    def __init__(self, directory: str | Path, index: int, observed_prefixes: tuple[str, ...] = ()) -> None:
        self.directory = Path(directory)
        self.index = index
        self.observed_prefixes = observed_prefixes
        self._path = self.directory / f"process-{index}.json"
        self.requests = SnapshotRequests(self.directory, index)

    def publish(self, collector: Collector, errors: Sequence[ErrorEntry] = ()) -> None:
        """Write this process's snapshot (atomically: readers never see half a file)."""
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"families": snapshot(collector), "errors": list(errors)}))
        os.replace(tmp, self._path)

    def peers(self) -> list[dict[str, Any]]:
        """The other processes' latest snapshots: {"families": [...], "errors": [...]}."""
        out = []
        for path in sorted(self.directory.glob("process-*.json")):
            if path == self._path:
                continue
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # a process that has just gone: its file is being replaced or removed
        return out

    def merged_with_errors(
        self, collector: Collector, errors: Sequence[ErrorEntry]
    ) -> tuple[list[Family], list[ErrorEntry]]:
        """This process's live metrics merged with the peers' snapshots, and every
        process's recent errors (ours first): the peers' files are read once for both."""
        peers = self.peers()
        families = merge([snapshot(collector), *(p["families"] for p in peers)], self.observed_prefixes)
        return families, [*errors, *(e for p in peers for e in p.get("errors", ()))]

    def merged(self, collector: Collector) -> Collector:
        """A collector of this process's live metrics merged with the peers' snapshots, for exposition."""
        return _Merged(self.merged_with_errors(collector, ())[0])


def merge(snapshots: Iterable[list[Family]], observed_prefixes: tuple[str, ...] = ()) -> list[Family]:
    families: dict[str, Family] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for snap in snapshots:
        for fam in snap:
            name = fam["name"]
            if name not in families:
                families[name] = {"name": name, "doc": fam["doc"], "type": fam["type"], "samples": []}
                values[name] = {}
            take_max = fam["type"] == "gauge" and name.startswith(observed_prefixes)
            into = values[name]
            for sample_name, labels, value in fam["samples"]:
                key = (sample_name, tuple(sorted(labels.items())))
                old = into.get(key)
                if old is None:
                    into[key] = value
                elif sample_name.endswith("_created"):
                    into[key] = min(old, value)
                elif take_max:
                    into[key] = max(old, value)
                else:
                    into[key] = old + value
    for name, fam in families.items():
        fam["samples"] = [[sname, dict(labels), v] for (sname, labels), v in values[name].items()]
    return list(families.values())


class _Merged(Collector):
    def __init__(self, families: list[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for fam in self._families:
            metric = Metric(fam["name"], fam["doc"], fam["type"])
            for sample_name, labels, value in fam["samples"]:
                metric.add_sample(sample_name, labels, value)
            yield metric
