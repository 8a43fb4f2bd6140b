"""Running experiments in this process through Flower's simulation engine (no SuperLink):
one experiment (:func:`simulate`), or a set of them with a comparison (:func:`compare_experiments`).

``fedllm run``, ``fedllm compare`` and the Python API (``fedllm.run_experiment``,
``fedllm.compare``) all come here; ``flwr run .`` drives the same ServerApp and ClientApp.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedllm.apps.ray_start import EarlyRay, backend_config, without_prestarted_workers
from fedllm.config import ExperimentConfig
from fedllm.core.errors import DataError


def simulate(cfg: ExperimentConfig, clients: int, cpus_per_client: float = 1.0, resume: Path | None = None,
             echo: Callable[[str], None] = print, ray_address: str | None = None,
             gpus_per_client: float = 0.0, early_ray: EarlyRay | None = None) -> Path:
    """One run with ``clients`` simulated edge clients; returns its results folder. ``ray_address``: run
    the clients on an existing Ray cluster (``ray start --head`` on one machine, ``ray start
    --address=HEAD:PORT`` on the others) instead of a Ray instance of this machine's cores; each client
    reserves ``cpus_per_client`` cores and ``gpus_per_client`` GPUs (a fraction shares one). ``early_ray``:
    Ray already being started with this backend config (``fedllm run``, fedllm/apps/ray_start.py)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flwr.simulation import run_simulation

    from fedllm.apps.client_app import app as client_app
    from fedllm.apps.federated_run import FederatedRun
    from fedllm.apps.server_app import make_server_app
    from fedllm.workloads import workload_for

    # Everything that can be wrong with the input fails here, in one line, before the simulation starts
    # or a results folder is made (under ``fedllm run`` Ray may already be coming up meanwhile; it is
    # shut down again before the error returns): the data for this many clients, the results folder,
    # the model and its PEFT set-up (the server's run is set up now and handed to the ServerApp).
    try:
        workload_for(cfg).check_data(clients)
        prepared = FederatedRun(None, cfg, echo, resume)
        out: list[Path] = []
        failed: list[Exception] = []
        without_prestarted_workers()
        if early_ray is not None:
            early_ray.wait()
        run_simulation(server_app=make_server_app(cfg, on_done=out.append, resume=resume, echo=echo,
                                                  prepared=prepared, on_error=failed.append),
                       client_app=client_app,
                       num_supernodes=clients,
                       backend_config=backend_config(cpus_per_client, gpus_per_client, ray_address))
    finally:
        if early_ray is not None:
            early_ray.release()
    if failed:
        raise failed[0]
    if not out:
        raise RuntimeError("the simulation ended without finishing the run (see the log above)")
    return out[0]


@dataclass
class Comparison:
    table: str  # markdown
    plots: list[Path]
    out: Path  # where table.md, table.csv and the plots are
    runs: list[Path]  # the results folder of every run compared


def compare_experiments(paths: list[Path], overrides: list[str] | None = None, clients: int = 4, rerun: bool = False,
                        out: Path | None = None, target: float | None = None,
                        echo: Callable[[str], None] = print) -> Comparison:
    """Run every experiment (files, folders, sweep points) that has no finished results yet (found
    again by config hash; ``rerun`` forces), then write the comparison table and plots."""
    from fedllm.results.report import load_run, write_report
    from fedllm.results.sweep import finished_run, plan

    runs = plan(list(paths), overrides or [])
    echo(f"fedllm compare: {len(runs)} runs")
    folders = []
    for i, planned in enumerate(runs, 1):
        cached = None if rerun else finished_run(planned.config)
        label = f"[{i}/{len(runs)}] {planned.source.name} {planned.overrides or ''}".rstrip()
        if cached:
            echo(f"{label}: cached ({cached})")
            folders.append(cached)
            continue
        echo(f"{label}: running")
        try:
            folders.append(simulate(planned.config, planned.config.data.num_clients or clients, echo=echo))
        except DataError as err:
            raise DataError(f"{planned.source}: {err}") from None
    out = out or Path("results") / "compare" / runs[0].config.digest()
    unique = list(dict.fromkeys(folders))  # sweep points that resolve to the same config share one run
    table, plots = write_report([load_run(f) for f in unique], out, target)
    return Comparison(table, plots, out, unique)
