"""Krum, Multi-Krum and Bulyan against Flower's own strategies (flwr.serverapp.strategy, Flower 1.42)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedllm.strategies import InsufficientUpdates, build_rule
from flwr.app import Array, ArrayRecord, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp.strategy import Bulyan, Krum, MultiKrum


def _updates(n: int, byzantine: int, seed: int, spread: float = 1.0) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    honest = rng.normal(0.3, spread, (n - byzantine, 40))
    attack = -4.0 * honest.mean(axis=0) + rng.normal(0, 0.1, (byzantine, 40))  # sign-flipped, scaled
    return np.concatenate([honest, attack]).astype(np.float32), list(rng.integers(5, 50, n))


def _flower(strategy, deltas: np.ndarray, examples: list[int]) -> np.ndarray:
    base = np.ones(deltas.shape[1], dtype=np.float32)  # Flower sees client models: base + delta
    replies = [make_message(Metadata(run_id=1, message_id=f"r{i}", src_node_id=i + 1, dst_node_id=0,
                                     reply_to_message_id=f"i{i}", group_id="", created_at=0.0, ttl=3600.0,
                                     message_type=MessageType.TRAIN),
                            RecordDict({"arrays": ArrayRecord({"w": Array(base + d)}),
                                        "metrics": MetricRecord({"num-examples": int(n)})}))
               for i, (d, n) in enumerate(zip(deltas, examples))]
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays["w"].numpy() - base


@pytest.mark.parametrize("n, byzantine, f", [(5, 1, 1), (8, 2, 2), (10, 2, 1)])
def test_krum_and_multikrum_equal_flowers(n, byzantine, f):
    deltas, examples = _updates(n, byzantine, seed=n)
    w = torch.tensor(examples, dtype=torch.float32)
    krum = build_rule("krum", {"f": f})(torch.from_numpy(deltas), w).numpy()
    assert np.allclose(krum, _flower(Krum(num_malicious_nodes=f), deltas, examples), atol=1e-5)
    assert any(np.allclose(krum, row) for row in deltas[: n - byzantine])  # an honest client's update
    for m in (2, n - f):
        ours = build_rule("multikrum", {"f": f, "m": m})(torch.from_numpy(deltas), w).numpy()
        theirs = _flower(MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m), deltas, examples)
        assert np.allclose(ours, theirs, atol=1e-5)
    assert np.allclose(build_rule("multikrum", {"f": f})(torch.from_numpy(deltas), w).numpy(),
                       _flower(MultiKrum(num_malicious_nodes=f, num_nodes_to_select=n - f), deltas, examples),
                       atol=1e-5)


@pytest.mark.parametrize("n, byzantine, f", [(7, 1, 1), (8, 1, 1), (11, 2, 2), (12, 2, 2), (16, 3, 3)])
def test_bulyan_equals_flowers(n, byzantine, f):
    deltas, examples = _updates(n, byzantine, seed=100 + n)
    ours = build_rule("bulyan", {"f": f})(torch.from_numpy(deltas), torch.ones(n)).numpy()
    assert np.allclose(ours, _flower(Bulyan(num_malicious_nodes=f), deltas, examples), atol=1e-5)
    tight, _ = _updates(n, byzantine, seed=200 + n, spread=0.05)  # honest clients agree: Bulyan keeps to them
    honest_mean = tight[: n - byzantine].mean(axis=0)
    robust = build_rule("bulyan", {"f": f})(torch.from_numpy(tight), torch.ones(n)).numpy()
    assert np.linalg.norm(robust - honest_mean) < 0.2 * np.linalg.norm(tight.mean(axis=0) - honest_mean)


def test_bulyan_with_too_few_updates_keeps_the_model():
    deltas = torch.randn(6, 10)
    with pytest.raises(InsufficientUpdates, match="needs at least 7 updates, got 6"):
        build_rule("bulyan", {"f": 1})(deltas, torch.ones(6))
    from fedllm.channels import build_channel

    from fedllm.core.types import ClientUpdate
    from fedllm.fusion.pipeline import fuse_updates

    fused, record = fuse_updates([ClientUpdate(i, deltas[i], 10, {}) for i in range(6)], build_channel("ideal", {}, 0),
                                 build_rule("bulyan", {"f": 1}))
    assert fused is None and "needs at least 7" in record["fusion_skipped"]
