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

import torch
from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from channels import build_channel
from fedllm.aggregation import DPSettings, apply_update, fuse_updates
from fedllm.config import ConfigError, ExperimentConfig, load_config
from fedllm.data import DataError, check_partitions, load_suite
from fedllm.metrics import evaluate_tasks, fusion_metrics
from fedllm.privacy import gaussian_epsilon
from fedllm.lora_products import LoraProducts
from fedllm.realign import few_shot_set, realign, realign_parameters, realigned_state
from fedllm.models import build_bundle
from fedllm.pfit import client_prompts, evaluate_policy, preferences_of
from fedllm.policy import build_policy
from fedllm.payload import (METRICS, ClientUpdate, RejectedReply, parse_reply, reject_outlier_norms,
                            round_content)
from fedllm.results import ResultsWriter, load_checkpoint, save_checkpoint
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


def check_data(cfg: ExperimentConfig, num_partitions: int) -> None:
    """Data errors of a run with ``num_partitions`` simulated clients (a missing file, a label out of
    range, a client left with no examples or prompts), raised before training and before a results
    folder exists."""
    if cfg.rl is not None:
        client_prompts(cfg, 0, num_partitions)  # loads rl.prompts; too few for the clients is an error
    else:
        check_partitions(cfg.data, num_partitions, cfg.seed)


def wait_for_nodes(grid: Grid, needed: int, timeout: float = 120.0) -> list[int]:
    start = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed or time.monotonic() - start > timeout:
            return nodes
        time.sleep(0.5)


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB); in a simulation the server runs in
    the driver process, so this is the server's."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


