"""Channel models against closed forms (and independent Monte-Carlo references)."""

import math

import pytest
import torch
from fedllm.channels import CHANNELS, ClientMeta, build_channel
from fedllm.channels.mimo_mac import (
    CDTYPE,
    MimoMacChannel,
    noise_covariance,
    project_power,
    receiver_sum_rate,
    strongest_user_jammer,
    sum_rate,
    worst_case_jammer,
)


def _meta(n: int, examples: list[float] | None = None) -> ClientMeta:
    return ClientMeta([f"c{i}" for i in range(n)], torch.tensor(examples or [1.0] * n))


def _gaussian(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_awgn_mse_matches_noise_variance(snr_db):
    x = _gaussian(2, 1_000_000) * 0.03
    y, report = build_channel("awgn", {"snr_db": snr_db}, 1).transmit(x, _meta(2))
    expected = x.pow(2).mean(dim=1) * 10 ** (-snr_db / 10)
    assert torch.allclose(report.mse, expected, rtol=0.05)
    assert torch.allclose(report.mse, (y - x).pow(2).mean(dim=1), rtol=1e-4)
    assert torch.allclose(report.snr_db, torch.full((2,), snr_db), atol=0.25)


@pytest.mark.parametrize("kind", ["awgn", "rayleigh"])
def test_a_packet_of_zeros_arrives_as_zeros_and_the_payload_keeps_the_snr_of_the_rest(kind):
    """Per-packet power normalisation: the other packets each arrive at the link's SNR (MSE = their power /
    SNR, the closed form), and a packet of zeros, whose side information says power 0, arrives as zeros
    (before: unit-power noise there, 10 log10(0.03^2) = -30 dB below the payload)."""
    x = _gaussian(2, 200_000) * 0.03
    x[:, 8192:16384] = 0.0  # packet 1 of 4096 complex symbols
    x[1, :] = 0.0  # a whole payload of zeros
    y, report = build_channel(kind, {"snr_db": 10.0, "equalizer": "zf"} if kind == "rayleigh" else {"snr_db": 10.0},
                              3).transmit(x, _meta(2))
    assert torch.equal(y[:, 8192:16384], torch.zeros(2, 8192)) and torch.equal(y[1], torch.zeros(200_000))
    if kind == "awgn":
        assert float(report.mse[0]) == pytest.approx(float(x[0].pow(2).mean()) / 10, rel=0.03)
        assert float(report.snr_db[0]) == pytest.approx(10.0, abs=0.15)


def test_awgn_noiseless_is_identity_and_odd_lengths_round_trip():
    x = _gaussian(3, 1001)
    y, report = build_channel("awgn", {"snr_db": float("inf")}, 0).transmit(x, _meta(3))
    assert torch.allclose(y, x, atol=1e-6) and y.shape == x.shape
    assert torch.all(report.symbols == 501)


def test_rayleigh_zero_forcing_matches_conditional_closed_form():
    snr_db, size = 10.0, 2000
    x = _gaussian(2, 400_000)
    ch = build_channel("rayleigh", {"snr_db": snr_db, "equalizer": "zf", "packet_size": size}, 3)
    y, report = ch.transmit(x, _meta(2))
    gains = report.extra["gain_power"]  # |h|^2 per client and packet
    # Per packet: MSE = E_packet[x^2] / (SNR |h|^2); packets hold 2 * size reals.
    packet_power = x.view(2, -1, 2 * size).pow(2).mean(dim=2)
    expected = (packet_power / (10 ** (snr_db / 10) * gains)).mean(dim=1)
    assert torch.allclose(report.mse, expected, rtol=0.05)


def test_rayleigh_gains_are_unit_power_and_mmse_beats_zf():
    x = _gaussian(4, 200_000)
    zf = build_channel("rayleigh", {"snr_db": 5.0, "equalizer": "zf", "packet_size": 64}, 7).transmit(x, _meta(4))[1]
    mmse = build_channel("rayleigh", {"snr_db": 5.0, "equalizer": "mmse", "packet_size": 64}, 7).transmit(x, _meta(4))[1]
    assert abs(float(zf.extra["gain_power"].mean()) - 1.0) < 0.05  # E|h|^2 = 1 over 6252 packets
    assert torch.all(mmse.mse < zf.mse)
    assert torch.all(mmse.mse < 1.0)  # LMMSE never does worse than sending nothing


def test_imperfect_csi_costs_accuracy_and_path_loss_lowers_snr():
    x = _gaussian(2, 200_000)
    perfect = build_channel("rayleigh", {"snr_db": 20.0}, 5).transmit(x, _meta(2))[1]
    noisy_csi = build_channel("rayleigh", {"snr_db": 20.0, "csi_error_var": 0.1}, 5).transmit(x, _meta(2))[1]
    assert torch.all(noisy_csi.mse > 1.5 * perfect.mse)
    near = build_channel("awgn", {"snr_db": 20.0, "path_loss_exponent": 3.0, "distance_m": 1.0}, 5).transmit(x, _meta(2))[1]
    far = build_channel("awgn", {"snr_db": 20.0, "path_loss_exponent": 3.0, "distance_m": 2.0}, 5).transmit(x, _meta(2))[1]
    assert torch.allclose(far.snr_db, near.snr_db - 30 * math.log10(2), atol=0.3)


def test_rician_with_strong_line_of_sight_approaches_awgn():
    x = _gaussian(2, 200_000)
    rician = build_channel("rician", {"snr_db": 10.0, "k_factor": 1000.0, "equalizer": "zf"}, 2).transmit(x, _meta(2))[1]
    assert torch.allclose(rician.mse, x.pow(2).mean(1) / 10, rtol=0.1)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_erasure_loss_rate_within_three_sigma(p):
    x = _gaussian(4, 1_000_000)
    y, report = build_channel("erasure", {"p": p, "packet_size": 100}, 11).transmit(x, _meta(4))
    packets = 4 * 10_000
    sigma = math.sqrt(p * (1 - p) / packets)
    assert abs(report.extra["loss_rate"] - p) < 3 * sigma
    zeroed = (y == 0).float().mean()
    assert abs(float(zeroed) - report.extra["loss_rate"]) < 1e-3
    assert not report.dropped.any()


def test_erasure_client_mode_drops_whole_clients():
    x = _gaussian(2000, 10)
    y, report = build_channel("erasure", {"p": 0.25, "mode": "client"}, 0).transmit(x, _meta(2000))
    rate = float(report.dropped.float().mean())
    assert abs(rate - 0.25) < 3 * math.sqrt(0.25 * 0.75 / 2000)
    assert torch.equal(y[~report.dropped], x[~report.dropped])


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_is_unbiased_with_bounded_variance(bits):
    x = _gaussian(1, 1000)
    ch = build_channel("quantize", {"bits": bits}, 0)
    trials = torch.stack([ch.transmit(x, _meta(1))[0] for _ in range(400)])
    step = float((x.max() - x.min()) / (2**bits - 1))
    mean_err = (trials.mean(0) - x).abs().max()
    assert mean_err < 4 * (step / 2) / math.sqrt(400) + 1e-6  # unbiased: the mean converges to x
    assert float(trials.var(0).max()) <= step**2 / 4 * 1.15
    levels = torch.unique(trials)
    assert len(levels) <= 2**bits


def test_quantize_bits_are_counted_and_topk_keeps_the_largest():
    x = _gaussian(2, 10_000)
    _, dense = build_channel("quantize", {"bits": 4}, 0).transmit(x, _meta(2))
    assert torch.all(dense.bits == 10_000 * 4 + 64)
    y, sparse = build_channel("quantize", {"bits": 8, "topk": 0.01}, 0).transmit(x, _meta(2))
    assert torch.all(sparse.bits == 100 * (8 + 14) + 64)  # small d: the exact threshold
    assert int((y[0] != 0).sum()) <= 100
    top = x[0].abs().topk(100).indices
    assert set(torch.nonzero(y[0]).flatten().tolist()) <= set(top.tolist())
    big = _gaussian(2, 1_000_000)
    yb, sampled = build_channel("quantize", {"bits": 8, "topk": 0.05}, 0).transmit(big, _meta(2))
    kept = (yb != 0).sum(dim=1).double()
    assert torch.all((kept - 50_000).abs() < 2_500)  # the sampled threshold keeps about k
    assert torch.all(sampled.bits == kept * (8 + 20) + 64)
    smallest_kept = big.abs().where(yb != 0, torch.tensor(float("inf"))).min(dim=1).values
    largest_dropped = big.abs().where(yb == 0, torch.tensor(0.0)).max(dim=1).values
    assert torch.all(smallest_kept >= largest_dropped * 0.999)  # what is kept is the largest


def _mimo_setup(seed: int = 0, users: int = 3):
    ch = MimoMacChannel(MimoMacChannel.Params(), seed)
    h, g = ch.draw(users)
    p = [10 ** 0.5 / 8] * users
    return ch, h, g, p, 10 ** -0.3, 1000.0


def _independent_worst_case(h, p, g, sigma2, budget, receiver, starts=3, seed=0) -> float:
    """The lowest receiver sum rate scipy's L-BFGS finds over the full jammer covariance
    Q = budget B B^H / tr(B B^H) (B: jammer antennas squared, no reduction to what the receiver
    sees) from random starts: a different parametrisation, a different search (scipy 1.x)."""
    import numpy as np
    from scipy.optimize import minimize

    nj = g.shape[1]

    def objective(x):
        b = torch.tensor(x[: nj * nj].reshape(nj, nj) + 1j * x[nj * nj:].reshape(nj, nj), dtype=CDTYPE,
                         requires_grad=True)
        q = budget * (b @ b.conj().T) / torch.trace(b @ b.conj().T).real
        value = receiver_sum_rate(h, p, noise_covariance(g, q, sigma2), receiver)
        (grad,) = torch.autograd.grad(value, b)
        return value.item(), np.concatenate([2 * grad.real.numpy().ravel(), 2 * grad.imag.numpy().ravel()])

    rng = np.random.default_rng(seed)
    return min(minimize(objective, rng.standard_normal(2 * nj * nj), jac=True, method="L-BFGS-B",
                        options={"maxiter": 3000, "gtol": 1e-12, "ftol": 1e-15}).fun for _ in range(starts))


@pytest.mark.parametrize("receiver, jammer_db", [("lmmse", 0.0), ("lmmse", 30.0), ("zf", 0.0), ("zf", 30.0)])
def test_no_independent_search_finds_a_worse_jammer(receiver, jammer_db):
    """The jammer minimises the rate the simulated receiver achieves; L-BFGS over the full covariance
    from random starts does not find a covariance that lowers it by more than 1%."""
    ch = MimoMacChannel(MimoMacChannel.Params(nt=2, nr=8, jammer_antennas=16, receiver=receiver), 0)
    h, g = ch.draw(3)
    p, sigma2, budget = [10 ** 0.5 / 2] * 3, 10 ** -0.3, 10 ** (jammer_db / 10)
    solved = worst_case_jammer(h, p, g, sigma2, budget, receiver)
    assert float(torch.trace(solved.q).real) <= budget * (1 + 1e-9)
    assert float(torch.linalg.eigvalsh(solved.q).min()) >= -1e-9 * budget
    assert solved.objective == pytest.approx(receiver_sum_rate(h, p, noise_covariance(g, solved.q, sigma2),
                                                               receiver).item())
    isotropic = receiver_sum_rate(h, p, noise_covariance(g, budget / 16 * torch.eye(16, dtype=CDTYPE), sigma2),
                                  receiver).item()
    assert solved.objective < 0.9 * isotropic
    assert solved.objective <= 1.01 * _independent_worst_case(h, p, g, sigma2, budget, receiver)


def test_the_jammer_targets_the_receivers_rate_not_single_user_rates():
    """The single-user proxy ignores interference between users; the two objectives disagree, and
    the channel minimises the receiver's (the jammer for the proxy leaves the receiver a higher rate)."""
    ch = MimoMacChannel(MimoMacChannel.Params(nt=4, nr=12, jammer_antennas=16, receiver="zf"), 1)
    h, g = ch.draw(3)
    p, sigma2, budget = [10 ** 0.5 / 4] * 3, 10 ** -0.3, 100.0
    ours = worst_case_jammer(h, p, g, sigma2, budget, "zf").q
    proxy = _single_user_worst_case(h, p, g, sigma2, budget)
    rate = lambda q: receiver_sum_rate(h, p, noise_covariance(g, q, sigma2), "zf").item()  # noqa: E731
    assert rate(ours) < 0.99 * rate(proxy)


def _single_user_worst_case(h, p, g, sigma2, budget):
    import numpy as np
    from scipy.optimize import minimize

    nj = g.shape[1]

    def objective(x):
        b = torch.tensor(x[: nj * nj].reshape(nj, nj) + 1j * x[nj * nj:].reshape(nj, nj), dtype=CDTYPE,
                         requires_grad=True)
        value = sum_rate(h, p, noise_covariance(g, budget * (b @ b.conj().T) / torch.trace(b @ b.conj().T).real,
                                                 sigma2))
        (grad,) = torch.autograd.grad(value, b)
        return value.item(), np.concatenate([2 * grad.real.numpy().ravel(), 2 * grad.imag.numpy().ravel()])

    x = minimize(objective, np.concatenate([np.eye(nj).ravel(), np.zeros(nj * nj)]), jac=True, method="L-BFGS-B").x
    b = torch.tensor(x[: nj * nj].reshape(nj, nj) + 1j * x[nj * nj:].reshape(nj, nj), dtype=CDTYPE)
    return budget * (b @ b.conj().T) / torch.trace(b @ b.conj().T).real


def test_the_round_record_reports_the_solvers_optimality():
    ch = build_channel("mimo_mac", {"nt": 2, "nr": 8, "jammer_antennas": 16, "jammer_power_db": 20.0}, 0)
    _, report = ch.transmit(torch.randn(3, 100, generator=torch.Generator().manual_seed(0)), _meta(3))
    record = report.summary()
    assert record["channel_jammer_pg_norm"] < 1e-3 and record["channel_jammer_iterations"] >= 1
    assert record["channel_jammer_power"] == pytest.approx(100.0, rel=1e-6)


def test_project_power_is_a_projection():
    a = torch.randn(6, 6, dtype=CDTYPE, generator=torch.Generator().manual_seed(0))
    q = project_power(a @ a.conj().T, 2.0)
    assert abs(float(torch.trace(q).real) - 2.0) < 1e-9
    assert torch.allclose(project_power(q, 2.0), q, atol=1e-9)


def test_strongest_user_jammer_hits_the_user_with_the_largest_gain():
    ch, h, g, p, sigma2, budget = _mimo_setup(4)
    q, target = strongest_user_jammer(h, g, budget)
    gains = [float(torch.linalg.matrix_norm(hk).real) for hk in h]
    assert target == max(range(3), key=gains.__getitem__)
    iso = budget / g.shape[1] * torch.eye(g.shape[1], dtype=CDTYPE)
    err_target = [float(torch.diagonal(e).real.mean()) for e in ch.error_covariances(h, p, noise_covariance(g, q, sigma2))]
    err_iso = [float(torch.diagonal(e).real.mean()) for e in ch.error_covariances(h, p, noise_covariance(g, iso, sigma2))]
    ratios = [a / b for a, b in zip(err_target, err_iso)]
    assert max(range(3), key=ratios.__getitem__) == target


def test_mimo_mac_received_error_follows_the_lmmse_covariance():
    x = _gaussian(3, 400_000)
    y, report = build_channel("mimo_mac", {"jammer": "isotropic", "jammer_power_db": 10.0}, 0).transmit(x, _meta(3))
    # The payload is scaled to the stream power p_k, so relative error = E_k diagonal / p_k.
    assert torch.allclose(report.mse / x.pow(2).mean(1), report.extra["relative_mse"].float(), rtol=0.05)
    none = build_channel("mimo_mac", {"jammer": "none"}, 0).transmit(x, _meta(3))[1]
    assert torch.all(none.mse < report.mse)


def test_zero_forcing_error_exceeds_the_signal_under_a_strong_jammer_where_lmmse_saturates():
    x = _gaussian(3, 200_000)
    common = {"jammer": "isotropic", "nt": 4, "nr": 16}
    rel = {}
    for receiver in ("lmmse", "zf"):
        for power in (0.0, 30.0):
            _, report = build_channel("mimo_mac", {**common, "receiver": receiver, "jammer_power_db": power},
                                      0).transmit(x, _meta(3))
            rel[receiver, power] = float((report.mse / x.pow(2).mean(1)).mean())
            assert rel[receiver, power] == pytest.approx(float(report.extra["relative_mse"].mean()), rel=0.05)
    assert rel["zf", 0.0] > rel["lmmse", 0.0]  # zf never beats lmmse
    assert rel["lmmse", 30.0] < 1.0 < rel["zf", 30.0]  # lmmse shrinks, zf amplifies the jammer
    with pytest.raises(ValueError, match="raise channel.nr to >= 24"):
        build_channel("mimo_mac", {"receiver": "zf"}, 0).transmit(x[:, :1000], _meta(3))


def test_ota_noiseless_sum_is_the_weighted_sum():
    x = _gaussian(3, 10_001)
    w = [1.0, 2.0, 5.0]
    y, report = build_channel("ota", {"snr_db": float("inf"), "truncation_threshold": 0.0}, 0).transmit(x, _meta(3, w))
    target = (torch.tensor(w).view(3, 1) / 8 * x).sum(0, keepdim=True)
    assert report.aggregated and y.shape == (1, 10_001)
    assert torch.allclose(y, target, atol=1e-5)
    noisy = build_channel("ota", {"snr_db": 10.0, "packet_size": 64}, 0).transmit(x, _meta(3, w))[1]
    assert float(noisy.mse[0]) > 0 and noisy.extra["truncated_fraction"] > 0


def test_compose_chains_stages_and_counts_digital_bits():
    x = _gaussian(2, 50_000)
    y, report = build_channel("compose", {"chain": [{"kind": "quantize", "bits": 8}, {"kind": "awgn", "snr_db": 30.0}]},
                              0).transmit(x, _meta(2))
    assert torch.all(report.bits == 50_000 * 8 + 64)
    q_only = build_channel("quantize", {"bits": 8}, 0).transmit(x, _meta(2))[1]
    assert torch.all(report.mse > q_only.mse)
    with pytest.raises(ValueError, match="last stage"):
        build_channel("compose", {"chain": [{"kind": "ota"}, {"kind": "awgn"}]}, 0)


@pytest.mark.parametrize("kind", sorted(set(CHANNELS.names()) - {"compose"}))
def test_every_channel_is_seeded_and_rejects_bad_input(kind):
    x = _gaussian(3, 4096)
    a = build_channel(kind, {}, 5).transmit(x, _meta(3))[0]
    b = build_channel(kind, {}, 5).transmit(x, _meta(3))[0]
    assert torch.equal(a, b)
    bad = x.clone()
    bad[1, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        build_channel(kind, {}, 5).transmit(bad, _meta(3))


@pytest.mark.parametrize(
    "kind, params, key",
    [
        ("erasure", {"p": 1.5}, "channel.p"),
        ("erasure", {"p": -0.1}, "channel.p"),
        ("quantize", {"bits": 0}, "channel.bits"),
        ("awgn", {"distance_m": -1.0}, "channel.distance_m"),
        ("rayleigh", {"csi_error_var": -0.5}, "channel.csi_error_var"),
        ("rician", {"k_factor": -1}, "channel.k_factor"),
        ("mimo_mac", {"nt": 0}, "channel.nt"),
        ("awgn", {"snr": 3}, "channel.snr"),
    ],
)
def test_bad_parameters_name_the_key(kind, params, key):
    with pytest.raises(ValueError, match=key):
        build_channel(kind, params, 0)


def test_payload_normalisation_drowns_small_packets_packet_normalisation_does_not():
    x = torch.cat([_gaussian(1, 8192, 1), _gaussian(1, 8192, 2) * 1e-3], dim=1)  # a loud and a quiet half
    common = {"snr_db": 10.0, "packet_size": 4096}
    per_packet = build_channel("awgn", {**common, "power_normalisation": "packet"}, 0).transmit(x, _meta(1))[0]
    per_payload = build_channel("awgn", {**common, "power_normalisation": "payload"}, 0).transmit(x, _meta(1))[0]
    quiet = slice(8192, None)

    def rel(y):
        return float((y[0, quiet] - x[0, quiet]).pow(2).mean() / x[0, quiet].pow(2).mean())

    assert abs(rel(per_packet) - 0.1) < 0.02  # every packet at its own 10 dB
    assert rel(per_payload) > 1000  # the quiet half sits 60 dB below the payload's power


def test_a_little_is_enough_sits_inside_the_honest_spread_where_krum_picks_it():
    """ALIE's attackers send mean - z std of the honest updates (z = 0.2533 for 10 clients, 2 attackers:
    the normal quantile of (n - s) / n, s = floor(n/2 + 1) - f). Krum, which shuns a sign-flipped outlier,
    picks the ALIE update: it sits closer to everyone than any honest one."""
    from fedllm.channels.byzantine import alie_z
    from fedllm.strategies import build_rule

    assert alie_z(10, 2) == pytest.approx(0.2533, abs=1e-4)
    g = torch.Generator().manual_seed(0)
    honest = 0.5 + torch.randn(8, 2000, generator=g)
    batch = torch.cat([honest, -4 * honest[:2]])  # rows p8, p9 will be the attackers
    meta = ClientMeta([f"p{i}" for i in range(10)], torch.ones(10))
    out, report = build_channel("byzantine", {"attack": "alie", "clients": ["p8", "p9"]}, 0).transmit(batch, meta)
    expected = honest.mean(0) - alie_z(10, 2) * honest.std(0, unbiased=False)
    assert torch.allclose(out[8], expected) and torch.allclose(out[9], expected) and torch.equal(out[:8], honest)
    assert report.extra["attackers"] == 2.0
    krum = build_rule("krum", {"f": 2})
    assert any(torch.equal(krum(batch, torch.ones(10)), row) for row in honest)  # the flip is shunned
    assert torch.equal(krum(out, torch.ones(10)), expected)  # ALIE is chosen
    ipm, _ = build_channel("byzantine", {"attack": "ipm", "fraction": 0.2, "epsilon": 0.5}, 0).transmit(honest, _meta(8))
    flipped = [i for i in range(8) if not torch.equal(ipm[i], honest[i])]
    assert len(flipped) == 2 and all(torch.allclose(ipm[i], -0.5 * honest[[j for j in range(8) if j not in flipped]].mean(0))
                                     for i in flipped)


def test_imperfect_csi_hurts_the_zero_forcing_receiver_through_the_channel_estimate_alone():
    """ZF divides by the estimated gain: with perfect CSI it undoes the fading exactly at high SNR, with
    an estimate g + e (var 0.1) it does not, so the error grows; LMMSE also changes its weights, which
    alone would hide a missing estimation error."""
    x = _gaussian(2, 200_000)
    settings = {"snr_db": 40.0, "equalizer": "zf"}
    perfect = build_channel("rayleigh", settings, 5).transmit(x, _meta(2))[1]
    estimated = build_channel("rayleigh", {**settings, "csi_error_var": 0.1}, 5).transmit(x, _meta(2))[1]
    assert torch.all(estimated.mse > 10 * perfect.mse)


def test_reports_of_batches_sent_apart_average_their_extras_over_clients():
    from fedllm.channels import ChannelReport

    def report(n: int, loss: float) -> ChannelReport:
        return ChannelReport(torch.zeros(n), torch.zeros(n), torch.full((n,), 32.0), torch.zeros(n, dtype=torch.bool),
                             extra={"loss_rate": loss})

    joined = ChannelReport.concat([report(3, 0.1), report(1, 0.5)], order=[0, 2, 3, 1])
    assert joined.extra["loss_rate"] == pytest.approx((3 * 0.1 + 1 * 0.5) / 4)


@pytest.mark.parametrize("kind", ["awgn", "rayleigh", "rician", "erasure", "ota"])
def test_analogue_links_count_32_bits_per_value(kind):
    x = _gaussian(3, 1001)
    report = build_channel(kind, {}, 0).transmit(x, _meta(3))[1]
    assert torch.equal(report.bits, torch.full((3,), 32.0 * 1001, dtype=report.bits.dtype))
