"""The fusion pipeline: from checked client updates to the new global parameters, in one place.

    updates -> stack (client-id order) -> channel (one call for the batch)
            -> fusion space (LoRA factors -> weight deltas B @ A, when fused so)
            -> fusion rule (DP wraps it) -> server optimiser (FedAdam, ...: its step on the fused delta)
            -> scale (fixed, or searched on validation data)
            -> apply to the global parameters -> the rule's post-merge hook (R-MTLLMF's realignment)
            -> fusion metrics (when asked)

The server calls it once a round; the R-MTLLMF benchmark calls its steps on the same task
vectors under many channels. Channels and rules stay pure tensor math; what they need of the
model or the data comes through the workload and the :class:`ServerMerge` context.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedllm.channels import Channel, ChannelReport, ClientMeta, build_channel
from fedllm.channels.segments import transmit_in_place
from fedllm.config import ExperimentConfig
from fedllm.core.bundle import ModelBundle
from fedllm.core.lora_ranks import pad_rows, rank_layout
from fedllm.core.types import ClientUpdate
from fedllm.core.vectors import Layout, Tensors, add, get_tensors, set_tensors, stack_rows, unflatten
from fedllm.fusion.lora_products import LoraProducts, SvdProducts
from fedllm.fusion.per_client_uplink import PerClientUplink
from fedllm.fusion.privacy import DifferentiallyPrivate, PrivacyLedger
from fedllm.fusion.running_sum import RunningSum
from fedllm.strategies import FusionRule, FusionSpace, InsufficientUpdates, build_rule, statistic_layouts
from fedllm.strategies.optimizers import build_optimizer
from fedllm.workloads import Workload


def apply_update(global_params: Tensors, fused: torch.Tensor | None, layout: Layout, scale: float) -> Tensors:
    """``global + scale * fused`` on the tensors of ``layout``; the others (e.g. LoRA factors kept at
    their initial value while their product is folded into base weights) stay as they are."""
    if fused is None:
        return global_params
    delta = unflatten(fused, layout)
    return {**global_params, **add({n: global_params[n] for n in delta}, delta, scale)}


def fuse_received(received: torch.Tensor, weights: torch.Tensor, report: ChannelReport, rule: FusionRule,
                  to_fusion_space: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  stats: dict[str, torch.Tensor] | None = None, space: FusionSpace | None = None,
                  ) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The fused delta of what arrived (``None`` if every payload was lost) and the channel's record.
    ``to_fusion_space`` maps received rows to what is fused when that is not what was sent (LoRA
    factors -> weight deltas); the channel always sees the payload. ``stats``: the received per-client
    statistics the rule fuses with (rows as ``received``), ``space`` what the rows and statistics are."""
    record: dict[str, Any] = report.summary()
    keep = ~report.dropped
    if report.aggregated:  # over-the-air: the channel already delivered the weighted mean
        fused = received[0]
    elif keep.any():
        rows = to_fusion_space(received) if to_fusion_space is not None else received
        kept = (lambda t: t) if keep.all() else (lambda t: t[keep])  # a full mask would copy every row
        try:
            kept_stats = {name: kept(rows_) for name, rows_ in (stats or {}).items()}
            fused = rule(kept(rows), kept(weights), kept_stats, space)
        except InsufficientUpdates as why:  # the round keeps the model, and says why
            record["fusion_skipped"] = str(why)
            return None, record
    else:
        record["all_lost"] = True
        return None, record
    record["update_norm"] = float(torch.linalg.vector_norm(fused))
    return fused, record


def fuse_updates(updates: list[ClientUpdate], channel: Channel, rule: FusionRule,
                 to_fusion_space: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 space: FusionSpace | None = None,
                 pad: Callable[[torch.Tensor, int], torch.Tensor] | None = None, in_place: bool = False,
                 ) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Stack the updates, send them through the channel in one call, fuse what arrived. ``in_place``:
    the updates' deltas are not read after the channel, so long payloads may cross it in segments with
    what arrives written over the stack (fedllm/channels/segments.py) instead of beside it. Updates are
    put in client-id order first: replies arrive in any order, and the channel's noise draws and the
    fusion's float sums must not depend on it (reproducible runs, resume). Statistics a rule fuses with
    cross the same uplink after the updates, one channel call each. Clients of different LoRA ranks
    send payloads of different sizes: each size crosses the channel as its own batch, and ``pad``
    brings a rank's received rows to the global layout (fedllm/core/lora_ranks.py)."""
    started = time.perf_counter()
    updates = sorted(updates, key=lambda u: u.client_id)
    weights = torch.tensor([float(u.num_examples) for u in updates])
    meta = ClientMeta(ids=[u.client_id for u in updates], num_examples=weights)
    received, report = transmit_by_rank(updates, channel, meta, pad, transmit_in_place if in_place else None)
    if received is None:
        return None, {**report.summary(), "fusion_skipped": "over-the-air aggregation needs payloads of one size; "
                      f"the clients' LoRA ranks differ ({sorted({u.rank for u in updates})})"}
    stats = {name: transmit_in_place(channel, torch.stack([u.stats[name] for u in updates]), meta)[0]
             for name in sorted(updates[0].stats)}  # a stack of their own: written over
    channel_done = time.perf_counter()
    fused, record = fuse_received(received, weights, report, rule, to_fusion_space, stats, space)
    return fused, {**record, "seconds_channel": channel_done - started,
                   "seconds_fusion": time.perf_counter() - channel_done}


