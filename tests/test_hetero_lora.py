"""Heterogeneous LoRA ranks: HetLoRA's zero-padding, FLoRA's stacking, FlexLoRA's SVD redistribution.

The oracles are computed apart from fedllm's code path: zero-padding with ``torch.nn.functional.pad``,
FLoRA's aggregate as the product of the literally stacked factors, FlexLoRA's as numpy's SVD of the
mean of the clients' products (and Eckart-Young's error for a client's share)."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fedllm.apps.client_round import train_round
from fedllm.apps.federated_run import FederatedRun
from fedllm.apps.payload import (
    DELTA,
    METRICS,
    RejectedReply,
    parse_reply,
    round_content,
)
from fedllm.config import ConfigError, load_config
from fedllm.core.lora_ranks import client_rank, pad_rows, rank_layout, truncate_to
from fedllm.core.types import ClientUpdate
from fedllm.core.vectors import Layout, flatten, unflatten
from fedllm.fusion.lora_products import svd_factors
from tests.test_payload import _reply
from tests.test_rmtllmf import TINY_FUSION

TINY_HET = [o for o in TINY_FUSION if not o.startswith("peft.")] + [
    "peft.method=lora", "peft.r=4", "peft.alpha=8", "peft.ranks=[2,4]", "client.lr=0.01", "client.max_steps=6",
    "strategy.name=fedavg", "peft.target_modules=[query,value]",
]


def _context(partition: int, **node) -> Context:
    return Context(run_id=1, node_id=partition + 10,
                   node_config={"partition-id": partition, "num-partitions": 2, **node}, state=RecordDict(), run_config={})


def _client_updates(run: FederatedRun, cfg, contexts) -> list[ClientUpdate]:
    """Each client trains from the global state; its reply goes through the server's own checks."""
    updates = []
    for i, context in enumerate(contexts):
        content = train_round(round_content(run.global_params, cfg.to_json(), 1, 2), context)
        updates.append(parse_reply(_reply(content), run.pipeline.layout,
                                   node=i + 1, stat_layouts={}))
    return updates


def _factors(run: FederatedRun):
    """(name of A, name of B, name of the base weight) per adapted layer of the server's model."""
    return [(p.a, p.b, p.weight) for p in run.pipeline.lora.pairs] if run.pipeline.lora is not None else [
        (n, n.replace("lora_A", "lora_B"), n.replace("lora_A.default", "base_layer"))
        for n in run.pipeline.layout.names if ".lora_A." in n]


# ----------------------------------------------------------------------------- the layout maths
def test_a_rank_layout_pads_back_to_the_global_one_and_truncation_inverts_it():
    glob = Layout(("l.lora_A.default.weight", "l.lora_B.default.weight", "head.weight"), ((4, 3), (5, 4), (2, 5)))
    low = rank_layout(glob, 2)
    assert low.shapes == ((2, 3), (5, 2), (2, 5))
    a, b, h = torch.randn(2, 3), torch.randn(5, 2), torch.randn(2, 5)
    padded = unflatten(pad_rows(flatten({"l.lora_A.default.weight": a, "l.lora_B.default.weight": b,
                                         "head.weight": h}, low)[None], low, glob)[0], glob)
    assert torch.equal(padded["l.lora_A.default.weight"], torch.nn.functional.pad(a, (0, 0, 0, 2)))
    assert torch.equal(padded["l.lora_B.default.weight"], torch.nn.functional.pad(b, (0, 2)))
    assert torch.equal(padded["head.weight"], h)
    # a padded client's B @ A is its own
    assert torch.allclose(padded["l.lora_B.default.weight"] @ padded["l.lora_A.default.weight"], b @ a)
    back = truncate_to(padded, dict(zip(low.names, low.shapes)))
    assert torch.equal(back["l.lora_A.default.weight"], a) and torch.equal(back["l.lora_B.default.weight"], b)
    with pytest.raises(ConfigError, match="head.weight"):  # only LoRA factors may differ, only by rank
        truncate_to(padded, {"head.weight": (2, 4)})


def test_a_clients_rank_comes_from_its_node_config_or_its_partition():
    peft = load_config(None, TINY_HET).peft
    assert [client_rank(peft, p, {}) for p in range(4)] == [2, 4, 2, 4]
    assert client_rank(peft, 0, {"lora-rank": 3}) == 3
    assert client_rank(peft, -1, {}) == 4  # a device with its own data and no rank: the global one
    with pytest.raises(ConfigError, match="lora-rank=8.*peft.r=4"):
        client_rank(peft, 0, {"lora-rank": 8})
    with pytest.raises(ConfigError, match="lora-rank='big'"):
        client_rank(peft, 0, {"lora-rank": "big"})


