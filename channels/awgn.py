"""AWGN: complex baseband with per-packet power normalisation and Gaussian noise at ``snr_db``.

The per-value MSE is E[x^2] / SNR: the closed form the tests check.
"""

from __future__ import annotations

import torch

from .base import CHANNELS, Channel, ChannelReport, ClientMeta, check_batch, from_symbols, measured_report, to_symbols
from .link import LinkParams, link_segment_values, transmit_link


@CHANNELS.register("awgn")
class AWGNChannel(Channel):
    Params = LinkParams
    independent = True

    def segment_values(self) -> int | None:
        return link_segment_values(self.params)

    def transmit(self, batch: torch.Tensor, meta: ClientMeta) -> tuple[torch.Tensor, ChannelReport]:
        check_batch(batch)
        n, d = batch.shape
        symbols = to_symbols(batch)
        received = from_symbols(transmit_link(symbols, self.params, meta, self.generator, self.seed), d)
        return received, measured_report(batch, received, torch.full((n,), 32.0 * d),
                                         symbols=torch.full((n,), float(symbols.shape[1])))
