"""strategy.running_sum over a noisy channel: each reply crosses the channel alone as it arrives, with
its client's own noise stream (fedllm/fusion/per_client_uplink.py). Checked against the fusion rules
applied to the rows each client's stream delivers (the stacked fuse_received path, fed by the channel's
own batch API), against closed forms of the channel, and for independence from the arrival order."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedllm.apps.replies import Replies
from fedllm.channels import ChannelReport, ClientMeta, build_channel
from fedllm.channels.base import measured_report
from fedllm.config import load_config
from fedllm.core.vectors import Layout, flatten
from fedllm.fusion.per_client_uplink import PerClientUplink
from fedllm.fusion.pipeline import fuse_received
from fedllm.fusion.privacy import DifferentiallyPrivate
from fedllm.fusion.running_sum import RunningSum
from fedllm.strategies import build_rule
from tests.test_running_sum import _reply

LAYOUT = Layout.of({"a": torch.zeros(40, 50), "b": torch.zeros(301)})  # odd: the last complex symbol is padded
ROUND = 3
CHANNELS = {
    "awgn": ("awgn", {"snr_db": 5.0, "packet_size": 64}),
    "rayleigh": ("rayleigh", {"snr_db": 15.0, "packet_size": 128, "distance_m": (1.0, 3.0), "path_loss_exponent": 2.0}),
    "erasure-client": ("erasure", {"p": 0.4, "mode": "client"}),
    "erasure-packet": ("erasure", {"p": 0.3, "packet_size": 100}),
    "quantize-topk": ("quantize", {"bits": 3, "topk": 0.5}),
    "compose": ("compose", {"chain": [{"kind": "quantize", "bits": 6}, {"kind": "rician", "snr_db": 12.0}]}),
}


def _payloads(n: int = 5, seed: int = 0) -> dict[int, tuple[dict, int]]:
    g = torch.Generator().manual_seed(seed)
    return {node: ({"a": torch.randn(40, 50, generator=g) * (1 + node), "b": torch.randn(301, generator=g)},
                   int(torch.randint(1, 500, (1,), generator=g))) for node in range(n)}


def _reference(channel, payloads, rule, server_round=ROUND):
    """The stacked path on the rows each client's own stream delivers: one channel call per client
    (the channel's batch API on a batch of one), rows in client order, then fuse_received."""
    got, reports = [], []
    for node in sorted(payloads, key=lambda n: f"p{n}"):
        tensors, examples = payloads[node]
        received, report = channel.for_one(f"round {server_round}/p{node}").transmit(
            flatten(tensors, LAYOUT)[None], ClientMeta([f"p{node}"], torch.tensor([float(examples)])))
        got.append(received[0])
        reports.append(report)
    weights = torch.tensor([float(payloads[n][1]) for n in sorted(payloads, key=lambda n: f"p{n}")])
    report = ChannelReport.concat(reports, list(range(len(reports))))
    return fuse_received(torch.stack(got), weights, report, rule)


def _running(channel, payloads, order, kind="mean", clip=None, server_round=ROUND, segment=None) -> Replies:
    uplink = PerClientUplink(channel, server_round) if segment is None else PerClientUplink(channel, server_round, segment)
    replies = Replies(sorted(payloads), running=RunningSum(LAYOUT.numel, kind, clip_norm=clip, uplink=uplink))
    for node in order:
        replies.take(node, _reply(node, *payloads[node]), LAYOUT, {})
    return replies


def _fused(channel, replies: Replies):
    """The round's fused delta and record, as the pipeline makes them from a running sum."""
    from fedllm.fusion.pipeline import FusionPipeline

    pipeline = FusionPipeline.__new__(FusionPipeline)  # only what fuse_running reads
    pipeline.channel, pipeline.dp, pipeline.layout = channel, None, LAYOUT
    return pipeline.fuse_running(replies.running)


@pytest.mark.parametrize("name", list(CHANNELS))
def test_running_fedavg_over_a_noisy_channel_is_fedavg_of_each_clients_own_draw_in_any_order(name):
    kind, params = CHANNELS[name]
    payloads = _payloads(seed=len(name))
    rule = build_rule("fedavg", {})
    expected, expected_record = _reference(build_channel(kind, params, seed=4), payloads, rule)
    results = []
    for order in itertools.islice(itertools.permutations(payloads), 0, None, 7):  # 18 of the 120 orders
        fused, record = _fused(build_channel(kind, params, seed=4), _running(build_channel(kind, params, seed=4),
                                                                              payloads, order))
        results.append(fused)
        for key in ("channel_mse", "channel_snr_db", "channel_bits", "channel_dropped"):
            assert record[key] == pytest.approx(expected_record[key], rel=1e-6), key
    assert expected is not None
    assert all(torch.equal(r, results[0]) for r in results)  # the noise follows the client, not the arrival
    assert torch.allclose(results[0], expected, rtol=1e-5, atol=1e-6)
    noiseless = rule(torch.stack([flatten(t, LAYOUT) for t, _ in payloads.values()]),
                     torch.tensor([float(e) for _, e in payloads.values()]))
    assert not torch.allclose(results[0], noiseless, rtol=1e-3, atol=1e-3)  # the channel did act


SEGMENTED = {  # channels that act packet by packet, and a chain of them: replies cross in segments
    "awgn": ("awgn", {"snr_db": 5.0, "packet_size": 64}),
    "rayleigh": ("rayleigh", {"snr_db": 15.0, "packet_size": 96, "distance_m": (1.0, 3.0), "path_loss_exponent": 2.0}),
    "erasure-packet": ("erasure", {"p": 0.3, "packet_size": 100}),
    "compose": ("compose", {"chain": [{"kind": "erasure", "p": 0.2, "packet_size": 50}, {"kind": "rician", "snr_db": 12.0,
                                                                                        "packet_size": 60}]}),
}


def _segmented_reference(channel, payloads, segment: int, server_round=ROUND):
    """Each client's payload cut into runs of ``segment`` values sent in turn through its own stream (the
    channel's batch API on a batch of one run), joined; the record measured on the joined payloads."""
    rows, sent = [], []
    for node in sorted(payloads, key=lambda n: f"p{n}"):
        tensors, examples = payloads[node]
        flat = flatten(tensors, LAYOUT)
        stream = channel.for_one(f"round {server_round}/p{node}")
        meta = ClientMeta([f"p{node}"], torch.tensor([float(examples)]))
        rows.append(torch.cat([stream.transmit(flat[None, lo:lo + segment], meta)[0][0]
                               for lo in range(0, flat.numel(), segment)]))
        sent.append(flat)
    weights = torch.tensor([float(payloads[n][1]) for n in sorted(payloads, key=lambda n: f"p{n}")])
    return torch.stack(rows), weights, measured_report(torch.stack(sent), torch.stack(rows), torch.zeros(len(rows)))


@pytest.mark.parametrize("name", list(SEGMENTED))
def test_a_reply_crosses_a_packet_channel_in_segments_of_whole_packets_in_any_arrival_order(name):
    """A reply longer than a segment crosses in runs of whole packets, one after another through its
    client's stream: FedAvg of the running sum = FedAvg of each client's runs sent through the batch API
    and joined, in any arrival order; the record's MSE and SNR are those of the whole payloads."""
    kind, params = SEGMENTED[name]
    payloads = _payloads(seed=len(name) + 1)
    quantum = build_channel(kind, params, seed=4).segment_values()
    uplink = PerClientUplink(build_channel(kind, params, seed=4), ROUND, segment_values=3 * quantum + 1)
    assert uplink.segment == 3 * quantum < LAYOUT.numel  # whole packets, several segments a reply
    rows, weights, expected_report = _segmented_reference(build_channel(kind, params, seed=4), payloads, uplink.segment)
    expected = build_rule("fedavg", {})(rows, weights)
    results = []
    for order in itertools.islice(itertools.permutations(payloads), 0, None, 29):  # 5 of the 120 orders
        replies = Replies(sorted(payloads), running=RunningSum(LAYOUT.numel, "mean", uplink=PerClientUplink(
            build_channel(kind, params, seed=4), ROUND, segment_values=3 * quantum + 1)))
        for node in order:
            replies.take(node, _reply(node, *payloads[node]), LAYOUT, {})
        fused, record = _fused(build_channel(kind, params, seed=4), replies)
        results.append(fused)
        assert record["channel_mse"] == pytest.approx(float(expected_report.mse.mean()), rel=1e-5)
        finite = expected_report.snr_db[torch.isfinite(expected_report.snr_db)]
        assert record["channel_snr_db"] == pytest.approx(float(finite.mean()), rel=1e-5)
        assert record["channel_bits"] == 32 * LAYOUT.numel * len(payloads)
    assert all(torch.equal(r, results[0]) for r in results)
    assert torch.allclose(results[0], expected, rtol=1e-5, atol=1e-6)


def test_segments_fall_on_packet_boundaries_each_packet_meets_one_gain():
    """Rayleigh, zero-forcing, perfect CSI: a packet's MSE given its gain is its power / (SNR |h|^2)
    (fedllm/channels/fading.py). Sent in segments, each packet of the whole payload meets one gain of the
    joined report's gain_power, in order; a segment cut inside a packet would give it two."""
    packet, snr = 256, 100.0
    channel = build_channel("rayleigh", {"snr_db": 20.0, "packet_size": packet, "equalizer": "zf"}, seed=3)
    g = torch.Generator().manual_seed(2)
    blocks = 400
    scale = torch.logspace(-3, 1, blocks).repeat_interleave(2 * packet)  # packets' powers over 8 decades
    payload = torch.randn(blocks * 2 * packet - 70, generator=g) * scale[:-70]  # the last packet a short one
    uplink = PerClientUplink(channel, 1, segment_values=7 * 2 * packet + 100)  # rounded down to whole packets
    received, lost = uplink.send("p0", payload, 1)
    report = uplink._reports[0][1]
    gains = report.extra["gain_power"][0]
    assert not lost and gains.shape == (blocks,)
    per_packet = torch.nn.functional.pad(payload, (0, 70)).view(blocks, -1)
    error = torch.nn.functional.pad(received - payload, (0, 70)).view(blocks, -1)
    widths = torch.full((blocks,), 2.0 * packet)
    widths[-1] -= 70
    normalised = (error.pow(2).sum(1) / widths) / (per_packet.pow(2).sum(1) / widths) * gains * snr
    assert float(normalised.mean()) == pytest.approx(1.0, rel=0.05)  # 400 packets of ~512 values
    assert float(normalised.log().std()) < 0.2  # each packet on its own gain: no packet off by |h'/h|^2
    assert float(report.symbols[0]) == -(-payload.numel() // 2)


def test_a_long_reply_over_awgn_is_added_a_segment_at_a_time():
    """Over a per-packet channel the server holds one segment of a reply and its noise, not a flat copy
    of the reply, what arrived and the noise (3 payloads: 96 MB here)."""
    from fedllm.channels.segments import SEGMENT_VALUES
    from tests.test_running_sum import _peak_torch_bytes

    n = 8_000_000
    layout = Layout.of({"a": torch.zeros(n)})
    message = _reply(0, {"a": torch.randn(n, generator=torch.Generator().manual_seed(0))}, 10)
    replies = Replies([0], running=RunningSum(n, "mean", uplink=PerClientUplink(
        build_channel("awgn", {"snr_db": 10.0}, seed=1), 1)))
    peak = _peak_torch_bytes(lambda: replies.take(0, message, layout, {}))
    assert peak < 4 * (4 * SEGMENT_VALUES)  # a segment, what arrived, its noise (4 MB each): half a payload
    assert replies.running.count == 1


def test_awgn_per_client_draws_match_the_links_closed_form_and_are_independent_streams():
    """Per-packet power normalisation at SNR s: each received value's error variance is the packet's mean
    power / s (fedllm/channels/link.py); two clients, and one client in two rounds, draw different noise."""
    channel = build_channel("awgn", {"snr_db": 10.0}, seed=0)
    payload = torch.randn(400_000, generator=torch.Generator().manual_seed(1))
    errors = {}
    for server_round, client in ((1, "p0"), (1, "p1"), (2, "p0")):
        uplink = PerClientUplink(channel, server_round)
        received, lost = uplink.send(client, payload, 10)
        errors[server_round, client] = received - payload
        assert not lost
        assert float(errors[server_round, client].pow(2).mean()) == pytest.approx(0.1, rel=0.02)
    pairs = list(itertools.combinations(errors.values(), 2))
    for e1, e2 in pairs:  # independent draws: correlation ~ N(0, 1/sqrt(d)) = 0.0016
        assert abs(float(torch.corrcoef(torch.stack([e1, e2]))[0, 1])) < 0.01
    again, _ = PerClientUplink(channel, 1).send("p1", payload, 10)
    assert torch.equal(again - payload, errors[1, "p1"])  # a stream is a function of (seed, round, client)


def test_payloads_the_channel_loses_are_left_out_and_a_round_that_loses_all_keeps_the_model():
    payloads = _payloads(6, seed=9)
    channel = build_channel("erasure", {"p": 0.5, "mode": "client"}, seed=2)
    replies = _running(channel, payloads, list(payloads))
    fused, record = _fused(channel, replies)
    lost = record["channel_dropped"]
    assert 0 < lost < 6 and replies.running is not None
    kept = [n for n in payloads if not bool(channel.for_one(f"round {ROUND}/p{n}").transmit(
        torch.ones(1, 1), ClientMeta([f"p{n}"], torch.ones(1)))[1].dropped[0])]
    assert len(kept) == 6 - lost
    rows = torch.stack([flatten(payloads[n][0], LAYOUT) for n in kept])
    weights = torch.tensor([float(payloads[n][1]) for n in kept])
    assert torch.allclose(fused, build_rule("fedavg", {})(rows, weights), rtol=1e-5, atol=1e-6)
    everything_lost = build_channel("erasure", {"p": 1.0, "mode": "client"}, seed=2)
    fused, record = _fused(everything_lost, _running(everything_lost, payloads, list(payloads)))
    assert fused is None and record["all_lost"] and record["channel_dropped"] == 6


@pytest.mark.parametrize("segmented", [False, True])
def test_running_dp_over_a_noisy_channel_clips_what_arrived_as_the_stacked_dp_does(segmented):
    """The stacked DP rule clips the received rows (fuse_received runs the rule after the channel): the
    running sum clips each received payload, not the sent one, also when it arrived in segments."""
    payloads = _payloads(seed=5)
    clip, cohort, noise = 30.0, 5.0, 0.7
    kind, params = CHANNELS["awgn"]

    def dp_rule() -> DifferentiallyPrivate:
        rule = DifferentiallyPrivate(build_rule("fedavg", {}), clip, noise, seed=11)
        rule.expected_cohort = cohort
        return rule

    segment = 5 * 128 if segmented else None  # 5 packets of 64 symbols
    if segmented:
        rows, weights, report = _segmented_reference(build_channel(kind, params, seed=4), payloads, segment)
        expected, _ = fuse_received(rows, weights, report, dp_rule())
    else:
        expected, _ = _reference(build_channel(kind, params, seed=4), payloads, dp_rule())
    replies = _running(build_channel(kind, params, seed=4), payloads, [3, 1, 4, 0, 2], kind="sum", clip=clip,
                       segment=segment)
    got = dp_rule().private_mean(replies.running.result(), replies.running.count)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_noisy_per_client_channel_is_a_valid_running_sum_config():
    cfg = load_config(None, ["model.name=tiny-bert", "strategy.running_sum=true", "strategy.reject_norm_ratio=null",
                             "channel.kind=compose", "channel.chain=[{kind: quantize, bits: 8}, {kind: rayleigh}]"])
    assert cfg.strategy.running_sum and cfg.channel.kind == "compose"
    with pytest.raises(ValueError, match="needs the round's payloads together"):
        PerClientUplink(build_channel("byzantine", {}, seed=0), 1)


@pytest.mark.slow
def test_a_run_with_a_running_sum_over_awgn_receives_each_reply_at_the_links_snr(tiny_overrides, tmp_path):
    """The real ServerApp and ClientApp under Flower's simulation, 3 clients, a 10 dB AWGN uplink with
    per-packet power normalisation: every payload arrives at 10 dB (the closed form), each counted once
    with its 32 bits a value."""
    from flwr.simulation import run_simulation

    from fedllm.apps.client_app import app as client_app
    from fedllm.apps.server_app import make_server_app
    from fedllm.results.writer import read_metrics

    cfg = load_config(None, [*tiny_overrides, "rounds=1", "client.max_steps=10", "data.max_test_per_task=100",
                             "strategy.reject_norm_ratio=null", "strategy.running_sum=true", "channel.kind=awgn",
                             "channel.snr_db=10", f"output.dir={tmp_path}"])
    run_simulation(server_app=make_server_app(cfg), client_app=client_app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    run_dir = next(tmp_path.glob("*/*/summary.json")).parent
    record = read_metrics(run_dir)[-1]
    values = sum(t.numel() for t in torch.load(run_dir / "global_params.pt").values())
    assert record["clients_used"] == 3 and record["channel_dropped"] == 0
    assert record["channel_bits"] == 3 * 32 * values
    assert record["channel_snr_db"] == pytest.approx(10.0, abs=0.3)
    assert record["channel_mse"] > 0.0
