"""Client-side local trainers, chosen by the YAML's ``client.trainer``.

A trainer is ``train(bundle, examples, ctx) -> TrainResult``: it updates the trainable
tensors of ``bundle.model`` in place on the client's own examples.
"""

from clients.base import TRAINERS, TrainContext, TrainResult, Trainer, client_seed, proximal_term
from clients import supervised as _supervised  # noqa: F401  (registers "supervised")
from clients import rl as _rl  # noqa: F401  (registers "rl")

__all__ = ["TRAINERS", "TrainContext", "TrainResult", "Trainer", "client_seed", "proximal_term"]
