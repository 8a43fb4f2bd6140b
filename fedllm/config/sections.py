"""The sections of an experiment config: one pydantic model per YAML section.

Each section validates its own keys (unknown keys are errors, values are typed and bounded);
rules that involve several sections live in :mod:`fedllm.config.rules`. A section that picks a
registry entry by name (``strategy``, ``channel``, ``client.trainer``) is a :class:`NamedSection`:
the name plus that entry's own parameters, validated against the entry's ``Params`` model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from fedllm.core.faults import FaultSpec
from fedllm.core.optional import check_installed
from fedllm.core.registry import Registry

# the classification head is `classifier` in encoders (BERT) and `score` in decoders (Llama, GPT-2)
DEFAULT_GLOBAL_PATTERNS = ("lora_", "adapter_", "classifier", "score")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NamedSection(BaseModel):
    """A registry entry by name plus that entry's own parameters: every key the section does not
    declare itself is a parameter of the chosen entry, validated by the entry's ``Params``."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name_key: ClassVar[str]  # the field that names the entry: "name", "kind", "trainer"
    section: ClassVar[str]  # where it sits in the YAML, for messages

    @staticmethod
    def registry() -> Registry:
        raise NotImplementedError

    @field_validator("name", "kind", "trainer", mode="after", check_fields=False)
    @classmethod
    def _registered(cls, value: str, info) -> str:
        if info.field_name == cls.name_key:
            cls.registry().get(value)  # unknown names: the message lists the allowed ones
        return value

    @model_validator(mode="after")
    def _entry_params(self) -> "NamedSection":
        name = getattr(self, self.name_key)
        self.registry().validate(name, self.params(), self.section, tuple(type(self).model_fields))
        return self

    def params(self) -> dict[str, Any]:
        """The chosen entry's own parameters (the keys this section does not declare)."""
        return dict(self.model_extra or {})


class ModelSection(_Section):
    name: str = Field("minilm", description="'minilm' (embedded), 'tiny-bert', a HF id or a local path")
    max_length: PositiveInt = 64
    # linear: a trained classification layer; label_embedding: a frozen head of label-name
    # embeddings (cosine / temperature), see fedllm/workloads/classification/heads.py.
    head: Literal["linear", "label_embedding"] = "linear"
    label_template: str = "{label}"
    temperature: PositiveFloat = 0.05
    # how the label-embedding head pools a sentence's token states: mean (encoders), last (the last
    # non-pad token: a decoder's only state that has read the whole sentence), auto: last for
    # decoder-only models (Llama, GPT-2, ...), mean otherwise
    pooling: Literal["auto", "mean", "last"] = "auto"
    # float32, or mixed precision for forward passes (bf16 runs on CPU and GPU; fp16 needs CUDA);
    # fedllm/core/accelerator.py. Sent deltas are float32 either way.
    precision: Literal["float32", "bf16", "fp16"] = "float32"
    # a k-bit base (QLoRA): 4bit NF4 or 8bit LLM.int8 via bitsandbytes, CUDA only, LoRA only
    quantization: Literal["none", "4bit", "8bit"] = "none"


