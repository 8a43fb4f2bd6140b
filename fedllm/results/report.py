"""Tables and plots from saved results folders (``fedllm compare`` / ``fedllm report``).

The score is test accuracy, or the mean mixed reward when every run is RL instruction tuning
(PFIT), whose reports also carry each run's preference matrix.

Runs that differ only in ``seed`` form one row: mean ± std over seeds of the final accuracy,
uplink bytes and wall time. Plots (PNG): accuracy vs round, accuracy vs cumulative uplink
bytes, final accuracy vs channel SNR / jammer power (when runs vary it), per-task bars, and
per-client bars of personalised accuracy for runs with federated evaluation.
Everything is computed from ``config.yaml``, ``metrics.jsonl`` and ``summary.json`` alone, so a
report can be re-rendered at any time without training.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedllm.results.writer import read_metrics


@dataclass
class RunResult:
    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def label(self) -> str:
        out = self.config.get("output", {}).get("name")
        return out or f"{self.config['strategy']['name']}-{self.config['channel']['kind']}"

    def frame(self):
        """The per-round records as a pandas DataFrame (one row per round), tagged with the run."""
        import pandas as pd

        table = pd.DataFrame(self.records)
        table.insert(0, "experiment", self.label)
        table.insert(0, "run", str(self.path))
        return table

    def group_key(self) -> str:
        cfg = dict(self.config)
        cfg.pop("seed", None)
        cfg.pop("output", None)
        return json.dumps(cfg, sort_keys=True)


def load_run(path: Path) -> RunResult:
    if not (path / "summary.json").is_file():
        raise FileNotFoundError(f"{path} holds no finished run (no summary.json)")
    raw = yaml.safe_load((path / "config.yaml").read_text())
    try:  # fill keys added since the run was made with their defaults, so runs compare like for like
        from fedllm.config import config_from_dict

        raw = config_from_dict(raw).model_dump(mode="json")
    except ValueError as err:  # a run made by an older fedllm: still shown, as it was saved, and said so
        warnings.warn(f"{path}: its config.yaml does not validate with this fedllm ({' '.join(str(err).split())[:300]}); "
                      "the run is reported with its config as saved", stacklevel=2)
    return RunResult(path, raw, read_metrics(path), json.loads((path / "summary.json").read_text()))


def find_runs(paths: list[Path]) -> list[RunResult]:
    """Finished runs under the given folders (a run folder itself, or any parent of run folders)."""
    found: dict[Path, RunResult] = {}
    for p in paths:
        for summary in ([p / "summary.json"] if (p / "summary.json").is_file() else sorted(p.rglob("summary.json"))):
            found.setdefault(summary.parent.resolve(), load_run(summary.parent))
    return list(found.values())


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _varying_keys(runs: list[RunResult]) -> list[str]:
    """Dotted config keys (other than seed/output) whose values differ between runs."""
    from fedllm.config import dotted_leaves

    flats = [{k: json.dumps(v, sort_keys=True)
              for k, v in dotted_leaves({k: v for k, v in r.config.items() if k not in ("seed", "output")}).items()}
             for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if len({f.get(k) for f in flats}) > 1]


def _compact(value: Any) -> str:
    """A config value for a table cell: lists of mappings (faults, channel chains) without their
    empty or zero fields, e.g. ``sign_flip fraction=0.2 scale=4.0``."""
    if isinstance(value, list):
        return "[" + ", ".join(_compact(v) for v in value) + "]" if value else "none"
    if isinstance(value, dict):
        head = [str(value["kind"])] if "kind" in value else []
        return " ".join(head + [f"{k}={_compact(v)}" for k, v in value.items()
                                if k != "kind" and v not in (None, "", [], {}, 0, 0.0)])
    return str(value)


def setting_of(run: RunResult, runs: list[RunResult]) -> str:
    """What sets ``run`` apart from the other runs with the same name: the keys that vary among them."""
    same_name = [r for r in runs if r.label == run.label]
    varying = _varying_keys(same_name)
    return "; ".join(f"{k}={_compact(_lookup(run.config, k))}" for k in varying if _lookup(run.config, k) is not None)


def series_name(run: RunResult, runs: list[RunResult]) -> str:
    setting = setting_of(run, runs)
    return f"{run.label} ({setting})" if setting else run.label


def metric_of(runs: list[RunResult]) -> str:
    """The score the report ranks by: mean mixed reward when every run is RL instruction tuning
    (PFIT), test accuracy otherwise."""
    return "reward" if runs and all(r.config.get("rl") for r in runs) else "accuracy"


def uplink_to_reach(run: RunResult, target: float, key: str) -> float | None:
    """Cumulative uplink bytes when ``key`` (e.g. personalised accuracy) first reaches ``target``;
    None if it never does. The communication cost a wireless link pays for a quality level."""
    total = 0.0
    for rec in run.records:
        total += rec.get("bytes_up", 0) or 0
        value = rec.get(key)
        if isinstance(value, (int, float)) and value >= target:
            return total
    return None


def summarise(runs: list[RunResult], target: float | None = None) -> list[dict[str, Any]]:
    """One row per configuration (seeds pooled), in first-seen order; with ``target``, also the
    uplink spent to reach it (personalised score where clients evaluate, else the global one)."""
    m = metric_of(runs)
    groups: dict[str, list[RunResult]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: str(r.path)):
        groups[r.group_key()].append(r)
    rows = []
    for members in groups.values():
        first = members[0]
        setting = setting_of(first, runs) or "—"
        acc = _mean_std([r.summary.get(f"final_{m}") for r in members])
        up = _mean_std([r.summary.get("total_bytes_up") for r in members])
        wall = _mean_std([r.summary.get("wall_time") for r in members])
        rows.append({
            "run": first.label, "setting": setting, "seeds": len(members),
            f"final_{m}": acc[0], f"final_{m}_std": acc[1],
            "bytes_up": up[0], "wall_time_s": wall[0], "wall_time_std": wall[1],
            "normalized_accuracy": _mean_std([r.records[-1].get("normalized_accuracy") for r in members])[0],
            f"personalized_{m}": _mean_std([r.summary.get(f"personalized_{m}") for r in members])[0],
            f"worst_client_{m}": _mean_std([r.summary.get(f"worst_client_{m}") for r in members])[0],
        })
        if target is not None:
            key = f"personalized_{m}" if any(f"personalized_{m}" in rec for rec in first.records) else m
            reached = [uplink_to_reach(r, target, key) for r in members]
            rows[-1]["target_key"] = key
            rows[-1]["bytes_to_target"] = (statistics.fmean(reached) if all(b is not None for b in reached)
                                           else float("nan"))
    return rows


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _fmt(value: float, std: float | None = None, digits: int = 4) -> str:
    if value != value:  # NaN
        return "—"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_table(rows: list[dict[str, Any]], m: str = "accuracy", target: float | None = None) -> str:
    extra = f" uplink MB to {target:g} |" if target is not None else ""
    lines = [f"| run | setting | seeds | final {m} | normalised accuracy | personalised {m} (worst client) "
             "| uplink MB | wall time (s) |" + extra,
             "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if extra else "")]
    for r in rows:
        personal = "—" if r[f"personalized_{m}"] != r[f"personalized_{m}"] else \
            f"{r[f'personalized_{m}']:.4f} ({r[f'worst_client_{m}']:.4f})"
        lines.append(f"| {r['run']} | {r['setting']} | {r['seeds']} | {_fmt(r[f'final_{m}'], r[f'final_{m}_std'])} "
                     f"| {_fmt(r['normalized_accuracy'])} | {personal} | {r['bytes_up'] / 2**20:.1f} "
                     f"| {_fmt(r['wall_time_s'], r['wall_time_std'], 1)} |"
                     + (f" {_fmt(r['bytes_to_target'] / 2**20, digits=2)} |" if extra else ""))
    return "\n".join(lines) + "\n"


def preference_tables(runs: list[RunResult]) -> str:
    """PFIT's preference matrices: each client's final policy (row) scored under every client's
    preference (column); a personalised method should win on the diagonal."""
    out = []
    for r in sorted(runs, key=lambda r: str(r.path)):
        matrix = r.records[-1].get("preference_matrix") if r.records else None
        if not matrix:
            continue
        n = len(next(iter(matrix.values())))
        diag = [row[int(c[1:])] for c, row in matrix.items() if int(c[1:]) < len(row)]
        off = [v for c, row in matrix.items() for j, v in enumerate(row) if j != int(c[1:])]
        out += [f"\nPreference matrix of {series_name(r, runs)} (row: client's policy, column: preference; "
                f"diagonal mean {statistics.fmean(diag):.4f}, off-diagonal {statistics.fmean(off) if off else float('nan'):.4f})\n",
                "| policy | " + " | ".join(f"pref p{j}" for j in range(n)) + " |",
                "| --- |" + " --- |" * n]
        out += [f"| {c} | " + " | ".join(f"**{v:.4f}**" if j == int(c[1:]) else f"{v:.4f}" for j, v in enumerate(row))
                + " |" for c, row in matrix.items()]
    return "\n".join(out) + ("\n" if out else "")


def csv_table(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["run"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _series(runs: list[RunResult]) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: str(r.path)):
        out[series_name(r, runs)].append(r)
    return out


def _mean_curve(members: list[RunResult], x_of, metric: str = "accuracy") -> tuple[list[float], list[float]]:
    points: dict[float, list[float]] = defaultdict(list)
    for m in members:
        for rec, x in zip(m.records, x_of(m)):
            if rec.get(metric) is not None:
                points[x].append(rec[metric])
    xs = sorted(points)
    return xs, [statistics.fmean(points[x]) for x in xs]


def _cumulative_bytes(run: RunResult) -> list[float]:
    total, out = 0.0, []
    for rec in run.records:
        total += rec.get("bytes_up", 0) or 0
        out.append(total / 2**20)
    return out


def plot_all(runs: list[RunResult], out_dir: Path) -> list[Path]:
    """Write the comparison plots; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    series = _series(runs)
    metric = metric_of(runs)
    ylabel = "mean mixed reward (held-out prompts)" if metric == "reward" else "test accuracy (mean over tasks)"
    written = []
    index: dict[str, list[str]] = {}

    def save(fig, name: str) -> None:
        path = out_dir / name
        ax = fig.axes[0]
        index[name] = [str(c.get_label()) for c in (ax.get_lines() or ax.containers)]
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for name, x_of, xlabel in ((f"{metric}_vs_round.png", lambda m: [r["round"] for r in m.records], "round"),
                               (f"{metric}_vs_uplink.png", _cumulative_bytes, "cumulative uplink (MB)")):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for label, members in series.items():
            xs, ys = _mean_curve(members, x_of, metric)
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        save(fig, name)

    personal = f"personalized_{metric}"
    personal_runs = {label: ms for label, ms in series.items() if any(personal in r for m in ms for r in m.records)}
    for suffix, x_of, xlabel in (("round", lambda m: [r["round"] for r in m.records], "round"),
                                 ("uplink", _cumulative_bytes, "cumulative uplink (MB)")):
        if not personal_runs:  # each client's own model on its own data / preference, mean over clients
            break
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for label, members in personal_runs.items():
            xs, ys = _mean_curve(members, x_of, personal)
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"personalised {metric} (mean over clients)")
        ax.legend(fontsize=7)
        save(fig, f"{personal}_vs_{suffix}.png")

    for key, xlabel in (("channel.snr_db", "channel SNR (dB)"), ("channel.jammer_power_db", "jammer power (dB)")):
        if key not in _varying_keys(runs):
            continue
        by_rest: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in runs:
            x = _lookup(r.config, key)
            if x is None:  # e.g. an ideal-channel run has no SNR
                continue
            same_name = [o for o in runs if o.label == r.label]
            rest = "; ".join(f"{k}={_lookup(r.config, k)}" for k in _varying_keys(same_name) if k != key)
            by_rest[f"{r.label} ({rest})" if rest else r.label][float(x)].append(r.summary.get(f"final_{metric}"))
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for label, pts in by_rest.items():
            xs = sorted(pts)
            ax.plot(xs, [statistics.fmean(pts[x]) for x in xs], marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"final {metric}")
        ax.legend(fontsize=7)
        save(fig, f"{metric}_vs_{key.split('.')[-1]}.png")

    task_names = sorted({k.split("/", 1)[1] for r in runs for k in r.summary if k.startswith("accuracy/")})
    if task_names:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        width = 0.8 / max(1, len(series))
        for i, (label, members) in enumerate(series.items()):
            vals = [statistics.fmean([m.summary.get(f"accuracy/{t}", float("nan")) for m in members]) for t in task_names]
            ax.bar([j + i * width for j in range(len(task_names))], vals, width=width, label=label)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(task_names))], task_names)
        ax.set_ylabel("final accuracy")
        ax.legend(fontsize=7)
        save(fig, "accuracy_per_task.png")
    per_client = f"client_{metric}"
    client_runs = {label: members for label, members in series.items() if members[-1].records[-1].get(per_client)}
    if client_runs:
        clients = sorted({c for ms in client_runs.values() for c in ms[-1].records[-1][per_client]},
                         key=lambda c: (len(c), c))
        fig, ax = plt.subplots(figsize=(max(6.4, 0.5 * len(clients) * len(client_runs)), 4))
        width = 0.8 / len(client_runs)
        for i, (label, members) in enumerate(client_runs.items()):
            per = [statistics.fmean([m.records[-1][per_client].get(c, float("nan")) for m in members])
                   for c in clients]
            ax.bar([j + i * width for j in range(len(clients))], per, width=width, label=label)
        ax.set_xticks([j + width * (len(client_runs) - 1) / 2 for j in range(len(clients))], clients)
        ax.set_ylabel(f"personalised {metric} (own test split / own preference)")
        ax.legend(fontsize=7)
        save(fig, f"{metric}_per_client.png")
    (out_dir / "plots.json").write_text(json.dumps(index, indent=2))  # plot -> its series, for readers and tests
    return written


def write_report(runs: list[RunResult], out_dir: Path, target: float | None = None) -> tuple[str, list[Path]]:
    """Markdown + CSV table and plots into ``out_dir``; returns the Markdown and the plot paths."""
    if not runs:
        raise FileNotFoundError("no finished runs to report on")
    rows = summarise(runs, target)
    md = markdown_table(rows, metric_of(runs), target) + preference_tables(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(md)
    (out_dir / "table.csv").write_text(csv_table(rows))
    return md, plot_all(runs, out_dir)
