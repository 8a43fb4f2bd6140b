"""A round's fused delta built as the replies arrive, so the server never holds the round's stack.

For a rule whose fusion is a (weighted) sum (``FusionRule.running_sum``: FedAvg's example-weighted
mean, task arithmetic's sum) over a channel that delivers every payload as sent, the server adds each
checked reply into one accumulator and frees it: memory is one accumulator however many clients
reply, instead of one row per client. Under DP-FedAvg (fedllm/fusion/privacy.py) each reply is
clipped to the clip norm as it is added (its norm is taken while it is checked), and the private
mean's noise and fixed denominator are applied to the finished sum. The accumulator is float64:
float32 payloads (and their products with whole example counts or clip factors) add up in it with
rounding far below float32's, so the result, rounded to float32 at the end, does not depend on the
order the replies arrived in (the stacked path sorts replies by client for the same reason) and
agrees with the stacked rule to float32 rounding. Over a noisy channel that takes payloads one by one
(AWGN, fading, erasures, quantisation), each reply crosses it through its client's own noise stream,
a segment of packets at a time where the channel acts packet by packet, and is added as it arrives
(fedllm/fusion/per_client_uplink.py); a payload the channel lost is not.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from fedllm.fusion.per_client_uplink import PerClientUplink


class RunningSum:
    """Sum of ``weight x payload`` over the replies added so far, with the weights' total. A reply's
    weight is its example count in a ``"mean"``, 1 in a ``"sum"``, and with ``clip_norm`` (DP, a
    ``"sum"``) the factor that brings its L2 norm down to ``clip_norm``."""

    def __init__(self, numel: int, kind: Literal["mean", "sum"], clip_norm: float | None = None,
                 uplink: "PerClientUplink | None" = None) -> None:
        if kind not in ("mean", "sum"):
            raise ValueError(f"a running sum is a 'mean' or a 'sum', not {kind!r}")
        if clip_norm is not None and kind != "sum":
            raise ValueError("a clipped running sum (DP) is a plain sum of the clipped replies: kind 'sum'")
        self.kind, self.clip_norm = kind, clip_norm
        self.uplink = uplink  # None: the channel delivers every payload as sent, added straight from the reply
        self.total: torch.Tensor | None = torch.zeros(numel, dtype=torch.float64)
        self.weight_total = 0.0
        self.count = 0

    @property
    def needs_norm(self) -> bool:
        """True when a reply's weight depends on its L2 norm (DP clipping)."""
        return self.clip_norm is not None

    def weight(self, num_examples: int, norm: float | None = None) -> float:
        """A reply's weight: its example count in a mean, 1 in a plain sum, its clip factor under DP
        (``clip_rows``' ``min(1, C / max(norm, 1e-12))``)."""
        if self.clip_norm is not None:
            if norm is None:
                raise ValueError("a clipped running sum needs each reply's L2 norm")
            return min(1.0, self.clip_norm / max(norm, 1e-12))
        return float(num_examples) if self.kind == "mean" else 1.0

    def add_piece(self, offset: int, values: torch.Tensor, weight: float) -> None:
        """Add one tensor of a reply, times the reply's :meth:`weight`, at ``offset`` of the flat layout;
        call :meth:`count_reply` once the reply's every piece is in (a reply is checked whole before
        any piece is added)."""
        # float32 into float64 in place: torch casts value by value as it adds (no float64 copy of the
        # tensor, which for MiniLM's word embeddings would be a whole payload's 94 MB)
        self._sum()[offset:offset + values.numel()].add_(values.reshape(-1), alpha=weight)

    def add_received(self, client_id: str, pieces: Iterable[tuple[int, torch.Tensor]], numel: int,
                     num_examples: int) -> None:
        """A whole checked reply (its tensors in layout order, ``pieces``) sent through the round's uplink,
        then added as received; a payload the channel lost is left out, as the stacked round drops its
        row. Under DP the received payload is clipped, as the stacked round clips received rows: its
        norm is known once all of it arrived, so only then is it added (held whole meanwhile)."""
        if self.uplink is None:
            raise ValueError("this running sum has no uplink: add a lossless channel's replies with add_piece")
        if self.needs_norm:
            received = self.uplink.received_whole(client_id, pieces, numel, num_examples)
            if received is None:
                return
            weight = self.weight(num_examples, float(torch.linalg.vector_norm(received)))  # float64 would copy it
            self.add_piece(0, received, weight)
        else:
            weight, arrived = self.weight(num_examples), False
            for offset, values in self.uplink.crossings(client_id, pieces, numel, num_examples):
                self.add_piece(offset, values, weight)  # a segment at a time: added, then the next one crosses
                arrived = True
            if not arrived:
                return
        self.count_reply(weight)

    def count_reply(self, weight: float) -> None:
        self.weight_total += weight
        self.count += 1

    def result(self, block: int = 1 << 20) -> torch.Tensor:
        """The fused delta in float32: the weighted mean or the sum of every reply added. Taking it
        ends the sum: the float64 values are converted ``block`` at a time and freed, so the server
        holds at most sum + result (3 payloads) for an instant, then the result alone (1)."""
        if self.count == 0:
            raise ValueError("fusion needs at least one client delta")
        total, self.total = self._sum(), None
        fused = torch.empty(total.numel(), dtype=torch.float32)
        for start in range(0, total.numel(), block):
            values = total[start:start + block]
            if self.kind == "mean":
                values.div_(self.weight_total)  # in float64, as the whole division would be
            fused[start:start + block] = values
        return fused

    def _sum(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("this running sum's result was taken: a round starts a new one")
        return self.total
