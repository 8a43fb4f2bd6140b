"""Rules that involve several sections of an experiment config (each section checks its own keys).

Each rule is a function that raises ``ValueError`` with a message naming the keys and the fix;
:class:`~fedllm.config.experiment.ExperimentConfig` runs them all after its sections validate.
Rules ask the chosen plugins what they are (an averaging rule, a rule that needs labelled shots,
a channel that delivers only a sum) instead of comparing names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedllm.config.experiment import ExperimentConfig


def _rule(cfg: "ExperimentConfig"):
    return cfg.strategy.registry().get(cfg.strategy.name)


def _delivers_sum(cfg: "ExperimentConfig") -> bool:
    return cfg.channel.registry().get(cfg.channel.kind).delivers_sum(cfg.channel.params())


def rl_goes_with_the_rl_trainer(cfg: "ExperimentConfig") -> None:
    if (cfg.rl is not None) != (cfg.client.trainer == "rl"):
        raise ValueError("client.trainer 'rl' and an 'rl:' section go together (RL instruction tuning of a "
                         "causal language model); set both or neither")
    if cfg.rl is None:
        return
    if _rule(cfg).needs_labelled_shots or cfg.eval.fusion_metrics:
        raise ValueError(f"RL instruction tuning has no labelled tasks: strategy {cfg.strategy.name!r} and "
                         "eval.fusion_metrics do not apply; use fedavg, personalized or local_only")
    if cfg.client.max_steps is None:
        raise ValueError("client.max_steps: RL instruction tuning runs a number of GRPO steps a round; give one "
                         "(e.g. client.max_steps: 4)")
    if cfg.client.batch_size % cfg.rl.num_generations:
        raise ValueError(f"client.batch_size {cfg.client.batch_size} must be a multiple of rl.num_generations "
                         f"{cfg.rl.num_generations} (each step scores whole groups of completions)")
    if cfg.strategy.server_lr == "auto":
        raise ValueError("strategy.server_lr 'auto' picks a scale by validation accuracy, which RL instruction "
                         "tuning has not; give a number")


def dp_is_for_averaging(cfg: "ExperimentConfig") -> None:
    if cfg.strategy.dp_clip_norm is not None and not _rule(cfg).averaging:
        raise ValueError(f"strategy.dp_clip_norm (DP-FedAvg) replaces the fusion by a clipped noisy mean, so it "
                         f"only goes with fedavg or personalized (averaging rules), not {cfg.strategy.name!r}")


def amplification_needs_poisson_sampling(cfg: "ExperimentConfig") -> None:
    strategy = cfg.strategy
    if strategy.dp_clip_norm is not None and strategy.fraction_train < 1 and strategy.sampling != "poisson":
        raise ValueError("strategy.dp_clip_norm with fraction_train < 1 needs strategy.sampling: poisson (the "
                         "accountant's sub-sampling amplification assumes each client is picked independently "
                         "with probability fraction_train)")
    if strategy.dp_target_epsilon is not None and strategy.dp_clip_norm is None:
        raise ValueError("strategy.dp_target_epsilon is a privacy budget: set strategy.dp_clip_norm (DP) too")


def only_local_only_sends_nothing(cfg: "ExperimentConfig") -> None:
    if _rule(cfg).sends_nothing != (not cfg.peft.global_patterns):
        raise ValueError("strategy 'local_only' goes with an empty peft.global_patterns (nothing is sent; "
                         "put the trainable tensors in peft.local_patterns), and only it may send nothing")


def frozen_layers_where_needed(cfg: "ExperimentConfig") -> None:
    if _rule(cfg).needs_frozen_layers and not cfg.peft.frozen_patterns:
        raise ValueError(f"strategy {cfg.strategy.name!r} fine-tunes with the sensitive layers frozen so they are "
                         "never sent: set peft.frozen_patterns (e.g. [embeddings])")


def statistics_in_the_fused_space(cfg: "ExperimentConfig") -> None:
    rule = cfg.strategy.registry().get(cfg.strategy.name)
    params = cfg.strategy.registry().validate(cfg.strategy.name, cfg.strategy.params(), "strategy")
    needed = rule(params).client_statistics()
    if "fisher" in needed and cfg.peft.fuse_lora_as != "factors":
        raise ValueError("strategy 'fisher' weighs the tensors a client sends; with peft.fuse_lora_as "
                         f"{cfg.peft.fuse_lora_as!r} the server fuses B @ A instead: use fuse_lora_as: factors or regmean")


def both_halves_of_an_algorithm(cfg: "ExperimentConfig") -> None:
    """A rule that needs its own client trainer (SCAFFOLD), and a trainer that needs its own rule."""
    wanted = _rule(cfg).client_trainer
    needed = getattr(cfg.client.registry().get(cfg.client.trainer), "needs_rule", None)
    if (wanted and wanted != cfg.client.trainer) or (needed and needed != cfg.strategy.name):
        name = wanted or needed
        raise ValueError(f"{name} has a server half and a client half: strategy.name {name} and client.trainer "
                         f"{name} go together")
    optimizer = getattr(cfg.client.registry().get(cfg.client.trainer), "needs_optimizer", None)
    if optimizer and cfg.client.optimizer != optimizer:
        raise ValueError(f"client.trainer {cfg.client.trainer} corrects {optimizer} steps: set client.optimizer: "
                         f"{optimizer} (it is {cfg.client.optimizer})")
    if wanted and cfg.peft.fuse_lora_as != "factors":
        raise ValueError(f"{wanted}'s control variates live in the sent tensors: use peft.fuse_lora_as: factors")


def personalisation_keeps_a_local_part(cfg: "ExperimentConfig") -> None:
    if _rule(cfg).needs_local_part and not cfg.peft.local_patterns:
        raise ValueError(f"strategy {cfg.strategy.name!r} keeps a personal part on every client: set "
                         "peft.local_patterns (e.g. [lora_]), or use strategy.name: fedavg")


def a_summed_uplink_needs_averaging(cfg: "ExperimentConfig") -> None:
    if not _delivers_sum(cfg):
        return
    if not _rule(cfg).averaging:
        raise ValueError(f"channel 'ota' delivers only the weighted sum, which strategy {cfg.strategy.name!r} "
                         "cannot use; use strategy.name: fedavg or another channel")
    if cfg.strategy.dp_clip_norm is not None:
        raise ValueError("channel 'ota' superposes the clients' raw updates, so the server can neither clip them "
                         "nor add DP noise per client: strategy.dp_clip_norm needs another channel")
    if cfg.peft.fuse_lora_as != "factors":
        raise ValueError("channel 'ota' delivers only the sum of the LoRA factors, not each client's B @ A: "
                         f"peft.fuse_lora_as {cfg.peft.fuse_lora_as!r} needs another channel (or fuse_lora_as: factors)")


def heterogeneous_ranks_meet_in_one_space(cfg: "ExperimentConfig") -> None:
    """Clients of different LoRA ranks send payloads of different sizes: the server pads them after the
    channel (fedllm/core/lora_ranks.py), so they cannot be superposed on the air, and per-client
    statistics (a Fisher, SCAFFOLD's control variates) would need the same padding rule."""
    peft = cfg.peft
    if peft.fuse_lora_as == "svd" and _rule(cfg).needs_labelled_shots:
        raise ValueError(f"peft.fuse_lora_as 'svd' (FlexLoRA) re-factorises the fused product; strategy "
                         f"{cfg.strategy.name!r} trains the merged model after fusion: use fuse_lora_as: weight_delta")
    if not peft.heterogeneous:
        return
    if _delivers_sum(cfg):
        raise ValueError(f"peft.ranks {peft.ranks}: clients of different ranks send payloads of different sizes, "
                         "which cannot be superposed over the air; use another channel or one rank")
    params = cfg.strategy.registry().validate(cfg.strategy.name, cfg.strategy.params(), "strategy")
    if _rule(cfg)(params).client_statistics() or _rule(cfg).client_trainer:
        raise ValueError(f"peft.ranks {peft.ranks}: strategy {cfg.strategy.name!r} fuses per-client statistics "
                         "in the sent layout, which differs by rank; use one rank or another strategy")


def a_quantized_base_stays_frozen(cfg: "ExperimentConfig") -> None:
    """A 4/8-bit base cannot take a float update: only adapters train, and the server cannot fold
    fused products into its weights."""
    if cfg.model.quantization == "none":
        return
    if cfg.peft.method != "lora":
        raise ValueError(f"model.quantization {cfg.model.quantization!r} freezes a k-bit base: peft.method "
                         f"{cfg.peft.method!r} would train it; use peft.method: lora (QLoRA)")
    if cfg.peft.fuse_lora_as == "weight_delta":
        raise ValueError(f"model.quantization {cfg.model.quantization!r}: peft.fuse_lora_as 'weight_delta' folds "
                         "the fused products into the base weights, which are k-bit; use fuse_lora_as: factors or svd")


def a_running_sum_needs_a_summable_round(cfg: "ExperimentConfig") -> None:
    """strategy.running_sum adds each reply into one sum as it arrives: nothing may need the rows apart."""
    strategy, why = cfg.strategy, None
    if not strategy.running_sum:
        return
    if _rule(cfg).running_sum is None:
        summable = sorted(n for n in strategy.registry().names() if strategy.registry().get(n).running_sum)
        why = (f"strategy {strategy.name!r} needs every reply at once; a running sum serves "
               f"{', '.join(summable)}")
    elif not (channels := cfg.channel.registry()).get(cfg.channel.kind).takes_one_at_a_time(cfg.channel.params()):
        one_by_one = sorted(n for n in channels.names() if channels.get(n).lossless or channels.get(n).independent)
        why = (f"channel {cfg.channel.kind!r} needs the round's payloads together (it sums them, or its attackers "
               f"see every update); a running sum takes each reply through the channel alone: channel.kind one of "
               f"{', '.join(one_by_one)} (or a compose chain of them)")
    elif strategy.reject_norm_ratio is not None and strategy.dp_clip_norm is None:  # DP turns that check off
        why = ("strategy.reject_norm_ratio compares every reply's norm with the round's median before any is "
               "fused; set it to null")
    elif cfg.eval.fusion_metrics:
        why = "eval.fusion_metrics scores each client's own model from its delta; set it to false"
    elif cfg.peft.fuse_lora_as != "factors":
        why = (f"peft.fuse_lora_as {cfg.peft.fuse_lora_as!r} fuses products B @ A, not the payloads; "
               "use fuse_lora_as: factors")
    elif cfg.peft.heterogeneous:
        why = f"peft.ranks {cfg.peft.ranks}: payloads of other ranks are padded in a batch; use one rank"
    if why:
        raise ValueError(f"strategy.running_sum: {why} (or set strategy.running_sum: false)")


def a_bfloat16_stack_is_fused_in_float32(cfg: "ExperimentConfig") -> None:
    """strategy.stack_dtype: bfloat16 keeps the replies in bfloat16; only a rule that reads them a column
    block at a time in float32, over a channel that hands the stack on as it is, fuses them as exactly."""
    strategy, why = cfg.strategy, None
    if strategy.stack_dtype == "float32":
        return
    if not _rule(cfg).bfloat16_stack:
        staged = sorted(n for n in strategy.registry().names() if strategy.registry().get(n).bfloat16_stack)
        why = f"strategy {strategy.name!r} computes on whole rows; a bfloat16 stack serves {', '.join(staged)}"
    elif not cfg.channel.registry().get(cfg.channel.kind).lossless:
        why = f"channel {cfg.channel.kind!r} computes on the stack as it is given; use channel.kind: ideal"
    elif strategy.dp_clip_norm is not None:
        why = "DP clips whole rows to a norm; set strategy.dp_clip_norm: null"
    elif strategy.running_sum:
        why = "strategy.running_sum holds no stack; drop one of the two"
    elif cfg.peft.fuse_lora_as != "factors":
        why = f"peft.fuse_lora_as {cfg.peft.fuse_lora_as!r} multiplies the rows' factors; use fuse_lora_as: factors"
    elif cfg.peft.heterogeneous:
        why = f"peft.ranks {cfg.peft.ranks}: payloads of other ranks are padded apart from the stack; use one rank"
    if why:
        raise ValueError(f"strategy.stack_dtype 'bfloat16': {why} (or set strategy.stack_dtype: float32)")


RULES: list[Callable[["ExperimentConfig"], None]] = [
    rl_goes_with_the_rl_trainer, dp_is_for_averaging, amplification_needs_poisson_sampling, only_local_only_sends_nothing, frozen_layers_where_needed,
    personalisation_keeps_a_local_part, statistics_in_the_fused_space, both_halves_of_an_algorithm, a_summed_uplink_needs_averaging,
    heterogeneous_ranks_meet_in_one_space, a_quantized_base_stays_frozen, a_running_sum_needs_a_summable_round,
    a_bfloat16_stack_is_fused_in_float32,
]


def check(cfg: "ExperimentConfig") -> None:
    for rule in RULES:
        rule(cfg)
