"""strategy.running_sum: replies added into one sum as they arrive, against Flower's own FedAvg
aggregation (flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords, flwr 1.x as installed) and
the stacked rules, whatever order the replies come in; bad replies leave nothing in the sum."""

from __future__ import annotations

import itertools

import pytest
import torch
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fedllm.apps.payload import DELTA, METRICS
from fedllm.apps.replies import Replies
from fedllm.config import ConfigError, load_config
from fedllm.core.vectors import Layout, flatten
from fedllm.fusion.running_sum import RunningSum
from fedllm.strategies import build_rule

LAYOUT = Layout.of({"a": torch.zeros(3, 4), "b": torch.zeros(5)})


def _reply(node: int, tensors: dict, examples: int) -> Message:
    content = RecordDict({DELTA: ArrayRecord(torch_state_dict=tensors),
                          METRICS: MetricRecord({"num-examples": examples, "train_loss": 0.5, "partition": node})})
    meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="m",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(metadata=meta, content=content)


def _payloads(n: int = 5, seed: int = 0) -> dict[int, tuple[dict, int]]:
    g = torch.Generator().manual_seed(seed)
    # magnitudes over several decades, as real deltas have: the sum's rounding is what is tested
    return {node: ({"a": torch.randn(3, 4, generator=g) * 10.0 ** node, "b": torch.randn(5, generator=g) * 1e-3},
                   int(torch.randint(1, 500, (1,), generator=g))) for node in range(n)}


def _taken(order, payloads, kind: str) -> Replies:
    replies = Replies(sorted(payloads), running=RunningSum(LAYOUT.numel, kind))
    for node in order:
        tensors, examples = payloads[node]
        replies.take(node, _reply(node, tensors, examples), LAYOUT, {})
    return replies


def test_running_fedavg_equals_flowers_aggregation_and_the_stacked_rule_in_any_order():
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    payloads = _payloads()
    stacked = torch.stack([flatten(t, LAYOUT) for t, _ in payloads.values()])
    weights = torch.tensor([float(e) for _, e in payloads.values()])
    rule = build_rule("fedavg", {})
    flower = aggregate_arrayrecords([_reply(n, t, e).content for n, (t, e) in payloads.items()], "num-examples")
    flower_flat = flatten(flower.to_torch_state_dict(), LAYOUT)
    results = []
    for order in itertools.permutations(payloads):
        replies = _taken(order, payloads, rule.running_sum)
        assert replies.running.count == 5 and all(u.delta is None for u in replies.updates)
        results.append(replies.running.result())
    assert all(torch.equal(r, results[0]) for r in results)  # 120 arrival orders, one result, bit for bit
    assert torch.allclose(results[0], rule(stacked, weights), rtol=1e-6, atol=0)
    assert torch.allclose(results[0], flower_flat, rtol=1e-5, atol=0)


def test_running_task_arithmetic_is_the_plain_sum():
    payloads = _payloads(seed=1)
    stacked = torch.stack([flatten(t, LAYOUT) for t, _ in payloads.values()])
    rule = build_rule("task_arithmetic", {})
    got = _taken(reversed(list(payloads)), payloads, rule.running_sum).running.result()
    assert torch.allclose(got, stacked.to(torch.float64).sum(0).to(torch.float32), rtol=1e-7, atol=0)
    assert torch.allclose(got, rule(stacked, torch.ones(5)), rtol=1e-6, atol=0)


def test_a_bad_reply_leaves_nothing_in_the_sum():
    """A NaN in the reply's last tensor (read after the good ones) and a tensor of the wrong shape: both
    rejected, and the sum is the good replies' alone."""
    payloads = _payloads(4, seed=2)
    good = {n: payloads[n] for n in (0, 1)}
    payloads[2][0]["b"][-1] = float("nan")
    payloads[3][0]["b"] = torch.zeros(6)
    replies = _taken([0, 2, 3, 1], payloads, "mean")
    assert len(replies.rejected) == 2 and "1 NaN/Inf" in replies.rejected[0] and "has shape (6,)" in replies.rejected[1]
    assert replies.running.count == 2 and len(replies.updates) == 2
    clean = _taken([0, 1], good, "mean").running
    assert torch.equal(replies.running.result(), clean.result())
    replies.compact()  # no stack: nothing to move


def test_running_dp_fedavg_clips_each_reply_as_it_arrives_and_equals_the_stacked_dp_in_any_order():
    """DP-FedAvg (McMahan et al.): every reply clipped to L2 norm C, summed, noised, divided by the
    expected cohort. Against the closed form (noise off) and the stacked DP rule (noise on, the same
    seed: the same draw), for every arrival order."""
    from fedllm.fusion.privacy import DifferentiallyPrivate

    payloads = _payloads(seed=3)  # norms from ~1e-3 to ~1e5: some rows clipped, some not
    flat = {n: flatten(t, LAYOUT) for n, (t, _) in payloads.items()}
    clip, cohort = 20.0, 7.5
    norms = {n: float(torch.linalg.vector_norm(f.double())) for n, f in flat.items()}
    assert min(norms.values()) < clip < max(norms.values())
    closed = sum(f.double() * min(1.0, clip / norms[n]) for n, f in flat.items()) / cohort
    stacked = torch.stack([flat[n] for n in sorted(payloads)])

    def dp_rule(noise: float) -> DifferentiallyPrivate:
        rule = DifferentiallyPrivate(build_rule("fedavg", {}), clip, noise, seed=11)
        rule.expected_cohort = cohort
        return rule

    for noise in (0.0, 1.3):
        reference = dp_rule(noise)(stacked, torch.ones(5))
        results = []
        for order in itertools.permutations(payloads):
            replies = Replies(sorted(payloads), running=RunningSum(LAYOUT.numel, "sum", clip_norm=clip))
            for node in order:
                replies.take(node, _reply(node, *payloads[node]), LAYOUT, {})
            results.append(dp_rule(noise).private_mean(replies.running.result(), replies.running.count))
        assert all(torch.equal(r, results[0]) for r in results)
        assert torch.allclose(results[0], reference, rtol=1e-5, atol=1e-6)
        # the closed form, with the rule's Gaussian draw (std sigma C on the sum) when the noise is on
        draw = torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(11)).double() * noise * clip
        assert torch.allclose(results[0].double(), closed + draw / cohort, rtol=1e-5, atol=1e-9)


