"""strategy.stack_dtype: bfloat16: the round's replies held in bfloat16 and fused in float32, a column
block at a time. Checked against float64 references computed here from the float32 rows, with the
bound the staging allows (each value rounded to nearest bfloat16: relative error <= 2^-8), exactly
where rounding commutes with the rule (an order statistic of rounded values is the rounded order
statistic), and through the server's reply stack."""

from __future__ import annotations

import pytest
import torch

from fedllm.apps.replies import Replies
from fedllm.channels import build_channel
from fedllm.config import ConfigError, load_config
from fedllm.core.vectors import Layout, flatten
from fedllm.fusion.pipeline import fuse_updates
from fedllm.strategies import build_rule
from fedllm.strategies.base import staged_rounding
from tests.test_running_sum import _reply

U = 2.0 ** -8  # bfloat16's rounding, relative


def _rows(n: int, d: int = 200_000, seed: int = 0) -> torch.Tensor:
    """Values over eleven decades with random signs, in more columns than one block (65,536)."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 10.0 ** (torch.rand(n, d, generator=g) * 11 - 8)
    return magnitude * torch.where(torch.rand(n, d, generator=g) < 0.5, -1.0, 1.0)


def test_the_stated_rounding_is_bfloat16s():
    assert staged_rounding(torch.bfloat16) == U and staged_rounding(torch.float32) == 0.0
    x = torch.tensor([1 + 2 ** -8 - 2 ** -12, 3.0e-20, 7.7e30])  # worst case just below a tie, tiny, huge
    assert torch.all((x.bfloat16().double() - x.double()).abs() <= U * x.double().abs())


@pytest.mark.parametrize("name", ["fedavg", "task_arithmetic"])
def test_sums_of_a_bfloat16_stack_are_within_its_rounding_of_the_exact_result(name):
    rows = _rows(7)
    weights = torch.tensor([5.0, 1.0, 30.0, 2.0, 9.0, 4.0, 11.0])
    share = weights.double() / weights.double().sum() if name == "fedavg" else torch.ones(7, dtype=torch.float64)
    exact = share @ rows.double()
    scale = share @ rows.double().abs()  # each value's own rounding, summed with the rule's weights
    rule = build_rule(name, {})
    got = rule(rows.bfloat16(), weights)
    assert got.dtype == torch.float32
    assert torch.all((got.double() - exact).abs() <= (U + 1e-6) * scale)
    assert not torch.equal(got, rule(rows, weights))  # the stack was staged: results differ from float32's
    # summing the stack in bfloat16 itself (the bug the float32 blocks avoid) breaks the bound
    naive = (rows.bfloat16() * share.bfloat16()[:, None]).sum(dim=0).double()
    assert not torch.all((naive - exact).abs() <= (U + 1e-6) * scale)


@pytest.mark.parametrize("n", [5, 6])
def test_the_median_of_a_bfloat16_stack_is_the_rounded_median(n):
    rows = _rows(n, seed=n)
    got = build_rule("median", {})(rows.bfloat16(), torch.ones(n))
    ordered = rows.double().sort(dim=0).values
    if n % 2:  # rounding keeps the order: the median of rounded values is the rounded median, exactly
        assert torch.equal(got, ordered[n // 2].to(torch.bfloat16).float())
    else:
        middle = (ordered[n // 2 - 1].to(torch.bfloat16).double() + ordered[n // 2].to(torch.bfloat16).double()) / 2
        assert torch.allclose(got.double(), middle, rtol=2 ** -23, atol=0)
    exact = ordered[(n - 1) // 2: n // 2 + 1].mean(dim=0)
    assert torch.all((got.double() - exact).abs() <= (U + 1e-6) * ordered.abs().max(dim=0).values)


def test_the_trimmed_mean_of_a_bfloat16_stack_is_within_its_rounding():
    rows = _rows(10, seed=3)
    got = build_rule("trimmed_mean", {"trim_ratio": 0.2})(rows.bfloat16(), torch.ones(10))
    kept = rows.double().sort(dim=0).values[2:8]
    assert torch.all((got.double() - kept.mean(dim=0)).abs() <= (U + 1e-6) * kept.abs().mean(dim=0))


def test_the_server_writes_replies_into_a_bfloat16_stack_and_fuses_it_in_float32():
    """Replies (Flower messages) into a bfloat16 stack, the norm check, the ideal channel, the median:
    the staged median of the float32 payloads, exactly; the stack is half the bytes."""
    layout = Layout.of({"a": torch.zeros(300, 301), "b": torch.zeros(7)})
    g = torch.Generator().manual_seed(4)
    payloads = {n: {"a": torch.randn(300, 301, generator=g) * 10.0 ** (n - 2), "b": torch.randn(7, generator=g)}
                for n in range(5)}
    stack = torch.empty(5, layout.numel, dtype=torch.bfloat16)
    replies = Replies(sorted(payloads), stack=stack)
    for node in (3, 0, 4, 1, 2):
        replies.take(node, _reply(node, payloads[node], 10 + node), layout, {})
    replies.finish(100.0, [], 1, 0.0)
    assert not replies.rejected and stack.element_size() == 2
    fused, record = fuse_updates(replies.updates, build_channel("ideal", {}, 0), build_rule("median", {}))
    flat = torch.stack([flatten(payloads[n], layout) for n in sorted(payloads)]).double()
    assert torch.equal(fused, flat.median(dim=0).values.to(torch.bfloat16).float())
    assert record["channel_mse"] == 0.0


def test_a_bfloat16_stack_is_a_valid_config_for_the_median():
    cfg = load_config(None, ["model.name=tiny-bert", "strategy.name=median", "strategy.stack_dtype=bfloat16"])
    assert cfg.strategy.stack_dtype == "bfloat16"


@pytest.mark.parametrize("overrides, message", [
    (["strategy.name=krum"], "strategy 'krum' computes on whole rows; a bfloat16 stack serves fedavg, median, "
                             "personalized, rmtllmf, task_arithmetic, trimmed_mean"),
    (["channel.kind=awgn"], "channel 'awgn' computes on the stack as it is given; use channel.kind: ideal"),
    (["strategy.dp_clip_norm=1.0"], "DP clips whole rows"),
    (["strategy.running_sum=true", "strategy.reject_norm_ratio=null"], "strategy.running_sum holds no stack"),
    (["strategy.stack_dtype=float16"], "stack_dtype"),
])
def test_a_bfloat16_stack_is_refused_where_it_would_not_be_fused_in_float32(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.name=tiny-bert", "strategy.stack_dtype=bfloat16", *overrides])


@pytest.mark.slow
def test_a_run_with_a_bfloat16_stack_ends_within_its_rounding_of_the_float32_run(tiny_overrides, tmp_path):
    """The real ServerApp and ClientApp under Flower's simulation, one round of 3 clients and the median:
    the fused update is the float32 run's to bfloat16 rounding (per value at most 2^-8 of it, so its
    norm too), and not bit for bit (the stack was staged)."""
    from flwr.simulation import run_simulation

    from fedllm.apps.client_app import app as client_app
    from fedllm.apps.server_app import make_server_app
    from fedllm.results.writer import read_metrics

    finals = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        cfg = load_config(None, [*tiny_overrides, "rounds=1", "client.max_steps=10", "data.max_test_per_task=100",
                                 "strategy.name=median", f"strategy.stack_dtype={dtype}", f"output.dir={out}"])
        run_simulation(server_app=make_server_app(cfg), client_app=client_app, num_supernodes=3,
                       backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
        run_dir = next(out.glob("*/*/summary.json")).parent
        finals[dtype] = (torch.load(run_dir / "global_params.pt"), read_metrics(run_dir)[-1])
    (full, full_record), (staged, staged_record) = finals["float32"], finals["bfloat16"]
    assert staged_record["clients_used"] == full_record["clients_used"] == 3
    norm = full_record["update_norm"]
    assert norm > 1e-3 and abs(staged_record["update_norm"] - norm) <= (U + 1e-6) * norm
    assert any(not torch.equal(staged[n], full[n]) for n in full)
    moved = sum(float((staged[n].double() - full[n].double()).pow(2).sum()) for n in full) ** 0.5
    size = sum(float(full[n].double().pow(2).sum()) for n in full) ** 0.5
    # |staged - float32 fused| <= 2^-8 |fused| value by value, plus float32's rounding of global + fused
    assert moved <= (U + 1e-6) * norm + 2 ** -23 * size
