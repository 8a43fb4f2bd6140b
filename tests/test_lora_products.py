"""LoRA task vectors merged as weight deltas B @ A (peft.fuse_lora_as: weight_delta)."""

import pytest
import torch

from fedllm.apps.client_round import train_round
from fedllm.apps.federated_run import FederatedRun
from fedllm.apps.payload import DELTA, METRICS, round_content
from fedllm.config import ConfigError, load_config
from fedllm.core.types import ClientUpdate
from fedllm.core.vectors import flatten, get_tensors, set_tensors
from fedllm.fusion.lora_products import LoraProducts
from fedllm.workloads.classification.data import load_suite
from fedllm.workloads.classification.metrics import predict
from fedllm.workloads.classification.models import build_bundle, cached_bundle
from tests.test_client_app import _context
from tests.test_rmtllmf import TINY_FUSION

TINY_LORA_FUSION = [o for o in TINY_FUSION if not o.startswith("peft.")] + [
    "peft.method=lora", "peft.r=4", "peft.alpha=8", "peft.fuse_lora_as=weight_delta", "client.lr=0.01",
    "client.max_steps=15", "strategy.name=task_arithmetic", "strategy.server_lr=0.5",
]


def _one_lora_layer(fan_in_fan_out: bool = False):
    """A PEFT model with one adapted 3 -> 4 layer (r=2, alpha=1: scaling 0.5) and a plain head."""
    from collections import OrderedDict

    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(4, 3) if fan_in_fan_out else torch.nn.Linear(3, 4)  # GPT-2's Conv1D stores W transposed
    model = get_peft_model(torch.nn.Sequential(OrderedDict(l=layer, head=torch.nn.Linear(4, 3))),
                           LoraConfig(r=2, lora_alpha=1, target_modules=["l"], fan_in_fan_out=fan_in_fan_out))
    return model, dict(model.named_parameters())


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_weight_delta_is_scaling_times_b_at_a_minus_the_initial_product(fan_in_fan_out):
    model, params = _one_lora_layer(fan_in_fan_out)
    a_name = next(n for n in params if "lora_A" in n)
    b_name = next(n for n in params if "lora_B" in n)
    w_name = next(n for n in params if n.endswith("l.base_layer.weight"))
    head = next(n for n in params if n.endswith("head.weight"))
    a0 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # a non-zero initial product is subtracted
    b0 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    with torch.no_grad():
        params[a_name].copy_(a0)
        params[b_name].copy_(b0)
    initial = {n: t.detach().clone() for n, t in params.items()}
    products = LoraProducts.of(model, (a_name, b_name, head), initial)
    d_a = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    d_b = torch.arange(8.0).reshape(4, 2)
    out = products.weight_delta({a_name: d_a, b_name: d_b, head: torch.ones(3, 4)})
    by_hand = 0.5 * ((b0 + d_b) @ (a0 + d_a) - b0 @ a0)  # (4 x 3): out x in
    assert torch.allclose(out[w_name], by_hand.T if fan_in_fan_out else by_hand)
    assert torch.equal(out[head], torch.ones(3, 4))  # not a factor: passes through
    assert torch.equal(params[a_name], a0) and torch.equal(params[b_name], b0)  # the server's layer is left as it was
    rows = torch.stack([flatten({a_name: d_a, b_name: d_b, head: torch.zeros(3, 4)}, products.factor_layout),
                        torch.zeros(products.factor_layout.numel)])
    mapped = products(rows)
    assert mapped.shape == (2, 12 + 12) and mapped[1].abs().sum() == 0  # nothing learnt, nothing merged
    # fusing factors is not fusing updates: the mean of two clients' B @ A differs from mean(B) @ mean(A)
    clients = [(d_b, d_a), (-d_b, -d_a)]
    mean_of_products = sum(0.5 * (b0 + b) @ (a0 + a) for b, a in clients) / 2
    product_of_means = 0.5 * (b0 + sum(b for b, _ in clients) / 2) @ (a0 + sum(a for _, a in clients) / 2)
    assert not torch.allclose(mean_of_products, product_of_means)


