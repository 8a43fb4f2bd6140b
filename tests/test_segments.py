"""Payloads sent a segment of whole packets at a time (fedllm/channels/segments.py): what arrives is what
the channel's batch API delivers for each column segment sent in turn, written over the batch; short
payloads and channels that need payloads whole go through ``transmit`` unchanged."""

from __future__ import annotations

import pytest
import torch

from fedllm.channels import ClientMeta, build_channel
from fedllm.channels.base import measured_report
from fedllm.channels.segments import BATCH_SEGMENT_VALUES, segment_length, transmit_in_place
from fedllm.core.types import ClientUpdate
from fedllm.fusion.pipeline import fuse_updates
from fedllm.strategies import build_rule

SEGMENTED = {
    "awgn": ("awgn", {"snr_db": 5.0, "packet_size": 64}),
    "rayleigh": ("rayleigh", {"snr_db": 15.0, "packet_size": 96, "distance_m": (1.0, 3.0), "path_loss_exponent": 2.0}),
    "rician-csi": ("rician", {"snr_db": 8.0, "packet_size": 40, "equalizer": "zf", "csi_error_var": 0.05}),
    "erasure-packet": ("erasure", {"p": 0.3, "packet_size": 100}),
    "compose": ("compose", {"chain": [{"kind": "erasure", "p": 0.2, "packet_size": 50},
                                      {"kind": "awgn", "snr_db": 12.0, "packet_size": 60}]}),
}
WHOLE = {  # a payload-wide range, loss or scale, or the clients' sum: these take payloads whole
    "quantize": ("quantize", {"bits": 4}),
    "erasure-client": ("erasure", {"p": 0.5, "mode": "client"}),
    "awgn-payload-power": ("awgn", {"snr_db": 5.0, "power_normalisation": "payload"}),
    "ota": ("ota", {"snr_db": 10.0}),
    "compose-quantize": ("compose", {"chain": [{"kind": "quantize", "bits": 6}, {"kind": "rayleigh"}]}),
}
META = ClientMeta(["p0", "p1", "p2"], torch.tensor([10.0, 30.0, 5.0]))


def _batch(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, d, generator=g) * torch.tensor([[1.0], [1e-3], [40.0]])  # rows over 4 decades