def test_config_errors_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match=r"peft.ranks .*set peft.r: 16"):
        load_config(None, [*TINY_HET, "peft.ranks=[2,16]"])
    with pytest.raises(ConfigError, match="over the air"):
        load_config(None, [*TINY_HET, "channel.kind=ota"])
    with pytest.raises(ConfigError, match="freeze_lora_a"):
        load_config(None, [*TINY_HET, "peft.fuse_lora_as=svd", "peft.freeze_lora_a=true"])
    with pytest.raises(ConfigError, match="statistics"):
        load_config(None, [*TINY_HET, "strategy.name=regmean"])
    with pytest.raises(ConfigError, match="svd.*weight_delta"):
        load_config(None, [*TINY_HET, "peft.fuse_lora_as=svd", "strategy.name=rmtllmf", "peft.frozen_patterns=[embeddings]"])


# ----------------------------------------------------------------------------- the three aggregations
def test_hetlora_zero_pads_the_factors_and_the_low_rank_client_sends_less(tmp_path):
    cfg = load_config(None, [*TINY_HET, f"output.dir={tmp_path}"])
    run = FederatedRun(None, cfg, echo=lambda _: None)
    g0 = {n: t.clone() for n, t in run.global_params.items()}
    updates = _client_updates(run, cfg, [_context(0), _context(1)])
    assert [u.rank for u in updates] == [2, None]  # partition 0 trained at rank 2, partition 1 at the global 4
    assert updates[0].delta.numel() < updates[1].delta.numel()
    low = unflatten(updates[0].delta, rank_layout(run.pipeline.layout, 2))
    high = unflatten(updates[1].delta, run.pipeline.layout)
    run.round_update(1, updates)
    w = torch.tensor([u.num_examples for u in updates], dtype=torch.float32)
    w = w / w.sum()
    for a, b, _ in _factors(run):
        want_a = g0[a] + w[0] * torch.nn.functional.pad(low[a], (0, 0, 0, 2)) + w[1] * high[a]
        want_b = g0[b] + w[0] * torch.nn.functional.pad(low[b], (0, 2)) + w[1] * high[b]
        assert torch.allclose(run.global_params[a], want_a, atol=1e-6)
        assert torch.allclose(run.global_params[b], want_b, atol=1e-6)
        assert torch.equal(run.global_params[a][2:], g0[a][2:] + w[1] * high[a][2:])  # only rank 4 moved these


def test_flora_folds_exactly_what_the_stacked_factors_multiply_to(tmp_path):
    cfg = load_config(None, [*TINY_HET, "peft.fuse_lora_as=weight_delta", f"output.dir={tmp_path}"])
    run = FederatedRun(None, cfg, echo=lambda _: None)
    g0 = {n: t.clone() for n, t in run.global_params.items()}
    updates = _client_updates(run, cfg, [_context(0), _context(1)])
    layouts = [rank_layout(run.pipeline.layout, 2), run.pipeline.layout]
    trained = [unflatten(u.delta, lay) for u, lay in zip(updates, layouts)]
    run.round_update(1, updates)
    w = torch.tensor([u.num_examples for u in updates], dtype=torch.float32)
    w = w / w.sum()
    scaling = cfg.peft.alpha / cfg.peft.r
    for a, b, weight in _factors(run):
        # each client's full factors: its start (the global ones, cut to its rank) plus what it learnt
        a_k = [g0[a][:2] + trained[0][a], g0[a] + trained[1][a]]
        b_k = [g0[b][:, :2] + trained[0][b], g0[b] + trained[1][b]]
        stacked_a = torch.cat(a_k, 0)  # FLoRA: A's stacked ...
        stacked_b = torch.cat([w[0] * b_k[0], w[1] * b_k[1]], 1)  # ... B's side by side, weighted
        start = scaling * g0[b] @ g0[a]  # zero: PEFT starts B at zero
        assert torch.allclose(run.global_params[weight] - g0[weight], scaling * stacked_b @ stacked_a - start,
                              atol=1e-6)
        assert torch.equal(run.global_params[a], g0[a])  # the LoRA restarts from its initial value


