"""Helpers the benchmark scripts share: run ``fedllm run`` in a fresh process, time it, read it back."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from memory_timeline import timeline

REPO = Path(__file__).resolve().parents[1]


def offline_env() -> dict[str, str]:
    """A run's environment as README's Run section sets it: nothing from the hub, no per-run
    re-install of the app's dependencies by Flower."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def fedllm_run(experiment: str, overrides: list[str], clients: int, out_root: Path | None = None) -> dict:
    """One experiment in its own process (Ray started and stopped inside); returns wall time,
    the run's summary and its per-round records."""
    out_root = out_root or Path(tempfile.mkdtemp(prefix="fedllm-bench-"))
    cmd = [sys.executable, "-m", "fedllm.apps.cli", "run", str(REPO / experiment), "--clients", str(clients),
           *[a for o in [*overrides, f"output.dir={out_root}"] for a in ("--set", o)]]
    env = offline_env()
    log = out_root / "run.log"
    start = time.perf_counter()
    sampled = timeline(cmd, log=log, env=env, cwd=REPO)  # the process's memory by kind, every 50 ms
    wall = time.perf_counter() - start
    if sampled["returncode"] != 0:
        raise RuntimeError(f"fedllm run failed ({sampled['returncode']}):\n{log.read_text()[-3000:]}")
    run_dir = next(p.parent for p in out_root.rglob("summary.json"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    peaks = sampled["peaks"]
    memory = {"heap_peak_mb": peaks["RssAnon"]["RssAnon"], "shared_peak_mb": peaks["RssShmem"]["RssShmem"],
              "rss_peak_mb": peaks["VmHWM"]["VmHWM"]} if peaks else {}
    return {"wall": wall, "summary": json.loads((run_dir / "summary.json").read_text()), "records": records,
            "dir": str(run_dir), "memory": memory}


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "n": len(values)}


def save_and_print(result: dict, out: Path, markdown: str) -> None:
    """A benchmark's result as JSON at ``out``, its table as Markdown beside it, and on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
