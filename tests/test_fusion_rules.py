import pytest
import torch
from fedllm.strategies import FUSION_RULES, build_rule


def test_fedavg_is_the_example_weighted_mean():
    deltas = torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, -2.0], [0.0, 8.0, 0.0]])
    weights = torch.tensor([1.0, 3.0, 4.0])
    fused = build_rule("fedavg", {})(deltas, weights)
    expected = torch.tensor([(1 + 9 + 0) / 8, (0 + 12 + 32) / 8, (2 - 6 + 0) / 8])
    assert torch.allclose(fused, expected)


def test_fedavg_equal_weights_is_plain_mean_and_single_client_is_identity():
    deltas = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(build_rule("fedavg", {})(deltas, torch.ones(5)), deltas.mean(0), atol=1e-6)
    assert torch.allclose(build_rule("fedavg", {})(deltas[:1], torch.tensor([9.0])), deltas[0])


def test_fedavg_rejects_bad_shapes_and_zero_weight():
    fedavg = build_rule("fedavg", {})
    with pytest.raises(ValueError, match="clients x d"):
        fedavg(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="positive total weight"):
        fedavg(torch.zeros(2, 3), torch.zeros(2))


def test_task_arithmetic_sums_the_task_vectors():
    deltas = torch.tensor([[1.0, -2.0], [0.5, 4.0], [0.0, 1.0]])
    assert torch.equal(build_rule("task_arithmetic", {})(deltas, torch.tensor([1.0, 5.0, 9.0])), torch.tensor([1.5, 3.0]))


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    deltas = torch.tensor([
        [0.9, -0.1, 0.5, 0.0, -0.8],
        [0.6, 0.7, -0.2, 0.05, -0.1],
        [-0.3, 0.8, 0.4, 0.0, 0.9],
    ])
    # k = 0.6 keeps 3 of 5 per row: row0 {0.9, 0.5, -0.8}, row1 {0.6, 0.7, -0.2}, row2 {0.8, 0.4, 0.9}
    # elected signs from sums: [+1.5, +1.5, +0.7, 0, +0.1]; disjoint means of agreeing entries:
    expected = torch.tensor([(0.9 + 0.6) / 2, (0.7 + 0.8) / 2, (0.5 + 0.4) / 2, 0.0, 0.9])
    fused = build_rule("ties", {"k": 0.6})(deltas, torch.ones(3))
    assert torch.allclose(fused, expected)


def test_dare_rescaling_keeps_the_expectation():
    """E[DARE] = the plain sum: deltas with a non-zero mean make the rescale visible (no rescale gives
    0.2 x the sum, 1 / (1 - p)^2 gives 5 x)."""
    g = torch.Generator().manual_seed(0)
    deltas = 1.0 + torch.randn(3, 200_000, generator=g)
    rule = build_rule("dare", {"p": 0.8}, seed=1)
    fused = rule(deltas, torch.ones(3))
    assert abs(float((fused != 0).float().mean()) - (1 - 0.8**3)) < 0.01
    assert float(fused.mean()) == pytest.approx(float(deltas.sum(0).mean()), rel=0.02)
    assert torch.allclose(build_rule("dare", {"p": 0.0})(deltas, torch.ones(3)), deltas.sum(0))


