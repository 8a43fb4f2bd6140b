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
