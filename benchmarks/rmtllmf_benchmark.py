"""R-MTLLMF benchmark: multi-task fusion of task vectors over ideal, noisy and jammed uplinks.

One-shot fusion needs each task's fine-tuned model once, so this script trains every task
vector a single time (cached on disk) and then evaluates every fusion rule and channel on them:

1. normalised accuracy under an ideal channel: zero-shot, individual, task arithmetic, TIES,
   DARE, R-MTLLMF (embeddings frozen during fine-tuning, task arithmetic, few-shot realignment),
   and LoRA task vectors merged as weight deltas B @ A vs as summed factors;
2. every fused method of ``method_specs`` but three variants (task-wise AdaMerging, LoRA factors
   summed, TIES on LoRA) under ``mimo_mac`` with the worst-case (sum-rate) and strongest-user jammer
   across jammer powers, with a zero-forcing receiver by default (LMMSE shrinks the estimate, so
   its error saturates below the signal; see README); the layer-wise coefficients AdaMerging learns
   are saved per condition (results.json "coefficients", tables in table.md);
3. WD error against channel MSE over an AWGN sweep, with a Spearman rank test and a
   linear-regression slope test on log10 MSE;
4. per-group sensitivity: noise of one per-value MSE hitting only the embeddings, attention,
   feed-forward or LayerNorm tensors of the fused model.

Data: the 8 text tasks in ../shared/data (sst2 subj cr mpqa trec banking77 ag_news emotion)
when present, else the embedded tasks. Model: the embedded MiniLM by default, or SmolLM2 (any BERT
or Llama model: ARCHITECTURES names each one's groups), with frozen label-embedding heads. Writes
table.md, results.json and PNG plots under --out.

    python benchmarks/rmtllmf_benchmark.py --quick          # 3 tasks, short
    python benchmarks/rmtllmf_benchmark.py                  # all 8 tasks
    python benchmarks/rmtllmf_benchmark.py --quick --model smollm2-135m --families full frozen \
        --methods "task arithmetic" TIES R-MTLLMF --no-statistics --validation 32
    python benchmarks/rmtllmf_benchmark.py --methods "AdaMerging (layer-wise, labelled shots, from 0)" \
        --set "AdaMerging (layer-wise, labelled shots, from 0):lr=0.005"   # one parameter of one method
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from fedllm.channels import ChannelReport, ClientMeta, build_channel  # noqa: E402
from fedllm.clients import TRAINERS, TrainContext  # noqa: E402

from fedllm.config import config_from_dict  # noqa: E402
from fedllm.core.memory import release_free_memory  # noqa: E402
from fedllm.core.vectors import Layout, flatten, get_tensors, set_tensors, subtract, unflatten  # noqa: E402
from fedllm.fusion.pipeline import FusionPipeline, apply_update  # noqa: E402
from fedllm.strategies import statistic_layouts  # noqa: E402
from fedllm.workloads.classification import Classification  # noqa: E402
from fedllm.workloads.classification.metrics import fusion_scores, individual_predictions, predict, task_scores  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
REAL_TASKS = ["sst2", "subj", "cr", "mpqa", "trec", "banking77", "ag_news", "emotion"]
# Per architecture (config.model_type): the tensor-name patterns of each sensitivity group (the
# first, embeddings, is what R-MTLLMF keeps home), LoRA's targets and the full fine-tuning lr.
# BERT: MiniLM, tiny-bert; Llama: SmolLM2 (its RMSNorms are the "layernorm" group; it has no
# biases). SmolLM2's label-embedding head barely moves at MiniLM's 2e-5 (sst2, 20 steps: accuracy
# 0.42 -> 0.44, loss 0.692) and learns at 1e-4 (0.42 -> 0.67).
ARCHITECTURES = {
    "bert": {"groups": {"embeddings": ("embeddings",), "attention": ("attention.self",),
                        "feed_forward": ("intermediate.dense", "output.dense"), "layernorm": ("LayerNorm",)},
             "lora_targets": ["query", "value"], "full_lr": 2e-5},
    "llama": {"groups": {"embeddings": ("embed_tokens",), "attention": ("self_attn",), "feed_forward": ("mlp",),
                         "layernorm": ("layernorm", "norm.weight")},
              "lora_targets": ["q_proj", "v_proj"], "full_lr": 1e-4},
}
LAMBDAS = [round(0.1 * i, 1) for i in range(1, 11)]
STATISTICS = {"fisher": {"examples": 64}, "gram": {"examples": 256}}  # what Fisher and RegMean fuse with
FAMILIES = ("full", "frozen", "lora")
JAMMERS = ("worst_case", "strongest_user")  # where the jammer stands: against every user, or the strongest


def architecture(model: str) -> dict:
    """The model's entry in ARCHITECTURES, by the model_type of its config."""
    from transformers import AutoConfig

    from fedllm.workloads.classification.models import model_source

    kind = AutoConfig.from_pretrained(model_source(model)).model_type
    if kind not in ARCHITECTURES:
        raise SystemExit(f"--model {model}: architecture {kind!r} has no group patterns here; add it to ARCHITECTURES "
                         f"(known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[kind]


def family_peft(family: str, arch: dict) -> tuple[dict, float]:
    """(peft section, client lr). full: everything trains and is sent (task arithmetic, TIES, DARE);
    frozen: R-MTLLMF's fine-tuning with the embeddings kept home; lora: LoRA r=8 on the attention's
    query and value projections."""
    return {
        "full": ({"method": "full", "global_patterns": ["*"]}, arch["full_lr"]),
        "frozen": ({"method": "full", "global_patterns": ["*"], "frozen_patterns": list(arch["groups"]["embeddings"])},
                   arch["full_lr"]),
        "lora": ({"method": "lora", "r": 8, "alpha": 16, "fuse_lora_as": "weight_delta",
                  "target_modules": arch["lora_targets"]}, 5e-4),
    }[family]


def experiment(tasks: list[str], family: str, steps: int, max_test: int, model: str = "minilm",
               validation: int = 100) -> object:
    real = all((SHARED / t / "train.jsonl").is_file() for t in tasks)
    specs = [{"name": t, "source": "local", "path": str(SHARED / t)} if real else {"name": t} for t in tasks]
    peft, lr = family_peft(family, architecture(model))
    return config_from_dict({
        "model": {"name": model, "max_length": 64, "head": "label_embedding", "temperature": 0.05},
        "peft": peft,
        "data": {"tasks": specs, "partition": "task", "max_train_per_task": 2000, "max_test_per_task": max_test,
                 "validation_per_task": validation},
        "client": {"lr": lr, "batch_size": 16, "max_steps": steps},
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
        print(f"  fine-tuned {task.name}: {result.steps} steps, loss {result.loss:.3f}, {time.perf_counter() - start:.0f}s",
              flush=True)
    set_tensors(bundle.model, theta0)
    return out


def task_statistics(cfg, workload: Classification, bundle, taus: dict[int, dict[str, torch.Tensor]],
                    requested: dict, cache: Path) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """What each task's client computes on its own data with its fine-tuned model for the rules that
    fuse with client statistics (a diagonal Fisher, Gram matrices of linear layers' inputs), cached."""
    out = {}
    theta0 = dict(bundle.initial_global)
    train = workload.suite.split("train")
    key = hashlib.sha256(json.dumps(requested, sort_keys=True).encode()).hexdigest()[:8]
    for t, task in enumerate(workload.suite.tasks):
        path = cache / f"{cfg.digest()}-{task.name}-stats-{key}.pt"
        if path.is_file():
            out[t] = torch.load(path)
            continue
        set_tensors(bundle.model, {n: theta0[n] + taus[t][n] for n in theta0})
        mine = train.subset([i for i, k in enumerate(train.tasks) if k == t])
        out[t] = workload.client_statistics(bundle, mine, requested, bundle.groups.global_names)
        torch.save(out[t], path)
    set_tensors(bundle.model, theta0)
    return out


class Received(NamedTuple):
    rows: torch.Tensor  # what the server got of the task vectors (sent space)
    report: ChannelReport
    relative_mse: float  # mean per-client MSE relative to the payload's power
    stats: dict[str, torch.Tensor]  # what it got of the clients' statistics


class Fusion:
    """One family of task vectors, merged and scored by the server's own fusion pipeline
    (fedllm/fusion/pipeline.py: rule, lambda search on validation data, R-MTLLMF's realignment),
    with each task's own model's predictions computed once. LoRA vectors travel as factors and
    are fused as B @ A."""

    def __init__(self, cfg, workload: Classification, bundle, taus: dict[int, dict[str, torch.Tensor]],
                 stats: dict[int, dict[str, dict[str, torch.Tensor]]] | None = None) -> None:
        """Takes the task vectors out of ``taus`` into one stack (the dict is left empty)."""
        self.cfg, self.workload, self.bundle, self.suite = cfg, workload, bundle, workload.suite
        pipeline = FusionPipeline(cfg, workload, bundle)
        self.stat_rows = {}  # statistic -> (tasks x values), each task's in its own layout
        for name in sorted(next(iter(stats.values())) if stats else {}):
            layout = statistic_layouts([name], bundle, pipeline.layout)[name]
            self.stat_rows[name] = torch.stack([flatten(stats[t][name], layout) for t in sorted(stats)])
        self.timings: dict[str, list[float]] = {}  # method -> server seconds per merge
        self.sent_layout, self.layout = pipeline.layout, pipeline.fusion_layout
        self.to_fusion_space = pipeline.to_fusion_space
        order = sorted(taus)
        self.batch = torch.empty(len(order), self.sent_layout.numel)
        for i, t in enumerate(order):  # each task's tensors freed once in the stack (8 SmolLM2 vectors: 4.3 GB)
            flatten(taus.pop(t), self.sent_layout, out=self.batch[i])
        # each task vector's mean power, the relative MSE's denominator (batch.pow(2): a stack-sized copy)
        self.power = torch.linalg.vector_norm(self.batch, dim=1).pow(2) / self.batch.shape[1]
        self.theta0 = pipeline.initial_global()
        self.test = workload.test
        in_fusion_space = self.to_fusion_space(self.batch)
        self.own = {}
        for i, t in enumerate(order):  # one task's own model at a time
            individual = {t: apply_update(self.theta0, in_fusion_space[i], self.layout, 1.0)}
            self.own.update(individual_predictions(bundle, self.suite, self.test, individual, 64, cfg.model.max_length))

    def received(self, channel: dict | None, seed: int = 0) -> Received:
        """What the server gets of the task vectors and of the clients' statistics (after them, over
        the same link), with the mean relative MSE of the task vectors."""
        channel = channel or {"kind": "ideal"}
        meta = ClientMeta([f"t{t}" for t in range(len(self.batch))], torch.ones(len(self.batch)))
        link = build_channel(channel["kind"], {k: v for k, v in channel.items() if k != "kind"}, seed)
        out, report = link.transmit(self.batch, meta)
        stats = {name: link.transmit(rows, meta)[0] for name, rows in self.stat_rows.items()}
        return Received(out, report, float((report.mse / self.power).mean()), stats)

    def merge(self, received: Received, rule: str, as_factors: bool = False, label: str | None = None,
              **params) -> tuple[dict[str, torch.Tensor], dict]:
        """theta0 + lambda * fuse(received), lambda searched on validation data, then the rule's
        post-merge hook (R-MTLLMF realigns, AdaMerging learns its coefficients), with the merge's
        record (the lambda chosen, AdaMerging's coefficients). ``as_factors``: fuse LoRA factors as
        tensors (FedIT's way). The server time goes into ``timings[label]``."""
        started = time.perf_counter()
        overrides = [f"strategy={json.dumps({'name': rule, 'server_lr': 'auto', 'lr_grid': LAMBDAS, **params})}"]
        if as_factors:
            overrides.append("peft.fuse_lora_as=factors")
        pipeline = FusionPipeline(config_from_dict(self.cfg.model_dump(mode="json"), overrides), self.workload,
                                  self.bundle)
        fused, _ = pipeline.fuse(received.rows, torch.ones(received.rows.shape[0]), received.report, received.stats)
        merged, record = pipeline.merge(self.theta0, fused, seed=0)
        self.timings.setdefault(label or rule, []).append(time.perf_counter() - started)
        return merged, record

    def cosine_similarity(self) -> list[list[float]]:
        return cosine_matrix(self.batch).tolist()

    def score(self, params: dict[str, torch.Tensor]) -> dict[str, float]:
        set_tensors(self.bundle.model, params)
        preds, loss_sum = predict(self.bundle, self.bundle.model, self.suite, self.test, 64, self.cfg.model.max_length)
        release_free_memory()  # what the merge and the scoring freed: SmolLM2's next stack-sized step needs it
        return {**fusion_scores(preds, self.own, self.test, self.suite),
                **task_scores(preds, loss_sum, self.test, self.suite)}

    def individual_accuracy(self) -> float:
        accs = [float((p == torch.tensor(self.test.labels)[torch.tensor(self.test.tasks) == t]).float().mean())
                for t, p in sorted(self.own.items())]
        return sum(accs) / len(accs)


class Method(NamedTuple):
    """One fused row of the benchmark: which family of task vectors, which rule with which parameters."""
    family: str  # "full", "frozen" (R-MTLLMF's embeddings kept home) or "lora"
    rule: str
    params: dict
    label: str | None = None  # its key in results.json's server_seconds (default: the rule's name)
    as_factors: bool = False  # LoRA factors fused as tensors instead of as B @ A
    jammed: bool = True  # also in the jammer sweeps (variants that add nothing there are left out)
    needs_statistics: bool = False  # fuses with the clients' Fisher or Gram matrices


def method_specs(adamerging_steps: int) -> dict[str, Method]:
    """Every fused row, in the order of the ideal table; the jammer sweeps take those marked ``jammed``."""
    # R-MTLLMF: 5-shot realignment, 20 steps (LayerNorms and biases; with LoRA, the factors, folded in)
    rmtllmf = {"shots": 5, "realign_steps": 20, "realign_lr": 1e-4, "realign_scope": "norms_biases"}
    adamerging = {"granularity": "layer", "steps": adamerging_steps, "lr": 0.01}
    # jam-aware: coefficients learnt on R-MTLLMF's labelled shots, fast enough to reach 0 in a few steps
    # (a jammed model can be confidently wrong, so low entropy does not mean a good merge)
    labelled = {**adamerging, "objective": "labelled", "lr": 0.05, "examples": 5}
    # ... and from the pretrained model (coefficients 0): each tensor's coefficient grows only where the shots
    # say it helps, instead of starting inside a jammed model whose loss is flat
    from_0 = {**labelled, "init": 0.0}
    return {
        "task arithmetic": Method("full", "task_arithmetic", {}),
        "TIES": Method("full", "ties", {"k": 0.2}),
        "DARE": Method("full", "dare", {"p": 0.9}),
        "Breadcrumbs": Method("full", "breadcrumbs", {"density": 0.9, "gamma": 0.01}),
        "Fisher": Method("full", "fisher", {}, needs_statistics=True),
        "RegMean": Method("full", "regmean", {}, needs_statistics=True),
        "AdaMerging (task-wise)": Method("full", "adamerging", {**adamerging, "granularity": "task"},
                                         "adamerging-task", jammed=False),
        "AdaMerging (layer-wise)": Method("full", "adamerging", adamerging),
        "AdaMerging (layer-wise, labelled shots)": Method("full", "adamerging", labelled, "adamerging-labelled"),
        "AdaMerging (layer-wise, labelled shots, from 0)": Method("full", "adamerging", from_0, "adamerging-from-0"),
        "R-MTLLMF": Method("frozen", "rmtllmf", rmtllmf),
        "R-MTLLMF + layer-wise coefficients": Method("frozen", "rmtllmf", {
            **rmtllmf, "coefficients": "layer", "coefficient_steps": adamerging_steps}, "rmtllmf-layers"),
        "task arithmetic, LoRA B@A": Method("lora", "task_arithmetic", {}, "lora-task_arithmetic"),
        "task arithmetic, LoRA factors summed": Method("lora", "task_arithmetic", {}, "lora-factors",
                                                       as_factors=True, jammed=False),
        "TIES, LoRA B@A": Method("lora", "ties", {"k": 0.2}, "lora-ties", jammed=False),
    }


def method_override(text: str) -> tuple[str, str, object]:
    """``METHOD:KEY=VALUE`` as (method, key, value); VALUE as JSON (a number, true, "text"), else as text."""
    name, sep, assignment = text.rpartition(":")
    key, eq, value = assignment.partition("=")
    if not sep or not eq or not name or not key:
        raise argparse.ArgumentTypeError(f"--set wants 'METHOD:KEY=VALUE', e.g. 'TIES:k=0.1', not {text!r}")
    try:
        return name, key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name, key.strip(), value


def run_method(fam: Fusion, received: Received, method: Method, label: str) -> tuple[dict[str, float], dict]:
    """The method's merge of what arrived, scored, with the merge's record."""
    merged, record = fam.merge(received, method.rule, as_factors=method.as_factors, label=label, **method.params)
    return fam.score(merged), record


def coefficient_summaries(records: dict[str, dict], groups: dict[str, tuple[str, ...]]) -> dict[str, dict]:
    """Per method that learnt layer-wise coefficients (AdaMerging, R-MTLLMF + coefficients): the mean
    coefficient (over tasks and tensors) of each group of tensors in each transformer layer, and every
    tensor's own, so a reader sees which layers the server turned down."""
    out = {}
    for name, record in records.items():
        coeffs = record.get("adamerging_coefficients")
        if isinstance(coeffs, dict):
            out[name] = {"by_group_and_layer": coefficients_by_layer(coeffs, groups), "per_tensor": coeffs}
    return out


def coefficients_by_layer(coeffs: dict[str, float], groups: dict[str, tuple[str, ...]]) -> dict[str, dict[str, float]]:
    """group -> layer ("-" for tensors outside the numbered layers) -> mean coefficient of its tensors."""
    import re

    cells: dict[str, dict[str, list[float]]] = {}
    for tensor, c in coeffs.items():
        group = next((g for g, pats in groups.items() if any(p in tensor for p in pats)), "other")
        layer = re.search(r"\.(\d+)\.", tensor)
        cells.setdefault(group, {}).setdefault(layer.group(1) if layer else "-", []).append(c)
    return {g: {k: sum(v) / len(v) for k, v in sorted(by.items(), key=lambda kv: (kv[0] != "-", int(kv[0])
                                                                                   if kv[0].isdigit() else -1))}
            for g, by in cells.items()}


def cosine_matrix(rows: torch.Tensor, block: int = 1 << 20) -> torch.Tensor:
    """Cosine similarity of every pair of rows, in float64, from column blocks: the rows in float64
    at once would be twice the stack (8.6 GB for 8 SmolLM2 task vectors, where the benchmark died)."""
    gram = torch.zeros(rows.shape[0], rows.shape[0], dtype=torch.float64)
    for part in rows.split(block, dim=1):
        part = part.double()
        gram += part @ part.T
    norms = gram.diagonal().sqrt().clamp_min(1e-300)
    return gram / norms[:, None] / norms[None, :]


def group_mask(layout: Layout, patterns: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([torch.full((size,), any(p in name for p in patterns))
                      for name, size in zip(layout.names, layout.sizes)])


def slope_tests(mse: list[float], wd: list[float]) -> dict[str, float]:
    """Does WD error grow with channel MSE? Spearman's rank correlation and the slope of WD error
    on log10 MSE, each with its two-sided p-value."""
    import numpy as np
    from scipy.stats import linregress, spearmanr

    rho, p_rho = spearmanr(mse, wd)
    fit = linregress(np.log10(mse), wd)
    return {"spearman_rho": float(rho), "p_value": float(p_rho), "slope_per_decade": float(fit.slope),
            "slope_p_value": float(fit.pvalue), "n": len(mse)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 tasks, fewer steps and jammer powers")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per task")
    parser.add_argument("--receiver", choices=["zf", "lmmse"], default="zf", help="mimo_mac receiver")
    parser.add_argument("--powers", type=float, nargs="+", help="jammer powers in dB")
    parser.add_argument("--tasks", nargs="+", help="task names (default: the 8 shared tasks, else embedded ones)")
    parser.add_argument("--model", default="minilm", help="'minilm', 'smollm2-135m', a local folder, or 'tiny-bert' "
                        "(a smoke run of this script)")
    parser.add_argument("--max-test", type=int, default=None, help="test examples per task")
    parser.add_argument("--validation", type=int, default=100, help="validation examples per task (the lambda "
                        "search scores each of 10 lambdas on them)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="task-vector families to fine-tune: full, frozen (R-MTLLMF), lora")
    parser.add_argument("--methods", nargs="+", help="only these rows (e.g. 'task arithmetic' TIES R-MTLLMF); "
                        "zero-shot and individual always run")
    parser.add_argument("--jammers", nargs="+", choices=JAMMERS, default=list(JAMMERS),
                        help="jammer placements of the sweep (section 2)")
    parser.add_argument("--skip", nargs="+", choices=["jammed", "wd", "sensitivity"], default=[],
                        help="sections to leave out (2: jammer sweeps, 3: WD error vs MSE, 4: per-group noise)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/rmtllmf"))
    parser.add_argument("--adamerging-steps", type=int, default=30, help="Adam steps of AdaMerging's coefficients")
    parser.add_argument("--set", dest="overrides", nargs="+", type=method_override, default=[],
                        metavar="'METHOD:KEY=VALUE'", help="change one parameter of one method's rule, e.g. "
                        "'AdaMerging (layer-wise, labelled shots, from 0):lr=0.005' (VALUE is read as JSON)")
    parser.add_argument("--no-statistics", action="store_true", help="skip Fisher and RegMean (their client "
                        "statistics cost a backward pass per example and Gram matrices per task)")
    args = parser.parse_args(argv)
    specs = method_specs(args.adamerging_steps)
    if unknown := [m for m in args.methods or () if m not in specs]:
        raise SystemExit(f"--methods {', '.join(map(repr, unknown))}: no such method; methods: {', '.join(specs)}")
    for name, key, value in args.overrides:
        if name not in specs:
            raise SystemExit(f"--set {name}:{key}=...: no method {name!r}; methods: {', '.join(specs)}")
        specs[name] = specs[name]._replace(params={**specs[name].params, key: value})
        try:  # a bad value stops here, before hours of fine-tuning, with the rule's own message
            config_from_dict({"strategy": {"name": specs[name].rule, **specs[name].params}})
        except ValueError as exc:
            raise SystemExit(f"--set {name}:{key}={value}: {exc}") from None
    torch.set_num_threads(os.cpu_count() or 1)
    real = all((SHARED / t / "train.jsonl").is_file() for t in REAL_TASKS)
    tasks = args.tasks or ((REAL_TASKS[:3] if args.quick else REAL_TASKS) if real else ["sentiment", "topic", "question"])
    real = all((SHARED / t / "train.jsonl").is_file() for t in tasks)
    steps = args.steps or (60 if args.quick else 150)
    powers = args.powers or ([0.0, 40.0, 60.0] if args.quick else [0.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    max_test = args.max_test or (200 if args.quick else 300)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cache"
    cache.mkdir(exist_ok=True)
    started = time.perf_counter()
    print(f"tasks: {tasks} ({'../shared/data' if real else 'embedded'}), {steps} steps each", flush=True)
    results: dict = {"tasks": tasks, "steps": steps, "data": "shared" if real else "embedded", "seed": 0,
                     "receiver": args.receiver, "model": args.model, "overrides": [list(o) for o in args.overrides]}

    groups = architecture(args.model)["groups"]
    if "full" not in args.families:
        raise SystemExit("--families must include full (the baselines, the WD sweep and the sensitivity study use it)")
    families = {}
    for name in args.families:
        cfg = experiment(tasks, name, steps, max_test, args.model, args.validation)
        workload = Classification(cfg)
        bundle = workload.build_model()
        taus = task_vectors(cfg, bundle, workload.suite, cache)
        stats = (task_statistics(cfg, workload, bundle, taus, STATISTICS, cache)
                 if name == "full" and not args.no_statistics else None)
        families[name] = Fusion(cfg, workload, bundle, taus, stats)
    full, frozen, lora = families["full"], families.get("frozen"), families.get("lora")
    mimo_base = {"kind": "mimo_mac", "nt": max(1, 16 // len(tasks)), "receiver": args.receiver}
    wanted = (lambda name: True) if not args.methods else (lambda name: name in args.methods)
    # a method runs when it is wanted, its family was trained and the statistics it fuses with were computed
    methods = {name: m for name, m in specs.items() if wanted(name) and m.family in families
               and (not m.needs_statistics or families[m.family].stat_rows)}

    # 1. ideal channel
    ideal = {name: fam.received(None) for name, fam in families.items()}
    table = {"zero-shot": full.score(full.theta0),
             "individual": {"accuracy": full.individual_accuracy(), "normalized_accuracy": 1.0}}
    records: dict[str, dict] = {}  # method -> what its merge recorded (AdaMerging: the coefficients)
    for name, m in methods.items():
        if m.family == "lora" and "individual, LoRA" not in table:
            table["individual, LoRA"] = {"accuracy": lora.individual_accuracy(), "normalized_accuracy": 1.0}
        table[name], records[name] = run_method(families[m.family], ideal[m.family], m, m.label or m.rule)
    results["ideal"] = table
    results["coefficients"] = {"ideal": coefficient_summaries(records, groups)}
    d = full.batch.shape[1]
    stat_values = {name: rows.shape[1] for name, rows in full.stat_rows.items()}
    results["uplink_bytes"] = {"task vector, all layers (task arithmetic, TIES, DARE, Breadcrumbs, AdaMerging)": 4 * d,
                               **{f"task vector + {name} (its rule)": 4 * (d + n) for name, n in stat_values.items()},
                               **({"task vector, embeddings kept home (R-MTLLMF)": 4 * frozen.batch.shape[1]}
                                  if frozen else {}),
                               **({"LoRA r=8 factors": 4 * lora.batch.shape[1]} if lora else {})}
    results["cosine_similarity"] = full.cosine_similarity()
    print("ideal channel:", {k: round(v.get("normalized_accuracy", float("nan")), 4) for k, v in table.items()}, flush=True)

    # 2. jammed MIMO uplink
    jammed = []
    for jammer in args.jammers if "jammed" not in args.skip else ():
        for power in powers:
            channel = {**mimo_base, "jammer": jammer, "jammer_power_db": power}
            records = {}
            # each family through the seeded channel once per power: every rule fuses the same received
            # rows (no rule writes into them; the test compares the rows before and after the sweep)
            received = {name: fam.received(channel) for name, fam in families.items()
                        if any(m.jammed and m.family == name for m in methods.values())}
            for name, m in methods.items():
                if not m.jammed:
                    continue
                rel_mse = received[m.family].relative_mse
                scores, records[name] = run_method(families[m.family], received[m.family], m, f"jammed {name}")
                jammed.append({"jammer": jammer, "power_db": power, "method": name, "relative_mse": rel_mse,
                               "normalized_accuracy": scores["normalized_accuracy"], "wd_error": scores["wd_error"],
                               "accuracy": scores["accuracy"]})
                print(f"  {jammer} {power:>4} dB {name:26s} rel.MSE {rel_mse:9.3f} "
                      f"norm.acc {scores['normalized_accuracy']:.4f} WD {scores['wd_error']:.4f}", flush=True)
                save_partial(results, jammed, args.out)  # a run stopped mid-sweep keeps every row it finished
            if summaries := coefficient_summaries(records, groups):
                results["coefficients"][f"{jammer} {power:g} dB"] = summaries
    # every merge's server time, the jammed ones under "jammed <method>"
    results["server_seconds"] = {k: statistics.median(v) for fam in families.values() for k, v in fam.timings.items()}
    results["jammed"] = jammed
    if jammed and {"task arithmetic", "R-MTLLMF"} <= set(methods):
        results["target"] = target_check(results)

    # 3. WD error vs MSE (fixed lambda, so the search does not hide the noise)
    wd = []
    snrs = [-40.0, -20.0, 0.0, 20.0] if args.quick else [-50.0, -40.0, -30.0, -20.0, -10.0, 0.0, 10.0, 20.0]
    for snr in snrs if "wd" not in args.skip else ():
        got = full.received({"kind": "awgn", "snr_db": snr, "power_normalisation": "payload"})
        rel_mse = got.relative_mse
        scores = full.score(apply_update(full.theta0, got.rows.sum(0), full.layout, 0.3))
        wd.append({"snr_db": snr, "relative_mse": rel_mse, "wd_error": scores["wd_error"],
                   "normalized_accuracy": scores["normalized_accuracy"]})
        print(f"  AWGN {snr:>5} dB rel.MSE {rel_mse:.3g} WD {scores['wd_error']:.4f}", flush=True)
    ta = [r for r in jammed if r["method"] == "task arithmetic"]
    if wd:
        results["wd_vs_mse"] = {"points": wd, **slope_tests([w["relative_mse"] for w in wd], [w["wd_error"] for w in wd]),
                                **({"jammed": slope_tests([r["relative_mse"] for r in ta], [r["wd_error"] for r in ta])}
                                   if len(ta) > 2 else {})}
        print("WD error vs MSE:", results["wd_vs_mse"], flush=True)

    # 4. per-group sensitivity: noise of the same per-value MSE on one group of the fused model
    if "sensitivity" not in args.skip:
        results["sensitivity"] = sensitivity(full, groups, [0.03, 0.1] if args.quick else [0.01, 0.03, 0.1])
    results["seconds"] = time.perf_counter() - started
    results["complete"] = True

    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    write_outputs(results, args.out)
    print(f"results in {args.out} ({results['seconds'] / 60:.0f} min)")


def save_partial(results: dict, jammed: list[dict], out: Path) -> None:
    """results.json as far as the run got (``"complete": false`` until the end): hours of jammed merges
    are not lost to a stopped run."""
    (out / "results.json").write_text(json.dumps({**results, "jammed": jammed, "complete": False}, indent=2))


def sensitivity(full: Fusion, groups: dict[str, tuple[str, ...]], sigmas: list[float]) -> dict:
    """Normalised accuracy of the fused model (lambda 0.3) with Gaussian noise of std ``sigma`` per
    value on one group of tensors at a time."""
    base = apply_update(full.theta0, full.batch.sum(0), full.layout, 0.3)
    base_flat = flatten(base, full.layout)
    rows = []
    g = torch.Generator().manual_seed(0)
    for sigma in sigmas:
        for group, patterns in groups.items():
            mask = group_mask(full.layout, patterns)
            noisy = base_flat + mask * torch.randn(base_flat.shape, generator=g) * sigma
            scores = full.score({**full.theta0, **unflatten(noisy, full.layout)})
            rows.append({"group": group, "sigma": sigma, "values": int(mask.sum()),
                         "normalized_accuracy": scores["normalized_accuracy"]})
            print(f"  noise std {sigma} on {group}: norm.acc {scores['normalized_accuracy']:.4f}", flush=True)
    return {"clean": full.score(base)["normalized_accuracy"], "rows": rows}


def target_check(results: dict) -> dict:
    """The issue's target: at the first jammer power where task arithmetic has lost half of its
    ideal normalised accuracy, does R-MTLLMF keep >= 90% of its own?"""
    ideal = results["ideal"]
    out = {}
    for jammer in ("worst_case", "strongest_user"):
        rows = {(r["method"], r["power_db"]): r["normalized_accuracy"] for r in results["jammed"] if r["jammer"] == jammer}
        powers = sorted({p for _, p in rows})
        half = next((p for p in powers if rows[("task arithmetic", p)] <= 0.5 * ideal["task arithmetic"]["normalized_accuracy"]),
                    None)
        out[jammer] = {"power_db": half, "rmtllmf_kept": None if half is None else
                       rows[("R-MTLLMF", half)] / ideal["R-MTLLMF"]["normalized_accuracy"]}
    return out


def write_outputs(results: dict, out: Path) -> None:
    """table.md and the PNG plots of whichever sections ran."""
    lines = [f"Tasks: {', '.join(results['tasks'])} ({results['data']} data), {results['steps']} fine-tuning steps "
             f"each, seed {results['seed']}; model {results.get('model', 'minilm')}; mimo_mac receiver "
             f"{results['receiver']}.", ""]
    lines += ideal_lines(results)
    if results["jammed"]:
        lines += jammed_lines(results)
    if "uplink_bytes" in results:
        lines += ["", "Uplink per client (MB) and median server time per merge (s):", "",
                  "| what a client sends | MB |", "| --- | --- |"]
        lines += [f"| {k} | {v / 2**20:.1f} |" for k, v in results["uplink_bytes"].items()]
        lines += ["", "| merge | server seconds |", "| --- | --- |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in results.get("server_seconds", {}).items()]
    if "cosine_similarity" in results:
        names = results["tasks"]
        lines += ["", "Cosine similarity of the task vectors (all layers):", "",
                  "| | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
        lines += [f"| {a} | " + " | ".join(f"{x:.3f}" for x in row) + " |"
                  for a, row in zip(names, results["cosine_similarity"])]
    lines += coefficient_lines(results.get("coefficients", {}))
    if "wd_vs_mse" in results:
        lines += wd_lines(results["wd_vs_mse"])
    if "sensitivity" in results:
        lines += sensitivity_lines(results["sensitivity"])
    lines.append(f"\nWall time: {results['seconds'] / 60:.0f} min.")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    write_plots(results, out)


def ideal_lines(results: dict) -> list[str]:
    nan = float("nan")
    lines = ["| method (ideal channel) | accuracy | normalised accuracy |", "| --- | --- | --- |"]
    for name, sc in results["ideal"].items():
        lines.append(f"| {name} | {sc.get('accuracy', nan):.4f} | {sc.get('normalized_accuracy', nan):.4f} |")
    return lines


def jammed_lines(results: dict) -> list[str]:
    lines: list[str] = []
    powers = sorted({r["power_db"] for r in results["jammed"]})
    methods = list(dict.fromkeys(r["method"] for r in results["jammed"]))
    for jammer in dict.fromkeys(r["jammer"] for r in results["jammed"]):
        rows = {(r["method"], r["power_db"]): r for r in results["jammed"] if r["jammer"] == jammer}
        lines += ["", f"Jammer {jammer}: normalised accuracy (WD error) by jammer power (dB)", "",
                  "| method | " + " | ".join(f"{p:.0f}" for p in powers) + " |", "| --- |" + " --- |" * len(powers)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(f"{rows[(m, p)]['normalized_accuracy']:.4f} ({rows[(m, p)]['wd_error']:.3f})"
                                               for p in powers) + " |")
        lines.append("| relative MSE (first method's payload) | " + " | ".join(
            f"{rows[(methods[0], p)]['relative_mse']:.3g}" for p in powers) + " |")
        t = results.get("target", {}).get(jammer)
        if t is not None:
            lines += ["", (f"Target: task arithmetic has lost half of its ideal normalised accuracy at {t['power_db']:.0f} "
                           f"dB, where R-MTLLMF keeps {100 * t['rmtllmf_kept']:.1f}% of its own (goal >= 90%)."
                           if t["power_db"] is not None else "Target: task arithmetic never loses half of its ideal "
                           "normalised accuracy in this sweep.")]
    return lines


def coefficient_lines(coefficients: dict[str, dict]) -> list[str]:
    """A group x layer table of the learnt mean coefficients per channel condition and method."""
    lines: list[str] = []
    for condition, by_method in coefficients.items():
        for method, summary in by_method.items():
            cells = summary["by_group_and_layer"]
            layers = list(dict.fromkeys(k for by in cells.values() for k in by))
            lines += ["", f"Layer-wise coefficients learnt by {method} ({condition}; mean over tasks and tensors; "
                      "'-' = outside the numbered layers):", "",
                      "| group | " + " | ".join(layers) + " |", "| --- |" + " --- |" * len(layers)]
            lines += [f"| {g} | " + " | ".join(f"{by[k]:.2f}" if k in by else "" for k in layers) + " |"
                      for g, by in cells.items()]
    return lines


def wd_lines(w: dict) -> list[str]:
    lines = ["", "WD error vs relative channel MSE (AWGN sweep, lambda 0.3):", "",
             "| SNR (dB) | relative MSE | WD error | normalised accuracy |", "| --- | --- | --- | --- |"]
    lines += [f"| {p['snr_db']:.0f} | {p['relative_mse']:.3g} | {p['wd_error']:.4f} | {p['normalized_accuracy']:.4f} |"
              for p in w["points"]]
    for label, test in (("AWGN sweep", w), ("jammed task arithmetic", w.get("jammed"))):
        if test is not None:
            lines.append(f"\n{label}, {test['n']} points: Spearman rho = {test['spearman_rho']:.3f} "
                         f"(p = {test['p_value']:.3g}); WD error rises {test['slope_per_decade']:.4f} per decade of "
                         f"MSE (slope p = {test['slope_p_value']:.3g}).")
    return lines


def sensitivity_lines(sens: dict) -> list[str]:
    sigmas = sorted({r["sigma"] for r in sens["rows"]})
    groups = list(dict.fromkeys(r["group"] for r in sens["rows"]))
    cell = {(r["group"], r["sigma"]): r for r in sens["rows"]}
    lines = ["", f"Sensitivity: normalised accuracy of the fused model (clean {sens['clean']:.4f}) when Gaussian noise "
             "of the given std per value hits one group only", "",
             "| group | values | " + " | ".join(f"std {s:g}" for s in sigmas) + " |",
             "| --- | --- |" + " --- |" * len(sigmas)]
    for g in groups:
        lines.append(f"| {g} | {cell[(g, sigmas[0])]['values']:,} | "
                     + " | ".join(f"{cell[(g, s)]['normalized_accuracy']:.4f}" for s in sigmas) + " |")
    return lines


def write_plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if results["jammed"]:
        methods = list(dict.fromkeys(r["method"] for r in results["jammed"]))
        jammers = list(dict.fromkeys(r["jammer"] for r in results["jammed"]))
        fig, axes = plt.subplots(1, len(jammers), figsize=(5 * len(jammers), 4), squeeze=False)
        axes = list(axes[0])
        for ax, jammer in zip(axes, jammers):
            for method in methods:
                pts = [r for r in results["jammed"] if r["jammer"] == jammer and r["method"] == method]
                ax.plot([r["power_db"] for r in pts], [r["normalized_accuracy"] for r in pts], marker="o", label=method)
            ax.set_title(f"jammer: {jammer} ({results['receiver']} receiver)")
        _save(fig, axes, "jammer power (dB)", "normalised accuracy", out / "jammed.png")
    if "wd_vs_mse" in results:
        w = results["wd_vs_mse"]
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.semilogx([p["relative_mse"] for p in w["points"]], [p["wd_error"] for p in w["points"]], marker="o",
                    label="AWGN")
        ta = [r for r in results["jammed"] if r["method"] == "task arithmetic"]
        if ta:
            ax.semilogx([r["relative_mse"] for r in ta], [r["wd_error"] for r in ta], "s", label="jammed (task arithmetic)")
        _save(fig, [ax], "relative channel MSE", "WD error", out / "wd_vs_mse.png")
    if "sensitivity" in results:
        sens = results["sensitivity"]
        sigmas = sorted({r["sigma"] for r in sens["rows"]})
        cell = {(r["group"], r["sigma"]): r for r in sens["rows"]}
        fig, ax = plt.subplots(figsize=(5, 4))
        for g in dict.fromkeys(r["group"] for r in sens["rows"]):
            ax.semilogx(sigmas, [cell[(g, s)]["normalized_accuracy"] for s in sigmas], marker="o", label=g)
        _save(fig, [ax], "noise std per value", "normalised accuracy", out / "sensitivity.png")



def _save(fig, axes, xlabel: str, ylabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
