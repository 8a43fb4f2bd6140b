"""Workloads: what a run trains and how it scores it (see :mod:`fedllm.workloads.base`).

``classification`` (an encoder with a classification head, PFTT and R-MTLLMF) and
``instruction_rl`` (a causal-LM policy tuned by RL against client preferences, PFIT).
"""

from fedllm.config import ExperimentConfig

# Each import registers its workload by name.
from fedllm.workloads import classification, instruction_rl  # noqa: E402,F401
from fedllm.workloads.base import WORKLOADS, ClientEvaluation, Evaluation, Workload


def workload_for(cfg: ExperimentConfig) -> Workload:
    """The workload an experiment describes: an ``rl:`` section means RL instruction tuning."""
    return WORKLOADS.get("instruction_rl" if cfg.rl is not None else "classification")(cfg)


__all__ = ["WORKLOADS", "ClientEvaluation", "Evaluation", "Workload", "workload_for"]
