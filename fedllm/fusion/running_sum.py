"""A round's fused delta built as the replies arrive, so the server never holds the round's stack.

For a rule whose fusion is a (weighted) sum (``FusionRule.running_sum``: FedAvg's example-weighted
mean, task arithmetic's sum) over a channel that delivers every payload as sent, the server adds each
checked reply into one accumulator and frees it: memory is one accumulator however many clients
reply, instead of one row per client. The accumulator is float64: float32 payloads (and their
products with whole example counts) add up in it with rounding far below float32's, so the result,
rounded to float32 at the end, does not depend on the order the replies arrived in (the stacked
path sorts replies by client for the same reason) and agrees with the stacked rule to float32
rounding.
"""

from __future__ import annotations

from typing import Literal

import torch


class RunningSum:
    """Sum of ``weight x payload`` over the replies added so far, with the weights' total."""

    def __init__(self, numel: int, kind: Literal["mean", "sum"]) -> None:
        if kind not in ("mean", "sum"):
            raise ValueError(f"a running sum is a 'mean' or a 'sum', not {kind!r}")
        self.kind = kind
        self.total = torch.zeros(numel, dtype=torch.float64)
        self.weight_total = 0.0
        self.count = 0

    def weight(self, num_examples: int) -> float:
        """A reply's weight: its example count in a mean, 1 in a plain sum."""
        return float(num_examples) if self.kind == "mean" else 1.0

    def add_piece(self, offset: int, values: torch.Tensor, num_examples: int) -> None:
        """Add one tensor of a reply at ``offset`` of the flat layout; call :meth:`count_reply` once the
        reply's every piece is in (a reply is checked whole before any piece is added)."""
        piece = self.total[offset:offset + values.numel()]
        piece.add_(values.reshape(-1).to(torch.float64), alpha=self.weight(num_examples))

    def count_reply(self, num_examples: int) -> None:
        self.weight_total += self.weight(num_examples)
        self.count += 1

    def result(self) -> torch.Tensor:
        """The fused delta in float32: the weighted mean or the sum of every reply added."""
        if self.count == 0:
            raise ValueError("fusion needs at least one client delta")
        if self.kind == "mean":
            return (self.total / self.weight_total).to(torch.float32)
        return self.total.to(torch.float32)
