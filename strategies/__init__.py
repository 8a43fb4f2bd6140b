"""Server-side fusion rules: pure functions on stacked client deltas, chosen by name.

``FUSION_RULES`` maps the YAML's ``strategy.name`` to a rule class whose ``fuse(deltas, weights)``
returns the fused delta; the fusion pipeline (fedllm/fusion/pipeline.py) wires any of them to
any channel. Installed as ``fedllm.strategies``; it imports nothing of fedllm but its core.
"""

# Each import registers its rules by name.
from . import adamerging, fedavg, krum, merging, model_merging, robust, scaffold  # noqa: F401,E402
from .base import (FUSION_RULES, STATISTIC_LAYOUTS, FusionRule, FusionSpace, InsufficientUpdates, MergeContext, build_rule,
                   statistic_layouts, validate_rule_params)

__all__ = ["FUSION_RULES", "STATISTIC_LAYOUTS", "FusionRule", "FusionSpace", "InsufficientUpdates", "MergeContext", "build_rule", "statistic_layouts",
           "validate_rule_params"]
