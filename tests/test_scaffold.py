"""SCAFFOLD: on heterogeneous clients its control variates remove the client drift that biases FedAvg,
and through the apps the control variates travel both ways and persist."""

from __future__ import annotations

import pytest
import torch
from fedllm.clients.scaffold import control_update
from fedllm.strategies import FusionSpace, build_rule

from fedllm.config import load_config
from fedllm.core.vectors import Layout


def _run(clients: list[tuple[torch.Tensor, torch.Tensor]], rounds: int, steps: int, lr: float, scaffold: bool):
    """Clients minimise f_i(x) = 1/2 ||A_i x - b_i||^2 with `steps` local SGD steps; the server averages."""
    d = clients[0][0].shape[1]
    layout = Layout(("x",), ((d,),))
    rule = build_rule("scaffold" if scaffold else "fedavg", {})
    x, c_i = torch.zeros(d), [torch.zeros(d) for _ in clients]
    drift = []
    for _ in range(rounds):
        c = rule.control if scaffold and rule.control is not None else torch.zeros(d)
        deltas, controls = [], []
        for k, (a, b) in enumerate(clients):
            y = x.clone()
            for _ in range(steps):
                grad = a.T @ (a @ y - b)
                y -= lr * (grad - c_i[k] + c if scaffold else grad)
            new = control_update({"x": c_i[k]}, {"x": c}, {"x": x}, {"x": y}, steps, lr)["x"]
            controls.append(new - c_i[k])
            c_i[k] = new if scaffold else c_i[k]
            deltas.append(y - x)
        drift.append(float(torch.stack(deltas).std(dim=0).norm()))
        weights = torch.ones(len(clients))
        if scaffold:
            rule.population = len(clients)
            fused = rule(torch.stack(deltas), weights, {"control": torch.stack(controls)}, FusionSpace(layout, {"control": layout}))
        else:
            fused = rule(torch.stack(deltas), weights)
        x = x + fused
    return x, drift


def test_scaffold_removes_the_drift_that_biases_fedavg():
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(20, 5, generator=g) * (1 + k), torch.randn(20, generator=g) + 3 * k) for k in range(4)]
    a, b = torch.cat([c[0] for c in clients]), torch.cat([c[1] for c in clients])
    optimum = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)  # of the sum of the clients' losses
    fedavg, fedavg_drift = _run(clients, rounds=60, steps=10, lr=0.004, scaffold=False)
    ours, scaffold_drift = _run(clients, rounds=60, steps=10, lr=0.004, scaffold=True)
    assert float((ours - optimum).norm()) < 0.01 * float(optimum.norm())
    assert float((fedavg - optimum).norm()) > 10 * float((ours - optimum).norm())
    assert scaffold_drift[-1] < fedavg_drift[-1]  # the clients' updates no longer pull apart


