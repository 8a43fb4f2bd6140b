"""Mutation score of the math fedllm's numbers rest on: how many small bugs the tests catch.

cosmic-ray (a dev dependency: ``pip install cosmic-ray``) enumerates every mutant of the modules
below (a flipped comparison, a swapped operator, a changed constant, a removed ``break``...); each
mutant runs the tests that guard its module, and counts as *killed* when they fail. The whole set is
about 5,600 mutants, about 10 hours on 2 cores, so by default a seeded uniform sample is run and the
score is reported with its 95% Wilson interval; ``--sample 0`` runs them all. Mutations are applied
to a copy of the checkout (``git archive HEAD``), never to it. Not a test: CI does not run it.

    python benchmarks/mutation_score.py                      # 150 mutants, seed 0
    python benchmarks/mutation_score.py --sample 0           # every mutant
    python benchmarks/mutation_score.py --modules strategies/krum.py --sample 0
    python benchmarks/mutation_score.py --retry results/benchmarks/mutation/results.json  # survivors again

Writes results.json (every mutant's outcome and diff) and survivors.md (each surviving mutant's
diff, to judge by hand: equivalent, or a test to add) under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTEST = "python -m pytest -q -x -m 'not slow' -p no:cacheprovider"
# the jammer's optimality searches take minutes: they guard mimo_mac alone
SLOW_JAMMER = "-k 'not worse_jammer and not rate_not_single and not solvers_optimality'"
STRATEGY_TESTS = ("tests/test_readme_defaults.py tests/test_aggregation.py tests/test_fusion_rules.py tests/test_krum.py "
                  "tests/test_model_merging.py tests/test_server_optimizers.py tests/test_scaffold.py")
# module -> the tests that guard it
TARGETS = {
    **{f"strategies/{m}.py": STRATEGY_TESTS for m in ("base", "fedavg", "robust", "krum", "merging", "model_merging",
                                                       "optimizers", "scaffold", "adamerging")},
    **{f"channels/{m}.py": f"tests/test_readme_defaults.py tests/test_channels.py {SLOW_JAMMER}" for m in ("base", "ideal", "awgn", "link", "fading",
                                                                              "erasure", "quantize", "ota", "compose")},
    "channels/byzantine.py": f"tests/test_channels.py tests/test_krum.py {SLOW_JAMMER}",
    "channels/mimo_mac.py": "tests/test_readme_defaults.py tests/test_channels.py",
    "fedllm/core/vectors.py": "tests/test_vectors.py tests/test_layout.py tests/test_aggregation.py",
    "fedllm/apps/payload.py": "tests/test_payload.py tests/test_faults.py tests/test_hetero_lora.py",
    "fedllm/fusion/privacy.py": "tests/test_privacy.py",
}


def copy_of_checkout(code_commit: str = "HEAD") -> Path:
    """``code_commit``'s code with HEAD's tests in a temporary folder (cosmic-ray edits the files it
    mutates): a sample's mutant positions belong to the code it was drawn from, new tests judge them."""
    work = Path(tempfile.mkdtemp(prefix="fedllm-mutation-"))
    for commit, paths in ((code_commit, []), ("HEAD", ["tests"])):
        archive = subprocess.run(["git", "archive", commit, *paths], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    return work


def enumerate_mutants(work: Path, module: str) -> list[dict]:
    """Every mutation cosmic-ray would make in ``module``."""
    config, session = work / "cr.toml", work / "cr.sqlite"
    config.write_text(f'[cosmic-ray]\nmodule-path = "{module}"\ntimeout = 600.0\nexcluded-modules = []\n'
                      f'test-command = "true"\n[cosmic-ray.distributor]\nname = "local"\n')
    session.unlink(missing_ok=True)
    subprocess.run(["cosmic-ray", "init", str(config), str(session)], cwd=work, check=True, capture_output=True)
    dump = subprocess.run(["cosmic-ray", "dump", str(session)], cwd=work, check=True, capture_output=True, text=True)
    return [json.loads(line)[0]["mutations"][0] for line in dump.stdout.splitlines() if line.strip()]


def run_mutant(work: Path, mutant: dict, env: dict, timeout: float) -> dict:
    tests = f"{PYTEST} {TARGETS[mutant['module_path']]}"
    cmd = ["cosmic-ray", "mutate-and-test", mutant["module_path"], mutant["operator_name"],
           str(mutant["occurrence"]), tests]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
        result = json.loads(stdout.strip().splitlines()[-1])
        outcome = result.get("test_outcome") or result.get("worker_outcome")
        diff = result.get("diff", "")
    except subprocess.TimeoutExpired:  # a mutant that loops forever is caught, by the timeout
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        outcome, diff = "killed (timeout)", ""
    except (json.JSONDecodeError, IndexError):
        outcome, diff = "error", ""
    return {**mutant, "outcome": outcome, "seconds": time.perf_counter() - started, "diff": diff}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, default=150, help="mutants to run (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modules", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant before it counts as killed")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/mutation"))
    parser.add_argument("--code-commit", help="mutate this commit's code (default HEAD, or the --retry sample's)")
    parser.add_argument("--retry", type=Path, help="a results.json: run its surviving mutants again (after new "
                        "tests), keep the other outcomes")
    args = parser.parse_args()

    code_commit = json.loads(args.retry.read_text())["summary"].get("code_commit", "HEAD") if args.retry else "HEAD"
    code_commit = args.code_commit or code_commit
    code_commit = subprocess.run(["git", "rev-parse", code_commit], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.strip()
    work = copy_of_checkout(code_commit)
    env = {**os.environ, "PYTHONPATH": str(work), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    kept: list[dict] = []
    if args.retry:  # the same sample: the surviving mutants again, every other outcome as it was
        earlier = json.loads(args.retry.read_text())
        args.modules, args.seed = earlier["summary"]["modules"], earlier["summary"]["seed"]
        kept = [r for r in earlier["mutants"] if r["outcome"] != "survived"]
        chosen = [{k: v for k, v in r.items() if k not in ("outcome", "seconds", "diff")}
                  for r in earlier["mutants"] if r["outcome"] == "survived"]
        total = earlier["summary"]["mutants_total"]
    else:
        mutants = [m for module in args.modules for m in enumerate_mutants(work, module)]
        chosen = mutants if args.sample == 0 else random.Random(args.seed).sample(mutants, min(args.sample, len(mutants)))
        total = len(mutants)
    pristine = {module: (work / module).read_text() for module in args.modules}
    print(f"{total} mutants in {len(args.modules)} modules; running {len(chosen)}", flush=True)
    results = list(kept)
    for i, mutant in enumerate(chosen, 1):
        result = run_mutant(work, mutant, env, args.timeout)
        for module, text in pristine.items():  # whatever happened, the next mutant starts from the original
            (work / module).write_text(text)
        results.append(result)
        print(f"[{i}/{len(chosen)}] {result['outcome']:<16} {result['module_path']}:{result['start_pos'][0]} "
              f"{result['operator_name']} ({result['seconds']:.0f} s)", flush=True)

    killed = sum(r["outcome"].startswith("killed") for r in results)
    counted = sum(r["outcome"].startswith(("killed", "survived")) for r in results)
    low, high = wilson(killed, counted)
    summary = {"mutants_total": total, "run": len(results), "counted": counted, "killed": killed,
               "score": killed / counted if counted else None, "ci95": [low, high], "seed": args.seed,
               "code_commit": code_commit,
               "modules": args.modules, "by_module": {}}
    for module in args.modules:
        mine = [r for r in results if r["module_path"] == module and r["outcome"].startswith(("killed", "survived"))]
        summary["by_module"][module] = {"run": len(mine), "killed": sum(r["outcome"].startswith("killed") for r in mine)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "mutants": results}, indent=2))
    survivors = [r for r in results if r["outcome"] == "survived"]
    (args.out / "survivors.md").write_text("\n\n".join(f"### {r['module_path']}:{r['start_pos'][0]} "
                                                       f"{r['operator_name']}\n```diff\n{r['diff']}\n```"
                                                       for r in survivors) + "\n")
    print(f"killed {killed} of {counted} ({100 * killed / max(counted, 1):.1f}%, 95% CI {100 * low:.1f}-"
          f"{100 * high:.1f}%); {len(results) - counted} incompetent or errored; survivors in {args.out / 'survivors.md'}")


if __name__ == "__main__":
    sys.exit(main())
