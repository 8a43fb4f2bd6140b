import sys

import pytest
import torch
from fedllm.core.memory import _malloc_trim, release_free_memory, reset_peak, resident_mb


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="glibc's malloc_trim")
def test_memory_freed_inside_the_heap_goes_back_to_the_os():
    big = torch.ones(4 * 1024 * 1024)
    del big  # a freed 16 MB mmapped block raises glibc's threshold: the 1 MB tensors below land in the heap
    keep, drop = [], []
    for i in range(400):
        (keep if i % 10 == 9 else drop).append(torch.ones(256 * 1024))
    drop.clear()  # 360 MB free between the kept tensors: glibc cannot shrink the heap past them
    held = resident_mb()
    assert release_free_memory()
    assert resident_mb() < held - 200
    assert all(float(t[0]) == 1.0 for t in keep)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_the_peak_counts_a_step_after_a_reset_and_only_it():
    assert reset_peak()
    before = resident_mb()
    block = torch.ones(64 * 1024 * 1024)  # 256 MB, touched, then freed (mmapped: back to the OS at once)
    del block
    assert resident_mb("VmHWM") - before >= 200  # the kernel syncs per-thread counts lazily: ~230 seen
    assert reset_peak()
    assert resident_mb("VmHWM") - resident_mb() < 20