class PeftSection(_Section):
    # lora: LoRA on target_modules (+ head); full: every weight trains; none: the base is frozen
    # and only the head and the adapters (if adapter_size is set) train.
    method: Literal["lora", "full", "none"] = "lora"
    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"])
    adapter_size: PositiveInt | None = Field(None, description="bottleneck width of Houlsby adapters; None: no adapters")
    # Linear layers the adapters wrap; None: the architecture's attention-output and feed-forward-output
    # projections (Houlsby's placement; fedllm/workloads/adapters.py knows BERT and Llama-family names).
    adapter_targets: list[str] | None = None
    # Parameter groups by name pattern (substring, or glob if it has * ? [): trainable
    # tensors matching `global_patterns` are sent and aggregated, those matching
    # `local_patterns` stay on the client; every other tensor is frozen.
    global_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_GLOBAL_PATTERNS))
    local_patterns: list[str] = Field(default_factory=list)
    # Tensors that never train, hence are never sent (R-MTLLMF freezes the embeddings: "embeddings").
    frozen_patterns: list[str] = Field(default_factory=list)
    # How the server fuses LoRA updates: `factors` fuses A and B as tensors (FedIT); `weight_delta`
    # fuses each client's scaling * B @ A and folds it into the base weights (what task arithmetic,
    # TIES and DARE are defined on); clients still send only the factors (fedllm/fusion/lora_products.py).
    # `svd` (FlexLoRA, Bai et al. 2024) fuses the clients' whole products B @ A and re-factorises the
    # result by SVD into the global factors, whose first r_k components are each client's best rank-r_k
    # share of it; the base weights never change and only factors go down.
    fuse_lora_as: Literal["factors", "weight_delta", "svd"] = "factors"
    # Heterogeneous LoRA ranks: partition i trains at rank ranks[i % len(ranks)] (<= r, the global rank);
    # a SuperNode's node-config `lora-rank` overrides it. How they meet: fuse_lora_as `factors` zero-pads
    # the factors (HetLoRA), `weight_delta` sums the products exactly (FLoRA's stacking), `svd` (FlexLoRA).
    ranks: list[PositiveInt] | None = None
    # FFA-LoRA (Sun et al. 2024): LoRA's A stays at its (seeded, shared) random initial value and only B
    # trains and is sent: half the uplink, and averaging the B's averages the updates B @ A exactly.
    freeze_lora_a: bool = False

    @model_validator(mode="after")
    def _weight_delta_needs_lora(self) -> "PeftSection":
        if self.fuse_lora_as != "factors" and self.method != "lora":
            raise ValueError(f"peft.fuse_lora_as {self.fuse_lora_as!r} merges LoRA factors; peft.method is "
                             f"{self.method!r} (use method: lora, or drop fuse_lora_as)")
        if self.fuse_lora_as == "svd" and self.freeze_lora_a:
            raise ValueError("peft.fuse_lora_as 'svd' (FlexLoRA) sends new A and B down every round; "
                             "peft.freeze_lora_a keeps A fixed: use fuse_lora_as: weight_delta with it")
        if self.ranks is not None:
            if self.method != "lora":
                raise ValueError(f"peft.ranks are LoRA ranks; peft.method is {self.method!r} (use method: lora)")
            if not self.ranks:
                raise ValueError("peft.ranks is empty: give one rank per device class (e.g. [2, 4, 8]) or drop it")
            if max(self.ranks) > self.r:
                raise ValueError(f"peft.ranks {self.ranks} has a rank above the global rank peft.r={self.r}: the "
                                 f"server keeps the largest; set peft.r: {max(self.ranks)}")
        return self

    @property
    def heterogeneous(self) -> bool:
        """True when clients may train LoRA at different ranks (from the config; node configs may add more)."""
        return bool(self.ranks) and set(self.ranks) != {self.r}


class TaskSpec(_Section):
    """One classification task: embedded (by name), a local JSONL/CSV file or folder, or a HF dataset."""

    name: str
    source: Literal["embedded", "local", "hf"] = "embedded"
    path: str | None = Field(None, description="local file/folder, or HF dataset name")
    text_field: str = "text"
    label_field: str = "label"

    @model_validator(mode="after")
    def _path_needed(self) -> "TaskSpec":
        if self.source in ("local", "hf") and not self.path:
            raise ValueError(f"task {self.name!r}: source {self.source!r} needs a 'path'")
        if self.source == "embedded":
            from fedllm.core.embedded_tasks import EMBEDDED_TASKS

            if self.name not in EMBEDDED_TASKS:
                raise ValueError(
                    f"unknown embedded task {self.name!r}; allowed: {', '.join(sorted(EMBEDDED_TASKS))}"
                    " (or give source: local/hf with a path)"
                )
        return self


