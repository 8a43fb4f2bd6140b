"""R-MTLLMF benchmark: multi-task fusion of task vectors over ideal, noisy and jammed uplinks.

One-shot fusion needs each task's fine-tuned model once, so this script trains every task
vector a single time (cached on disk) and then evaluates every fusion rule and channel on them:

1. normalised accuracy under an ideal channel: zero-shot, individual, task arithmetic, TIES,
   DARE, R-MTLLMF (embeddings frozen during fine-tuning, task arithmetic, few-shot realignment);
2. the same for task arithmetic and R-MTLLMF under ``mimo_mac`` with the worst-case (sum-rate)
   and strongest-user jammer across jammer powers;
3. WD error against channel MSE over an AWGN sweep, with a Spearman rank test;
4. per-group sensitivity: noise of one relative MSE hitting only the embeddings, attention,
   feed-forward or LayerNorm tensors of the fused vector.

Data: the 8 text tasks in ../shared/data (sst2 subj cr mpqa trec banking77 ag_news emotion)
when present, else the embedded tasks. Model: the embedded MiniLM with frozen label-embedding
heads, full fine-tuning. Writes table.md, results.json and PNG plots under --out.

    python benchmarks/rmtllmf_benchmark.py --quick          # 3 tasks, short: about 10 min on 2 cores
    python benchmarks/rmtllmf_benchmark.py                  # all 8 tasks
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from channels import ClientMeta, build_channel  # noqa: E402
from clients import TRAINERS, TrainContext  # noqa: E402
from fedllm.config import config_from_dict  # noqa: E402
from fedllm.data import load_suite  # noqa: E402
from fedllm.metrics import evaluate_tasks, fusion_metrics  # noqa: E402
from fedllm.models import build_bundle  # noqa: E402
from fedllm.realign import few_shot_set, realign  # noqa: E402
from fedllm.vectors import Layout, add, flatten, get_tensors, set_tensors, subtract, unflatten  # noqa: E402
from strategies import build_rule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
REAL_TASKS = ["sst2", "subj", "cr", "mpqa", "trec", "banking77", "ag_news", "emotion"]
GROUPS = {"embeddings": "embeddings", "attention": "attention", "feed_forward": ("intermediate", "output.dense"),
          "layernorm": "LayerNorm"}


def experiment(tasks: list[str], frozen: bool, steps: int, max_test: int) -> object:
    real = all((SHARED / t / "train.jsonl").is_file() for t in tasks)
    specs = [{"name": t, "source": "local", "path": str(SHARED / t)} if real else {"name": t} for t in tasks]
    return config_from_dict({
        "model": {"name": "minilm", "max_length": 64, "head": "label_embedding", "temperature": 0.05},
        "peft": {"method": "full", "global_patterns": ["*"], "frozen_patterns": ["embeddings"] if frozen else []},
        "data": {"tasks": specs, "partition": "task", "max_train_per_task": 2000, "max_test_per_task": max_test,
                 "validation_per_task": 100},
        "client": {"lr": 2e-5, "batch_size": 16, "max_steps": steps},
        "strategy": {"name": "task_arithmetic"}, "rounds": 1, "seed": 0,
    })


def task_vectors(cfg, bundle, suite, cache: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Fine-tune theta0 on each task alone (cached): tau_t = theta_t - theta0 of the transmitted group."""
    out = {}
    theta0 = dict(bundle.initial_global)
    train = suite.split("train")
    for t, task in enumerate(suite.tasks):
        path = cache / f"{cfg.digest()}-{task.name}.pt"
        if path.is_file():
            out[t] = torch.load(path)
            continue
        set_tensors(bundle.model, theta0)
        mine = train.subset([i for i, k in enumerate(train.tasks) if k == t])
        start = time.perf_counter()
        result = TRAINERS.get("supervised")(bundle, mine, TrainContext(cfg.client, suite.label_ranges,
                                                                       cfg.model.max_length, seed=t))
        out[t] = subtract(get_tensors(bundle.model, bundle.groups.global_names), theta0)
        torch.save(out[t], path)
        print(f"  fine-tuned {task.name}: {result.steps} steps, loss {result.loss:.3f}, {time.perf_counter() - start:.0f}s")
    set_tensors(bundle.model, theta0)
    return out


