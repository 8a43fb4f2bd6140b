"""Merging rules beyond task arithmetic: weighted average, Breadcrumbs, Fisher and RegMean, against
closed forms, FusionBench's own merging functions (fusion-bench 0.2.33) and a least-squares oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedllm.strategies import FusionSpace, build_rule

from fedllm.config import ConfigError, load_config
from fedllm.core.vectors import Layout, flatten


def test_weighted_average_normalises_the_given_weights():
    deltas = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, -2.0]])
    fused = build_rule("weighted_average", {"weights": [1.0, 1.0, 2.0]})(deltas, torch.ones(3))
    assert torch.allclose(fused, torch.tensor([(1 + 3 + 10) / 4, (2 + 6 - 4) / 4]))
    raw = build_rule("weighted_average", {"weights": [1.0, 1.0, 2.0], "normalize": False})(deltas, torch.ones(3))
    assert torch.allclose(raw, torch.tensor([14.0, 4.0]))
    with pytest.raises(ValueError, match="3 weights for 2 client updates"):
        build_rule("weighted_average", {"weights": [1.0, 1.0, 2.0]})(deltas[:2], torch.ones(2))


def test_breadcrumbs_drops_the_largest_and_the_smallest_magnitudes():
    row = torch.tensor([[10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0]])
    # gamma 0.1 drops the largest (10); density 0.5 keeps the next five; the four smallest go too
    fused = build_rule("breadcrumbs", {"gamma": 0.1, "density": 0.5})(torch.cat([row, -row]), torch.ones(2))
    assert torch.equal(fused, torch.zeros(10))  # the two rows cancel exactly where kept
    kept = build_rule("breadcrumbs", {"gamma": 0.1, "density": 0.5})(row, torch.ones(1))
    assert kept.tolist() == [0.0, -9.0, 8.0, -7.0, 6.0, -5.0, 0.0, 0.0, 0.0, 0.0]


def _models(seed: int = 0, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    layout = Layout(("lin.weight", "lin.bias", "norm.weight"), ((4, 5), (4,), (5,)))
    theta0 = {name: torch.randn(shape, generator=g) for name, shape in zip(layout.names, layout.shapes)}
    taus = [{name: 0.3 * torch.randn(shape, generator=g) for name, shape in zip(layout.names, layout.shapes)}
            for _ in range(n)]
    return layout, theta0, taus


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_merging_equals_fusionbench(normalize):
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights

    layout, theta0, taus = _models(1)
    g = torch.Generator().manual_seed(9)
    fishers = [{n: torch.rand(s, generator=g) * (i + 1) for n, s in zip(layout.names, layout.shapes)}
               for i in range(3)]
    reference = merging_with_fisher_weights({n: [theta0[n] + t[n] for t in taus] for n in layout.names}, fishers,
                                            torch.ones(3), normalize_fisher_weight=normalize)
    rule = build_rule("fisher", {"normalize": normalize})
    fused = rule(torch.stack([flatten(t, layout) for t in taus]), torch.ones(3),
                 {"fisher": torch.stack([flatten(f, layout) for f in fishers])}, FusionSpace(layout, {"fisher": layout}))
    assert torch.allclose(flatten(theta0, layout) + fused, flatten(reference, layout), atol=1e-5)


def test_regmean_equals_fusionbench_and_least_squares():
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

    layout, theta0, taus = _models(2)
    rng = np.random.default_rng(0)
    inputs = [rng.normal(0, 1 + i, (50, 5)) for i in range(3)]  # each client's inputs to `lin`
    grams = [torch.tensor(x.T @ x, dtype=torch.float32) for x in inputs]
    gram_layout = Layout(("lin.weight",), ((5, 5),))
    fused = build_rule("regmean", {})(torch.stack([flatten(t, layout) for t in taus]), torch.ones(3),
                                      {"gram": torch.stack([g.reshape(-1) for g in grams])},
                                      FusionSpace(layout, {"gram": gram_layout}))
    merged = {n: theta0[n] + t.reshape(s) for n, t, s in zip(layout.names, torch.split(fused, layout.sizes), layout.shapes)}
    reference = merging_with_regmean_weights({n: [theta0[n] + t[n] for t in taus] for n in layout.names},
                                             [{"lin": g} for g in grams])
    for name in layout.names:
        assert torch.allclose(merged[name], reference[name], atol=1e-4), name
    # RegMean's weight is the least-squares fit to every client's outputs on its own inputs
    targets = np.concatenate([x @ (theta0["lin.weight"] + t["lin.weight"]).numpy().T for x, t in zip(inputs, taus)])
    solution, *_ = np.linalg.lstsq(np.concatenate(inputs), targets, rcond=None)
    assert np.allclose(merged["lin.weight"].numpy(), solution.T, atol=1e-4)
    assert torch.allclose(merged["lin.bias"], theta0["lin.bias"] + sum(t["lin.bias"] for t in taus) / 3, atol=1e-6)


def test_the_client_statistics_are_what_the_rules_assume(tiny_overrides):
    """Gram matrices from the forward hooks equal X^T X of the inputs the layer really saw; the Fisher is
    the mean squared per-example gradient."""
    from fedllm.apps.client_round import _prepare  # noqa: F401  (the client's import path)
    from fedllm.core.bundle import forward_logits
    from fedllm.workloads import workload_for
    from fedllm.workloads.classification import empirical_fisher, input_grams

    cfg = load_config(None, [*tiny_overrides, "strategy.name=regmean"])
    workload = workload_for(cfg)
    bundle = workload.build_model()
    data = workload.client_data(0, 2, {}).subset(list(range(6)))
    layer = "bert.encoder.layer.0.attention.self.query.weight"
    grams = input_grams(bundle, data, workload.suite, 32, bundle.groups.global_names, 6, 4)
    assert layer in grams and grams[layer].shape == (64, 64)
    seen = []  # one example at a time: no padding at all
    module = dict(bundle.model.named_modules())[layer.removesuffix(".weight")]
    hook = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().reshape(-1, 64)))
    with torch.no_grad():
        for i in range(6):
            forward_logits(bundle, bundle.model, [data.texts[i]], [data.tasks[i]], workload.suite.label_ranges, 32)
    hook.remove()
    x = torch.cat(seen).double()
    assert torch.allclose(grams[layer].double(), x.T @ x / 6, rtol=1e-4, atol=1e-4)
    sent = ["classifier.weight"]
    fisher = empirical_fisher(bundle, data, workload.suite, 32, sent, 3)["classifier.weight"]
    squares = []
    for i in range(3):
        bundle.model.zero_grad()
        logits = forward_logits(bundle, bundle.model, [data.texts[i]], [data.tasks[i]], workload.suite.label_ranges, 32)
        torch.nn.functional.cross_entropy(logits, torch.tensor([data.labels[i]])).backward()
        squares.append(dict(bundle.model.named_parameters())["classifier.weight"].grad.clone() ** 2)
    assert torch.allclose(fisher, sum(squares) / 3, atol=1e-7)


def test_rules_that_need_statistics_are_checked():
    with pytest.raises(ConfigError, match="strategy 'fisher' weighs the tensors a client sends"):
        load_config(None, ["strategy.name=fisher", "peft.fuse_lora_as=weight_delta"])
    with pytest.raises(ConfigError, match="only goes with fedavg or personalized"):  # DP wraps averaging rules only
        load_config(None, ["strategy.name=regmean", "strategy.dp_clip_norm=1"])
    with pytest.raises(ValueError, match="fuses with the clients' gram; missing: gram"):
        build_rule("regmean", {})(torch.zeros(2, 3), torch.ones(2))


@pytest.mark.slow
def test_a_regmean_round_sends_and_fuses_the_gram_matrices(tiny_overrides, tmp_path):
    from flwr.simulation import run_simulation

    from fedllm.apps.client_app import app as client_app
    from fedllm.apps.server_app import make_server_app
    from fedllm.results.writer import read_metrics
    from fedllm.workloads import workload_for

    cfg = load_config(None, [*tiny_overrides, "rounds=1", "client.max_steps=3", "strategy.name=regmean",
                             "strategy.examples=16", "data.tasks=[topic, question]", "data.partition=task"])
    run_simulation(server_app=make_server_app(cfg), client_app=client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    record = read_metrics(next((tmp_path / "results").glob("*/*")))[1]
    bundle = workload_for(cfg).build_model()
    params = dict(bundle.model.named_parameters())
    sent = sum(params[n].numel() for n in bundle.groups.global_names)
    linear_inputs = [params[n].shape[1] for n in bundle.groups.global_names
                     if n.endswith(".weight") and params[n].dim() == 2 and "embeddings" not in n]
    assert record["clients_used"] == 2 and record["bytes_up_per_client"] == 4 * (sent + sum(i * i for i in linear_inputs))
    assert record["accuracy"] > 0


class _QuadraticContext:
    """A MergeContext whose objective is ||theta - target||^2: the coefficients that minimise it are known."""

    def __init__(self, before, target, space):
        from types import SimpleNamespace

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(before["w"].clone())
                self.b = torch.nn.Parameter(before["b"].clone())

            def forward(self, **inputs):
                return torch.cat([self.w.reshape(-1), self.b])

        self.bundle = SimpleNamespace(model=Model())
        self.before, self.space, self.seed, self.target = before, space, 0, target

    def few_shot(self, shots):
        return None

    def loss(self, examples, model=None):
        return ((model or self.bundle.model)() - self.target).pow(2).sum()

    entropy = loss


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_keeps_the_useful_task_vector_and_turns_down_the_jammed_one(granularity):
    """theta0 + lambda_1 tau_1 + lambda_2 tau_2 against a target theta0 + tau_1: a jammed (pure noise)
    tau_2 is turned down to 0 and the useful tau_1 up to 1, per tensor when layer-wise."""
    from fedllm.strategies.adamerging import AdaMergingParams, learn_coefficients

    layout = Layout(("w", "b"), ((2, 3), (3,)))
    g = torch.Generator().manual_seed(0)
    before = {"w": torch.randn(2, 3, generator=g), "b": torch.randn(3, generator=g)}
    useful, jammed = torch.randn(9, generator=g), 3 * torch.randn(9, generator=g)
    ctx = _QuadraticContext(before, flatten(before, layout) + useful, FusionSpace(layout))
    merged, record = learn_coefficients(torch.stack([useful, jammed]), layout, ctx, AdaMergingParams(
        granularity=granularity, objective="labelled", steps=300, lr=0.05))
    assert record["adamerging_labelled_after"] < 0.05 * record["adamerging_labelled_before"]
    assert torch.allclose(flatten(merged, layout), flatten(before, layout) + useful, atol=0.05)
    coefficients = record["adamerging_coefficients"]
    assert (coefficients == pytest.approx([1.0, 0.0], abs=0.02) if granularity == "task"
            else coefficients == pytest.approx({"w": 0.5, "b": 0.5}, abs=0.02))  # per tensor: mean of 1 and 0


def test_adamerging_runs_as_a_servers_fusion_rule(tiny_overrides):
    """The rule inside the fusion pipeline: the merged model is theta0 + the learnt mix, recorded per tensor."""
    from fedllm.core.types import ClientUpdate
    from fedllm.fusion.pipeline import FusionPipeline
    from fedllm.workloads import workload_for

    cfg = load_config(None, [*tiny_overrides, "data.tasks=[topic, question]", "data.partition=task",
                             "strategy.name=adamerging", "strategy.steps=3"])
    workload = workload_for(cfg)
    pipeline = FusionPipeline(cfg, workload, workload.build_model())
    g = torch.Generator().manual_seed(0)
    updates = [ClientUpdate(i, 0.01 * torch.randn(pipeline.layout.numel, generator=g), 10,
                            {"train_loss": 1.0, "partition": i}) for i in range(2)]
    merged, record = pipeline(pipeline.initial_global(), updates, seed=0, population=2, server_round=1)
    assert set(record["adamerging_coefficients"]) == set(pipeline.layout.names)
    assert record["adamerging_entropy_after"] <= record["adamerging_entropy_before"] + 1e-6
    with pytest.raises(ConfigError, match="RL instruction tuning has no labelled tasks"):
        load_config(None, ["model.name=tiny-gpt2", "client.trainer=rl", "rl={}", "strategy.name=adamerging"])


def test_every_statistic_a_rule_asks_for_is_declared_and_an_undeclared_one_is_named():
    from fedllm.strategies import FUSION_RULES, STATISTIC_LAYOUTS, build_rule, statistic_layouts

    asked = {name for rule in FUSION_RULES.names() if rule != "weighted_average"
             for name in build_rule(rule, {}).client_statistics()}
    assert asked == {"fisher", "gram", "control"} and asked <= set(STATISTIC_LAYOUTS.names())
    with pytest.raises(ValueError, match="unknown client statistic 'hessian'; allowed: control, fisher, gram"):
        statistic_layouts(["hessian"], None, None)


def test_adamerging_starts_from_its_initial_coefficient_on_every_task_vector():
    """Before the post-merge hook learns anything, the fused update is init x the sum of the task vectors."""
    from fedllm.strategies import build_rule

    deltas = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    assert torch.allclose(build_rule("adamerging", {"init": 0.3})(deltas, torch.ones(2)), 0.3 * deltas.sum(dim=0))


def test_layer_wise_adamerging_follows_fusionbenchs_layer_wise_merged_model():
    """fedllm's layer-wise AdaMerging (coefficients per task and tensor, Adam on the entropy of the
    merged model's predictions, the classification workload's entropy) against FusionBench 0.2.33's
    own pieces: LayerWiseMergedModel (clamped weights, theta0 + sum_t w_tl tau_tl), its entropy_loss,
    and the Adam loop of its layer-wise AdaMerging, on one batch of unlabelled inputs."""
    import copy
    from types import SimpleNamespace

    from fusion_bench.method.adamerging.entropy_loss import entropy_loss
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights

    from fedllm.strategies.adamerging import AdaMergingParams, learn_coefficients
    from fedllm.workloads.classification import Classification

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.head(torch.tanh(self.hidden(x)))

    torch.manual_seed(0)
    pretrained, inputs = Toy(), torch.randn(32, 6)
    finetuned = [copy.deepcopy(pretrained) for _ in range(3)]
    for m in finetuned:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.5 * torch.randn_like(p))
    names = [n for n, _ in pretrained.named_parameters()]
    layout = Layout(tuple(names), tuple(tuple(p.shape) for p in pretrained.parameters()))
    before = {n: p.detach().clone() for n, p in pretrained.named_parameters()}
    rows = torch.stack([flatten({n: p.detach() - before[n] for n, p in m.named_parameters()}, layout) for m in finetuned])
    steps, lr, init = 15, 0.01, 0.3

    # FusionBench: its merged model, its loss, the Adam loop of LayerWiseAdaMergingAlgorithm.test_time_adaptation
    reference = LayerWiseMergedModel(get_layer_wise_weights(3, len(names), init_values=init), copy.deepcopy(pretrained),
                                     [copy.deepcopy(m) for m in finetuned], clamp_weights=True)
    optimizer = torch.optim.Adam([reference.merge_weight], lr=lr)
    reference.merge_weights()
    for _ in range(steps):
        entropy_loss(reference(inputs)).backward(retain_graph=True)
        optimizer.step()
        optimizer.zero_grad()
        reference.merge_weights()

    # fedllm: the same coefficients learnt through a MergeContext whose entropy is the workload's
    entropy_of = SimpleNamespace(_logits=lambda bundle, examples, model: model(x=examples))
    ctx = SimpleNamespace(bundle=SimpleNamespace(model=copy.deepcopy(pretrained)), before=before, seed=0,
                          few_shot=lambda shots: inputs,
                          entropy=lambda examples, model=None: Classification.prediction_entropy(entropy_of, None, examples, model))
    merged, record = learn_coefficients(rows, layout, ctx, AdaMergingParams(
        granularity="layer", objective="entropy", steps=steps, lr=lr, init=init))
    learnt = reference.merge_weight.detach()
    assert 0.0 < learnt.min() and learnt.max() < 1.0  # inside [0, 1]: FusionBench's clamp of a copy and ours agree
    assert (learnt - init).abs().max() > 1e-2  # the coefficients moved: agreeing is not agreeing on the start
    assert record["adamerging_coefficients"] == pytest.approx({n: float(learnt[:, i].mean()) for i, n in enumerate(names)},
                                                             abs=1e-5)
    for name in names:
        assert torch.allclose(merged[name], reference._merged_state_dict[name].detach(), atol=1e-5), name
    assert record["adamerging_entropy_after"] == pytest.approx(float(entropy_loss(reference(inputs))), abs=1e-5)
