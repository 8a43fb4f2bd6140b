"""Server-side fusion rules: pure functions on stacked client deltas, chosen by name.

``FUSION_RULES`` maps the YAML's ``strategy.name`` to ``fuse(deltas, weights) -> delta``;
the one :class:`fedllm.server_round.RoundRunner` wires any of them to any channel.
"""

from strategies.base import FUSION_RULES, FusionRule
from strategies import fedavg as _fedavg  # noqa: F401  (registers "fedavg")

__all__ = ["FUSION_RULES", "FusionRule"]
