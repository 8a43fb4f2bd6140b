"""ServerApp: reads the experiment and runs it (:class:`fedllm.apps.federated_run.FederatedRun`).

With ``flwr run`` the experiment comes from the run config (``experiment``, ``overrides``,
``resume``); ``fedllm run`` and the Python API pass a validated config directly.

Loading this module imports Flower and nothing heavy; the run imports torch, transformers and the
workload when it starts. Under ``flwr run`` Flower 1.42 loads the ServerApp and then the ClientApp
under one import lock, and starts Ray only after both: a heavy module here kept Ray waiting for
torch and transformers to import (7 s on 2 cores), where now it comes up while the run imports them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedllm.core.errors import ConfigError, DataError, StorageError

if TYPE_CHECKING:
    from fedllm.apps.federated_run import FederatedRun
    from fedllm.config import ExperimentConfig

log = logging.getLogger("fedllm")
APP_DIR = Path(__file__).resolve().parents[2]


def resolve_experiment_path(path: str) -> Path | None:
    """An experiment path as given, else relative to the app folder (where ``flwr run`` ships it)."""
    if not path:
        return None
    p = Path(path).expanduser()
    for candidate in (p, APP_DIR / p):
        if candidate.is_file():
            return candidate
    shipped = sorted(f.relative_to(APP_DIR).as_posix() for f in (APP_DIR / "experiments").glob("*.yaml"))
    raise ConfigError(f"experiment file not found: {path} (looked in {Path.cwd()} and {APP_DIR}); "
                      f"shipped experiments: {', '.join(shipped) or 'none'}")


def config_from_run_config(run_config: dict) -> ExperimentConfig:
    from fedllm.config import load_config

    return load_config(resolve_experiment_path(str(run_config.get("experiment", ""))),
                       str(run_config.get("overrides", "")) or None)


def results_root(run_config: dict) -> Path:
    """Where a relative ``output.dir`` lives under ``flwr run``: the run config's ``results-dir``, else
    ``$FEDLLM_RESULTS``, else ``~/fedllm-results``. Not the working directory: the ServerApp runs in
    the SuperLink's process, whose directory is wherever it was first started."""
    chosen = str(run_config.get("results-dir", "")) or os.environ.get("FEDLLM_RESULTS", "") or "~/fedllm-results"
    return Path(chosen).expanduser().resolve()


def run_experiment(grid: Grid, cfg: ExperimentConfig, echo: Callable[[str], None] = print,
                   resume: Path | None = None, root: Path | None = None) -> Path:
    """Run every round of ``cfg`` on the nodes of ``grid`` (continuing ``resume``); returns the results
    folder (a relative ``output.dir`` under ``root``, default the working directory)."""
    from fedllm.apps.federated_run import FederatedRun

    return FederatedRun(grid, cfg, echo, resume, root).run()


KNOWN_ERRORS = (ConfigError, DataError, StorageError)  # the user's input or the disk: one line, no traceback


def make_server_app(cfg: ExperimentConfig | None = None, on_done: Callable[[Path], None] | None = None,
                    resume: Path | None = None, echo: Callable[[str], None] = print,
                    prepared: FederatedRun | None = None,
                    on_error: Callable[[Exception], None] | None = None) -> ServerApp:
    """A ServerApp for ``cfg``; ``None`` reads the experiment (and ``resume``) from the run config
    (``flwr run``). ``prepared``: a run already set up (model built, data and results folder
    checked) before the simulation started. ``on_done`` receives the results folder of a finished run;
    ``on_error``, if given, receives a known error (bad input, a full disk) instead of Flower, whose
    log would bury its one line under a traceback (the in-process simulation re-raises it after)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        resume_dir = resume or (Path(str(context.run_config["resume"])).expanduser()
                                if context.run_config.get("resume") else None)
        try:
            if prepared is not None:
                prepared.grid = grid
                run_dir = prepared.run()
            elif cfg is None:  # flwr run: the experiment and where its results go come from the run config
                run_dir = run_experiment(grid, config_from_run_config(context.run_config), echo, resume_dir,
                                         results_root(context.run_config))
            else:
                run_dir = run_experiment(grid, cfg, echo, resume_dir)
        except KNOWN_ERRORS as err:  # one line that names it, then fail the run
            log.error("fedllm: %s", err)
            if on_error is None:
                raise
            on_error(err)
            return
        if on_done is not None:
            on_done(run_dir)

    return server_app


app = make_server_app()
