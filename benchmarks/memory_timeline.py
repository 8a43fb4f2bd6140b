"""Where a command's memory goes: its process's resident memory sampled every 50 ms, split by kind.

    python benchmarks/memory_timeline.py --out mem.json -- fedllm run experiments/fedavg_lora.yaml --clients 64 ...

A process's peak RSS (what ``server_peak_rss_mb`` reports) mixes three kinds of pages: its own heap
(``RssAnon``: the model, the round's sum or stack, the replies being read), mapped files (``RssFile``:
libraries) and shared memory (``RssShmem``: in a simulation, pages of Ray's object store that the
driver has touched while handing messages to and from the clients' actors; Ray's, bounded by its
store, and absent in a deployment). Printed: each kind's peak and the others at that moment.
Linux only (/proc). Samples can miss a spike shorter than 50 ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def sample(pid: int) -> dict[str, float] | None:
    """The process's memory fields in MB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status
                    if line.split(":")[0] in FIELDS}
    except (OSError, ValueError, IndexError):
        return None


def timeline(command: list[str], interval: float = 0.05, log: Path | None = None, env: dict | None = None,
             cwd: Path | None = None) -> dict:
    """Run ``command`` to its end, sampling it; its output goes to ``log`` (default: discarded)."""
    with open(log or "/dev/null", "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        started, samples = time.monotonic(), []
        while proc.poll() is None:
            fields = sample(proc.pid)
            if fields:
                samples.append({"t": round(time.monotonic() - started, 3), **fields})
            time.sleep(interval)
    peaks = {f: max(samples, key=lambda s: s.get(f, 0.0)) for f in FIELDS} if samples else {}
    return {"command": command, "returncode": proc.returncode, "wall_s": time.monotonic() - started,
            "peaks": peaks, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/memory_timeline.json"))
    parser.add_argument("--log", type=Path, default=None, help="where the command's output goes")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    result = timeline(command, log=args.log)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result))
    for field, at in result["peaks"].items():
        others = ", ".join(f"{k} {at.get(k, 0.0):.0f}" for k in FIELDS if k != field)
        print(f"peak {field} {at.get(field, 0.0):.0f} MB at {at['t']:.1f} s ({others})")
    print(f"exit {result['returncode']}, {result['wall_s']:.1f} s")
    sys.exit(result["returncode"])


if __name__ == "__main__":
    main()
