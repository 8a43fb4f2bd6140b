"""Packet erasures with probability ``p``.

``mode: client`` loses a client's whole payload with probability p (the client is missing this
round: ``report.dropped``, the server fuses the rest). ``mode: packet`` cuts each payload into
packets of ``packet_size`` values, loses each independently with probability p and zero-fills
it (a biased, shrunk update: the fused delta is scaled by about 1-p).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt

from .base import CHANNELS, Channel, ChannelParams, ChannelReport, ClientMeta, check_batch, measured_report


class ErasureParams(ChannelParams):
    p: float = Field(0.1, ge=0.0, le=1.0, description="loss probability")
    mode: Literal["client", "packet"] = "packet"
    packet_size: PositiveInt = 1024


@CHANNELS.register("erasure")
class ErasureChannel(Channel):
    Params = ErasureParams
    independent = True

    def segment_values(self) -> int | None:
        """Packet erasures cut along packets; a client's whole-payload loss needs the payload whole."""
        return self.params.packet_size if self.params.mode == "packet" else None

    def transmit(self, batch: torch.Tensor, meta: ClientMeta) -> tuple[torch.Tensor, ChannelReport]:
        check_batch(batch)
        n, d = batch.shape
        p = self.params.p
        bits = torch.full((n,), 32.0 * d)
        if self.params.mode == "client":
            lost = torch.rand(n, generator=self.generator) < p
            received = batch.clone()
            received[lost] = 0.0
            return received, measured_report(batch, received, bits, dropped=lost, loss_rate=float(lost.float().mean()))
        size = self.params.packet_size
        blocks = -(-d // size)
        lost = torch.rand((n, blocks), generator=self.generator) < p
        keep = (~lost).repeat_interleave(size, dim=1)[:, :d]
        received = batch * keep
        return received, measured_report(batch, received, bits, lost_packets=lost.sum(dim=1),
                                         loss_rate=float(lost.float().mean()))
