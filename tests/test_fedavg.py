import pytest
import torch

from strategies import FUSION_RULES


def test_fedavg_is_the_example_weighted_mean():
    deltas = torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, -2.0], [0.0, 8.0, 0.0]])
    weights = torch.tensor([1.0, 3.0, 4.0])
    fused = FUSION_RULES.get("fedavg")(deltas, weights)
    expected = torch.tensor([(1 + 9 + 0) / 8, (0 + 12 + 32) / 8, (2 - 6 + 0) / 8])
    assert torch.allclose(fused, expected)


def test_fedavg_equal_weights_is_plain_mean_and_single_client_is_identity():
    deltas = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(FUSION_RULES.get("fedavg")(deltas, torch.ones(5)), deltas.mean(0), atol=1e-6)
    assert torch.allclose(FUSION_RULES.get("fedavg")(deltas[:1], torch.tensor([9.0])), deltas[0])


def test_fedavg_rejects_bad_shapes_and_zero_weight():
    fedavg = FUSION_RULES.get("fedavg")
    with pytest.raises(ValueError, match="clients x d"):
        fedavg(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="positive total weight"):
        fedavg(torch.zeros(2, 3), torch.zeros(2))
