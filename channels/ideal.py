"""A perfect link: what the client sent is what the server gets (the noiseless baseline)."""

from __future__ import annotations

import torch

from .base import CHANNELS, Channel, ChannelReport, ClientMeta, check_batch


@CHANNELS.register("ideal")
class IdealChannel(Channel):
    def transmit(self, batch: torch.Tensor, meta: ClientMeta) -> tuple[torch.Tensor, ChannelReport]:
        check_batch(batch)
        n, d = batch.shape
        report = ChannelReport(
            mse=torch.zeros(n),
            snr_db=torch.full((n,), float("inf")),
            bits=torch.full((n,), float(d * 32)),
            dropped=torch.zeros(n, dtype=torch.bool),
        )
        return batch, report  # read-only on both sides (Channel.transmit): no copy
