"""The ``fedllm`` command: run experiment YAMLs through Flower's simulation engine.

``fedllm run`` drives the same ServerApp and ClientApp as ``flwr run .``, in-process (Flower's
``run_simulation`` with the Ray backend), so an experiment is one command with no SuperLink.
"""

from __future__ import annotations

import os
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
) -> None:
    """Run one experiment YAML in a local simulation with CLIENTS edge clients."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedllm.config import ConfigError, load_config

    try:
        cfg = load_config(experiment, set_ or [])
    except ConfigError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    from flwr.simulation import run_simulation

    from fedllm.client_app import app as client_app
    from fedllm.server_app import make_server_app

    run_simulation(server_app=make_server_app(cfg), client_app=client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": cpus_per_client},
                                   "init_args": {"num_cpus": os.cpu_count() or 1}})


def main() -> None:
    app()


if __name__ == "__main__":
    main()