def transmit_by_rank(updates: list[ClientUpdate], channel: Channel, meta: ClientMeta,
                     pad: Callable[[torch.Tensor, int], torch.Tensor] | None,
                     send: Callable[[Channel, torch.Tensor, ClientMeta], tuple[torch.Tensor, ChannelReport]] | None = None,
                     ) -> tuple[torch.Tensor | None, ChannelReport]:
    """The received rows (global layout, in the updates' order) and the channel's report: one channel
    call when every payload has one size, else one per rank. ``None`` rows: an over-the-air channel
    met payloads of different sizes. ``send``: how a batch crosses (default: ``channel.transmit``)."""
    send = send or (lambda ch, batch, m: ch.transmit(batch, m))  # noqa: E731
    ranks = [u.rank for u in updates]
    if len(set(ranks)) == 1 or pad is None:
        return send(channel, stack_rows([u.delta for u in updates]), meta)
    rows: list[torch.Tensor | None] = [None] * len(updates)
    reports, order = [], []
    for rank in sorted(set(ranks), key=ranks.index):
        idx = [i for i, r in enumerate(ranks) if r == rank]
        sub = ClientMeta([meta.ids[i] for i in idx], meta.num_examples[idx],
                         None if meta.tx_power is None else meta.tx_power[idx])
        got, rep = send(channel, torch.stack([updates[i].delta for i in idx]), sub)
        if rep.aggregated:
            return None, rep
        for i, row in zip(idx, pad(got, rank)):
            rows[i] = row
        reports.append(rep)
        order += idx
    return torch.stack(rows), ChannelReport.concat(reports, order)


@dataclass
class ServerMerge:
    """The server's side of a rule's post-merge hook (:class:`fedllm.strategies.MergeContext`)."""

    bundle: ModelBundle
    workload: Workload
    lora: LoraProducts | None
    seed: int
    before: Tensors
    space: FusionSpace

    def load(self, params: Tensors) -> None:
        set_tensors(self.bundle.model, params)

    def few_shot(self, shots: int) -> Any:
        return self.workload.few_shot(shots, self.seed)

    def loss(self, examples: Any, model: torch.nn.Module | None = None) -> torch.Tensor:
        return self.workload.few_shot_loss(self.bundle, examples, model)

    def entropy(self, examples: Any, model: torch.nn.Module | None = None) -> torch.Tensor:
        return self.workload.prediction_entropy(self.bundle, examples, model)

    def read_back(self) -> Tensors:
        """The trained transmitted tensors, or, with LoRA merged as weight deltas, the LoRA folded
        into the base weights (factors reset)."""
        if self.lora is not None:
            return self.lora.fold(self.bundle.model)
        return get_tensors(self.bundle.model, self.bundle.groups.global_names)


