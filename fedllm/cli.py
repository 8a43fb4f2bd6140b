"""The ``fedllm`` command: run experiment YAMLs through Flower's simulation engine.

``fedllm run`` drives the same ServerApp and ClientApp as ``flwr run .``, in-process (Flower's
``run_simulation`` with the Ray backend), so an experiment is one command with no SuperLink.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Federated fine-tuning and fusion of language models over wireless channels.")


@app.callback()
def _group() -> None:
    """Federated fine-tuning and fusion of language models over wireless channels."""


@app.command(epilog="Example: fedllm run experiments/fedavg_lora.yaml --set rounds=3 --set channel.kind=awgn")
def run(
    experiment: Annotated[Path, typer.Argument(help="experiment YAML", exists=True, dir_okay=False)],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. client.lr=0.001 (repeatable)")] = None,
    clients: Annotated[int, typer.Option(help="number of simulated edge clients (SuperNodes)")] = 4,
    cpus_per_client: Annotated[float, typer.Option(help="CPU cores reserved per client")] = 1.0,
    resume: Annotated[Path | None, typer.Option(help="results folder of an interrupted run of this config",
                                                exists=True, file_okay=False)] = None,
) -> None:
    """Run one experiment YAML in a local simulation with CLIENTS edge clients."""
    from fedllm.config import ConfigError, load_config

    from fedllm.data import DataError

    try:
        cfg = load_config(experiment, set_ or [])
        simulate(cfg, cfg.data.num_clients or clients, cpus_per_client, resume)
    except (ConfigError, DataError) as err:
        _fail(str(err))


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


class RoundProgress:
    """A progress bar over rounds (on a terminal) fed by the server's per-round log lines."""

    def __init__(self, rounds: int, enabled: bool | None = None) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=rounds, unit="round", desc="rounds",
                        disable=not sys.stderr.isatty() if enabled is None else not enabled)

    def __call__(self, line: str) -> None:
        self._tqdm.write(line)
        match = re.match(r"\[round (\d+)/\d+\]", line)
        if match and int(match.group(1)) > self.bar.n:
            self.bar.update(int(match.group(1)) - self.bar.n)
        if line.startswith("fedllm: done"):
            self.bar.close()


def simulate(cfg, clients: int, cpus_per_client: float = 1.0, resume: Path | None = None) -> Path:
    """One run through Flower's simulation engine; returns its results folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flwr.simulation import run_simulation

    from fedllm.client_app import app as client_app
    from fedllm.server_app import check_data, make_server_app

    check_data(cfg, clients)  # data errors surface here, one line, before Ray starts or a folder is made
    out: list[Path] = []
    run_simulation(server_app=make_server_app(cfg, on_done=out.append, resume=resume, echo=RoundProgress(cfg.rounds)),
                   client_app=client_app,
                   num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": cpus_per_client},
                                   "init_args": {"num_cpus": os.cpu_count() or 1}})
    if not out:
        raise RuntimeError("the simulation ended without finishing the run (see the log above)")
    return out[0]


@app.command(epilog="Examples: fedllm compare experiments/  |  fedllm compare a.yaml b.yaml --set rounds=1")
def compare(
    experiments: Annotated[list[Path], typer.Argument(help="experiment YAMLs and/or folders of them", exists=True)],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override applied to every run (repeatable)")] = None,
    clients: Annotated[int, typer.Option(help="clients for runs whose data.num_clients is unset")] = 4,
    rerun: Annotated[bool, typer.Option(help="run again even when finished results exist")] = False,
    out: Annotated[Path | None, typer.Option(help="where the table and plots go")] = None,
    target: Annotated[float | None, typer.Option(help="add a column: uplink MB until the (personalised) "
                                                       "accuracy or reward first reaches this")] = None,
) -> None:
    """Run what has no results yet (cached by config hash), then print and save a comparison."""
    from fedllm.config import ConfigError
    from fedllm.data import DataError
    from fedllm.report import load_run, write_report
    from fedllm.sweep import finished_run, plan

    try:
        runs = plan(list(experiments), set_ or [])
    except ConfigError as err:
        _fail(str(err))
    typer.echo(f"fedllm compare: {len(runs)} runs")
    folders = []
    for i, planned in enumerate(runs, 1):
        cached = None if rerun else finished_run(planned.config)
        label = f"[{i}/{len(runs)}] {planned.source.name} {planned.overrides or ''}".rstrip()
        if cached:
            typer.echo(f"{label}: cached ({cached})")
            folders.append(cached)
        else:
            typer.echo(f"{label}: running")
            try:
                folders.append(simulate(planned.config, planned.config.data.num_clients or clients))
            except DataError as err:
                _fail(f"{planned.source}: {err}")
    out = out or Path("results") / "compare" / runs[0].config.digest()
    unique = list(dict.fromkeys(folders))  # sweep points that resolve to the same config share one run
    md, plots = write_report([load_run(f) for f in unique], out, target)
    typer.echo(md)
    typer.echo(f"table and {len(plots)} plots in {out}")


@app.command(epilog="Example: fedllm report results/ --out results/report")
def report(
    results: Annotated[list[Path], typer.Argument(help="results folders (runs or parents of runs)", exists=True)],
    out: Annotated[Path, typer.Option(help="where the table and plots go")] = Path("results/report"),
    target: Annotated[float | None, typer.Option(help="add a column: uplink MB until the (personalised) "
                                                       "accuracy or reward first reaches this")] = None,
) -> None:
    """Re-render tables and plots from saved results, without training."""
    from fedllm.report import find_runs, write_report

    runs = find_runs(list(results))
    if not runs:
        _fail(f"no finished runs (folders with summary.json) under {', '.join(map(str, results))}")
    md, plots = write_report(runs, out, target)
    typer.echo(md)
    typer.echo(f"table and {len(plots)} plots in {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