class Fusion:
    """Everything needed to merge one family of task vectors and score the result."""

    def __init__(self, cfg, bundle, suite, taus: dict[int, dict[str, torch.Tensor]]) -> None:
        self.cfg, self.bundle, self.suite, self.taus = cfg, bundle, suite, taus
        self.theta0 = dict(bundle.initial_global)
        self.layout = Layout.of(self.theta0)
        self.batch = torch.stack([flatten(taus[t], self.layout) for t in sorted(taus)])
        self.test = suite.split("test")
        self.validation = suite.split("validation")
        self.individual = {t: add(self.theta0, taus[t]) for t in taus}

    def received(self, channel: dict | None, seed: int = 0) -> tuple[torch.Tensor, float]:
        if not channel:
            return self.batch, 0.0
        meta = ClientMeta([f"t{t}" for t in sorted(self.taus)], torch.ones(len(self.taus)))
        out, report = build_channel(channel["kind"], {k: v for k, v in channel.items() if k != "kind"}, seed).transmit(
            self.batch, meta)
        rel = float((report.mse / self.batch.pow(2).mean(dim=1)).mean())
        return out, rel

    def merge(self, received: torch.Tensor, rule: str, realign_steps: int = 0, **params) -> dict[str, torch.Tensor]:
        fused = build_rule(rule, params, seed=0)(received, torch.ones(received.shape[0]))
        best, best_acc = self.theta0, -1.0
        for lam in [0.1 * i for i in range(1, 11)]:  # lambda on validation data, as in task arithmetic
            cand = add(self.theta0, unflatten(fused, self.layout), lam)
            set_tensors(self.bundle.model, cand)
            acc = evaluate_tasks(self.bundle, self.bundle.model, self.suite, self.validation, 64,
                                 self.cfg.model.max_length)["accuracy"]
            if acc > best_acc:
                best, best_acc = cand, acc
        if realign_steps:
            set_tensors(self.bundle.model, best)
            shots = few_shot_set(self.validation, len(self.suite.tasks), 5, seed=0)
            realign(self.bundle, shots, self.suite, steps=realign_steps, lr=1e-4, scope="norms_biases",
                    max_length=self.cfg.model.max_length, seed=0)
            best = get_tensors(self.bundle.model, self.bundle.groups.global_names)
        return best

    def score(self, params: dict[str, torch.Tensor]) -> dict[str, float]:
        out = fusion_metrics(self.bundle, self.suite, self.test, params, self.individual, 64, self.cfg.model.max_length)
        set_tensors(self.bundle.model, params)
        out.update(evaluate_tasks(self.bundle, self.bundle.model, self.suite, self.test, 64, self.cfg.model.max_length))
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 tasks, fewer steps and jammer powers")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per task")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/rmtllmf"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    real = all((SHARED / t / "train.jsonl").is_file() for t in REAL_TASKS)
    tasks = (REAL_TASKS[:3] if args.quick else REAL_TASKS) if real else ["sentiment", "topic", "question"]
    steps = args.steps or (60 if args.quick else 150)
    powers = [0.0, 20.0, 40.0] if args.quick else [0.0, 10.0, 20.0, 30.0, 40.0]
    max_test = 200 if args.quick else 500
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cache"
    cache.mkdir(exist_ok=True)
    print(f"tasks: {tasks} ({'../shared/data' if real else 'embedded'}), {steps} steps each")
    results: dict = {"tasks": tasks, "steps": steps, "data": "shared" if real else "embedded"}

    families = {}
    for frozen in (False, True):
        cfg = experiment(tasks, frozen, steps, max_test)
        suite = load_suite(cfg.data, cfg.seed)
        bundle = build_bundle(cfg, suite.label_names)
        families[frozen] = Fusion(cfg, bundle, suite, task_vectors(cfg, bundle, suite, cache))
    plain, frozen = families[False], families[True]
    mimo_base = {"kind": "mimo_mac", "nt": max(1, 16 // len(tasks))}

    # 1. ideal channel
    table = {"zero-shot": plain.score(plain.theta0)}
    table["task arithmetic"] = plain.score(plain.merge(plain.batch, "task_arithmetic"))
    individual = [table["task arithmetic"][f"individual_accuracy/{task.name}"] for task in plain.suite.tasks]
    table = {"zero-shot": table["zero-shot"], "individual": {"accuracy": sum(individual) / len(individual),
                                                             "normalized_accuracy": 1.0},
             "task arithmetic": table["task arithmetic"]}
    table["TIES"] = plain.score(plain.merge(plain.batch, "ties", k=0.2))
    table["DARE"] = plain.score(plain.merge(plain.batch, "dare", p=0.9))
    table["R-MTLLMF"] = frozen.score(frozen.merge(frozen.batch, "task_arithmetic", realign_steps=20))
    results["ideal"] = table
    print("ideal channel:", {k: round(v.get("normalized_accuracy", float("nan")), 4) for k, v in table.items()})

    # 2. jammed MIMO uplink
    jammed = []
    for jammer in ("worst_case", "strongest_user"):
        for power in powers:
            channel = {**mimo_base, "jammer": jammer, "jammer_power_db": power}
            for name, fam, realign_steps in (("task arithmetic", plain, 0), ("R-MTLLMF", frozen, 20)):
                received, rel_mse = fam.received(channel)
                scores = fam.score(fam.merge(received, "task_arithmetic", realign_steps=realign_steps))
                jammed.append({"jammer": jammer, "power_db": power, "method": name, "relative_mse": rel_mse,
                               "normalized_accuracy": scores.get("normalized_accuracy"), "wd_error": scores.get("wd_error"),
                               "accuracy": scores["accuracy"]})
                print(f"  {jammer} {power:>4} dB {name:16s} rel.MSE {rel_mse:.3f} "
                      f"norm.acc {scores.get('normalized_accuracy', float('nan')):.4f}")
    results["jammed"] = jammed

    # 3. WD error vs MSE
    from scipy.stats import spearmanr

    wd = []
    for snr in ([-40.0, -20.0, 0.0, 20.0] if args.quick else [-50.0, -40.0, -30.0, -20.0, -10.0, 0.0, 10.0, 20.0]):
        received, rel_mse = plain.received({"kind": "awgn", "snr_db": snr, "power_normalisation": "payload"})
        scores = plain.score(add(plain.theta0, unflatten(received.sum(0), plain.layout), 0.3))
        wd.append({"snr_db": snr, "relative_mse": rel_mse, "wd_error": scores["wd_error"]})
    rho, p_value = spearmanr([w["relative_mse"] for w in wd], [w["wd_error"] for w in wd])
    results["wd_vs_mse"] = {"points": wd, "spearman_rho": float(rho), "p_value": float(p_value)}
    print(f"WD error vs MSE: Spearman rho {rho:.3f}, p = {p_value:.4f}")

    # 4. per-group sensitivity (noise of relative MSE 100 on one group of the fused vector)
    fused = plain.batch.sum(0)
    sens = {}
    g = torch.Generator().manual_seed(0)
    for group, patterns in GROUPS.items():
        patterns = patterns if isinstance(patterns, tuple) else (patterns,)
        mask = torch.cat([torch.full((size,), any(p in name for p in patterns))
                          for name, size in zip(plain.layout.names, plain.layout.sizes)])
        rms = float(fused[mask].pow(2).mean().sqrt())
        noisy = fused + mask * torch.randn(fused.shape, generator=g) * rms * 10.0
        scores = plain.score(add(plain.theta0, unflatten(noisy, plain.layout), 0.3))
        sens[group] = {"values": int(mask.sum()), "normalized_accuracy": scores.get("normalized_accuracy")}
    clean = plain.score(add(plain.theta0, unflatten(fused, plain.layout), 0.3)).get("normalized_accuracy")
    results["sensitivity"] = {"clean": clean, "groups": sens}
    print("sensitivity:", {k: round(v["normalized_accuracy"], 4) for k, v in sens.items()}, "clean", round(clean, 4))

    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    write_outputs(results, args.out)
    print(f"results in {args.out}")


def write_outputs(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"Tasks: {', '.join(results['tasks'])} ({results['data']} data), {results['steps']} fine-tuning steps each.", "",
             "| method (ideal channel) | accuracy | normalised accuracy |", "| --- | --- | --- |"]
    for name, s in results["ideal"].items():
        lines.append(f"| {name} | {s.get('accuracy', float('nan')):.4f} | {s.get('normalized_accuracy', float('nan')):.4f} |")
    lines += ["", "| jammer | power (dB) | method | relative MSE | normalised accuracy | WD error |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in results["jammed"]:
        lines.append(f"| {r['jammer']} | {r['power_db']:.0f} | {r['method']} | {r['relative_mse']:.3f} | "
                     f"{r['normalized_accuracy']:.4f} | {r['wd_error']:.4f} |")
    w = results["wd_vs_mse"]
    lines += ["", f"WD error vs relative MSE (AWGN sweep): Spearman rho = {w['spearman_rho']:.3f}, p = {w['p_value']:.4g}", "",
              "| group hit by noise (10x its RMS) | values | normalised accuracy |", "| --- | --- | --- |"]
    for g, v in results["sensitivity"]["groups"].items():
        lines.append(f"| {g} | {v['values']:,} | {v['normalized_accuracy']:.4f} |")
    lines.append(f"| none (clean) | — | {results['sensitivity']['clean']:.4f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, jammer in zip(axes, ("worst_case", "strongest_user")):
        for method in ("task arithmetic", "R-MTLLMF"):
            pts = [r for r in results["jammed"] if r["jammer"] == jammer and r["method"] == method]
            ax.plot([r["power_db"] for r in pts], [r["normalized_accuracy"] for r in pts], marker="o", label=method)
        ax.set_title(f"jammer: {jammer}")
        ax.set_xlabel("jammer power (dB)")
        ax.set_ylabel("normalised accuracy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "jammed.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    pts = results["wd_vs_mse"]["points"]
    ax.semilogx([p["relative_mse"] for p in pts], [p["wd_error"] for p in pts], marker="o")
    ax.set_xlabel("relative channel MSE")
    ax.set_ylabel("WD error")
    fig.tight_layout()
    fig.savefig(out / "wd_vs_mse.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