def test_folding_equals_pefts_merge_and_unload():
    import copy

    model, params = _one_lora_layer()
    initial = {n: t.detach().clone() for n, t in params.items()}
    a_name = next(n for n in params if "lora_A" in n)
    b_name = next(n for n in params if "lora_B" in n)
    products = LoraProducts.of(model, (a_name, b_name), initial)
    with torch.no_grad():  # "trained": PEFT starts B at zero
        params[b_name].copy_(torch.randn(params[b_name].shape, generator=torch.Generator().manual_seed(3)))
    reference = copy.deepcopy(model).merge_and_unload().l.weight.detach()
    folded = products.fold(model)
    assert torch.allclose(folded[products.weight_layout.names[0]], reference, atol=1e-6)
    assert torch.equal(params[b_name], initial[b_name])  # the factors are reset


def test_folding_the_lora_into_base_weights_keeps_the_model_function():
    cfg = load_config(None, TINY_LORA_FUSION)
    suite = load_suite(cfg.data, cfg.seed)
    bundle = build_bundle(cfg, suite.label_names)
    products = LoraProducts.of(bundle.model, bundle.groups.global_names, bundle.initial_global)
    assert len(products.pairs) == 4  # query and value in 2 layers
    assert all(n.endswith("base_layer.weight") for n in products.weight_layout.names)
    g = torch.Generator().manual_seed(0)
    trained = {n: t + 0.3 * torch.randn(t.shape, generator=g) for n, t in bundle.initial_global.items()}
    set_tensors(bundle.model, trained)
    test = suite.split("test").subset(list(range(40)))
    with torch.no_grad():
        _, loss_lora = predict(bundle, bundle.model, suite, test, 20, 32)
    merged = products.fold(bundle.model)
    assert get_tensors(bundle.model, bundle.groups.global_names).keys() == bundle.initial_global.keys()
    for n, t in get_tensors(bundle.model, bundle.groups.global_names).items():
        assert torch.equal(t, bundle.initial_global[n])  # factors reset
    with torch.no_grad():
        _, loss_folded = predict(bundle, bundle.model, suite, test, 20, 32)
    assert loss_folded == pytest.approx(loss_lora, rel=1e-5)
    assert set(merged) == set(products.weight_layout.names)


def test_server_fuses_client_lora_updates_as_weight_deltas_and_sends_merged_weights(tmp_path):
    cfg = load_config(None, [*TINY_LORA_FUSION, "eval.fusion_metrics=true", f"output.dir={tmp_path}"])
    run = FederatedRun(None, cfg, echo=lambda _: None)
    theta0 = {n: t.clone() for n, t in run.global_params.items()}
    factor_names = set(run.pipeline.layout.names)
    assert any(n.endswith("base_layer.weight") for n in theta0) and run.down_bytes > run.payload_bytes
    updates = []
    for partition in (0, 1):
        reply = train_round(round_content(run.global_params, cfg.to_json(), 1, 2), _context(partition))
        delta = reply.array_records[DELTA].to_torch_state_dict()
        assert set(delta) == factor_names  # only the factors travel up
        metrics = {k: float(v) for k, v in dict(reply.metric_records[METRICS]).items()}
        updates.append(ClientUpdate(partition + 1, flatten(delta, run.pipeline.layout), 100, metrics))
    record = run.round_update(1, updates)
    expected = sum(run.pipeline.lora(u.delta[None])[0] for u in updates)
    for name, value in zip(run.pipeline.fusion_layout.names, torch.split(expected, run.pipeline.fusion_layout.sizes)):
        assert torch.allclose(run.global_params[name], theta0[name] + 0.5 * value.reshape(theta0[name].shape),
                              atol=1e-6)
    for name in factor_names:
        assert torch.equal(run.global_params[name], theta0[name])  # LoRA restarts from its initial value
    assert record["normalized_accuracy/topic"] == pytest.approx(  # the merged model over each task's own model
        run.workload.evaluate(run.bundle, run.global_params, 2).metrics["accuracy/topic"]
        / record["individual_accuracy/topic"])
    # the next round's client starts from the merged weights
    train_round(round_content(run.global_params, cfg.to_json(), 2, 2), _context(0))
    client = cached_bundle(cfg, run.workload.suite.label_names)
    some_weight = run.pipeline.fusion_layout.names[0]
    assert torch.equal(dict(client.model.named_parameters())[some_weight].detach(), run.global_params[some_weight])


