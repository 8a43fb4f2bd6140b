"""A round's uplink taken one reply at a time, for a running sum over a noisy channel.

The stacked round sends every payload through the channel in one call, its noise drawn for the
batch in client order. A running sum has no batch: each reply crosses the channel alone as it
arrives, through the channel's stream for (round, client) (:meth:`fedllm.channels.Channel.for_one`),
so what the server receives of a client does not depend on who replied before it, and a resumed
run draws the same noise without a saved generator state. The draw is a different one from the
stacked round's (same distribution, other values): a run with a running sum over a noisy channel
is reproducible, but not bit-equal to the stacked run.

A channel that acts packet by packet (:meth:`~fedllm.channels.Channel.segment_values`: AWGN and fading
with per-packet power normalisation, packet erasures, chains of them) takes a long reply in segments
of whole packets, read from the reply's own tensors and sent in turn through the client's stream: the
server then holds one segment of the reply and its noise at a time (a few MB), not a flat copy of the
reply, what arrived and the noise (three payloads more, for a full model's task vector). A payload no
longer than one segment crosses in one call, as the batch API would send it alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch

from fedllm.channels import Channel, ChannelReport, ClientMeta
from fedllm.channels.segments import SEGMENT_VALUES, check_no_segment_lost, joined_report, segment_length


class PerClientUplink:
    """Sends payloads through ``channel`` one by one in round ``server_round`` and keeps each one's
    report, so the round's record is the stacked round's (per-client MSE, SNR, bits, drops)."""

    def __init__(self, channel: Channel, server_round: int, segment_values: int = SEGMENT_VALUES) -> None:
        if not channel.takes_one_at_a_time(channel.params.model_dump()):
            raise ValueError(f"{type(channel).__name__} needs the round's payloads together; it cannot take them one by one")
        self.channel, self.round = channel, server_round
        self.segment = segment_length(channel, segment_values)
        self._reports: list[tuple[str, ChannelReport]] = []
        self.seconds = 0.0  # time spent in the channel

    def crossings(self, client_id: str, pieces: Iterable[tuple[int, torch.Tensor]], numel: int,
                  num_examples: int) -> Iterator[tuple[int, torch.Tensor]]:
        """What the server receives of one client's payload, as (offset, values) in the flat layout: the
        payload is given as its tensors in layout order (``pieces``: (offset, tensor), tiling ``numel``
        values), crosses in segments where the channel allows, and yields nothing when the channel lost
        it whole. Each yielded tensor is valid until the next one is asked for."""
        meta = ClientMeta([client_id], torch.tensor([float(num_examples)]))
        channel = self.channel.for_one(f"round {self.round}/{client_id}")
        size = self.segment if self.segment is not None and numel > self.segment else numel
        reports, sizes, signal = [], [], 0.0
        for offset, values in _segments(pieces, numel, size):
            started = time.perf_counter()
            received, report = channel.transmit(values[None], meta)
            if size < numel:
                check_no_segment_lost(self.channel, report)
                signal += float(torch.linalg.vector_norm(values)) ** 2
            reports.append(report)
            sizes.append(values.numel())
            self.seconds += time.perf_counter() - started
            if not bool(report.dropped[0]):
                yield offset, received[0]
        self._reports.append((client_id, reports[0] if len(reports) == 1 else
                              joined_report(reports, sizes, torch.tensor([signal], dtype=torch.float64))))

    def received_whole(self, client_id: str, pieces: Iterable[tuple[int, torch.Tensor]], numel: int,
                       num_examples: int) -> torch.Tensor | None:
        """:meth:`crossings` gathered into one flat payload (None when the channel lost it whole), for
        what needs all of it at once (DP's norm of what arrived)."""
        received: torch.Tensor | None = None
        for offset, values in self.crossings(client_id, pieces, numel, num_examples):
            received = torch.empty(numel) if received is None else received
            received[offset:offset + values.numel()] = values
        return received

    def send(self, client_id: str, payload: torch.Tensor, num_examples: int) -> tuple[torch.Tensor, bool]:
        """What the server receives of one client's flat payload (zeros when lost), and whether the
        channel lost it whole."""
        received = self.received_whole(client_id, [(0, payload)], payload.numel(), num_examples)
        return (torch.zeros_like(payload), True) if received is None else (received, False)

    def report(self) -> ChannelReport:
        """Every payload's report, in client-id order (the stacked round's rows)."""
        if not self._reports:
            empty = torch.zeros(0)
            return ChannelReport(empty, empty, empty.double(), torch.zeros(0, dtype=torch.bool))
        ordered = [report for _, report in sorted(self._reports, key=lambda item: item[0])]
        return ChannelReport.concat(ordered, list(range(len(ordered))))


def _segments(pieces: Iterable[tuple[int, torch.Tensor]], numel: int, size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Consecutive runs of ``size`` values (the last one shorter) of the flat payload the pieces tile, as
    (offset, float32 values): a run inside one float32 piece is a view of it, any other is gathered into
    one buffer reused from run to run (so a run is valid until the next one is asked for)."""
    buffer: torch.Tensor | None = None
    start, filled = 0, 0  # the run being filled: its offset, and how much of it the buffer holds
    for offset, values in pieces:
        if offset != start + filled:
            raise ValueError(f"payload pieces must tile the layout in order: a piece at {offset}, expected {start + filled}")
        flat, at = values.reshape(-1), 0
        while at < flat.numel():
            want = min(size, numel - start)
            if filled == 0 and flat.dtype == torch.float32 and flat.numel() - at >= want:
                yield start, flat[at:at + want]
                at, start = at + want, start + want
                continue
            if buffer is None:
                buffer = torch.empty(min(size, numel))
            take = min(want - filled, flat.numel() - at)
            buffer[filled:filled + take] = flat[at:at + take]
            filled, at = filled + take, at + take
            if filled == want:
                yield start, buffer[:want]
                start, filled = start + want, 0
    if start + filled != numel:
        raise ValueError(f"payload pieces hold {start + filled} values, the layout {numel}")