class DataSection(_Section):
    tasks: list[TaskSpec] = Field(default_factory=lambda: [TaskSpec(name="sentiment")], min_length=1)
    partition: Literal["iid", "dirichlet", "task"] = "iid"
    alpha: PositiveFloat = 0.5
    max_train_per_task: PositiveInt | None = 2000
    max_test_per_task: PositiveInt | None = 400
    # Held out of each task's train split for server-side choices (lambda search, realignment);
    # at most a fifth of the train split.
    validation_per_task: NonNegativeInt = 100
    num_clients: PositiveInt | None = Field(
        None, description="clients to split the data into; default: the federation's num-supernodes"
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _names_to_specs(cls, value: Any) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


class ClientSection(NamedSection):
    """``trainer`` picks the local trainer (``fedllm.clients``); the keys below are every trainer's."""

    name_key = "trainer"
    section = "client"
    trainer: str = "supervised"
    lr: PositiveFloat = 5e-4
    # The local optimiser: AdamW (what LoRA fine-tuning uses), or plain SGD (textbook FedAvg, and the
    # step SCAFFOLD's correction and control-variate update assume).
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0.0)
    local_epochs: PositiveInt = 1
    batch_size: PositiveInt = 16
    max_steps: PositiveInt | None = 20
    # Proximal weight mu: adds mu/2 ||w - w_global||^2 over the global group (FedProx; PFTT's
    # personalised loss). 0 turns it off.
    prox_mu: float = Field(0.0, ge=0.0)
    # Injected misbehaviour (see fedllm/core/faults.py): [{kind: sign_flip, fraction: 0.2, scale: 1}, ...]
    faults: list[FaultSpec] = Field(default_factory=list)

    @staticmethod
    def registry() -> Registry:
        from fedllm.clients import TRAINERS

        return TRAINERS


class OptimizerSection(NamedSection):
    """``name`` picks the server optimiser (``fedllm.strategies.optimizers``); other keys are its parameters."""

    name_key = "name"
    section = "strategy.optimizer"
    name: str = "none"

    @staticmethod
    def registry() -> Registry:
        from fedllm.strategies.optimizers import SERVER_OPTIMIZERS

        return SERVER_OPTIMIZERS


class StrategySection(NamedSection):
    """``name`` picks the fusion rule (``fedllm.strategies``); the keys below are every rule's."""

    name_key = "name"
    section = "strategy"
    name: str = "fedavg"
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    # The server optimiser that steps on the fused delta (fedavgm, fedadagrad, fedadam, fedyogi; none: FedAvg's)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    # fixed: round(fraction_train x N) clients a round; poisson: each with probability fraction_train
    # (what DP's sub-sampling amplification assumes); see fedllm/apps/sampling.py
    sampling: Literal["fixed", "poisson"] = "fixed"
    min_clients: PositiveInt = 1
    # Scale of the fused delta: global += server_lr * fused (lambda of task arithmetic); "auto"
    # picks the value of lr_grid with the best validation accuracy, each round (a 0 in the grid
    # lets the server keep its model when every scale of the fused update hurts, e.g. under jamming).
    server_lr: PositiveFloat | Literal["auto"] = 1.0
    lr_grid: list[NonNegativeFloat] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 11)], min_length=1)
    round_timeout: PositiveFloat | None = Field(600.0, description="seconds to wait for replies")
    # A reply whose delta norm exceeds this multiple of the round's median norm is rejected
    # (None: no check). Needs 3+ replies, so a median means something.
    reject_norm_ratio: PositiveFloat | None = 100.0
    # Add each reply into one running sum as it arrives instead of holding the round's (clients x values)
    # stack (fedllm/fusion/running_sum.py): server memory one payload's, not one per client. For rules
    # whose fusion is a sum (fedavg, personalized, task_arithmetic, rmtllmf) over a channel that takes each
    # payload on its own (ideal, awgn, fading, erasure, quantize: each reply crosses it as it arrives, with
    # noise from its client's own stream, so not the stacked round's draw), without norm-outlier rejection
    # (it compares every reply's norm before any is fused).
    running_sum: bool = False
    # The round's reply stack in bfloat16 (half the memory of float32) for rules that fuse it a column
    # block at a time in float32 (fedavg, personalized, task_arithmetic, rmtllmf, median, trimmed_mean)
    # over the ideal channel: each fused value within 2^-8 (bfloat16's rounding) of the float32 one,
    # relative to the values it is made of (tests/test_bfloat16_stack.py).
    stack_dtype: Literal["float32", "bfloat16"] = "float32"
    # Central differential privacy (DP-FedAvg, fedllm/fusion/privacy.py): clip each update to
    # dp_clip_norm, average uniformly, add Gaussian noise of dp_noise_multiplier x clip / n;
    # the epsilon spent at dp_delta is logged every round. None: off.
    dp_clip_norm: PositiveFloat | None = None
    dp_noise_multiplier: float = Field(1.0, ge=0.0)
    dp_delta: float = Field(1e-5, gt=0.0, lt=1.0)
    # Stop the run (cleanly, checkpoint kept) before a round that would spend more than this epsilon.
    dp_target_epsilon: PositiveFloat | None = None

    @staticmethod
    def registry() -> Registry:
        from fedllm.strategies import FUSION_RULES

        return FUSION_RULES


