"""The lines a run prints: what it is, one line per round, and how it ended."""

from __future__ import annotations

from typing import Any


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def start_line(run_name: str, model: str, method: str, what: str, values: int, payload_bytes: int,
               run_dir: Any) -> str:
    return (f"fedllm: {run_name} | model {model} ({method}) | {what} | {values:,} transmitted values "
            f"({fmt_bytes(payload_bytes)}) | results in {run_dir}")


def round_line(record: dict[str, Any], rounds: int, metric: str, payload_bytes: int) -> str:
    rejected, missing, m = len(record["rejected"]), record["clients_missing"], metric
    personal = (f"personalized={record[f'personalized_{m}']:.4f} (worst {record[f'worst_client_{m}']:.4f}) "
                if f"personalized_{m}" in record else "")
    return (f"[round {record['round']}/{rounds}] train_loss={record.get('train_loss', float('nan')):.4f} "
            f"{m}={record.get(m, float('nan')):.4f} " + personal
            + f"clients={record['clients_used']}/{record['clients_sampled']} "
            + (f"rejected={rejected} " if rejected else "") + (f"missing={missing} " if missing else "")
            + f"up={fmt_bytes(record['bytes_up'])} ({fmt_bytes(payload_bytes)}/client) "
            f"down={fmt_bytes(record['bytes_down'])} time={record['round_time']:.1f}s")


def done_line(summary: dict[str, Any], metric: str, run_dir: Any) -> str:
    m = metric
    final = summary.get(f"final_{m}")
    scores = [f"final {m} {final:.4f}"] if final is not None else []
    if f"personalized_{m}" in summary:
        scores.append(f"personalised {summary[f'personalized_{m}']:.4f} "
                      f"(worst client {summary[f'worst_client_{m}']:.4f})")
    return f"fedllm: done in {summary['wall_time']:.1f}s, {', '.join(scores) or 'no evaluation'}, results in {run_dir}"