class FusionPipeline:
    """Channel, rule, scale and post-merge hook of one run, built from its config."""

    def __init__(self, cfg: ExperimentConfig, workload: Workload, bundle: ModelBundle,
                 channel: Channel | None = None) -> None:
        self.cfg, self.workload, self.bundle = cfg, workload, bundle
        self.layout = Layout.of(bundle.initial_global)  # what clients send
        # LoRA merged as weight deltas: clients send factors, the server fuses scaling * B @ A in the
        # base weights' layout and sends those weights down with the factors at their initial value.
        # FlexLoRA (``svd``): the same products, re-factorised into the global factors after fusion.
        products = {"weight_delta": LoraProducts, "svd": SvdProducts}.get(cfg.peft.fuse_lora_as)
        self.lora = (products.of(bundle.model, bundle.groups.global_names, bundle.initial_global)
                     if products is not None else None)
        self.fusion_layout = self.lora.weight_layout if self.lora is not None else self.layout
        self.channel = channel or build_channel(cfg.channel.kind, cfg.channel.params(), cfg.seed)
        self.rule: FusionRule = build_rule(cfg.strategy.name, cfg.strategy.params(), cfg.seed)
        self.optimizer = build_optimizer(cfg.strategy.optimizer.name, cfg.strategy.optimizer.params())
        self.stat_layouts = statistic_layouts(self.rule.client_statistics(), bundle, self.layout)
        self.space = FusionSpace(self.fusion_layout, self.stat_layouts)
        self.rule.check(bundle)
        self._padding: Tensors | None = None
        strategy = cfg.strategy
        self.dp = (DifferentiallyPrivate(self.rule, strategy.dp_clip_norm, strategy.dp_noise_multiplier, cfg.seed + 17)
                   if strategy.dp_clip_norm is not None else None)
        self.ledger = (PrivacyLedger(strategy.dp_noise_multiplier, strategy.dp_delta, strategy.fraction_train)
                       if self.dp is not None else None)

    @property
    def outlier_ratio(self) -> float | None:
        """The reply checks' norm-outlier ratio; none under DP, where clipping bounds every update and a
        filter comparing clients would break the one-client sensitivity (fedllm/fusion/privacy.py)."""
        return None if self.dp is not None else self.cfg.strategy.reject_norm_ratio

    @property
    def stack_dtype(self) -> torch.dtype:
        """What the round's reply stack holds (strategy.stack_dtype; the config checked the rule reads a
        bfloat16 stack in float32)."""
        return getattr(torch, self.cfg.strategy.stack_dtype)

    def running_sum(self, server_round: int = 1) -> RunningSum | None:
        """An empty running sum for round ``server_round``'s replies under strategy.running_sum (the config
        checked the rule, channel and reply checks allow it), else None: the round keeps a stack. Over a
        noisy channel each reply crosses it alone first (fedllm/fusion/per_client_uplink.py)."""
        if not self.cfg.strategy.running_sum:
            return None
        uplink = None if self.channel.lossless else PerClientUplink(self.channel, server_round)
        if self.dp is not None:  # each reply clipped as it is added; the noise goes on the finished sum
            return RunningSum(self.layout.numel, "sum", clip_norm=self.dp.clip_norm, uplink=uplink)
        return RunningSum(self.layout.numel, self.rule.running_sum, uplink=uplink)

    def fuse_running(self, running: RunningSum) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """The fused delta of a round whose replies were added up as they arrived (``None`` if the channel
        lost every payload), with the record a stacked round's fusion would give."""
        started = time.perf_counter()
        report = (running.uplink.report() if running.uplink is not None
                  else self.channel.lossless_report(running.count, self.layout.numel))
        seconds = {"seconds_channel": running.uplink.seconds if running.uplink is not None else 0.0}
        if running.count == 0:
            return None, {**report.summary(), "all_lost": True, **seconds, "seconds_fusion": 0.0}
        fused = running.result()
        if self.dp is not None:
            fused = self.dp.private_mean(fused, running.count)
        record = {**report.summary(), "update_norm": float(torch.linalg.vector_norm(fused)),
                  **seconds, "seconds_fusion": time.perf_counter() - started}
        return fused, record

    def exceeds_privacy_budget(self) -> bool:
        """True when the next round would spend more than ``strategy.dp_target_epsilon``."""
        target = self.cfg.strategy.dp_target_epsilon
        return self.ledger is not None and target is not None and self.ledger.would_exceed(target)

    def initial_global(self) -> Tensors:
        """The global state the server starts from and sends: the transmitted group, plus the base
        weights the LoRA products are folded into."""
        params = dict(self.bundle.initial_global)
        if self.lora is not None:
            params.update(self.lora.global_tensors(self.bundle.model))
        return params

    # ---------------------------------------------------------------- the steps
    def transmit(self, rows: torch.Tensor, meta: ClientMeta) -> tuple[torch.Tensor, ChannelReport]:
        """What the server receives of the clients' payloads (rows in the sent layout)."""
        return self.channel.transmit(rows, meta)

    def downlink(self) -> dict[str, Tensors]:
        """What the server sends besides the global group (the rule's, e.g. SCAFFOLD's control variate)."""
        return self.rule.downlink(self.space)

    def pad(self, rows: torch.Tensor, rank: int | None) -> torch.Tensor:
        """A rank's received rows in the global layout (fedllm/core/lora_ranks.py); the round's start
        (:meth:`start_round`) says what lies beyond a client's rank."""
        if rank is None:
            return rows
        return pad_rows(rows, rank_layout(self.layout, rank), self.layout, self._padding)

    def start_round(self, global_params: Tensors) -> None:
        """What the round's updates are relative to (FlexLoRA: the global factors)."""
        if self.lora is not None:
            self.lora.start_round(global_params)
        self._padding = self.lora.padding(global_params) if self.lora is not None else None

    def apply(self, global_params: Tensors, fused: torch.Tensor | None, scale: float) -> Tensors:
        """``global + scale * fused`` in the fusion space (FlexLoRA re-factorises the product)."""
        if self.lora is not None:
            return self.lora.apply(global_params, fused, scale)
        return apply_update(global_params, fused, self.fusion_layout, scale)

    def to_fusion_space(self, rows: torch.Tensor) -> torch.Tensor:
        """Received rows as what is fused (LoRA factors -> weight deltas); the channel saw the payload."""
        return self.lora(rows) if self.lora is not None else rows

    def fuse(self, received: torch.Tensor, weights: torch.Tensor, report: ChannelReport,
             stats: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """The fused delta of what arrived (``None`` if every payload was lost) and the channel's record."""
        return fuse_received(received, weights, report, self.dp or self.rule, self.to_fusion_space, stats, self.space)

    def choose_scale(self, global_params: Tensors, fused: torch.Tensor | None) -> tuple[float, dict[str, float]]:
        """``strategy.server_lr``, or with ``auto`` the value of ``lr_grid`` whose merged model scores
        best on the workload's validation data (task arithmetic's lambda search, Ilharco et al.)."""
        grid = self.cfg.strategy.lr_grid
        if self.cfg.strategy.server_lr != "auto":
            return float(self.cfg.strategy.server_lr), {}
        if fused is None or not self.workload.has_validation():
            return 1.0, {}
        scores = {str(lam): self.workload.validation_score(self.bundle, self.apply(global_params, fused, lam))
                  for lam in grid}
        return max(grid, key=lambda lam: scores[str(lam)]), scores

    def merge(self, global_params: Tensors, fused: torch.Tensor | None, seed: int,
              server_round: int = 1) -> tuple[Tensors, dict[str, Any]]:
        """The server optimiser's step on the fused delta, scaled and applied, then the rule's post-merge hook."""
        record: dict[str, Any] = {}
        if fused is not None:
            fused = self.optimizer.step(fused, server_round)
        scale, by_lr = self.choose_scale(global_params, fused)
        if by_lr:
            record["validation_by_lr"] = by_lr
        record["server_lr"] = scale
        merged = self.apply(global_params, fused, scale)
        merged, hook_record = self.rule.post_merge(
            merged, ServerMerge(self.bundle, self.workload, self.lora, seed, global_params, self.space))
        return merged, {**record, **hook_record}

    # ---------------------------------------------------------------- a server round
    def __call__(self, global_params: Tensors, updates: list[ClientUpdate], seed: int,
                 population: int | None = None, server_round: int = 1,
                 running: RunningSum | None = None) -> tuple[Tensors, dict[str, Any]]:
        """The round's new global parameters and its record; ``population``: the clients sampling draws
        from (DP divides by the expected cohort, fraction_train x population); ``running``: the updates'
        deltas, already added up as they arrived (strategy.running_sum)."""
        self.rule.population = population
        if self.dp is not None:
            self.dp.expected_cohort = self.cfg.strategy.fraction_train * population if population else None
        self.start_round(global_params)
        if running is not None:
            fused, record = self.fuse_running(running)
        else:
            fused, record = fuse_updates(updates, self.channel, self.dp or self.rule, self.to_fusion_space,
                                         self.space, self.pad, in_place=not self.cfg.eval.fusion_metrics)
        if self.ledger is not None and fused is not None:
            record["dp_epsilon"] = self.ledger.spend()
        started = time.perf_counter()
        merged, merge_record = self.merge(global_params, fused, seed, server_round)
        record.update(merge_record, seconds_merge=time.perf_counter() - started)
        if self.cfg.eval.fusion_metrics:  # each task's own model from its clean (pre-channel) task vector
            individual = {int(u.metrics["task"]): self.apply(
                global_params, self.to_fusion_space(self.pad(u.delta[None].float(), u.rank))[0], 1.0)
                for u in updates if u.metrics.get("task", -1) >= 0}
            record.update(self.workload.fusion_metrics(self.bundle, merged, individual))
        return merged, record

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {"channel_rng": self.channel.generator.get_state(), "rule_rng": self.rule.generator.get_state(),
                "dp_rng": self.dp.generator.get_state() if self.dp else None,
                "dp_rounds": self.ledger.rounds if self.ledger else 0, "optimizer": self.optimizer.state_dict(),
                "rule_state": self.rule.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.channel.generator.set_state(state["channel_rng"])
        self.rule.generator.set_state(state["rule_rng"])
        if self.dp is not None and state.get("dp_rng") is not None:
            self.dp.generator.set_state(state["dp_rng"])
        self.optimizer.load_state_dict(state.get("optimizer", {}))
        self.rule.load_state_dict(state.get("rule_state", {}))
        if self.ledger is not None:  # checkpoints made before the ledger kept the count in the run's totals
            self.ledger.rounds = state.get("dp_rounds", state.get("totals", {}).get("dp_rounds", 0))