class FederatedRun:
    """The server side of one experiment: state, one method per step of a round, checkpoints."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig, echo: Callable[[str], None] = print,
                 resume: Path | None = None) -> None:
        self.grid, self.cfg, self.echo = grid, cfg, echo
        # The score that names a run: accuracy of a classifier, mean mixed reward of a policy (PFIT).
        self.metric = "reward" if cfg.rl is not None else "accuracy"
        if cfg.data.num_clients:  # simulated partitions: an empty one fails here, before a results folder exists
            check_data(cfg, cfg.data.num_clients)
        if cfg.rl is not None:
            self.suite, self.test, self.validation = None, None, None
            self.bundle = build_policy(cfg)
        else:
            self.suite = load_suite(cfg.data, cfg.seed)
            self.test = self.suite.split("test")
            self.validation = self.suite.split("validation")
            self.bundle = build_bundle(cfg, self.suite.label_names)
        self.global_params = dict(self.bundle.initial_global)
        self.layout = Layout.of(self.global_params)  # what clients send
        self.payload_bytes = self.layout.numel * 4
        # LoRA merged as weight deltas: clients send factors, the server fuses B @ A in the base weights'
        # layout and sends those weights down with the factors at their initial value.
        self.lora = (LoraProducts.of(self.bundle.model, self.bundle.groups.global_names, self.bundle.initial_global)
                     if cfg.peft.fuse_lora_as == "weight_delta" else None)
        if self.lora is not None:
            self.global_params.update(get_tensors(self.bundle.model, self.lora.weight_layout.names))
        self.fusion_layout = self.lora.weight_layout if self.lora is not None else self.layout
        self.down_bytes = sum(t.numel() for t in self.global_params.values()) * 4
        self.channel = build_channel(cfg.channel.kind, cfg.channel.params(), cfg.seed)
        self.fuse = build_rule(cfg.strategy.name, cfg.strategy.params(), cfg.seed)
        if isinstance(self.fuse, RMTLLMF) and self.fuse.params.realign_steps > 0 and not realign_parameters(
                self.bundle, self.fuse.params.realign_scope):
            raise ConfigError(f"strategy.realign_scope {self.fuse.params.realign_scope!r} selects no transmitted "
                              "tensor to realign (with LoRA there are no LayerNorms or biases in the sent group); "
                              "use realign_scope: transmitted or realign_steps: 0")
        self.dp = (DPSettings(cfg.strategy.dp_clip_norm, cfg.strategy.dp_noise_multiplier,
                              torch.Generator().manual_seed(cfg.seed + 17))
                   if cfg.strategy.dp_clip_norm is not None else None)
        self.rng = random.Random(cfg.seed)
        self.config_json = cfg.to_json()
        self.totals = {"bytes_up": 0, "bytes_down": 0, "elapsed": 0.0}
        self.next_round = 1
        self.writer = ResultsWriter(cfg, resume_dir=resume)
        if resume is not None:
            self._restore(resume)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {"round": self.next_round - 1, "global_params": self.global_params, "totals": self.totals,
                "sampler": self.rng.getstate(), "channel_rng": self.channel.generator.get_state(),
                "rule_rng": self.fuse.generator.get_state(), "config_digest": self.cfg.digest(),
                "dp_rng": self.dp.generator.get_state() if self.dp else None}

    def _restore(self, run_dir: Path) -> None:
        state = load_checkpoint(run_dir)
        if state["config_digest"] != self.cfg.digest():
            raise ConfigError(f"cannot resume {run_dir}: it was made by another config "
                              f"(digest {state['config_digest']}, this one {self.cfg.digest()})")
        self.global_params = state["global_params"]
        self.totals = state["totals"]
        self.rng.setstate(state["sampler"])
        self.channel.generator.set_state(state["channel_rng"])
        self.fuse.generator.set_state(state["rule_rng"])
        if self.dp is not None and state.get("dp_rng") is not None:
            self.dp.generator.set_state(state["dp_rng"])
        self.next_round = state["round"] + 1
        self.writer.truncate_after(state["round"])
        self.echo(f"fedllm: resuming {run_dir} after round {state['round']}")

    # ------------------------------------------------------------------ evaluation
    def score(self, params: dict[str, torch.Tensor], examples) -> dict[str, float]:
        set_tensors(self.bundle.model, params)
        return evaluate_tasks(self.bundle, self.bundle.model, self.suite, examples, self.cfg.eval.batch_size,
                              self.cfg.model.max_length)

    def evaluate(self, rnd: int = 0) -> dict[str, float]:
        if self.cfg.rl is not None:
            return self.evaluate_policy(rnd)
        return self.score(self.global_params, self.test)

    def evaluate_policy(self, rnd: int) -> dict:
        """The global policy (its local part at the initial value) under every client's preference."""
        set_tensors(self.bundle.model, self.global_params)
        set_tensors(self.bundle.model, self.bundle.initial_local)
        prefs = preferences_of(self.cfg, self.cfg.data.num_clients or len(self.grid.get_node_ids()) or 1)
        scores = evaluate_policy(self.bundle, self.cfg, prefs)
        self.writer.log_samples(rnd, scores.samples)
        return {"reward": sum(scores.per_preference) / len(prefs), "kl": scores.kl,
                **{f"reward/p{j}": r for j, r in enumerate(scores.per_preference)},
                **{f"score/{k}": v for k, v in scores.per_reward.items()}}

    def choose_scale(self, fused: torch.Tensor | None) -> tuple[float, dict[str, float]]:
        """Lambda search (Ilharco et al.): the scale with the best mean validation accuracy."""
        if fused is None or not len(self.validation):
            return 1.0, {}
        scores = {}
        for lam in self.cfg.strategy.lr_grid:
            candidate = apply_update(self.global_params, fused, self.fusion_layout, lam)
            scores[str(lam)] = self.score(candidate, self.validation)["accuracy"]
        return max(self.cfg.strategy.lr_grid, key=lambda lam: scores[str(lam)]), scores

    def evaluate_federated(self, rnd: int) -> dict:
        """Every client scores the global group plus its own local group on its own test partition."""
        cfg = self.cfg
        nodes = sorted(self.grid.get_node_ids())
        content = round_content(self.global_params, self.config_json, rnd, cfg.data.num_clients or 0)
        messages = [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
        per_client: dict[str, float] = {}
        rows: dict[str, list[float]] = {}  # PFIT: each client's policy under every client's preference
        for reply in self.grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout):
            if reply.has_error() or METRICS not in reply.content.metric_records:
                log.warning("round %d: evaluation failed on client %s", rnd, reply.metadata.src_node_id)
                continue
            metrics = dict(reply.content.metric_records[METRICS])
            name = f"p{int(metrics['partition'])}" if "partition" in metrics else f"n{reply.metadata.src_node_id}"
            per_client[name] = float(metrics[self.metric])
            if self.cfg.rl is not None:
                rows[name] = [float(metrics[k]) for k in sorted((k for k in metrics if k.startswith("reward/p")),
                                                                 key=lambda k: int(k.removeprefix("reward/p")))]
        if not per_client:
            return {}
        vals, m = list(per_client.values()), self.metric
        out = {f"personalized_{m}": sum(vals) / len(vals), f"worst_client_{m}": min(vals),
               f"client_{m}": dict(sorted(per_client.items()))}
        if rows:
            out["preference_matrix"] = dict(sorted(rows.items(), key=lambda kv: int(kv[0][1:])))
        return out

    # ------------------------------------------------------------------ one round
    def collect(self, rnd: int) -> tuple[list[int], int, list[ClientUpdate], list[str], list[int]]:
        """Sample clients, send the global group, and check every reply: (sampled nodes, number of
        replies, usable updates, rejection reasons, nodes that never replied)."""
        cfg = self.cfg
        nodes = wait_for_nodes(self.grid, cfg.strategy.min_clients)
        k = max(cfg.strategy.min_clients, round(cfg.strategy.fraction_train * len(nodes)))
        sampled = sorted(self.rng.sample(nodes, min(k, len(nodes))))
        content = round_content(self.global_params, self.config_json, rnd, cfg.data.num_clients or 0)
        messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in sampled]
        updates: list[ClientUpdate] = []
        rejected: list[str] = []
        replied: list[int] = []
        # Parse each reply as it is handed over and keep only the flat delta: holding the messages
        # as well would double the server's memory per client.
        for reply in self.grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout):
            replied.append(reply.metadata.src_node_id)
            try:
                updates.append(parse_reply(reply, self.layout))
            except RejectedReply as why:
                rejected.append(str(why))
        updates, outliers = reject_outlier_norms(updates, cfg.strategy.reject_norm_ratio)
        rejected += outliers
        for why in rejected:
            log.warning("round %d: rejected reply: %s", rnd, why)
        missing = sorted(set(sampled) - set(replied))
        if missing:
            log.warning("round %d: %d of %d sampled clients did not reply within %ss: nodes %s", rnd,
                        len(missing), len(sampled), cfg.strategy.round_timeout, missing)
        return sampled, len(replied), updates, rejected, missing

    def in_fusion_space(self, delta: torch.Tensor) -> torch.Tensor:
        return delta if self.lora is None else self.lora(delta[None])[0]

    def update(self, rnd: int, updates: list[ClientUpdate]) -> dict:
        """Channel, fusion, scale, optional realignment and fusion metrics; updates the global group."""
        cfg = self.cfg
        fused, record = fuse_updates(updates, self.channel, self.fuse, self.dp, self.lora)
        if self.dp is not None:
            self.totals["dp_rounds"] = self.totals.get("dp_rounds", 0) + 1
            record["dp_epsilon"] = gaussian_epsilon(self.totals["dp_rounds"], self.dp.noise_multiplier,
                                                    cfg.strategy.dp_delta)
        scale = cfg.strategy.server_lr
        if scale == "auto":
            scale, record["validation_by_lr"] = self.choose_scale(fused)
        record["server_lr"] = scale
        before = self.global_params
        self.global_params = apply_update(before, fused, self.fusion_layout, scale)
        if isinstance(self.fuse, RMTLLMF) and self.fuse.params.realign_steps > 0:
            prm = self.fuse.params
            set_tensors(self.bundle.model, self.global_params)
            shots = few_shot_set(self.validation, len(self.suite.tasks), prm.shots, cfg.seed + rnd)
            record["realign_loss_before"], record["realign_loss_after"] = realign(
                self.bundle, shots, self.suite, steps=prm.realign_steps, lr=prm.realign_lr,
                scope=prm.realign_scope, max_length=cfg.model.max_length, seed=cfg.seed + rnd)
            self.global_params = {**self.global_params, **realigned_state(self.bundle, self.lora)}
        if cfg.eval.fusion_metrics:
            individual = {int(u.metrics["task"]): apply_update(before, self.in_fusion_space(u.delta),
                                                               self.fusion_layout, 1.0)
                          for u in updates if u.metrics.get("task", -1) >= 0}
            record.update(fusion_metrics(self.bundle, self.suite, self.test, self.global_params, individual,
                                         cfg.eval.batch_size, cfg.model.max_length))
        examples = sum(u.num_examples for u in updates)
        record["train_loss"] = sum(u.metrics["train_loss"] * u.num_examples for u in updates) / examples
        times = [u.metrics["train_time"] for u in updates if "train_time" in u.metrics]
        if times:  # where a round's time goes: the slowest client bounds it
            record["client_train_time_max"], record["client_train_time_mean"] = max(times), sum(times) / len(times)
        if any(u.metrics.get("local_norm") for u in updates):  # personal parts: how far each has moved
            record["client_local_norm"] = {u.client_id: u.metrics["local_norm"] for u in updates}
            record["client_local_rounds"] = {u.client_id: int(u.metrics.get("local_rounds", 0)) for u in updates}
        return record

    def round(self, rnd: int) -> dict:
        cfg = self.cfg
        t0 = time.monotonic()
        sampled, replied, updates, rejected, missing = self.collect(rnd)
        record: dict = {"round": rnd, "clients_sampled": len(sampled), "clients_replied": replied,
                        "clients_used": len(updates), "clients_missing": len(missing),
                        "missing_nodes": missing,
                        "rejected": rejected, "bytes_up": self.payload_bytes * replied,
                        "bytes_down": self.down_bytes * len(sampled), "bytes_up_per_client": self.payload_bytes}
        if len(updates) < cfg.strategy.min_clients:
            self.echo(f"[round {rnd}/{cfg.rounds}] skipped: {len(updates)} usable replies < strategy.min_clients="
                      f"{cfg.strategy.min_clients}")
            record["skipped"] = True
        else:
            record.update(self.update(rnd, updates))
        if rnd % cfg.eval.every == 0 or rnd == cfg.rounds:
            t_eval = time.monotonic()
            if cfg.eval.centralized:
                record.update(self.evaluate(rnd))
            if cfg.eval.federated:
                record.update(self.evaluate_federated(rnd))
            record["eval_time"] = time.monotonic() - t_eval
        self.totals["bytes_up"] += record["bytes_up"]
        self.totals["bytes_down"] += record["bytes_down"]
        record["round_time"] = time.monotonic() - t0
        return record

    def _echo_round(self, record: dict) -> None:
        rejected, missing = len(record["rejected"]), record["clients_missing"]
        m = self.metric
        self.echo(f"[round {record['round']}/{self.cfg.rounds}] train_loss={record.get('train_loss', float('nan')):.4f} "
                  f"{m}={record.get(m, float('nan')):.4f} "
                  + (f"personalized={record[f'personalized_{m}']:.4f} (worst {record[f'worst_client_{m}']:.4f}) "
                     if f"personalized_{m}" in record else "")
                  + f"clients={record['clients_used']}/{record['clients_sampled']} "
                  + (f"rejected={rejected} " if rejected else "") + (f"missing={missing} " if missing else "")
                  + f"up={_fmt_bytes(record['bytes_up'])} ({_fmt_bytes(self.payload_bytes)}/client) "
                  f"down={_fmt_bytes(record['bytes_down'])} time={record['round_time']:.1f}s")

    # ------------------------------------------------------------------ the whole run
    def run(self) -> Path:
        cfg = self.cfg
        what = (f"tasks {[t.name for t in self.suite.tasks]}" if self.suite is not None
                else f"RL on {cfg.rl.prompts} prompts, rewards {sorted(cfg.rl.rewards)}")
        self.echo(f"fedllm: {cfg.run_name()} | model {cfg.model.name} ({cfg.peft.method}) | {what} | "
                  f"{self.layout.numel:,} transmitted values "
                  f"({_fmt_bytes(self.payload_bytes)}) | results in {self.writer.dir}")
        if self.next_round == 1:
            scores = self.evaluate() if cfg.eval.centralized else {}
            self.writer.log_round({"round": 0, **scores, "bytes_up": 0, "bytes_down": 0, "wall_time": 0.0})
            self.echo(f"[round 0/{cfg.rounds}] {self.metric}={scores.get(self.metric, float('nan')):.4f} (before training)")
            save_checkpoint(self.writer.dir, self._state())
        start = time.monotonic() - self.totals["elapsed"]
        for rnd in range(self.next_round, cfg.rounds + 1):
            record = self.round(rnd)
            self.totals["elapsed"] = record["wall_time"] = time.monotonic() - start
            self.writer.log_round(record)
            self.next_round = rnd + 1
            save_checkpoint(self.writer.dir, self._state())
            self._echo_round(record)
        final = self.writer.records[-1]
        m = self.metric
        summary = {"experiment": cfg.run_name(), "rounds": cfg.rounds, "final_accuracy": final.get("accuracy"),
                   **({"final_reward": final.get("reward")} if cfg.rl is not None else {}),
                   **{k: v for k, v in final.items() if k.startswith(("accuracy/", "reward/"))},
                   **{k: final[k] for k in (f"personalized_{m}", f"worst_client_{m}", "preference_matrix", "dp_epsilon")
                      if k in final},
                   "total_bytes_up": self.totals["bytes_up"], "total_bytes_down": self.totals["bytes_down"],
                   "bytes_up_per_client_per_round": self.payload_bytes, "wall_time": self.totals["elapsed"],
                   "config_digest": cfg.digest(), "server_peak_rss_mb": peak_rss_mb()}
        self.writer.finish(self.global_params, summary)
        final_score = summary.get(f"final_{m}")
        scores = [f"final {m} {final_score:.4f}"] if final_score is not None else []
        if f"personalized_{m}" in summary:
            scores.append(f"personalised {summary[f'personalized_{m}']:.4f} "
                          f"(worst client {summary[f'worst_client_{m}']:.4f})")
        self.echo(f"fedllm: done in {summary['wall_time']:.1f}s, {', '.join(scores) or 'no evaluation'}, "
                  f"results in {self.writer.dir}")
        return self.writer.dir


def run_experiment(grid: Grid, cfg: ExperimentConfig, echo: Callable[[str], None] = print,
                   resume: Path | None = None) -> Path:
    """Run every round of ``cfg`` on the nodes of ``grid`` (continuing ``resume``); returns the results folder."""
    return FederatedRun(grid, cfg, echo, resume).run()


def make_server_app(cfg: ExperimentConfig | None = None, on_done: Callable[[Path], None] | None = None,
                    resume: Path | None = None, echo: Callable[[str], None] = print) -> ServerApp:
    """A ServerApp for ``cfg``; ``None`` reads the experiment (and ``resume``) from the run config
    (``flwr run``). ``on_done`` receives the results folder of a finished run."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        resume_dir = resume or (Path(str(context.run_config["resume"])).expanduser()
                                if context.run_config.get("resume") else None)
        try:
            run_dir = run_experiment(grid, cfg or config_from_run_config(context.run_config), echo, resume_dir)
        except (ConfigError, DataError) as err:  # the user's input: one line that names it, then fail the run
            log.error("fedllm: %s", err)
            raise
        if on_done is not None:
            on_done(run_dir)

    return server_app


app = make_server_app()
