import torch
from fedllm.channels import build_channel
from fedllm.strategies import build_rule

from fedllm.core.types import ClientUpdate
from fedllm.core.vectors import Layout, flatten
from fedllm.fusion.pipeline import apply_update, fuse_updates

GLOBAL = {"w": torch.zeros(2, 3), "b": torch.ones(2)}
LAYOUT = Layout.of(GLOBAL)


def _updates() -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(0)
    return [ClientUpdate(i, torch.randn(LAYOUT.numel, generator=g), n, {"train_loss": 1.0})
            for i, n in enumerate([10, 30, 60])]


def aggregate(global_params, updates, layout, channel, rule, lr=1.0):
    fused, record = fuse_updates(updates, channel, rule)
    return apply_update(global_params, fused, layout, lr), record


def _expected(updates, lr=1.0):
    w = torch.tensor([u.num_examples for u in updates], dtype=torch.float32)
    mean = (w / w.sum()) @ torch.stack([u.delta for u in updates])
    return flatten(GLOBAL, LAYOUT) + lr * mean


def test_ideal_fedavg_round_gives_global_plus_weighted_mean():
    ups = _updates()
    new, record = aggregate(GLOBAL, ups, LAYOUT, build_channel("ideal", {}, 0), build_rule("fedavg", {}), 0.5)
    assert torch.allclose(flatten(new, LAYOUT), _expected(ups, 0.5), atol=1e-6)
    assert record["channel_mse"] == 0 and record["channel_bits"] == 3 * 32 * LAYOUT.numel


def test_noiseless_over_the_air_equals_fedavg():
    ups = _updates()
    ota = build_channel("ota", {"snr_db": float("inf"), "truncation_threshold": 0.0}, 0)
    new, _ = aggregate(GLOBAL, ups, LAYOUT, ota, build_rule("fedavg", {}))
    assert torch.allclose(flatten(new, LAYOUT), _expected(ups), atol=1e-5)


def test_dropped_clients_are_left_out_and_all_lost_keeps_the_model():
    ups = _updates()
    lost = build_channel("erasure", {"p": 1.0, "mode": "client"}, 0)
    new, record = aggregate(GLOBAL, ups, LAYOUT, lost, build_rule("fedavg", {}))
    assert record["all_lost"] and record["channel_dropped"] == 3
    assert all(torch.equal(new[k], GLOBAL[k]) for k in GLOBAL)


def test_noisy_channel_perturbs_the_update_by_its_mse():
    ups = _updates()
    new, record = aggregate(GLOBAL, ups, LAYOUT, build_channel("awgn", {"snr_db": 0.0}, 0), build_rule("fedavg", {}))
    assert record["channel_mse"] > 0.3  # deltas of unit variance at 0 dB
    assert not torch.allclose(flatten(new, LAYOUT), _expected(ups), atol=1e-2)
