"""The trainer interface shared by supervised PEFT and (later) RL trainers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from fedllm.registry import Registry

if TYPE_CHECKING:
    from fedllm.config import ClientSection
    from fedllm.data import Examples
    from fedllm.models import ModelBundle


@dataclass
class TrainContext:
    section: "ClientSection"
    label_ranges: list[tuple[int, int]]
    max_length: int
    seed: int


@dataclass
class TrainResult:
    loss: float  # mean training loss over the steps taken
    steps: int
    examples_seen: int


class Trainer(Protocol):
    def __call__(self, bundle: "ModelBundle", examples: "Examples", ctx: TrainContext) -> TrainResult: ...


TRAINERS: Registry[Trainer] = Registry("client trainer")
