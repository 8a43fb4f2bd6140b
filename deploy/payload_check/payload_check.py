"""Round-trips one float32 payload of ``megabytes`` MB to ``nodes`` SuperNodes and back, and checks it
arrived intact both ways. Why: a full-model task vector (SmolLM2: 538 MB) is a single ArrayRecord;
this shows the deployment engine carries it (Flower splits arrays into 5 MB chunks) and how long the
link takes, without training anything. The result (times, throughput, intact) is printed and, when
``out`` is set, written there as JSON."""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


def payload(megabytes: float) -> np.ndarray:
    """The same bytes on both sides, so each can check what it got."""
    return np.random.default_rng(0).standard_normal(int(megabytes * 2**20) // 4, dtype=np.float32)


@client.train()
def echo(msg: Message, context: Context) -> Message:
    received = time.time()
    down = msg.content.array_records["payload"]["x"].numpy()
    intact = bool(np.array_equal(down, payload(msg.content.config_records["job"]["megabytes"])))
    up = down + np.float32(1.0)
    metrics = MetricRecord({"received_at": received, "down_intact": int(intact), "replied_at": time.time()})
    return Message(RecordDict({"payload": ArrayRecord({"x": Array(up)}), "metrics": metrics}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    megabytes, nodes, out = (float(context.run_config["megabytes"]), int(context.run_config["nodes"]),
                             str(context.run_config["out"]))
    while len(node_ids := sorted(grid.get_node_ids())) < nodes:
        time.sleep(0.5)
    down = payload(megabytes)
    content = RecordDict({"payload": ArrayRecord({"x": Array(down)}), "job": ConfigRecord({"megabytes": megabytes})})
    sent = time.time()
    replies = list(grid.send_and_receive([Message(content, dst_node_id=n, message_type=MessageType.TRAIN)
                                          for n in node_ids[:nodes]]))
    done = time.time()
    results = []
    for reply in replies:
        if reply.has_error():
            results.append({"node": reply.metadata.src_node_id, "error": reply.error.reason})
            continue
        metrics = reply.content.metric_records["metrics"]
        up = reply.content.array_records["payload"]["x"].numpy()
        results.append({"node": reply.metadata.src_node_id, "down_intact": bool(metrics["down_intact"]),
                        "up_intact": bool(np.array_equal(up, down + np.float32(1.0))),
                        "down_seconds": metrics["received_at"] - sent, "up_seconds": done - metrics["replied_at"]})
    result = {"megabytes": megabytes, "nodes": len(results), "round_trip_seconds": done - sent, "replies": results}
    print("payload check:", json.dumps(result))
    if out:
        with open(out, "w") as f:
            json.dump(result, f)
