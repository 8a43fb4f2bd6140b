"""One typed experiment config, loaded from YAML plus ``key=value`` overrides.

Everything a run needs is in :class:`ExperimentConfig`, validated before any training:
unknown keys, wrong types, impossible values and unknown registry names all stop the run
with :class:`ConfigError`, whose message names the key and what is allowed. The resolved
config travels to clients as JSON, so an edge device needs no YAML file of its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    NonNegativeFloat,
    NonNegativeInt,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config problem, phrased for the user: which key, what is wrong, what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = Field("minilm", description="'minilm' (embedded), 'tiny-bert', a HF id or a local path")
    max_length: PositiveInt = 64
    # linear: a trained classification layer; label_embedding: a frozen head of label-name
    # embeddings (cosine / temperature), see fedllm/heads.py.
    head: Literal["linear", "label_embedding"] = "linear"
    label_template: str = "{label}"
    temperature: PositiveFloat = 0.05


class PeftSection(_Section):
    # lora: LoRA on target_modules (+ head); full: every weight trains; none: the base is frozen
    # and only the head and the adapters (if adapter_size is set) train.
    method: Literal["lora", "full", "none"] = "lora"
    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"])
    adapter_size: PositiveInt | None = Field(None, description="bottleneck width of Houlsby adapters; None: no adapters")
    adapter_targets: list[str] = Field(default_factory=lambda: ["output.dense"])
    # Parameter groups by name pattern (substring, or glob if it has * ? [): trainable
    # tensors matching `global_patterns` are sent and aggregated, those matching
    # `local_patterns` stay on the client; every other tensor is frozen.
    global_patterns: list[str] = Field(default_factory=lambda: ["lora_", "adapter_", "classifier"])
    local_patterns: list[str] = Field(default_factory=list)
    # Tensors that never train, hence are never sent (R-MTLLMF freezes the embeddings: "embeddings").
    frozen_patterns: list[str] = Field(default_factory=list)
    # How the server fuses LoRA updates: `factors` fuses A and B as tensors (FedIT); `weight_delta`
    # fuses each client's scaling * B @ A and folds it into the base weights (what task arithmetic,
    # TIES and DARE are defined on); clients still send only the factors (fedllm/lora_products.py).
    fuse_lora_as: Literal["factors", "weight_delta"] = "factors"

    @model_validator(mode="after")
    def _weight_delta_needs_lora(self) -> "PeftSection":
        if self.fuse_lora_as == "weight_delta" and self.method != "lora":
            raise ValueError(f"peft.fuse_lora_as 'weight_delta' merges LoRA factors; peft.method is {self.method!r} "
                             "(use method: lora, or drop fuse_lora_as)")
        return self


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
            from fedllm.embedded_tasks import EMBEDDED_TASKS

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


class ClientSection(_Section):
    trainer: str = "supervised"
    lr: PositiveFloat = 5e-4
    weight_decay: float = Field(0.0, ge=0.0)
    local_epochs: PositiveInt = 1
    batch_size: PositiveInt = 16
    max_steps: PositiveInt | None = 20
    # Proximal weight mu: adds mu/2 ||w - w_global||^2 over the global group (FedProx; PFTT's
    # personalised loss). 0 turns it off.
    prox_mu: float = Field(0.0, ge=0.0)
    # Injected misbehaviour (see fedllm/faults.py): [{kind: sign_flip, fraction: 0.2, scale: 1}, ...]
    faults: list["FaultSpec"] = Field(default_factory=list)

    @field_validator("trainer")
    @classmethod
    def _known_trainer(cls, value: str) -> str:
        from clients import TRAINERS

        TRAINERS.get(value)
        return value


from fedllm.faults import FaultSpec  # noqa: E402  (pure pydantic; no import cycle)

ClientSection.model_rebuild()


class StrategySection(BaseModel):
    """``name`` picks the fusion rule; keys other than the common ones are that rule's parameters."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "fedavg"
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
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
    # Central differential privacy (DP-FedAvg, fedllm/privacy.py): clip each update to
    # dp_clip_norm, average uniformly, add Gaussian noise of dp_noise_multiplier x clip / n;
    # the epsilon spent at dp_delta is logged every round. None: off.
    dp_clip_norm: PositiveFloat | None = None
    dp_noise_multiplier: float = Field(1.0, ge=0.0)
    dp_delta: float = Field(1e-5, gt=0.0, lt=1.0)

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        from strategies import FUSION_RULES

        FUSION_RULES.get(value)
        return value

    @model_validator(mode="after")
    def _known_rule(self) -> "StrategySection":
        from strategies import validate_rule_params

        validate_rule_params(self.name, self.params())
        return self

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ChannelSection(BaseModel):
    """``kind`` picks the channel; every other key is that channel's own parameter."""

    model_config = ConfigDict(extra="allow")
    kind: str = "ideal"

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from channels import CHANNELS

        CHANNELS.get(value)
        return value

    @model_validator(mode="after")
    def _known_channel(self) -> "ChannelSection":
        from channels.base import validate_channel_params

        validate_channel_params(self.kind, self.params())
        return self

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


