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


PHASES = {  # what each phase of a round's record covers, in the order a round runs them
    "send": "build and push the round's messages",
    "wait_for_clients": "until the last reply (the clients' training, transfers, start-up)",
    "slowest_client_training": "of which: the slowest client's own training time",
    "checks": "check and unpack replies",
    "channel": "the channel on every payload",
    "fusion": "the fusion rule (and LoRA products)",
    "merge": "server optimiser, scale search, post-merge training",
    "evaluation": "the global model's (and clients') evaluation",
    "checkpoint": "the server checkpoint",
}


def profile_table(summary: dict[str, Any]) -> str:
    """Seconds per phase over the run, and each one's share of its wall time (``fedllm run --profile``)."""
    phases, wall = summary.get("phase_times", {}), summary["wall_time"] or float("nan")
    lines = [f"{'phase':<26} {'seconds':>9} {'share':>6}  what", "-" * 80]
    for name, what in PHASES.items():
        if name in phases:
            lines.append(f"{name:<26} {phases[name]:>9.2f} {100 * phases[name] / wall:>5.1f}%  {what}")
    lines.append(f"{'wall time':<26} {wall:>9.2f} {100.0:>5.1f}%  rounds 1..{summary['rounds']} and round 0's evaluation")
    return "\n".join(lines)