def test_dare_equals_pefts_dare_linear_with_a_shared_mask(monkeypatch):
    """fedllm's DARE against PEFT's (peft.utils.merge_utils.dare_linear, PEFT 0.21): PEFT draws its masks
    with torch.bernoulli, so it is handed the very masks fedllm's rule draws (its seeded generator, one
    uniform draw for the whole batch, kept where >= p); the drop, the 1 / (1 - p) rescale and the sum
    must then agree exactly."""
    from peft.utils.merge_utils import dare_linear

    p, seed = 0.7, 4
    deltas = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    keep = (torch.rand(deltas.shape, generator=torch.Generator().manual_seed(seed)) >= p).float()
    masks = iter(keep)
    monkeypatch.setattr(torch, "bernoulli", lambda probs: next(masks))
    theirs = dare_linear(list(deltas), torch.ones(3), density=1 - p)
    ours = build_rule("dare", {"p": p}, seed=seed)(deltas, torch.ones(3))
    assert 0.1 < float(keep.mean()) < 0.5  # the masks really drop
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 64])
def test_ties_equals_pefts_merge_utils(chunk, monkeypatch):
    """fedllm's TIES against PEFT's (peft.utils.merge_utils.ties, PEFT 0.21) on the same vectors,
    also when fedllm merges the coordinates in chunks (64 does not divide 1000: a ragged last one)."""
    from peft.utils.merge_utils import ties

    if chunk:
        monkeypatch.setattr(FUSION_RULES.get("ties"), "CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    deltas = torch.randn(4, 1000, generator=g) + torch.tensor([0.3, -0.2, 0.0, 0.1])[:, None]
    for density in (0.2, 0.5, 1.0):
        reference = ties(list(deltas), torch.ones(4), density=density, majority_sign_method="total")
        assert torch.allclose(build_rule("ties", {"k": density})(deltas, torch.ones(4)), reference, atol=1e-6)


def test_median_and_trimmed_mean_ignore_outliers():
    deltas = torch.tensor([[1.0, 2.0], [1.2, 2.2], [0.8, 1.8], [1.1, 2.1], [1000.0, -1000.0]])
    w = torch.ones(5)
    assert torch.allclose(build_rule("median", {})(deltas, w), torch.tensor([1.1, 2.0]))
    assert torch.allclose(build_rule("median", {})(deltas[:4], w[:4]), torch.tensor([1.05, 2.05]))
    assert torch.allclose(build_rule("trimmed_mean", {"trim_ratio": 0.2})(deltas, w), torch.tensor([1.1, (1.8 + 2.0 + 2.1) / 3]))


def test_norm_clip_bounds_each_update():
    deltas = torch.tensor([[3.0, 4.0], [0.6, 0.8], [300.0, 400.0]])
    fused = build_rule("norm_clip", {"max_norm": 1.0})(deltas, torch.ones(3))
    assert torch.allclose(fused, torch.tensor([0.6, 0.8]))
    by_median = build_rule("norm_clip", {"median_multiple": 1.0})(deltas, torch.ones(3))  # median norm 5
    assert torch.allclose(by_median, torch.tensor([(3 + 0.6 + 3) / 3, (4 + 0.8 + 4) / 3]))


def test_rule_parameters_are_validated():
    from fedllm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"strategy.k: .*less than or equal to 1"):
        load_config(None, "strategy.name=ties strategy.k=2")
    with pytest.raises(ConfigError, match=r"strategy.p: unknown key; allowed: name, fraction_train, .*, and for 'ties': k$"):
        load_config(None, "strategy.name=ties strategy.p=0.5")
    assert load_config(None, "strategy.name=dare strategy.p=0.5").strategy.params() == {"p": 0.5}


@pytest.mark.parametrize("clients", [5, 6])
def test_robust_rules_on_column_blocks_equal_the_whole_tensor_reduction(clients):
    """Median and trimmed mean reduce column blocks (for speed); the result must not change."""

    x = torch.randn(clients, 200_003, generator=torch.Generator().manual_seed(1))
    w = torch.ones(clients)
    ordered = x.sort(dim=0).values
    median = ordered[clients // 2] if clients % 2 else (ordered[clients // 2 - 1] + ordered[clients // 2]) / 2
    assert torch.equal(build_rule("median", {})(x, w), median)
    cut = int(0.2 * clients)
    assert torch.allclose(build_rule("trimmed_mean", {})(x, w), ordered[cut:clients - cut].mean(0))


@pytest.mark.parametrize("name", FUSION_RULES.names())
def test_no_rule_writes_into_the_received_rows_or_statistics(name):
    """The R-MTLLMF benchmark fuses one received batch with every rule in turn (one transmission per
    jammer power): a rule that scaled, trimmed or sorted the rows in place would corrupt the next rule's."""
    from fedllm.core.vectors import Layout
    from fedllm.strategies import FusionSpace

    layout, gram = Layout(("lin.weight", "lin.bias"), ((4, 5), (4,))), Layout(("lin.weight",), ((5, 5),))
    g, n = torch.Generator().manual_seed(0), 7
    rule = build_rule(name, {"weights": [1.0] * n} if name == "weighted_average" else {})
    layouts = {s: gram if s == "gram" else layout for s in rule.client_statistics()}
    stats = {s: (torch.stack([(x.T @ x).reshape(-1) for x in torch.randn(n, 9, 5, generator=g)]) if s == "gram"
                 else torch.rand(n, layout.numel, generator=g)) for s in layouts}
    rows = torch.randn(n, layout.numel, generator=g)
    before_rows, before_stats = rows.clone(), {s: t.clone() for s, t in stats.items()}
    fused = rule(rows, torch.ones(n), stats, FusionSpace(layout, layouts))
    assert fused.shape == (layout.numel,)
    assert torch.equal(rows, before_rows)
    assert all(torch.equal(stats[s], before_stats[s]) for s in stats)