DEFAULT_REWARDS = {
    "correct": {"kind": "exact_answer"},
    "concise": {"kind": "length", "target": 2},
    "polite": {"kind": "tone"},
    "helpful": {"kind": "similarity"},
}


class RLSection(_Section):
    """RL instruction tuning (PFIT): prompts, named rewards, each client's preference over them."""

    prompts: str = Field("embedded", description="'embedded' or a folder with Alpaca-style train/test.jsonl")
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
        from clients.rewards import validate_reward

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
    # Multi-task fusion metrics (one task per client): each client's individual model is
    # evaluated from its clean delta, giving normalised accuracy and the WD error.
    fusion_metrics: bool = False
    # Federated evaluation: every client evaluates the global group plus its own local group on
    # its own test partition (personalised accuracy: mean and worst client).
    federated: bool = False


class OutputSection(_Section):
    dir: str = "results"
    name: str | None = None
    # Also log every round to TensorBoard or MLflow (when installed); see fedllm/tracking.py.
    tracking: Literal["none", "tensorboard", "mlflow"] = "none"

    @field_validator("tracking")
    @classmethod
    def _installed(cls, value: str) -> str:
        from fedllm.tracking import check_installed

        check_installed(value)
        return value


class ExperimentConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    peft: PeftSection = Field(default_factory=PeftSection)
    data: DataSection = Field(default_factory=DataSection)
    client: ClientSection = Field(default_factory=ClientSection)
    strategy: StrategySection = Field(default_factory=StrategySection)
    channel: ChannelSection = Field(default_factory=ChannelSection)
    rounds: PositiveInt = 3
    eval: EvalSection = Field(default_factory=EvalSection)
    seed: int = 0
    output: OutputSection = Field(default_factory=OutputSection)
    rl: RLSection | None = Field(None, description="RL instruction tuning (PFIT); needs client.trainer: rl")

    @model_validator(mode="after")
    def _rl_goes_with_the_rl_trainer(self) -> "ExperimentConfig":
        if (self.rl is not None) != (self.client.trainer == "rl"):
            raise ValueError("client.trainer 'rl' and an 'rl:' section go together (RL instruction tuning of a "
                             "causal language model); set both or neither")
        if self.rl is not None and (self.strategy.name == "rmtllmf" or self.eval.fusion_metrics):
            raise ValueError("RL instruction tuning has no labelled tasks: strategy 'rmtllmf' and eval.fusion_metrics "
                             "do not apply; use fedavg, personalized or local_only")
        if self.rl is not None and self.client.batch_size % self.rl.num_generations:
            raise ValueError(f"client.batch_size {self.client.batch_size} must be a multiple of rl.num_generations "
                             f"{self.rl.num_generations} (each step scores whole groups of completions)")
        if self.rl is not None and self.strategy.server_lr == "auto":
            raise ValueError("strategy.server_lr 'auto' picks a scale by validation accuracy, which RL instruction "
                             "tuning has not; give a number")
        return self

    @model_validator(mode="after")
    def _dp_is_for_averaging(self) -> "ExperimentConfig":
        if self.strategy.dp_clip_norm is not None and self.strategy.name not in ("fedavg", "personalized"):
            raise ValueError(f"strategy.dp_clip_norm (DP-FedAvg) replaces the fusion by a clipped noisy mean, so it "
                             f"only goes with fedavg or personalized, not {self.strategy.name!r}")
        return self

    @model_validator(mode="after")
    def _local_only_sends_nothing(self) -> "ExperimentConfig":
        if (self.strategy.name == "local_only") != (not self.peft.global_patterns):
            raise ValueError("strategy 'local_only' goes with an empty peft.global_patterns (nothing is sent; "
                             "put the trainable tensors in peft.local_patterns), and only it may send nothing")
        return self

    @model_validator(mode="after")
    def _rmtllmf_freezes_something(self) -> "ExperimentConfig":
        if self.strategy.name == "rmtllmf" and not self.peft.frozen_patterns:
            raise ValueError("strategy 'rmtllmf' fine-tunes with the sensitive layers frozen so they are never sent: "
                             "set peft.frozen_patterns (e.g. [embeddings])")
        return self

    @model_validator(mode="after")
    def _ota_needs_fedavg(self) -> "ExperimentConfig":
        stages = self.channel.params().get("chain", []) if self.channel.kind == "compose" else [{"kind": self.channel.kind}]
        if any(s.get("kind") == "ota" for s in stages) and self.strategy.name != "fedavg":
            raise ValueError(f"channel 'ota' delivers only the weighted sum, which strategy {self.strategy.name!r} "
                             "cannot use; use strategy.name: fedavg or another channel")
        if any(s.get("kind") == "ota" for s in stages) and self.peft.fuse_lora_as == "weight_delta":
            raise ValueError("channel 'ota' delivers only the sum of the LoRA factors, not each client's B @ A: "
                             "peft.fuse_lora_as 'weight_delta' needs another channel (or fuse_lora_as: factors)")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def digest(self) -> str:
        """Short hash of what decides a run's results: same config, same hash. Tracking is a view
        of the results, so it is left out, as are an unset ``rl`` and the default
        ``peft.fuse_lora_as`` (runs made before those keys existed keep their hash, so their cached
        results stay found)."""
        data = self.model_dump(mode="json")
        data["output"].pop("tracking", None)
        if data.get("rl") is None:
            data.pop("rl", None)
        if data["peft"].get("fuse_lora_as") == "factors":  # the default, as before the key existed
            data["peft"].pop("fuse_lora_as")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    def run_name(self) -> str:
        return self.output.name or f"{self.strategy.name}-{self.channel.kind}"


