"""ClientApp: thin Flower glue around the client's work (fedllm/apps/client_round.py).

In a deployment Flower 1.42 starts one ClientApp process per message, so this module imports
Flower and nothing heavy: the train and evaluate handlers import the round's work (torch,
transformers, the workload: about 4 s of imports on 2 cores) when they run, and the identity query
answers without it (the first message to every node, 16 of them at once in a 16-node round). In a
deployment the work itself runs in the node's warm worker, which keeps those imports and the model
across rounds (fedllm/apps/warm_worker.py).
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm.apps import warm_worker
from fedllm.apps.wire import METRICS

app = ClientApp()


def partition_of(context: Context, config: dict) -> tuple[int, int]:
    """(partition id, number of partitions); a device with its own data has no partition: (-1, 0)."""
    node_config = context.node_config
    if "partition-id" not in node_config:
        if node_config.get("data-path"):
            return -1, 0
        raise ValueError("node config lacks 'partition-id' or 'data-path' (start the SuperNode with "
                         "--node-config 'partition-id=0 num-partitions=N' or --node-config 'data-path=/my/data.jsonl')")
    num = int(config.get("num-partitions") or node_config.get("num-partitions", 0))
    return int(node_config["partition-id"]), num


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = warm_worker.run_in_worker("train", msg.content, context)
    if reply is None:
        from fedllm.apps.client_round import train_round

        reply = train_round(msg.content, context)
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    reply = warm_worker.run_in_worker("evaluate", msg.content, context)
    if reply is None:
        from fedllm.apps.client_round import evaluate_round

        reply = evaluate_round(msg.content, context)
    return Message(reply, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this client is across runs: its data partition (a device with its own data has none). The
    node's first message, so it also starts the node's warm worker (fedllm/apps/warm_worker.py)."""
    warm_worker.prestart(context)
    pid = context.node_config.get("partition-id")
    facts = ({"partition": int(pid), "partitions": int(context.node_config.get("num-partitions", 0))}
             if pid is not None else {})
    return Message(RecordDict({METRICS: MetricRecord(facts)}), reply_to=msg)
