"""Warming a simulation worker while the server evaluates round 0.

In a simulation, a Ray worker is a process that outlives its messages: the first round's train
message used to find it bare, so round 1 paid each worker's imports of torch, transformers and the
workload and its model build (7.8 s of a 5-round MiniLM run on 2 cores, README Performance), while
the server sat in its round-0 evaluation. The identity query, the first message every node gets,
now carries the experiment, and the worker builds what the train handler will need (imports, the
model, this client's data) in a thread while it waits; the train and evaluate handlers wait for that
thread before they start, so they never race it for the model.

Not in a deployment: there Flower starts a process per message (the query's would exit with its
thread) and the node's warm worker keeps the imports instead (fedllm/apps/warm_worker.py).

This module imports nothing heavy: the ClientApp imports it for every message.
"""

from __future__ import annotations

import logging
import sys
import threading

from flwr.app import Context, RecordDict

from fedllm.apps.wire import CONFIG

log = logging.getLogger("fedllm")

_threads: list[threading.Thread] = []
_started: set[tuple[str, int]] = set()  # (experiment, partition) already prepared in this process
_lock = threading.Lock()  # one preparation at a time: they share the process's model cache


def in_ray_worker() -> bool:
    """A simulation's worker (a process that outlives its messages), not Flower's per-message process."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def start(content: RecordDict, context: Context) -> bool:
    """Begin preparing this client's round in the background, if the query says for which experiment
    and this process outlives the message; True if a preparation started."""
    if CONFIG not in content.config_records or not in_ray_worker():
        return False
    experiment = str(content.config_records[CONFIG].get("experiment", ""))
    key = (experiment, int(context.node_config.get("partition-id", -1)))
    if not experiment or key in _started:
        return False
    _started.add(key)
    config = dict(content.config_records[CONFIG])
    thread = threading.Thread(target=_prepare, args=(config, context), name="fedllm-prewarm", daemon=True)
    _threads.append(thread)
    thread.start()
    return True


def _prepare(config: dict, context: Context) -> None:
    with _lock:
        try:
            from fedllm.apps.client_round import prepare_client

            prepare_client(config, context)
        except Exception as err:  # noqa: BLE001 (the round meets the same error and reports it to the server)
            log.debug("prewarm failed (the round will report it): %s", err)


def wait() -> None:
    """Let any preparation in this process finish (the handlers call this before their work)."""
    while _threads:
        _threads.pop().join()
