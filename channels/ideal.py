"""A perfect link: what the client sent is what the server gets (the noiseless baseline)."""

from __future__ import annotations

import torch

from .base import CHANNELS, Channel, ChannelReport, ClientMeta, check_batch


@CHANNELS.register("ideal")
class IdealChannel(Channel):
    lossless = True

    def transmit(self, batch: torch.Tensor, meta: ClientMeta) -> tuple[torch.Tensor, ChannelReport]:
        check_batch(batch)
        return batch, self.lossless_report(*batch.shape)  # read-only on both sides (Channel.transmit): no copy

    def segment_values(self) -> int | None:
        return 1  # value by value

    def lossless_report(self, clients: int, values: int) -> ChannelReport:
        return ChannelReport(
            mse=torch.zeros(clients),
            snr_db=torch.full((clients,), float("inf")),
            bits=torch.full((clients,), float(values * 32)),
            dropped=torch.zeros(clients, dtype=torch.bool),
        )