class ChannelSection(NamedSection):
    """``kind`` picks the channel (``fedllm.channels``); every other key is that channel's parameter."""

    name_key = "kind"
    section = "channel"
    kind: str = "ideal"

    @staticmethod
    def registry() -> Registry:
        from fedllm.channels import CHANNELS

        return CHANNELS


DEFAULT_REWARDS = {
    "correct": {"kind": "exact_answer"},
    "concise": {"kind": "length", "target": 2},
    "polite": {"kind": "tone"},
    "helpful": {"kind": "similarity"},
}


class RLSection(_Section):
    """RL instruction tuning (PFIT): prompts, named rewards, each client's preference over them."""

    prompts: str = Field("embedded", description="'embedded' (the tiny policy's set), 'embedded_chat' (natural "
                         "questions for a chat LLM) or a folder with Alpaca-style train/test.jsonl")
    max_train_prompts: PositiveInt | None = None
    max_test_prompts: PositiveInt = 24
    # name -> {kind: <reward kind>, ...its parameters}; see clients/rewards.py
    rewards: dict[str, dict[str, Any]] = Field(default_factory=lambda: dict(DEFAULT_REWARDS))
    # One mix per client (partition p uses preferences[p % len]); weights over reward names.
    preferences: list[dict[str, float]] = Field(
        default_factory=lambda: [{"correct": 1.0, "concise": 1.0}, {"correct": 1.0, "polite": 1.0}])
    # Instead: draw each client's weights over all rewards from a seeded Dirichlet(alpha).
    preference_alpha: PositiveFloat | None = None
    num_generations: int = Field(4, ge=2, description="completions per prompt (GRPO group size)")
    max_new_tokens: PositiveInt = 20
    temperature: PositiveFloat = 1.0
    beta: float = Field(0.04, ge=0.0, description="weight of the KL penalty to the reference policy")
    # Supervised instruction tuning that makes the embedded tiny policy (once, cached on disk).
    sft_steps: int = Field(600, ge=0)
    sft_lr: PositiveFloat = 3e-3

    @model_validator(mode="after")
    def _rewards_and_preferences(self) -> "RLSection":
        from fedllm.clients.rewards import validate_reward

        for name, spec in self.rewards.items():
            validate_reward(name, spec)
        for i, pref in enumerate(self.preferences):
            unknown = sorted(set(pref) - set(self.rewards))
            if unknown:
                raise ValueError(f"rl.preferences.{i}: unknown reward(s) {unknown}; defined in rl.rewards: "
                                 f"{sorted(self.rewards)}")
            if not pref or any(w < 0 for w in pref.values()) or sum(pref.values()) <= 0:
                raise ValueError(f"rl.preferences.{i}: give non-negative weights with a positive sum, e.g. "
                                 "{correct: 1.0, concise: 0.5}")
        if not self.preferences and self.preference_alpha is None:
            raise ValueError("rl.preferences: give at least one preference (or rl.preference_alpha)")
        return self


class EvalSection(_Section):
    every: PositiveInt = 1
    batch_size: PositiveInt = 64
    centralized: bool = True
    # Score the model before training (round 0). Off: the run starts training one evaluation sooner
    # (MiniLM, 400 test texts: about 3 s on 2 cores), and round 0 records no score.
    initial: bool = True
    # Multi-task fusion metrics (one task per client): each client's individual model is
    # evaluated from its clean delta, giving normalised accuracy and the WD error.
    fusion_metrics: bool = False
    # Federated evaluation: every client evaluates the global group plus its own local group on
    # its own test partition (personalised accuracy: mean and worst client).
    federated: bool = False


class OutputSection(_Section):
    dir: str = "results"
    name: str | None = None
    # Also log every round to TensorBoard or MLflow (when installed); see fedllm/results/tracking.py.
    tracking: Literal["none", "tensorboard", "mlflow"] = "none"

    @field_validator("tracking")
    @classmethod
    def _installed(cls, value: str) -> str:
        check_installed(value)
        return value


