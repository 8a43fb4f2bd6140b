"""Central DP (DP-FedAvg): clipping, the fixed denominator, the noise, and the accountant checked
against an independent one (opacus)."""

import warnings

import pytest
import torch
from fedllm.channels import build_channel
from fedllm.strategies import build_rule

from fedllm.config import ConfigError, load_config
from fedllm.core.types import ClientUpdate
from fedllm.fusion.pipeline import fuse_updates
from fedllm.fusion.privacy import DifferentiallyPrivate, PrivacyLedger, clip_rows


def _dp(clip: float, sigma: float, cohort: float | None = None, seed: int = 1) -> DifferentiallyPrivate:
    rule = DifferentiallyPrivate(build_rule("fedavg", {}), clip, sigma, seed)
    rule.expected_cohort = cohort
    return rule


def test_clipping_bounds_norms_and_keeps_small_updates():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    assert torch.allclose(clip_rows(x, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


def test_the_sum_is_divided_by_the_expected_cohort_and_the_noise_has_the_promised_scale():
    deltas = torch.randn(4, 200_000, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([1.0, 5.0, 2.0, 9.0])  # ignored: under DP every client counts once
    clean = clip_rows(deltas, 2.0).sum(0) / 8  # 4 arrived, 8 expected (q N): the denominator stays 8
    assert torch.allclose(_dp(2.0, 0.0, cohort=8)(deltas, weights), clean, atol=1e-6)
    noise = _dp(2.0, 1.5, cohort=8)(deltas, weights) - clean
    assert float(noise.std()) == pytest.approx(1.5 * 2.0 / 8, rel=0.02)


def test_one_client_moves_the_fused_update_by_at_most_clip_over_the_cohort():
    """The sensitivity DP's accounting rests on: add one client, however large its update, and the
    (noise-free) result moves by at most C / m."""
    g = torch.Generator().manual_seed(2)
    honest = torch.randn(5, 50, generator=g)
    attacker = 1e6 * torch.randn(1, 50, generator=g)
    without = _dp(1.0, 0.0, cohort=6)(honest, torch.ones(5))
    with_it = _dp(1.0, 0.0, cohort=6)(torch.cat([honest, attacker]), torch.ones(6))
    assert float(torch.linalg.vector_norm(with_it - without)) <= 1.0 / 6 + 1e-6


@pytest.mark.parametrize("sigma, rounds, q, delta", [(1.0, 1, 1.0, 1e-5), (1.0, 10, 0.1, 1e-5),
                                                     (2.0, 100, 0.05, 1e-6), (0.8, 50, 0.5, 1e-5),
                                                     (5.0, 20, 1.0, 1e-3)])
def test_epsilon_agrees_with_opacus_rdp_accountant(sigma, rounds, q, delta):
    """dp-accounting (ours, also Flower's backend) against opacus's own RDP implementation (opacus 1.6)."""
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(rounds):
            reference.step(noise_multiplier=sigma, sample_rate=q)
        expected = reference.get_epsilon(delta)
    assert PrivacyLedger(sigma, delta, q).epsilon(rounds) == pytest.approx(expected, rel=0.03)


def test_sub_sampling_amplifies_privacy_and_the_ledger_counts_rounds():
    assert PrivacyLedger(1.0, 1e-5, 0.1).epsilon(10) < 0.5 * PrivacyLedger(1.0, 1e-5, 1.0).epsilon(10)
    ledger = PrivacyLedger(1.0, 1e-5, 0.5)
    assert ledger.epsilon() == 0.0 and ledger.spend() == pytest.approx(ledger.epsilon(1))
    assert ledger.would_exceed(ledger.epsilon(2) * 0.99) and not ledger.would_exceed(ledger.epsilon(2) * 1.01)
    assert PrivacyLedger(0.0, 1e-5, 1.0).epsilon(1) == float("inf")


def test_server_side_dp_uses_uniform_weights_and_config_is_checked():
    ups = [ClientUpdate(i, torch.full((3,), float(v)), 10 * (i + 1), {}) for i, v in enumerate([1.0, 10.0, -2.0])]
    fused, _ = fuse_updates(ups, build_channel("ideal", {}, 0), _dp(1.0, 0.0))
    assert torch.allclose(fused, clip_rows(torch.stack([u.delta for u in ups]), 1.0).mean(0))
    assert load_config(None, "strategy.dp_clip_norm=0.5").strategy.dp_noise_multiplier == 1.0
    with pytest.raises(ConfigError, match="only goes with fedavg or personalized"):
        load_config(None, "strategy.name=median strategy.dp_clip_norm=0.5")
    with pytest.raises(ConfigError, match="needs strategy.sampling: poisson"):
        load_config(None, "strategy.dp_clip_norm=0.5 strategy.fraction_train=0.5")
    load_config(None, "strategy.dp_clip_norm=0.5 strategy.fraction_train=0.5 strategy.sampling=poisson")
    with pytest.raises(ConfigError, match="channel 'ota' superposes"):
        load_config(None, "strategy.dp_clip_norm=0.5 channel.kind=ota")
    with pytest.raises(ConfigError, match="dp_target_epsilon is a privacy budget"):
        load_config(None, "strategy.dp_target_epsilon=3")
