import pytest
import torch

from fedllm.core.vectors import Layout, add, flatten, get_tensors, matches, split_groups, subtract, unflatten


def test_flatten_unflatten_round_trips_exactly():
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.randn(5, generator=g),
               "c": torch.randn(2, 1, 3, generator=g)}
    layout = Layout.of(tensors)
    flat = flatten(tensors, layout)
    assert flat.shape == (12 + 5 + 6,)
    back = unflatten(flat, layout)
    assert list(back) == list(tensors)
    for name in tensors:
        assert torch.equal(back[name], tensors[name])


def test_unflatten_rejects_wrong_length():
    layout = Layout.of({"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="does not fit"):
        unflatten(torch.zeros(4), layout)


def test_delta_of_untouched_model_is_zero_and_add_restores():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    names = [n for n, _ in model.named_parameters()]
    before = get_tensors(model, names)
    after = get_tensors(model, names)
    delta = subtract(after, before)
    assert all(torch.count_nonzero(d) == 0 for d in delta.values())
    with torch.no_grad():
        model[0].weight += 1.0
    delta = subtract(get_tensors(model, names), before)
    assert torch.allclose(delta["0.weight"], torch.ones(3, 4))
    restored = add(before, delta)
    assert torch.equal(restored["0.weight"], model[0].weight.detach())


def test_matches_substring_and_glob():
    assert matches("base.lora_A.default.weight", ["lora_"])
    assert matches("encoder.layer.0.output", ["encoder.layer.?.*"])
    assert not matches("encoder.layer.10.output", ["encoder.layer.?.output"])
    assert not matches("classifier.weight", ["lora_"])


def test_split_groups_global_local_and_orphans():
    model = torch.nn.ModuleDict({"adapter": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 2),
                                 "body": torch.nn.Linear(2, 2)})
    model["body"].requires_grad_(False)
    groups = split_groups(model, ["adapter"], ["head"])
    assert groups.global_names == ("adapter.weight", "adapter.bias")
    assert groups.local_names == ("head.weight", "head.bias")
    with pytest.raises(ValueError, match="matches neither"):
        split_groups(model, ["adapter"], [])
    with pytest.raises(ValueError, match="select no trainable tensor"):
        split_groups(model, ["body"], ["adapter", "head"])


def test_stack_rows_takes_consecutive_rows_of_one_tensor_as_a_view_and_copies_otherwise():
    from fedllm.core.vectors import stack_rows

    base = torch.arange(20.0).reshape(5, 4)
    view = stack_rows([base[1], base[2], base[3]])
    assert torch.equal(view, base[1:4]) and view.data_ptr() == base[1].data_ptr()
    for rows in ([base[3], base[1]], [base[0], base[2]], [base[0], torch.zeros(4)], [base[0, :2], base[1, :2]]):
        stacked = stack_rows(rows)
        assert torch.equal(stacked, torch.stack(rows))
        stacked.add_(1)  # a copy: the rows are untouched
        assert torch.equal(base, torch.arange(20.0).reshape(5, 4))


def test_all_finite_checks_every_block_including_the_last_partial_one():
    from fedllm.core.vectors import all_finite

    values = torch.zeros(3, 1001)
    assert all_finite(values, block=64)
    for where in [(0, 0), (1, 500), (2, 1000)]:  # first block, a middle one, the last (partial) one
        for bad in (float("nan"), float("inf"), -float("inf")):
            broken = values.clone()
            broken[where] = bad
            assert not all_finite(broken, block=64), (where, bad)