def test_dp_with_a_running_sum_is_a_valid_config():
    cfg = load_config(None, ["model.name=tiny-bert", "strategy.running_sum=true", "strategy.dp_clip_norm=1.0"])
    assert cfg.strategy.running_sum and cfg.strategy.reject_norm_ratio is not None  # DP turns that check off


@pytest.mark.parametrize("overrides, message", [
    (["strategy.running_sum=true"], "strategy.reject_norm_ratio compares every reply's norm"),
    (["strategy.running_sum=true", "strategy.reject_norm_ratio=null", "strategy.name=median"],
     "strategy 'median' needs every reply at once; a running sum serves fedavg, personalized, rmtllmf, task_arithmetic"),
    (["strategy.running_sum=true", "strategy.reject_norm_ratio=null", "channel.kind=byzantine"],
     "channel 'byzantine' needs the round's payloads together"),
    (["strategy.running_sum=true", "strategy.reject_norm_ratio=null", "channel.kind=ota"],
     "channel.kind one of awgn, erasure, ideal, quantize, rayleigh, rician"),
    (["strategy.running_sum=true", "strategy.reject_norm_ratio=null", "channel.kind=compose",
      "channel.chain=[{kind: quantize}, {kind: ota}]"], "channel 'compose' needs the round's payloads together"),
])
def test_running_sum_is_refused_where_a_round_needs_its_rows_apart(overrides, message):
    with pytest.raises(ConfigError, match="strategy.running_sum: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["model.name=tiny-bert", *overrides])


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["strategy.dp_clip_norm=0.05", "strategy.dp_noise_multiplier=0.5"]],
                         ids=["fedavg", "dp-fedavg"])
def test_a_run_with_a_running_sum_ends_where_the_stacked_run_does(tiny_overrides, tmp_path, extra):
    """The real ServerApp and ClientApp under Flower's simulation, one round of 3 clients: the global
    model after the round is the stacked FedAvg's (or DP-FedAvg's, with the same noise draw) to float32
    rounding."""
    from flwr.simulation import run_simulation

    from fedllm.apps.client_app import app as client_app
    from fedllm.apps.server_app import make_server_app
    from fedllm.results.writer import read_metrics

    finals = {}
    for running in (False, True):
        out = tmp_path / str(running)
        cfg = load_config(None, [*tiny_overrides, "rounds=1", "client.max_steps=10", "data.max_test_per_task=100",
                                 "strategy.reject_norm_ratio=null",
                                 f"strategy.running_sum={str(running).lower()}", f"output.dir={out}", *extra])
        run_simulation(server_app=make_server_app(cfg), client_app=client_app, num_supernodes=3,
                       backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
        run_dir = next(out.glob("*/*/summary.json")).parent
        finals[running] = (torch.load(run_dir / "global_params.pt"), read_metrics(run_dir)[-1])
    (stacked, stacked_record), (summed, summed_record) = finals[False], finals[True]
    assert summed_record["clients_used"] == stacked_record["clients_used"] == 3
    assert summed_record["channel_bits"] == stacked_record["channel_bits"]
    assert summed_record["update_norm"] == pytest.approx(stacked_record["update_norm"], rel=1e-5)
    assert stacked_record["update_norm"] > 1e-3  # the round moved the model: equal results are not trivial
    for name, value in stacked.items():
        assert torch.allclose(summed[name], value, rtol=1e-5, atol=1e-7), name
    assert summed_record["accuracy"] == pytest.approx(stacked_record["accuracy"], abs=0.021)  # 100 test examples: one flipped tie is 0.01


def _peak_torch_bytes(work) -> int:
    """The most CPU memory torch's allocator held at once while ``work`` ran, beyond what it held before
    (torch's profiler reports every allocation and free, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def test_adding_a_reply_allocates_no_copy_and_taking_the_result_holds_sum_plus_result_at_most():
    """The sum is float64 (2 payloads); adding a float32 tensor must not make a float64 copy of it (a
    whole payload for MiniLM's embeddings), and the result (1 payload) must not be built through a
    float64 temporary (the mean's division was one: 2 more payloads at the server's peak)."""
    n = 3_000_000
    values = [torch.randn(n, generator=torch.Generator().manual_seed(s)) * 10.0 ** s for s in range(3)]
    examples = [17, 250, 3]
    running = RunningSum(n, "mean")
    assert _peak_torch_bytes(lambda: [running.add_piece(0, v, running.weight(e)) for v, e in zip(values, examples)]) < n
    reference = torch.zeros(n, dtype=torch.float64)  # the same adds, in the same order, then one division
    for v, e in zip(values, examples):
        reference.add_(v.to(torch.float64), alpha=float(e))
    [running.count_reply(running.weight(e)) for e in examples]
    taken = []
    assert _peak_torch_bytes(lambda: taken.append(running.result())) <= 4 * n + 8 * (1 << 20)
    assert torch.equal(taken[0], (reference / sum(examples)).to(torch.float32))
    with pytest.raises(RuntimeError, match="result was taken"):
        running.result()
