import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedllm.apps.payload import DELTA, METRICS, RejectedReply, parse_reply
from fedllm.core.vectors import Layout

LAYOUT = Layout.of({"a": torch.zeros(2, 2), "b": torch.zeros(3)})


def _reply(content: RecordDict | None = None, error: Error | None = None) -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=42, dst_node_id=0, reply_to_message_id="m",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(metadata=meta, content=content) if error is None else Message(metadata=meta, error=error)


def _content(tensors: dict, examples: int = 10) -> RecordDict:
    return RecordDict({DELTA: ArrayRecord(torch_state_dict=tensors),
                       METRICS: MetricRecord({"num-examples": examples, "train_loss": 0.5})})


def test_good_reply_is_flattened_in_server_layout():
    update = parse_reply(_reply(_content({"b": torch.tensor([1.0, 2, 3]), "a": torch.ones(2, 2)})), LAYOUT)
    assert update.node_id == 42 and update.num_examples == 10
    assert torch.equal(update.delta, torch.tensor([1.0, 1, 1, 1, 1, 2, 3]))


@pytest.mark.parametrize(
    "tensors, examples, reason",
    [
        ({"a": torch.ones(2, 2), "b": torch.tensor([1.0, float("nan"), 0])}, 10, "1 NaN/Inf"),
        ({"a": torch.ones(2, 2), "b": torch.tensor([float("inf"), 0, 0])}, 10, "NaN/Inf"),
        ({"a": torch.ones(4), "b": torch.zeros(3)}, 10, r"a has shape \(4,\), expected \(2, 2\)"),
        ({"a": torch.ones(2, 2), "c": torch.zeros(3)}, 10, r"missing \['b'\], unexpected \['c'\]"),
        ({"a": torch.ones(2, 2), "b": torch.zeros(3)}, 0, "reported 0 examples"),
    ],
)
def test_bad_replies_are_rejected_with_a_reason(tensors, examples, reason):
    with pytest.raises(RejectedReply, match=reason):
        parse_reply(_reply(_content(tensors, examples)), LAYOUT)


def test_error_and_incomplete_replies_are_rejected():
    with pytest.raises(RejectedReply, match="client 42 failed: boom"):
        parse_reply(_reply(error=Error(code=1, reason="boom")), LAYOUT)
    with pytest.raises(RejectedReply, match="lacks"):
        parse_reply(_reply(RecordDict({METRICS: MetricRecord({"num-examples": 1})})), LAYOUT)


def _from(node: int, partition: int, tensors: dict) -> Message:
    content = RecordDict({DELTA: ArrayRecord(torch_state_dict=tensors),
                          METRICS: MetricRecord({"num-examples": 10, "train_loss": 0.5, "partition": partition})})
    meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="m",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(metadata=meta, content=content)


@pytest.mark.parametrize("named_as_sampled", [True, False])
def test_replies_land_in_one_stack_that_fusion_takes_without_a_copy(named_as_sampled):
    """Replies arrive in any order, one is rejected (NaN) and one never comes: the used deltas end up
    as the top rows of the round's stack in client-id order ("p10" before "p2", as fusion sorts them),
    and fusion gets them as a view of that stack, equal to what torch.stack of the deltas would be.
    A client that names itself otherwise than it was sampled as still lands in its place."""
    from fedllm.apps.replies import Replies
    from fedllm.core.vectors import stack_rows

    partition = {11: 0, 12: 1, 13: 10, 14: 2, 15: 3}
    identities = {n: f"p{p}" for n, p in partition.items()}
    if not named_as_sampled:
        identities[11] = "p9"  # sampled as p9, replies as p0: its row is not where fusion wants it
    g = torch.Generator().manual_seed(0)
    sent = {n: {"a": torch.randn(2, 2, generator=g), "b": torch.randn(3, generator=g)} for n in partition}
    sent[15]["b"][1] = float("nan")
    sampled = sorted(partition)
    replies = Replies(sampled, stack=torch.empty(len(sampled), LAYOUT.numel),
                      row_order=sorted(sampled, key=identities.get))
    for node in (14, 11, 15, 13):  # 12 never replies
        replies.take(node, _from(node, partition[node], sent[node]), LAYOUT, {})
    replies.compact()
    assert len(replies.rejected) == 1 and "NaN" in replies.rejected[0]
    updates = sorted(replies.updates, key=lambda u: u.client_id)
    assert [u.client_id for u in updates] == ["p0", "p10", "p2"]
    rows = stack_rows([u.delta for u in updates])
    expected = torch.stack([torch.cat([sent[n]["a"].flatten(), sent[n]["b"]]) for n in (11, 13, 14)])
    assert torch.equal(rows, expected)
    assert rows.data_ptr() == replies.stack.data_ptr()  # the stack's top rows themselves: no copy
