"""benchmarks/memory_timeline.py splits a process's memory by kind: a child that holds 300 MB of its
own heap and then 200 MB of shared memory must show each in its own field, and not the other."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "memory_timeline.py"
CHILD = """
import mmap, time
heap = bytearray(300 * 2**20)          # zero-filled: every page touched
time.sleep(0.6)
del heap
shared = mmap.mmap(-1, 200 * 2**20)    # anonymous shared mapping: counted as RssShmem once written
for i in range(0, len(shared), 4096):
    shared[i] = 1
time.sleep(0.6)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_heap_and_shared_memory_are_told_apart():
    spec = importlib.util.spec_from_file_location("memory_timeline", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.timeline([sys.executable, "-c", CHILD])
    assert result["returncode"] == 0
    anon, shmem = result["peaks"]["RssAnon"], result["peaks"]["RssShmem"]
    assert 300 <= anon["RssAnon"] < 300 + 60 and anon["RssShmem"] < 5  # the heap, no shared pages yet
    assert 200 <= shmem["RssShmem"] < 205 and shmem["RssAnon"] < anon["RssAnon"] - 250  # heap freed by then
    assert result["peaks"]["VmHWM"]["VmHWM"] >= 300
