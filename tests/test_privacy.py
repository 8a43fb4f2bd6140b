import math

import pytest
import torch
from fedllm.channels import build_channel
from fedllm.strategies import build_rule

from fedllm.config import ConfigError, load_config
from fedllm.core.types import ClientUpdate
from fedllm.fusion.pipeline import fuse_updates
from fedllm.fusion.privacy import DifferentiallyPrivate, clip_rows, gaussian_epsilon


def test_clipping_bounds_norms_and_keeps_small_updates():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    clipped = clip_rows(x, 1.0)
    assert torch.allclose(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


def _dp(clip: float, sigma: float, seed: int = 1) -> DifferentiallyPrivate:
    return DifferentiallyPrivate(build_rule("fedavg", {}), clip, sigma, 1e-5, seed)


def test_dp_mean_noise_has_the_promised_scale():
    deltas = torch.randn(4, 200_000, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([1.0, 5.0, 2.0, 9.0])  # ignored: under DP every client counts once
    noise = _dp(2.0, 1.5)(deltas, weights) - clip_rows(deltas, 2.0).mean(0)
    assert float(noise.std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.02)
    assert torch.allclose(_dp(2.0, 0.0)(deltas, weights), clip_rows(deltas, 2.0).mean(0), atol=1e-7)


@pytest.mark.parametrize("rounds, sigma", [(1, 1.0), (10, 2.0), (100, 5.0)])
def test_epsilon_matches_the_rdp_closed_form(rounds, sigma):
    # min over alpha of T a / (2 s^2) + L / (a - 1) is T / (2 s^2) + sqrt(2 T L) / s at a = 1 + s sqrt(2L / T)
    log_inv_delta = math.log(1e5)
    exact = rounds / (2 * sigma**2) + math.sqrt(2 * rounds * log_inv_delta) / sigma
    assert gaussian_epsilon(rounds, sigma, 1e-5) == pytest.approx(exact, rel=0.01)
    assert gaussian_epsilon(rounds + 1, sigma, 1e-5) > gaussian_epsilon(rounds, sigma, 1e-5)
    assert gaussian_epsilon(rounds, 2 * sigma, 1e-5) < gaussian_epsilon(rounds, sigma, 1e-5)
    assert gaussian_epsilon(rounds, 0.0, 1e-5) == math.inf


def test_server_side_dp_replaces_the_mean_and_config_is_checked():
    ups = [ClientUpdate(i, torch.full((3,), float(v)), 10 * (i + 1), {}) for i, v in enumerate([1.0, 10.0, -2.0])]
    fused, _ = fuse_updates(ups, build_channel("ideal", {}, 0), _dp(1.0, 0.0))
    expected = clip_rows(torch.stack([u.delta for u in ups]), 1.0).mean(0)  # uniform weights under DP
    assert torch.allclose(fused, expected)
    assert load_config(None, "strategy.dp_clip_norm=0.5").strategy.dp_noise_multiplier == 1.0
    with pytest.raises(ConfigError, match="only goes with fedavg or personalized"):
        load_config(None, "strategy.name=median strategy.dp_clip_norm=0.5")
