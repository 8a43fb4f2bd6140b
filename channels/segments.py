"""Payloads sent through a channel a segment of whole packets at a time, so the server's peak memory
holds a segment's copy, noise and result instead of the whole payload's.

A channel that acts packet by packet says how long its segments may be
(:meth:`~fedllm.channels.Channel.segment_values`). A reply sent alone crosses in segments of about
:data:`SEGMENT_VALUES` values; a round's batch in column segments of about :data:`BATCH_SEGMENT_VALUES`
values in all, every row's share whole packets. A payload (or batch) no longer than one segment
crosses in one call, as before, with the draws of one call (the LoRA payloads of the shipped
experiments, up to about 55 clients a round). A longer one crosses in consecutive runs of whole
packets, in turn through the channel's generator: each value meets what it meets in one call (its
packet's gain, power scale, noise law), the draws being other values of the same law.
"""

from __future__ import annotations

import torch

from .base import Channel, ChannelReport, ClientMeta

SEGMENT_VALUES = 1 << 20  # values of one payload in a segment: 4 MB of float32, rounded down to whole packets
BATCH_SEGMENT_VALUES = 1 << 22  # values of a batch's column segment, every row's share together: 16 MB


def segment_length(channel: Channel, target: int = SEGMENT_VALUES) -> int | None:
    """How many values of each payload one segment holds on ``channel`` (None: the payload goes whole)."""
    quantum = channel.segment_values()
    return None if quantum is None else quantum * max(1, target // quantum)


def transmit_in_place(channel: Channel, batch: torch.Tensor, meta: ClientMeta,
                      target: int = BATCH_SEGMENT_VALUES) -> tuple[torch.Tensor, ChannelReport]:
    """What the server receives of a (clients x d) float32 ``batch`` it no longer needs as sent: on a
    channel that takes segments, and when the batch is wider than a column segment of about ``target``
    values in all (whole packets of every row), what arrives of each segment is written back over it
    and ``batch`` itself is returned (no second batch, no batch of noise); else ``channel.transmit``'s
    own result. The report is the whole payloads' (MSE and SNR of each row over all its segments)."""
    n, d = batch.shape
    size = segment_length(channel, max(1, target // max(n, 1)))
    if size is None or d <= size or batch.dtype != torch.float32:
        return channel.transmit(batch, meta)
    reports, widths = [], []
    signal = torch.zeros(n, dtype=torch.float64)
    for lo in range(0, d, size):
        part = batch[:, lo:lo + size]
        received, report = channel.transmit(part, meta)
        check_no_segment_lost(channel, report)
        signal += torch.linalg.vector_norm(part, dim=1).double().pow(2)
        part.copy_(received)
        reports.append(report)
        widths.append(part.shape[1])
    return batch, joined_report(reports, widths, signal)


def check_no_segment_lost(channel: Channel, report: ChannelReport) -> None:
    """A segment lost whole would leave the segments before it in the sum or stack: by the contract of
    :meth:`~fedllm.channels.Channel.segment_values` no segmenting channel loses whole payloads."""
    if bool(report.dropped.any()):
        raise RuntimeError(f"{type(channel).__name__} lost a segment of a payload whole: a channel that "
                           "loses whole payloads must not offer segments (segment_values)")


def joined_report(reports: list[ChannelReport], widths: list[int], signal: torch.Tensor) -> ChannelReport:
    """The report of payloads sent in segments (``reports``, one per segment, ``widths`` values each):
    each row's MSE and SNR over its whole payload (squared errors summed over the segments, ``signal``:
    each payload's squared norm), bits and symbols summed; per-packet extras (a row per payload, a
    value per packet) joined, per-payload counts summed, numbers weighted by values."""
    values = sum(widths)
    squared_error = sum(r.mse.double() * w for r, w in zip(reports, widths))
    mse, power = squared_error / values, signal / values
    snr = torch.where(squared_error > 0, 10 * torch.log10(power.clamp_min(1e-30) / mse.clamp_min(1e-30)),
                      torch.full_like(mse, float("inf")))
    symbols = None
    if all(r.symbols is not None for r in reports):
        symbols = sum(r.symbols for r in reports)  # type: ignore[misc]
    extra: dict = {}
    for key, first in reports[0].extra.items():
        parts = [r.extra[key] for r in reports]
        if isinstance(first, torch.Tensor):
            extra[key] = torch.cat(parts, dim=1) if first.ndim == 2 else sum(parts)
        elif isinstance(first, (int, float)):
            extra[key] = sum(float(p) * w for p, w in zip(parts, widths)) / values
    return ChannelReport(mse=mse.float(), snr_db=snr.float(), bits=sum(r.bits for r in reports).double(),
                         dropped=torch.stack([r.dropped for r in reports]).any(dim=0), symbols=symbols, extra=extra)
