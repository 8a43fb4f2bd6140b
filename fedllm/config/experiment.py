"""The whole experiment config: its sections, the cross-section rules, its JSON form and hash."""

from __future__ import annotations

import hashlib
import json

from pydantic import Field, PositiveInt, model_validator

from fedllm.config import rules
from fedllm.config.sections import (
    DEFAULT_GLOBAL_PATTERNS,
    ChannelSection,
    ClientSection,
    DataSection,
    EvalSection,
    ModelSection,
    OutputSection,
    PeftSection,
    RLSection,
    StrategySection,
    _Section,
)


class ExperimentConfig(_Section):
    """Everything a run needs, validated before any training; it travels to clients as JSON,
    so an edge device needs no YAML file of its own."""

    model: ModelSection = Field(default_factory=ModelSection)
    peft: PeftSection = Field(default_factory=PeftSection)
    data: DataSection = Field(default_factory=DataSection)
    client: ClientSection = Field(default_factory=ClientSection)
    strategy: StrategySection = Field(default_factory=StrategySection)
    channel: ChannelSection = Field(default_factory=ChannelSection)
    rounds: PositiveInt = 3
    eval: EvalSection = Field(default_factory=EvalSection)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    output: OutputSection = Field(default_factory=OutputSection)
    rl: RLSection | None = Field(None, description="RL instruction tuning (PFIT); needs client.trainer: rl")

    @model_validator(mode="after")
    def _cross_section_rules(self) -> "ExperimentConfig":
        rules.check(self)
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def digest(self) -> str:
        """Short hash of what decides a run's results: same config, same hash. Tracking is a view
        of the results, so it is left out, as are an unset ``rl`` and the default
        ``peft.fuse_lora_as`` (runs made before those keys existed keep their hash, so their cached
        results stay found); so do the widened defaults of ``peft.adapter_targets`` and
        ``peft.global_patterns`` (for BERT they select exactly what the old ones did)."""
        data = self.model_dump(mode="json")
        data["output"].pop("tracking", None)
        if data.get("rl") is None:
            data.pop("rl", None)
        if data["peft"].get("fuse_lora_as") == "factors":  # the default, as before the key existed
            data["peft"].pop("fuse_lora_as")
        for key, default in (("sampling", "fixed"), ("dp_target_epsilon", None), ("running_sum", False), ("stack_dtype", "float32"),  # added later
                             ("optimizer", {"name": "none"})):
            if data["strategy"].get(key) == default:
                data["strategy"].pop(key)
        for section, key, default in (("peft", "freeze_lora_a", False), ("peft", "ranks", None),  # added later
                                      ("model", "precision", "float32"), ("model", "quantization", "none"),
                                      ("model", "pooling", "auto"),
                                      ("eval", "initial", True), ("client", "optimizer", "adamw")):
            if data[section].get(key) == default:
                data[section].pop(key)
        # defaults widened for decoder models hash as the defaults they replace did, for the same runs
        if data["peft"]["adapter_targets"] is None:
            data["peft"]["adapter_targets"] = ["output.dense"]
        if data["peft"]["global_patterns"] == list(DEFAULT_GLOBAL_PATTERNS):
            data["peft"]["global_patterns"] = ["lora_", "adapter_", "classifier"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    def run_name(self) -> str:
        return self.output.name or f"{self.strategy.name}-{self.channel.kind}"
