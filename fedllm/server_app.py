"""ServerApp: the round loop of ../shared/DESIGN.md, with Flower only at the edges.

Each round: sample clients, send the global group, collect and check the replies,
stack the deltas, pass them through the channel (one call for the whole batch), fuse
with the strategy's rule, update the global group, evaluate, and log one line + one
JSON record.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from channels import build_channel
from fedllm.aggregation import apply_update, fuse_updates
from fedllm.config import ConfigError, ExperimentConfig, load_config
from fedllm.data import load_suite
from fedllm.metrics import evaluate_tasks, fusion_metrics
from fedllm.realign import few_shot_set, realign
from fedllm.models import build_bundle
from fedllm.payload import ClientUpdate, RejectedReply, parse_reply, reject_outlier_norms, round_content
from fedllm.results import ResultsWriter
from fedllm.vectors import Layout, get_tensors, set_tensors
from strategies import build_rule
from strategies.merging import RMTLLMF

log = logging.getLogger("fedllm")
APP_DIR = Path(__file__).resolve().parent.parent


def resolve_experiment_path(path: str) -> Path | None:
    """An experiment path as given, else relative to the app folder (where ``flwr run`` ships it)."""
    if not path:
        return None
    p = Path(path).expanduser()
    for candidate in (p, APP_DIR / p):
        if candidate.is_file():
            return candidate
    shipped = sorted(f.relative_to(APP_DIR).as_posix() for f in (APP_DIR / "experiments").glob("*.yaml"))
    raise ConfigError(f"experiment file not found: {path} (looked in {Path.cwd()} and {APP_DIR}); "
                      f"shipped experiments: {', '.join(shipped) or 'none'}")


def config_from_run_config(run_config: dict) -> ExperimentConfig:
    return load_config(resolve_experiment_path(str(run_config.get("experiment", ""))),
                       str(run_config.get("overrides", "")) or None)


def wait_for_nodes(grid: Grid, needed: int, timeout: float = 120.0) -> list[int]:
    start = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed or time.monotonic() - start > timeout:
            return nodes
        time.sleep(0.5)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def run_experiment(grid: Grid, cfg: ExperimentConfig, echo: Callable[[str], None] = print) -> Path:
    """Run every round of ``cfg`` on the nodes of ``grid``; returns the results folder."""
    suite = load_suite(cfg.data, cfg.seed)
    test = suite.split("test")
    validation = suite.split("validation")
    bundle = build_bundle(cfg, suite.label_names)
    global_params = dict(bundle.initial_global)
    layout = Layout.of(global_params)
    payload_bytes = layout.numel * 4
    channel = build_channel(cfg.channel.kind, cfg.channel.params(), cfg.seed)
    fuse = build_rule(cfg.strategy.name, cfg.strategy.params(), cfg.seed)
    writer = ResultsWriter(cfg)
    rng = random.Random(cfg.seed)
    config_json = cfg.to_json()
    echo(f"fedllm: {cfg.run_name()} | model {cfg.model.name} ({cfg.peft.method}) | tasks "
         f"{[t.name for t in suite.tasks]} | {layout.numel:,} transmitted values ({_fmt_bytes(payload_bytes)}) "
         f"| results in {writer.dir}")

    def evaluate() -> dict[str, float]:
        if not cfg.eval.centralized:
            return {}
        set_tensors(bundle.model, global_params)
        return evaluate_tasks(bundle, bundle.model, suite, test, cfg.eval.batch_size, cfg.model.max_length)

    def choose_scale(fused, grid: list[float]) -> tuple[float, dict[str, float]]:
        """Lambda search (Ilharco et al.): the scale with the best mean validation accuracy."""
        if fused is None or not len(validation):
            return 1.0, {}
        scores = {}
        for lam in grid:
            set_tensors(bundle.model, apply_update(global_params, fused, layout, lam))
            scores[str(lam)] = evaluate_tasks(bundle, bundle.model, suite, validation, cfg.eval.batch_size,
                                              cfg.model.max_length)["accuracy"]
        best = max(grid, key=lambda lam: scores[str(lam)])
        return best, scores

    scores = evaluate()
    writer.log_round({"round": 0, **scores, "bytes_up": 0, "bytes_down": 0, "wall_time": 0.0})
    echo(f"[round 0/{cfg.rounds}] accuracy={scores.get('accuracy', float('nan')):.4f} (before training)")
    total_up = total_down = 0
    start = time.monotonic()
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.monotonic()
        nodes = wait_for_nodes(grid, cfg.strategy.min_clients)
        k = max(cfg.strategy.min_clients, round(cfg.strategy.fraction_train * len(nodes)))
        sampled = sorted(rng.sample(nodes, min(k, len(nodes))))
        content = round_content(global_params, config_json, rnd, cfg.data.num_clients or 0)
        messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in sampled]
        replies = list(grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout))
        updates: list[ClientUpdate] = []
        rejected: list[str] = []
        for reply in replies:
            try:
                updates.append(parse_reply(reply, layout))
            except RejectedReply as why:
                rejected.append(str(why))
                log.warning("round %d: rejected reply: %s", rnd, why)
        updates, outliers = reject_outlier_norms(updates, cfg.strategy.reject_norm_ratio)
        for why in outliers:
            log.warning("round %d: rejected reply: %s", rnd, why)
        rejected += outliers
        missing = len(sampled) - len(replies)
        if missing:
            log.warning("round %d: %d of %d sampled clients did not reply within %ss", rnd, missing,
                        len(sampled), cfg.strategy.round_timeout)
        bytes_down = payload_bytes * len(sampled)
        bytes_up = payload_bytes * len(replies)
        total_up += bytes_up
        total_down += bytes_down
        record: dict = {"round": rnd, "clients_sampled": len(sampled), "clients_replied": len(replies),
                        "clients_used": len(updates), "clients_missing": missing, "rejected": rejected,
                        "bytes_up": bytes_up, "bytes_down": bytes_down,
                        "bytes_up_per_client": payload_bytes}
        if len(updates) < cfg.strategy.min_clients:
            echo(f"[round {rnd}/{cfg.rounds}] skipped: {len(updates)} usable replies < strategy.min_clients="
                 f"{cfg.strategy.min_clients}")
            record["skipped"] = True
        else:
            fused, channel_record = fuse_updates(updates, channel, fuse)
            record.update(channel_record)
            scale = cfg.strategy.server_lr
            if scale == "auto":
                scale, record["validation_by_lr"] = choose_scale(fused, cfg.strategy.lr_grid)
            record["server_lr"] = scale
            before = global_params
            global_params = apply_update(global_params, fused, layout, scale)
            if isinstance(fuse, RMTLLMF) and fuse.params.realign_steps > 0:
                set_tensors(bundle.model, global_params)
                shots = few_shot_set(validation, len(suite.tasks), fuse.params.shots, cfg.seed + rnd)
                record["realign_loss_before"], record["realign_loss_after"] = realign(
                    bundle, shots, suite, steps=fuse.params.realign_steps, lr=fuse.params.realign_lr,
                    scope=fuse.params.realign_scope, max_length=cfg.model.max_length, seed=cfg.seed + rnd)
                global_params = get_tensors(bundle.model, bundle.groups.global_names)
            if cfg.eval.fusion_metrics:
                individual = {int(u.metrics["task"]): apply_update(before, u.delta, layout, 1.0)
                              for u in updates if u.metrics.get("task", -1) >= 0}
                record.update(fusion_metrics(bundle, suite, test, global_params, individual,
                                             cfg.eval.batch_size, cfg.model.max_length))
            examples = sum(u.num_examples for u in updates)
            record["train_loss"] = sum(u.metrics["train_loss"] * u.num_examples for u in updates) / examples
        if rnd % cfg.eval.every == 0 or rnd == cfg.rounds:
            record.update(evaluate())
        record["round_time"] = time.monotonic() - t0
        record["wall_time"] = time.monotonic() - start
        writer.log_round(record)
        echo(f"[round {rnd}/{cfg.rounds}] train_loss={record.get('train_loss', float('nan')):.4f} "
             f"accuracy={record.get('accuracy', float('nan')):.4f} clients={len(updates)}/{len(sampled)} "
             + (f"rejected={len(rejected)} " if rejected else "") + (f"missing={missing} " if missing else "")
             + f"up={_fmt_bytes(bytes_up)} ({_fmt_bytes(payload_bytes)}/client) down={_fmt_bytes(bytes_down)} "
             f"time={record['round_time']:.1f}s")
    final = writer.records[-1]
    summary = {"experiment": cfg.run_name(), "rounds": cfg.rounds, "final_accuracy": final.get("accuracy"),
               **{k: v for k, v in final.items() if k.startswith("accuracy/")},
               "total_bytes_up": total_up, "total_bytes_down": total_down,
               "bytes_up_per_client_per_round": payload_bytes, "wall_time": time.monotonic() - start,
               "config_digest": cfg.digest()}
    writer.finish(global_params, summary)
    echo(f"fedllm: done in {summary['wall_time']:.1f}s, final accuracy {summary['final_accuracy']:.4f}, "
         f"results in {writer.dir}")
    return writer.dir


def make_server_app(cfg: ExperimentConfig | None = None,
                    on_done: Callable[[Path], None] | None = None) -> ServerApp:
    """A ServerApp for ``cfg``; ``None`` reads the experiment from the run config (``flwr run``).
    ``on_done`` receives the results folder of a finished run."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_dir = run_experiment(grid, cfg or config_from_run_config(context.run_config))
        if on_done is not None:
            on_done(run_dir)

    return server_app


app = make_server_app()
