"""A round's uplink taken one reply at a time, for a running sum over a noisy channel.

The stacked round sends every payload through the channel in one call, its noise drawn for the
batch in client order. A running sum has no batch: each reply crosses the channel alone as it
arrives, through the channel's stream for (round, client) (:meth:`fedllm.channels.Channel.for_one`),
so what the server receives of a client does not depend on who replied before it, and a resumed
run draws the same noise without a saved generator state. The draw is a different one from the
stacked round's (same distribution, other values): a run with a running sum over a noisy channel
is reproducible, but not bit-equal to the stacked run.
"""

from __future__ import annotations

import time

import torch

from fedllm.channels import Channel, ChannelReport, ClientMeta


class PerClientUplink:
    """Sends payloads through ``channel`` one by one in round ``server_round`` and keeps each one's
    report, so the round's record is the stacked round's (per-client MSE, SNR, bits, drops)."""

    def __init__(self, channel: Channel, server_round: int) -> None:
        if not channel.takes_one_at_a_time(channel.params.model_dump()):
            raise ValueError(f"{type(channel).__name__} needs the round's payloads together; it cannot take them one by one")
        self.channel, self.round = channel, server_round
        self._reports: list[tuple[str, ChannelReport]] = []
        self.seconds = 0.0  # time spent in the channel

    def send(self, client_id: str, payload: torch.Tensor, num_examples: int) -> tuple[torch.Tensor, bool]:
        """What the server receives of one client's flat payload, and whether the channel lost it whole."""
        started = time.perf_counter()
        meta = ClientMeta([client_id], torch.tensor([float(num_examples)]))
        received, report = self.channel.for_one(f"round {self.round}/{client_id}").transmit(payload[None], meta)
        self._reports.append((client_id, report))
        self.seconds += time.perf_counter() - started
        return received[0], bool(report.dropped[0])

    def report(self) -> ChannelReport:
        """Every payload's report, in client-id order (the stacked round's rows)."""
        if not self._reports:
            empty = torch.zeros(0)
            return ChannelReport(empty, empty, empty.double(), torch.zeros(0, dtype=torch.bool))
        ordered = [report for _, report in sorted(self._reports, key=lambda item: item[0])]
        return ChannelReport.concat(ordered, list(range(len(ordered))))