def test_flexlora_redistributes_the_svd_of_the_mean_product(tmp_path):
    cfg = load_config(None, [*TINY_HET, "peft.fuse_lora_as=svd", "rounds=2", f"output.dir={tmp_path}"])
    run = FederatedRun(None, cfg, echo=lambda _: None)
    assert not any("base_layer" in n for n in run.global_params)  # only factors go down
    scaling = cfg.peft.alpha / cfg.peft.r
    w = None
    for rnd in (1, 2):  # round 2 starts from SVD factors: clients' starts are their truncations
        g0 = {n: t.clone() for n, t in run.global_params.items()}
        updates = _client_updates(run, cfg, [_context(0), _context(1)])
        trained = [unflatten(u.delta, lay) for u, lay in zip(updates, [rank_layout(run.pipeline.layout, 2),
                                                                       run.pipeline.layout])]
        run.round_update(rnd, updates)
        w = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        w = w / w.sum()
        for a, b, _ in _factors(run):
            products = [scaling * (g0[b][:, :2] + trained[0][b]).double() @ (g0[a][:2] + trained[0][a]).double(),
                        scaling * (g0[b] + trained[1][b]).double() @ (g0[a] + trained[1][a]).double()]
            mean = (w[0] * products[0] + w[1] * products[1]).numpy()
            u, s, vh = np.linalg.svd(mean)
            best4 = (u[:, :4] * s[:4]) @ vh[:4]
            got = scaling * run.global_params[b].double() @ run.global_params[a].double()
            assert np.allclose(got.numpy(), best4, atol=1e-5)
            # a rank-2 client's share: the best rank-2 approximation (Eckart-Young's error)
            share = scaling * run.global_params[b][:, :2].double() @ run.global_params[a][:2].double()
            assert np.linalg.norm(mean - share.numpy()) == pytest.approx(np.sqrt((s[2:] ** 2).sum()), rel=1e-4)


def test_svd_factors_keep_null_components_trainable():
    product = torch.outer(torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 3.0, 4.0, 0.0]))  # rank 1
    spare = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    b, a = svd_factors(product, 3, 0.5, spare)
    assert torch.allclose(0.5 * b @ a, product, atol=1e-6)
    assert torch.equal(a[1:], spare[1:]) and b[:, 1:].abs().sum() == 0  # no component: spare A, zero B


# ----------------------------------------------------------------------------- through the apps
def test_a_client_above_the_global_rank_is_rejected_by_name_and_the_round_goes_on(tmp_path):
    cfg = load_config(None, [*TINY_HET, f"output.dir={tmp_path}"])
    run = FederatedRun(None, cfg, echo=lambda _: None)
    with pytest.raises(ConfigError, match="lora-rank=8"):
        train_round(round_content(run.global_params, cfg.to_json(), 1, 2), _context(0, **{"lora-rank": 8}))
    updates = _client_updates(run, cfg, [_context(0, **{"lora-rank": 3}), _context(1, **{"lora-rank": 1})])
    assert [u.rank for u in updates] == [3, 1]
    content = train_round(round_content(run.global_params, cfg.to_json(), 1, 2), _context(0))
    content.metric_records[METRICS]["lora_rank"] = 3  # says 3, sends rank-2 tensors
    with pytest.raises(RejectedReply, match=r"lora_A.*shape \(2, \d+\), expected \(3, \d+\)"):
        parse_reply(_reply(content), run.pipeline.layout, node=7)
    assert DELTA in content.array_records


@pytest.mark.parametrize("fuse", ["factors", "weight_delta", "svd"])
def test_a_simulation_with_mixed_ranks_runs_and_counts_each_clients_payload(tmp_path, fuse):
    from fedllm.apps.simulation import simulate

    cfg = load_config(None, [*TINY_HET, f"peft.fuse_lora_as={fuse}", "rounds=2", "channel.kind=awgn",
                             "channel.snr_db=20", "data.num_clients=2", f"output.dir={tmp_path}"])
    run_dir = simulate(cfg, clients=2)
    summary = json.loads((run_dir / "summary.json").read_text())
    layout = FederatedRun(None, cfg, echo=lambda _: None).pipeline.layout
    both = 4 * (layout.numel + rank_layout(layout, 2).numel)
    assert summary["total_bytes_up"] == 2 * both  # two rounds, one rank-2 and one rank-4 payload each
    assert summary["final_accuracy"] > 0.3
