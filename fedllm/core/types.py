"""The data types every layer shares: labelled examples, instructions, a checked client update."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Examples:
    """Labelled texts as parallel lists: text, joint label id, task index."""

    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    tasks: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> "Examples":
        return Examples([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                        [self.tasks[i] for i in indices])


@dataclass(frozen=True)
class Instruction:
    """One prompt of instruction tuning."""

    prompt: str  # the full prompt text the policy continues
    reference: str  # the reference answer (content words)
    responses: tuple[str, ...] = ()  # demonstration responses for supervised tuning (all styles)
    question: str = ""  # the bare instruction, for a chat model's template ("": the prompt is final)


def client_identity(facts: Mapping[str, Any], node_id: int) -> str:
    """A client's run-stable name: "p<partition>" when it reports its data partition, else "n<node id>"
    (a device without one; node ids are drawn per run)."""
    partition = facts.get("partition")
    return f"p{int(partition)}" if partition is not None else f"n{node_id}"


@dataclass
class ClientUpdate:
    """One client's checked reply: its flat delta in the server's layout, example count, metrics."""

    node_id: int
    delta: torch.Tensor | None  # flat, in the server's layout (None: added into the round's running sum)
    num_examples: int
    metrics: dict[str, float]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # flat statistics a fusion rule asked for
    rank: int | None = None  # its LoRA rank when below the global one: ``delta`` is in that rank's layout

    @property
    def client_id(self) -> str:
        """A name stable across runs: the data partition when known (node ids are drawn per run)."""
        return client_identity(self.metrics, self.node_id)