@pytest.mark.slow
def test_control_variates_cross_both_ways_and_persist(tiny_overrides, tmp_path):
    from flwr.simulation import run_simulation

    from fedllm.apps.client_app import app as client_app
    from fedllm.apps.server_app import make_server_app
    from fedllm.results.writer import load_checkpoint, read_metrics
    from fedllm.workloads import workload_for

    cfg = load_config(None, [*tiny_overrides, "rounds=2", "client.max_steps=4", "client.lr=0.05",
                             "strategy.name=scaffold", "client.trainer=scaffold", "client.optimizer=sgd", "channel.kind=awgn",
                             "channel.snr_db=30"])
    run_simulation(server_app=make_server_app(cfg), client_app=client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    run_dir = next((tmp_path / "results").glob("*/*"))
    records = read_metrics(run_dir)
    bundle = workload_for(cfg).build_model()
    sent = sum(dict(bundle.model.named_parameters())[n].numel() for n in bundle.groups.global_names)
    assert records[1]["bytes_up_per_client"] == 4 * 2 * sent  # the delta and the control delta
    assert records[2]["bytes_down"] == 2 * 4 * 2 * sent  # the global group and the server control variate
    control = load_checkpoint(run_dir)["rule_state"]["control"]
    assert control is not None and control.shape == (sent,) and float(control.norm()) > 0
    assert records[2]["accuracy"] > records[0]["accuracy"]


def test_scaffold_corrects_sgd_steps_and_says_so():
    from fedllm.config import ConfigError

    with pytest.raises(ConfigError, match="client.trainer scaffold corrects sgd steps: set client.optimizer: sgd"):
        load_config(None, ["strategy.name=scaffold", "client.trainer=scaffold"])
    assert load_config(None, ["strategy.name=scaffold", "client.trainer=scaffold", "client.optimizer=sgd"])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_client_optimizer_sgd_takes_plain_gradient_steps(optimizer):
    """client.optimizer=sgd moves every trained tensor by exactly -lr x its gradient (FedAvg's local
    step); AdamW's normalised step does not (so the option is not ignored)."""
    from fedllm.clients import TrainContext
    from fedllm.clients.supervised import local_optimizer, supervised_steps
    from fedllm.workloads.classification.data import client_examples, load_suite
    from fedllm.workloads.classification.models import build_bundle
    from tests.conftest import TINY_OVERRIDES

    cfg = load_config(None, [*TINY_OVERRIDES, f"client.optimizer={optimizer}", "client.lr=0.1", "client.max_steps=1"])
    suite = load_suite(cfg.data, cfg.seed)
    bundle = build_bundle(cfg, suite.label_names)
    params = {n: p for n, p in bundle.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    grads = {}
    ctx = TrainContext(section=cfg.client, label_ranges=suite.label_ranges, max_length=32, seed=0)
    supervised_steps(bundle, client_examples(cfg.data, 0, 1, cfg.seed), ctx, local_optimizer(bundle, cfg.client),
                     lambda: grads.update({n: p.grad.clone() for n, p in params.items() if p.grad is not None}))
    moved = [n for n in grads if float(grads[n].abs().max()) > 0]
    assert len(moved) > 10
    sgd_like = all(torch.allclose(params[n].detach() - before[n], -0.1 * grads[n], atol=1e-6) for n in moved)
    assert sgd_like == (optimizer == "sgd")


def test_the_scaffold_trainer_takes_corrected_sgd_steps_and_returns_its_mean_gradient():
    """One local step from x: plain SGD gives y0 = x - lr g; SCAFFOLD's trainer, with server control c
    and its own c_i, gives y = x - lr (g - c_i + c) on the same batch, so y - y0 = -lr (c - c_i) on the
    sent tensors, and its new control variate is g = (x - y0) / lr, sent as g - c_i (option II)."""
    from fedllm.clients import TRAINERS, TrainContext
    from fedllm.workloads.classification.data import client_examples, load_suite
    from fedllm.workloads.classification.models import build_bundle
    from tests.conftest import TINY_OVERRIDES

    cfg = load_config(None, [*TINY_OVERRIDES, "client.optimizer=sgd", "client.lr=0.1", "client.max_steps=1",
                             "strategy.name=scaffold", "client.trainer=scaffold"])
    suite = load_suite(cfg.data, cfg.seed)
    examples = client_examples(cfg.data, 0, 2, cfg.seed)
    moved = {}
    for trainer in ("supervised", "scaffold"):
        bundle = build_bundle(cfg, suite.label_names)
        names = list(bundle.groups.global_names)
        x = {n: t.detach().clone() for n, t in bundle.model.named_parameters() if n in names}
        g = torch.Generator().manual_seed(1)
        c = {n: 0.01 * torch.randn(t.shape, generator=g) for n, t in x.items()}
        c_i = {n: 0.01 * torch.randn(t.shape, generator=g) for n, t in x.items()}
        ctx = TrainContext(section=cfg.client, label_ranges=suite.label_ranges, max_length=32, seed=3,
                           incoming={"control": c}, kept={"control": c_i})
        result = TRAINERS.get(trainer)(bundle, examples, ctx)
        moved[trainer] = {n: t.detach().clone() for n, t in bundle.model.named_parameters() if n in names}
    for n in x:
        assert torch.allclose(moved["scaffold"][n] - moved["supervised"][n], -0.1 * (c[n] - c_i[n]), atol=1e-6), n
        gradient = (x[n] - moved["supervised"][n]) / 0.1
        assert torch.allclose(result.keep["control"][n], gradient, atol=1e-4), n
        assert torch.allclose(result.statistics["control"][n], gradient - c_i[n], atol=1e-4), n


def test_with_part_of_the_clients_the_server_control_moves_by_the_sampled_share():
    """c <- c + |S| / N mean Delta c_i: with 2 of 5 clients in a round, c moves by 2/5 of their mean."""
    from fedllm.core.vectors import Layout
    from fedllm.strategies import FusionSpace, build_rule

    layout = Layout(("x",), ((3,),))
    rule = build_rule("scaffold", {})
    rule.population = 5
    controls = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    rule(torch.zeros(2, 3), torch.ones(2), {"control": controls}, FusionSpace(layout, {"control": layout}))
    assert torch.allclose(rule.control, 0.4 * controls.mean(dim=0))
