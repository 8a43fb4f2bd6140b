"""Reading a message's arrays in place: the same values as Flower's own ``Array.numpy()`` (the
oracle), without the copy (the view lies in the message's bytes), and a reply parsed into its row
of the round's stack without NumPy holding a second copy of any tensor."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fedllm.apps.array_view import array_in_place, tensor_in_place
from fedllm.apps.payload import DELTA, METRICS, RejectedReply, parse_reply
from fedllm.core.vectors import Layout, flatten

RNG = np.random.default_rng(0)
CASES = {
    "float32 matrix": RNG.standard_normal((3, 4)).astype(np.float32),
    "float64 Fortran order": np.asfortranarray(RNG.standard_normal((3, 4))),
    "big-endian int": np.arange(5, dtype=">i4"),
    "0-d": np.array(3.5),
    "empty float16": np.zeros((0, 3), np.float16),
    "bool": np.array([True, False, True]),
    "3-d int8": RNG.integers(-100, 100, (2, 3, 4)).astype(np.int8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_in_place_reads_what_flower_reads(name):
    array = Array(CASES[name])
    got, flower = array_in_place(array), array.numpy()
    assert got.dtype == flower.dtype and got.shape == flower.shape and np.array_equal(got, flower)
    in_message = np.shares_memory(got, np.frombuffer(array.data, np.uint8))
    # C-order numeric values are read where they lie; Fortran order falls back to Flower's reader
    assert in_message == (got.size > 0 and not name.startswith("float64 Fortran"))


def test_a_torch_tensor_is_read_without_a_copy():
    record = ArrayRecord(torch_state_dict={"w": torch.randn(20, 30)})
    values = tensor_in_place(record["w"])
    assert torch.equal(values, torch.from_numpy(record["w"].numpy()))
    data = np.frombuffer(record["w"].data, np.uint8)
    assert data.ctypes.data <= values.data_ptr() < data.ctypes.data + data.size


@pytest.mark.parametrize("data", [b"garbage" * 20, None])
def test_bytes_that_are_not_an_array_raise_as_flower_does(data):
    good = Array(np.arange(10, dtype=np.float32))
    bad = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=data or good.data[:-5])
    for read in (bad.numpy, lambda: array_in_place(bad)):
        with pytest.raises(ValueError):
            read()


def _reply(tensors: dict[str, torch.Tensor]) -> Message:
    content = RecordDict({DELTA: ArrayRecord(torch_state_dict=tensors),
                          METRICS: MetricRecord({"num-examples": 10})})
    meta = Metadata(run_id=1, message_id="", src_node_id=7, dst_node_id=0, reply_to_message_id="m",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(metadata=meta, content=content)


def test_a_reply_goes_into_its_row_without_numpy_copying_a_tensor():
    """The old reader (np.load) made a NumPy copy of each tensor (4 MB for the big one here) before
    it went into the row; tracemalloc sees every NumPy allocation."""
    tensors = {"big": torch.randn(1000, 1000), "small": torch.randn(7)}
    layout = Layout.of(tensors)
    reply, row = _reply(tensors), torch.empty(layout.numel)
    tracemalloc.start()
    try:
        update = parse_reply(reply, layout, out=row)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(update.delta, flatten(tensors, layout)) and update.delta.data_ptr() == row.data_ptr()
    assert peak < 1_000_000, f"parsing held {peak} bytes of NumPy memory (a 4 MB tensor copied?)"


def test_a_truncated_tensor_is_rejected_with_its_name():
    tensors = {"w": torch.randn(4, 4)}
    reply = _reply(tensors)
    array = reply.content.array_records[DELTA]["w"]
    reply.content.array_records[DELTA]["w"] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype,
                                                     data=array.data[:-8])
    with pytest.raises(RejectedReply, match="client 7: w cannot be read as an array"):
        parse_reply(reply, Layout.of(tensors))
