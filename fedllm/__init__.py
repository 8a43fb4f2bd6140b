"""fedllm: federated fine-tuning and resilient fusion of language models at the wireless edge.

Use from Python (notebooks, scripts)::

    import fedllm
    run = fedllm.run_experiment("experiments/fedavg_lora.yaml", clients=4, overrides=["rounds=2"])
    run.summary["final_accuracy"], run.frame()          # the summary, the per-round records as a table
    table = fedllm.load_results("results/fedavg-ideal")  # every finished run under a folder
    comparison = fedllm.compare(["experiments/"], overrides=["rounds=2"])

Layers, lowest first: ``fedllm.core`` (types, registries, vectors), the plugins
(``fedllm.channels``, ``fedllm.strategies``, ``fedllm.clients``), ``fedllm.config``,
``fedllm.workloads``, ``fedllm.fusion``, ``fedllm.results``, ``fedllm.apps`` (Flower apps and CLI).
"""

from __future__ import annotations

from pathlib import Path as _Path
from typing import TYPE_CHECKING, Any

# The plugin packages sit at the project's top level (channels/, strategies/, clients/) and are
# installed as fedllm.channels, fedllm.strategies and fedllm.clients (pyproject's package-dir), so
# they never clash with unrelated packages of those names (Django Channels installs `channels`).
# Run from a source tree (``flwr run .`` ships the project folder), they are found beside this one.
_HERE = _Path(__file__).resolve().parent
if not (_HERE / "channels").is_dir() and (_HERE.parent / "channels" / "__init__.py").is_file():
    __path__.append(str(_HERE.parent))  # noqa: F821 (a package's __path__)

__all__ = ["ConfigError", "DataError", "ExperimentConfig", "RunResult", "compare", "load_config", "load_results",
           "load_run", "run_experiment"]

if TYPE_CHECKING:
    from fedllm.api import compare, load_results, run_experiment
    from fedllm.config import ConfigError, ExperimentConfig, load_config
    from fedllm.core.errors import DataError
    from fedllm.results.report import RunResult, load_run

_LAZY = {"compare": "fedllm.api", "load_results": "fedllm.api", "run_experiment": "fedllm.api",
         "ConfigError": "fedllm.core.errors", "DataError": "fedllm.core.errors", "ExperimentConfig": "fedllm.config",
         "load_config": "fedllm.config", "RunResult": "fedllm.results.report", "load_run": "fedllm.results.report"}


def __getattr__(name: str) -> Any:
    """Public names load on first use: ``import fedllm.channels`` must not pull in torch, Flower and the apps."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedllm' has no attribute {name!r}")
