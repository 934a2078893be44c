import re
import sys
from pathlib import Path

import numpy as np
import pytest

from ampq_pass.core.memory import release_freed_memory


def _rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and trims glibc's heap")
def test_freed_heap_memory_goes_back_to_the_system():
    # Freeing one 16 MB block raises glibc's mmap threshold to 16 MB: the 4 MB blocks after
    # it come from the heap, and with small live objects between them (what a stage's
    # tensors and Python objects look like) freeing them leaves 256 MB resident until the
    # heap is trimmed.
    big = np.ones(16 << 20, np.uint8)
    del big
    blocks, pins = [], []
    for _ in range(64):
        blocks.append(np.ones(4 << 20, np.uint8))
        pins.append(bytearray(64 << 10))
    del blocks
    before = _rss_mb()
    release_freed_memory()
    assert before - _rss_mb() > 128, (before, _rss_mb())
    assert len(pins) == 64
