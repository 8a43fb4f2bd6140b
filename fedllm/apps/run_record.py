"""What a run writes about itself: the clients' part of a round record, where the time went, the summary."""

from __future__ import annotations

import resource
from collections.abc import Mapping, Sequence
from typing import Any

from fedllm.apps.payload import RAY_NODE
from fedllm.config import ExperimentConfig
from fedllm.core.types import ClientUpdate


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB); in a simulation the server runs in
    the driver process, so this is the server's."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_record(updates: list[ClientUpdate]) -> dict[str, Any]:
    """What the clients report of their training: loss, time, how far their personal parts moved."""
    examples = sum(u.num_examples for u in updates)
    record: dict[str, Any] = {"train_loss": sum(u.metrics["train_loss"] * u.num_examples for u in updates) / examples}
    times = [u.metrics["train_time"] for u in updates if "train_time" in u.metrics]
    if times:  # where a round's time goes: the slowest client bounds it
        record["client_train_time_max"], record["client_train_time_mean"] = max(times), sum(times) / len(times)
    if len({u.metrics[RAY_NODE] for u in updates if RAY_NODE in u.metrics}) > 1:  # where a Ray cluster ran each
        record["client_ray_node"] = {u.client_id: f"{int(u.metrics[RAY_NODE]):012x}" for u in updates
                                     if RAY_NODE in u.metrics}
    if any(u.metrics.get("local_norm") for u in updates):  # personal parts: how far each has moved
        record["client_local_norm"] = {u.client_id: u.metrics["local_norm"] for u in updates}
        record["client_local_rounds"] = {u.client_id: int(u.metrics.get("local_rounds", 0)) for u in updates}
    return record


def phase_totals(records: Sequence[Mapping[str, Any]], checkpoint_seconds: float) -> dict[str, float]:
    """Where the run's time went, summed over its rounds (``fedllm run --profile`` prints it)."""
    totals: dict[str, float] = {}
    for record in records:
        for phase, seconds in record.get("phase_times", {}).items():
            totals[phase] = totals.get(phase, 0.0) + seconds
        if "client_train_time_max" in record:
            totals["slowest_client_training"] = totals.get("slowest_client_training", 0.0) + record["client_train_time_max"]
    totals["checkpoint"] = checkpoint_seconds
    return totals


def run_summary(cfg: ExperimentConfig, metric: str, records: Sequence[Mapping[str, Any]], totals: Mapping[str, Any],
                payload_bytes: int, stopped: str | None) -> dict[str, Any]:
    """summary.json: the last round's scores, the run's bytes, time and memory, and why it stopped early."""
    final, m = records[-1], metric
    return {"experiment": cfg.run_name(), "rounds": cfg.rounds, "final_accuracy": final.get("accuracy"),
            f"final_{m}": final.get(m), **{k: v for k, v in final.items() if k.startswith(("accuracy/", "reward/"))},
            **{k: final[k] for k in (f"personalized_{m}", f"worst_client_{m}", "preference_matrix", "dp_epsilon")
               if k in final},
            "total_bytes_up": totals["bytes_up"], "total_bytes_down": totals["bytes_down"],
            "bytes_up_per_client_per_round": payload_bytes, "wall_time": totals["elapsed"],
            "config_digest": cfg.digest(), "server_peak_rss_mb": peak_rss_mb(),
            "phase_times": phase_totals(records, totals.get("checkpoint_seconds", 0.0)),
            **({"stopped_early": stopped} if stopped else {})}
