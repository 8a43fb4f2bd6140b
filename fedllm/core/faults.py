"""Misbehaving clients, for robustness experiments and the server's fault tests.

A ``faults:`` entry in the YAML makes the listed partitions (or a seeded ``fraction`` of them)
corrupt their reply after honest training:

- Byzantine updates that pass the server's format checks: ``sign_flip`` (-scale x delta),
  ``scale`` (scale x delta), ``random`` (Gaussian noise of the honest delta's norm x scale);
- broken payloads the server must reject: ``nan``, ``wrong_shape``, ``wrong_names``, ``huge_norm``;
- failures: ``crash`` (the ClientApp raises), ``no_examples`` (reports zero examples) and ``slow``
  (replies after ``delay`` seconds, e.g. past ``strategy.round_timeout``, like a device on a bad link).
"""

from __future__ import annotations

import random
import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

FaultKind = Literal["sign_flip", "scale", "random", "nan", "wrong_shape", "wrong_names", "huge_norm", "crash",
                    "no_examples", "slow"]


class FaultSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: FaultKind
    clients: list[int] = Field(default_factory=list, description="partition ids that misbehave")
    fraction: float = Field(0.0, ge=0.0, le=1.0, description="or this fraction of partitions, drawn with the seed")
    scale: PositiveFloat = 1.0
    delay: float = Field(0.0, ge=0.0, description="seconds a 'slow' client waits before replying")

    @model_validator(mode="after")
    def _who(self) -> "FaultSpec":
        if self.kind == "slow" and self.delay <= 0:
            raise ValueError("fault 'slow': give 'delay' (seconds > 0) to wait before replying")
        if not self.clients and self.fraction == 0.0:
            raise ValueError(f"fault {self.kind!r}: give 'clients' (partition ids) or a 'fraction' > 0")
        return self

    def hits(self, partition_id: int, num_partitions: int, seed: int) -> bool:
        if partition_id in self.clients:
            return True
        if self.fraction > 0 and num_partitions > 0:
            count = round(self.fraction * num_partitions)
            chosen = random.Random(f"faults-{self.kind}-{seed}").sample(range(num_partitions), count)
            return partition_id in chosen
        return False


class ClientCrash(RuntimeError):
    """Raised by a client configured with the ``crash`` fault."""


def apply_fault(spec: FaultSpec, delta: dict[str, torch.Tensor], metrics: dict, seed: int) -> dict[str, torch.Tensor]:
    """The corrupted reply tensors (``metrics`` is changed in place for ``no_examples``)."""
    if spec.kind == "crash":
        raise ClientCrash("injected fault: client crashed during training")
    if spec.kind == "slow":
        time.sleep(spec.delay)
        return delta
    if spec.kind == "no_examples":
        metrics["num-examples"] = 0
        return delta
    names = list(delta)
    if spec.kind == "sign_flip":
        return {n: -spec.scale * t for n, t in delta.items()}
    if spec.kind == "scale":
        return {n: spec.scale * t for n, t in delta.items()}
    if spec.kind == "huge_norm":
        return {n: 1e6 * t + 1e3 for n, t in delta.items()}
    if spec.kind == "random":
        g = torch.Generator().manual_seed(seed)
        norm = torch.sqrt(sum(t.pow(2).sum() for t in delta.values()))
        noise = {n: torch.randn(t.shape, generator=g) for n, t in delta.items()}
        noise_norm = torch.sqrt(sum(t.pow(2).sum() for t in noise.values())).clamp_min(1e-12)
        return {n: t * (spec.scale * norm / noise_norm) for n, t in noise.items()}
    out = dict(delta)
    if spec.kind == "nan":
        out[names[0]] = out[names[0]].clone().reshape(-1)
        out[names[0]][0] = float("nan")
        out[names[0]] = out[names[0]].reshape(delta[names[0]].shape)
    elif spec.kind == "wrong_shape":
        out[names[0]] = torch.zeros(delta[names[0]].numel() + 1)
    elif spec.kind == "wrong_names":
        out["not.a.parameter"] = out.pop(names[0])
    return out