# --------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key{_allowed_keys_hint(e['loc'])}"
        lines.append(f"  {key}: {msg}")
    return "invalid experiment config:\n" + "\n".join(lines)


def _allowed_keys_hint(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        if annotation is TaskSpec or str(part) == "tasks":
            model = TaskSpec
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return ""
    return f"; allowed: {', '.join(model.model_fields)}"


def _split_items(text: str) -> list[str]:
    """Split on whitespace that is outside brackets, braces and quotes (``c=[x, y]`` is one item)."""
    items, current, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch.isspace() and depth == 0:
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(ch)
    if current:
        items.append("".join(current))
    return items


class _Replace(dict):
    """An override whose value is a whole mapping: it replaces the section instead of merging into it."""


def parse_overrides(overrides: str | list[str] | None) -> dict[str, Any]:
    """Parse ``"rounds=5 client.lr=0.001"`` (or a list of such items) into a nested dict.

    Values are read as YAML, so ``5`` is an int and ``[a, b]`` a list; a mapping value
    (``channel={kind: awgn, snr_db: 0}``) replaces the whole section rather than merging into it.
    """
    if not overrides:
        return {}
    items = _split_items(overrides) if isinstance(overrides, str) else list(overrides)
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. client.lr=0.001)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part!r} is not a section")
        node[parts[-1]] = _Replace(value) if isinstance(value, dict) else value
    return nested


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, _Replace):
            merged[key] = dict(value)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(raw: dict[str, Any], overrides: str | list[str] | None = None) -> ExperimentConfig:
    data = _deep_merge(raw, parse_overrides(overrides))
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def dotted_leaves(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"section.key": value}`` (the spelling of overrides and sweeps)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(dotted_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_experiment_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in an experiment file; missing files and YAML errors in one line (file:line:column)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment file not found: {p} (give a path to a YAML file)")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"experiment file {p}{where} is not valid YAML: {what}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"experiment file {p} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None, overrides: str | list[str] | None = None) -> ExperimentConfig:
    """Load an experiment YAML (``None``: all defaults) and apply overrides."""
    return config_from_dict(read_experiment_yaml(path) if path else {}, overrides)


def config_from_json(text: str) -> ExperimentConfig:
    return config_from_dict(json.loads(text))