@pytest.mark.parametrize("name", list(SEGMENTED))
def test_a_long_batch_arrives_as_its_segments_through_the_batch_api_written_over_it(name):
    kind, params = SEGMENTED[name]
    quantum = build_channel(kind, params, seed=1).segment_values()
    target = 3 * (4 * quantum + 3)  # in all: each of the 3 rows' share rounded down to whole packets
    size = segment_length(build_channel(kind, params, seed=1), target // 3)
    assert size == 4 * quantum
    sent = _batch(11 * quantum + 37)  # 3 whole segments and a short, odd one
    batch = sent.clone()
    received, report = transmit_in_place(build_channel(kind, params, seed=1), batch, META, target)
    assert received is batch  # written over: no second batch
    reference = build_channel(kind, params, seed=1)  # one generator, segments in turn
    expected = torch.cat([reference.transmit(sent[:, lo:lo + size], META)[0] for lo in range(0, sent.shape[1], size)],
                         dim=1)
    assert torch.equal(received, expected)
    whole = measured_report(sent, expected, torch.zeros(3))
    assert torch.allclose(report.mse, whole.mse, rtol=1e-5)
    assert torch.allclose(report.snr_db, whole.snr_db, rtol=1e-5)
    assert torch.equal(report.bits, build_channel(kind, params, seed=1).transmit(sent, META)[1].bits)
    assert not report.dropped.any()
    assert not torch.equal(received, sent)  # the channel did act


@pytest.mark.parametrize("name", list(SEGMENTED) + list(WHOLE))
def test_short_payloads_and_channels_that_need_them_whole_cross_in_one_call(name):
    kind, params = {**SEGMENTED, **WHOLE}[name]
    for d, target in ((700, 1 << 20), (5_000, 64)):  # short; long, but on a channel without segments
        if name in SEGMENTED and target == 64:
            continue
        sent = _batch(d, seed=d)
        batch = sent.clone()
        received, report = transmit_in_place(build_channel(kind, params, seed=2), batch, META, target)
        expected, expected_report = build_channel(kind, params, seed=2).transmit(sent, META)
        assert torch.equal(received, expected) and torch.equal(batch, sent)  # the same draws; the batch untouched
        assert torch.equal(report.mse, expected_report.mse)


def test_awgn_in_segments_keeps_the_links_closed_form_per_packet():
    """Per-packet power normalisation: each value's error variance is its packet's mean power / SNR
    (fedllm/channels/link.py), whichever segment the packet crossed in."""
    packet = 128
    powers = torch.logspace(-4, 2, 300)  # one power per packet, over 6 decades
    sent = (torch.randn(1, 300 * 2 * packet, generator=torch.Generator().manual_seed(5))
            * powers.sqrt().repeat_interleave(2 * packet))
    received, _ = transmit_in_place(build_channel("awgn", {"snr_db": 10.0, "packet_size": packet}, seed=3),
                                    sent.clone(), ClientMeta(["p0"], torch.ones(1)), 7 * 2 * packet + 5)
    error = (received - sent).view(300, -1).pow(2).mean(1)
    power = sent.view(300, -1).pow(2).mean(1)
    ratio = error / power * 10.0
    assert float(ratio.mean()) == pytest.approx(1.0, rel=0.03)  # 300 packets of 256 values
    assert float(ratio.log().std()) < 0.2  # every packet at the SNR: none scaled by a neighbour's power


def test_a_long_batch_crosses_awgn_without_a_second_batch_or_a_batch_of_noise():
    from tests.test_running_sum import _peak_torch_bytes

    n, d = 4, 8_000_000
    batch = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    channel = build_channel("awgn", {"snr_db": 10.0}, seed=1)
    meta = ClientMeta([f"p{i}" for i in range(n)], torch.ones(n))
    peak = _peak_torch_bytes(lambda: transmit_in_place(channel, batch, meta))
    block = 4 * n * segment_length(channel, BATCH_SEGMENT_VALUES // n)  # a column segment: 16 MB; the batch 128 MB
    assert peak < 5 * block  # its copy, noise and result
    assert _peak_torch_bytes(lambda: channel.transmit(batch[:, :d // 8], meta)) > 2 * 4 * n * d // 8  # whole: 2+ copies


def test_fuse_updates_writes_over_the_deltas_only_when_told_they_are_not_read_again():
    """The pipeline sends in place unless eval.fusion_metrics reads each client's clean delta after the
    channel; both ways fuse the same received rows."""
    d = 3 * (1 << 20) + 11
    stack = _batch(d, seed=7)
    clean = stack.clone()
    updates = [ClientUpdate(i, stack[i], int(w), {"partition": i}) for i, w in enumerate(META.num_examples)]
    channel = ("awgn", {"snr_db": 0.0})
    kept, _ = fuse_updates(updates, build_channel(*channel, seed=4), build_rule("fedavg", {}))
    assert torch.equal(stack, clean)
    written, record = fuse_updates(updates, build_channel(*channel, seed=4), build_rule("fedavg", {}), in_place=True)
    assert not torch.equal(stack, clean)  # the deltas' own memory now holds what arrived
    expected = build_rule("fedavg", {})(transmit_in_place(build_channel(*channel, seed=4), clean.clone(), META)[0],
                                         META.num_examples)
    assert torch.allclose(written, expected, rtol=1e-5, atol=1e-7)
    assert record["channel_snr_db"] == pytest.approx(0.0, abs=0.05)
    assert not torch.allclose(kept, written, atol=1e-4)  # one draw in one call, the other in segments


def test_a_channel_that_offers_segments_but_loses_payloads_whole_is_refused():
    """segment_values promises no payload is lost whole: a lost segment would leave the ones before it
    in the stack or the running sum, so both paths stop instead of fusing part of a payload."""
    from fedllm.channels import CHANNELS
    from fedllm.fusion.per_client_uplink import PerClientUplink

    class Broken(CHANNELS.get("erasure")):  # client erasures, wrongly offering segments
        def segment_values(self) -> int | None:
            return 8

    broken = Broken(CHANNELS.get("erasure").Params(p=1.0, mode="client"), seed=0)
    with pytest.raises(RuntimeError, match="lost a segment of a payload whole"):
        transmit_in_place(broken, _batch(5_000), META, target=3 * 64)
    with pytest.raises(RuntimeError, match="lost a segment of a payload whole"):
        PerClientUplink(broken, 1, segment_values=64).send("p0", torch.ones(500), 1)