def test_rmtllmf_with_lora_realigns_the_factors_and_folds_them(tmp_path):
    cfg = load_config(None, [*TINY_LORA_FUSION, "strategy.name=rmtllmf", "peft.frozen_patterns=[embeddings]",
                             "strategy.realign_scope=transmitted", "strategy.realign_steps=5",
                             "strategy.realign_lr=0.01", f"output.dir={tmp_path}"])
    run = FederatedRun(None, cfg, echo=lambda _: None)
    theta0 = {n: t.clone() for n, t in run.global_params.items()}
    reply = train_round(round_content(run.global_params, cfg.to_json(), 1, 2), _context(0))
    update = ClientUpdate(1, flatten(reply.array_records[DELTA].to_torch_state_dict(), run.pipeline.layout), 100,
                          {"train_loss": 1.0})
    record = run.round_update(1, [update])
    assert record["realign_loss_after"] < record["realign_loss_before"]
    for name in run.pipeline.layout.names:
        assert torch.equal(run.global_params[name], theta0[name])
    assert any(not torch.equal(run.global_params[n], theta0[n]) for n in run.pipeline.fusion_layout.names)
    norms_only = load_config(None, [*TINY_LORA_FUSION, "strategy.name=rmtllmf", "peft.frozen_patterns=[embeddings]",
                                    "strategy.realign_scope=norms_biases", f"output.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="realign_scope"):  # LoRA sends no LayerNorm: nothing to realign
        FederatedRun(None, norms_only, echo=lambda _: None)


def test_weight_delta_needs_lora_and_a_per_client_channel():
    with pytest.raises(ConfigError, match="peft.fuse_lora_as"):
        load_config(None, [*TINY_FUSION, "peft.fuse_lora_as=weight_delta"])
    with pytest.raises(ConfigError, match="fuse_lora_as"):
        load_config(None, [*TINY_LORA_FUSION, "strategy.name=fedavg", "channel.kind=ota"])
    default = load_config(None, [o for o in TINY_LORA_FUSION if "fuse_lora_as" not in o])
    explicit = load_config(None, [o for o in TINY_LORA_FUSION if "fuse_lora_as" not in o] + ["peft.fuse_lora_as=factors"])
    assert default.digest() == explicit.digest()  # the default leaves older results' cache keys alone


def test_ffa_lora_sends_only_b_and_averaging_b_averages_the_updates():
    """FFA-LoRA (peft.freeze_lora_a): A stays at its shared random start, only B trains and travels; the
    update B @ A is then linear in B, so the mean of the clients' B's gives the mean of their updates."""
    cfg = load_config(None, [*TINY_LORA_FUSION, "peft.freeze_lora_a=true"])
    full = load_config(None, TINY_LORA_FUSION)
    suite = load_suite(cfg.data, cfg.seed)
    bundle, plain = build_bundle(cfg, suite.label_names), build_bundle(full, suite.label_names)
    assert not any("lora_A" in n for n in bundle.groups.global_names)
    lora_values = lambda b: sum(b.initial_global[n].numel() for n in b.groups.global_names if "lora_" in n)  # noqa: E731
    assert 2 * lora_values(bundle) == lora_values(plain)  # r x (in + out) per layer, here in == out: half
    products = LoraProducts.of(bundle.model, bundle.groups.global_names, bundle.initial_global)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, products.factor_layout.numel, generator=g)
    assert torch.allclose(products(rows).mean(0), products(rows.mean(0, keepdim=True))[0], atol=1e-6)
    both = LoraProducts.of(plain.model, plain.groups.global_names, plain.initial_global)
    rows = torch.randn(3, both.factor_layout.numel, generator=g)
    assert not torch.allclose(both(rows).mean(0), both(rows.mean(0, keepdim=True))[0], atol=1e-3)
