"""Client-side local trainers, chosen by the YAML's ``client.trainer``.

A trainer is ``train(bundle, examples, ctx) -> TrainResult``: it updates the trainable
tensors of ``bundle.model`` in place on the client's own examples.
"""

from . import rl as _rl  # noqa: F401  (registers "rl")
from . import scaffold as _scaffold  # noqa: F401  (registers "scaffold")
from . import supervised as _supervised  # noqa: F401  (registers "supervised")
from .base import TRAINERS, TrainContext, Trainer, TrainResult, client_seed, proximal_term

__all__ = ["TRAINERS", "TrainContext", "TrainResult", "Trainer", "client_seed", "proximal_term"]
