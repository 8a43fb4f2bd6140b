"""What batching evaluation examples by token count saves: token positions the model computes (padding
included) and, with --time, the seconds of one pass over the test sets.

    python benchmarks/eval_batches.py [--model smollm2-135m] [--max-test 300] [--time]

The test sets are the 8 shared tasks of ../shared/data (the R-MTLLMF benchmark's), else the embedded
tasks. Orders compared: as the test set lists them (by task), by characters, and by tokens (what
``fedllm.workloads.classification.metrics.predict`` does).
"""

from __future__ import annotations

import argparse
import time

import torch
from rmtllmf_benchmark import REAL_TASKS as TASKS
from rmtllmf_benchmark import SHARED  # the same 8 test sets as the R-MTLLMF benchmark


def positions(lengths: list[int], order: list[int], batch_size: int) -> int:
    """Token positions computed when each batch pads to its longest row."""
    return sum(max(lengths[i] for i in order[s:s + batch_size]) * len(order[s:s + batch_size])
               for s in range(0, len(order), batch_size))


def main(argv: list[str] | None = None) -> None:
    from fedllm.config import load_config
    from fedllm.core.bundle import forward_logits
    from fedllm.workloads import workload_for
    from fedllm.workloads.classification.metrics import token_counts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-test", type=int, default=300, help="test examples per task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--time", action="store_true", help="also time a forward pass over every batch, per order")
    args = parser.parse_args(argv)
    real = all((SHARED / t / "test.jsonl").is_file() for t in TASKS)
    tasks = (f"[{', '.join(f'{{name: {t}, source: local, path: {SHARED / t}}}' for t in TASKS)}]" if real
             else "[sentiment, topic, question]")
    workload = workload_for(load_config(None, [f"model.name={args.model}", f"model.max_length={args.max_length}",
                                               "model.head=label_embedding", f"data.tasks={tasks}",
                                               f"data.max_test_per_task={args.max_test}"]))
    test = workload.test
    bundle = workload.build_model() if args.time else None
    tokenizer = bundle.tokenizer if bundle else workload_tokenizer(args.model)
    lengths = token_counts(tokenizer, test.texts, args.max_length)
    orders = {"as listed": list(range(len(test))),
              "by characters": sorted(range(len(test)), key=lambda i: len(test.texts[i])),
              "by tokens (predict)": sorted(range(len(test)), key=lengths.__getitem__)}
    print(f"{len(test)} examples ({'shared' if real else 'embedded'} tasks), {sum(lengths):,} real tokens, "
          f"batches of {args.batch_size}")
    base = positions(lengths, orders["as listed"], args.batch_size)
    for name, order in orders.items():
        computed = positions(lengths, order, args.batch_size)
        line = f"  {name:20s} {computed:>9,} positions ({base / computed:.2f}x fewer)"
        if args.time:
            bundle.model.eval()
            started = time.perf_counter()
            with torch.no_grad():
                for s in range(0, len(order), args.batch_size):
                    rows = order[s:s + args.batch_size]
                    forward_logits(bundle, bundle.model, [test.texts[i] for i in rows], [test.tasks[i] for i in rows],
                                   workload.suite.label_ranges, args.max_length)
            line += f", {time.perf_counter() - started:.1f} s"
        print(line, flush=True)


def workload_tokenizer(model: str):
    from transformers import AutoTokenizer

    from fedllm.workloads.classification.models import model_source

    return AutoTokenizer.from_pretrained(model_source(model))


if __name__ == "__main__":
    main()
