"""Server-side fusion rules: pure functions on stacked client deltas, chosen by name.

``FUSION_RULES`` maps the YAML's ``strategy.name`` to ``fuse(deltas, weights) -> delta``;
the one :class:`fedllm.server_round.RoundRunner` wires any of them to any channel.
"""

from strategies.base import FUSION_RULES, FusionRule, build_rule, validate_rule_params

# Each import registers its rules by name.
from strategies import fedavg, merging, robust  # noqa: F401,E402

__all__ = ["FUSION_RULES", "FusionRule", "build_rule", "validate_rule_params"]
