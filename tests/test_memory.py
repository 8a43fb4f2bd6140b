import sys

import pytest
import torch
from fedllm.core.memory import _malloc_trim, release_free_memory


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="glibc's malloc_trim")
def test_memory_freed_inside_the_heap_goes_back_to_the_os():
    big = torch.ones(4 * 1024 * 1024)
    del big  # a freed 16 MB mmapped block raises glibc's threshold: the 1 MB tensors below land in the heap
    keep, drop = [], []
    for i in range(400):
        (keep if i % 10 == 9 else drop).append(torch.ones(256 * 1024))
    drop.clear()  # 360 MB free between the kept tensors: glibc cannot shrink the heap past them
    held = _resident_mb()
    assert release_free_memory()
    assert _resident_mb() < held - 200
    assert all(float(t[0]) == 1.0 for t in keep)
