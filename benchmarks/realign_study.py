"""Does R-MTLLMF's few-shot realignment bring a jammed fusion back? A study of the realignment itself.

On the task vectors of ``rmtllmf_benchmark.py`` (trained once and cached under the same ``--out``;
embeddings frozen during fine-tuning, as R-MTLLMF prescribes), fused by task arithmetic over the
jammed MIMO uplink (worst-case jammer, zero-forcing receiver), the server realigns the merged
model on labelled shots it holds, and every setting is scored against the tasks' own models
(normalised accuracy):

- shots per task: 5 (the paper's), 20, 100;
- scope: LayerNorms and biases (``norms_biases``), every transmitted tensor (``transmitted``), or
  the whole model, embeddings included (``all``: a server-side study only; the embeddings stay on
  the clients, so this model could not be sent back as it is);
- steps and learning rate: 20 at 1e-4 (the default), 100 at 1e-4, 100 at 1e-3;
- R-MTLLMF with layer-wise AdaMerging coefficients before realigning (`--no-coefficients` leaves it out);
- the floor of it all: the uplink discarded (lambda 0: the pretrained model) and the whole model
  trained on the same shots, i.e. what the server's shots give without any client's task vector.

``--settings 20:1e-4 100:1e-3`` and ``--scopes`` cut the grid to a budget (every setting is a
merge, a lambda search and a test pass over the 8 tasks: with MiniLM on 2 cores 44 s without
realignment, 75-115 s with 5 shots per task and 250-285 s with 20, at 50 whole-batch steps).

    python benchmarks/realign_study.py --out results/benchmarks/rmtllmf          # reuses its cache
    python benchmarks/realign_study.py --quick --out /tmp/rs                        # 3 tasks, short

Writes ``realign.md`` and ``realign.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("rmtllmf_benchmark", HERE / "rmtllmf_benchmark.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

from fedllm.core.vectors import get_tensors, set_tensors  # noqa: E402
from fedllm.strategies.realign import realign  # noqa: E402
from fedllm.workloads.classification import Classification  # noqa: E402

SETTINGS = [(20, 1e-4), (100, 1e-4), (100, 1e-3)]  # (steps, learning rate)
SCOPES = ("norms_biases", "transmitted", "all")


def setting(text: str) -> tuple[int, float]:
    """``STEPS:LR`` (e.g. ``100:1e-3``) as (steps, learning rate)."""
    try:
        steps, lr = text.split(":")
        return int(steps), float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--settings wants STEPS:LR, e.g. 100:1e-3, not {text!r}") from None


def realign_all(fam, received, shots: int, steps: int, lr: float, discard: bool = False) -> dict[str, torch.Tensor]:
    """Task arithmetic with its lambda search (``discard``: lambda 0, the pretrained model), then every
    parameter of the model realigned."""
    merged, _ = fam.merge(received, "rmtllmf", label="rmtllmf-all", shots=shots, realign_steps=0,
                          **({"lr_grid": [0.0]} if discard else {}))
    model = fam.bundle.model
    set_tensors(model, merged)
    examples = fam.workload.few_shot(shots, 0)
    params = [p for p in model.parameters()]
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        realign(model, params, lambda: fam.workload.few_shot_loss(fam.bundle, examples), steps=steps, lr=lr, seed=0)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return get_tensors(model, [n for n, _ in model.named_parameters()])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 tasks, 5 and 20 shots, the default steps only")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per task (as the benchmark's)")
    parser.add_argument("--tasks", nargs="+")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--powers", type=float, nargs="+", default=[40.0, 50.0], help="worst-case jammer powers (dB)")
    parser.add_argument("--shots", type=int, nargs="+", default=None)
    parser.add_argument("--receiver", choices=["zf", "lmmse"], default="zf")
    parser.add_argument("--settings", nargs="+", type=setting, default=None,
                        help="realignment steps:learning rate pairs (default 20:1e-4 100:1e-4 100:1e-3)")
    parser.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    parser.add_argument("--no-ideal", dest="ideal", action="store_false", help="only the jammed powers")
    parser.add_argument("--no-coefficients", dest="coefficients", action="store_false",
                        help="leave out R-MTLLMF + layer-wise coefficients (with 100 shots, about 10 min per power)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/rmtllmf"))
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    real = all((bench.SHARED / t / "train.jsonl").is_file() for t in bench.REAL_TASKS)
    tasks = args.tasks or ((bench.REAL_TASKS[:3] if args.quick else bench.REAL_TASKS) if real
                           else ["sentiment", "topic", "question"])
    steps = args.steps or (60 if args.quick else 150)
    max_test = args.max_test or (200 if args.quick else 300)
    shots_list = args.shots or ([5, 20] if args.quick else [5, 20, 100])
    settings = args.settings or (SETTINGS[:1] if args.quick else SETTINGS)
    cache = args.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cfg = bench.experiment(tasks, "frozen", steps, max_test, args.model)
    workload = Classification(cfg)
    bundle = workload.build_model()
    fam = bench.Fusion(cfg, workload, bundle, bench.task_vectors(cfg, bundle, workload.suite, cache))
    pristine = get_tensors(bundle.model, [n for n, _ in bundle.model.named_parameters()])
    rows = []
    done: dict[tuple, dict] = {}  # rows that do not depend on the channel, computed once

    def record(power, label: str, scope: str, shots: int, steps_: int, lr: float, merge,
               same_at_every_power: bool = False) -> None:
        key = (label, scope, shots, steps_, lr)
        if same_at_every_power and key in done:
            rows.append({**done[key], "power_db": power})
            return
        t0 = time.perf_counter()
        scores = fam.score(merge())
        set_tensors(bundle.model, pristine)  # the "all" scope trains the embeddings too: undo it
        rows.append({"power_db": power, "method": label, "scope": scope, "shots": shots, "steps": steps_, "lr": lr,
                     "normalized_accuracy": scores["normalized_accuracy"], "accuracy": scores["accuracy"],
                     "server_seconds": time.perf_counter() - t0})
        if same_at_every_power:
            done[key] = rows[-1]
        print(f"  {'ideal' if power is None else f'{power:.0f} dB':>6} {label:34s} {scope:13s} shots {shots:>3} steps {steps_:>3} lr {lr:g}: "
              f"norm.acc {scores['normalized_accuracy']:.4f}", flush=True)

    for power in [None, *args.powers] if args.ideal else args.powers:
        channel = None if power is None else {"kind": "mimo_mac", "nt": max(1, 16 // len(tasks)),
                                              "receiver": args.receiver, "jammer": "worst_case",
                                              "jammer_power_db": power}
        received = fam.received(channel)
        record(power, "task arithmetic (no realignment)", "-", 0, 0, 0.0,
               lambda: fam.merge(received, "rmtllmf", label="no-realign", realign_steps=0)[0])
        for shots in shots_list:
            for steps_, lr in settings:
                for scope in args.scopes:
                    record(power, "R-MTLLMF", scope, shots, steps_, lr, lambda: (
                        realign_all(fam, received, shots, steps_, lr) if scope == "all" else fam.merge(
                            received, "rmtllmf", label=f"rmtllmf-{scope}", shots=shots, realign_steps=steps_,
                            realign_lr=lr, realign_scope=scope)[0]))
            if args.coefficients:
                record(power, "R-MTLLMF + layer-wise coefficients", "norms_biases", shots, 20, 1e-4, lambda: fam.merge(
                    received, "rmtllmf", label="rmtllmf-layers", shots=shots, realign_steps=20, realign_lr=1e-4,
                    coefficients="layer", coefficient_steps=30)[0])
            steps_, lr = settings[-1]
            # lambda 0 makes it the same model whatever the channel did: realigned once, reported at every power
            record(power, "uplink discarded (pretrained model) + realignment", "all", shots, steps_, lr,
                   lambda: realign_all(fam, received, shots, steps_, lr, discard=True), same_at_every_power=True)
    out = {"tasks": tasks, "steps": steps, "receiver": args.receiver, "rows": rows,
           "seconds": time.perf_counter() - started}
    (args.out / "realign.json").write_text(json.dumps(out, indent=2))
    (args.out / "realign.md").write_text(table(out))
    print(table(out))
    print(f"in {args.out} ({out['seconds'] / 60:.0f} min)")


def table(out: dict) -> str:
    powers = list(dict.fromkeys(r["power_db"] for r in out["rows"]))
    name = {None: "ideal"} | {p: f"{p:.0f} dB" for p in powers if p is not None}
    keyed: dict[tuple, dict] = {}
    for r in out["rows"]:
        keyed.setdefault((r["method"], r["scope"], r["shots"], r["steps"], r["lr"]), {})[r["power_db"]] = r
    lines = [f"Realignment study: tasks {', '.join(out['tasks'])}; worst-case jammer, {out['receiver']} receiver; "
             "normalised accuracy (server seconds per merge at the last power)", "",
             "| method | scope | shots/task | steps | lr | " + " | ".join(name[p] for p in powers) + " | s |",
             "| --- | --- | --- | --- | --- |" + " --- |" * (len(powers) + 1)]
    for (method, scope, shots, steps, lr), by_power in keyed.items():
        cells = [f"{by_power[p]['normalized_accuracy']:.4f}" if p in by_power else "—" for p in powers]
        last = by_power[powers[-1]]["server_seconds"] if powers[-1] in by_power else float("nan")
        lines.append(f"| {method} | {scope} | {shots} | {steps} | {lr:g} | " + " | ".join(cells) + f" | {last:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
