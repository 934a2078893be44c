import os
import subprocess
import sys

import pytest

# Run in a fresh interpreter: in the suite's process earlier tests have already fragmented the
# heap and moved glibc's mmap threshold, so whether new blocks land on the heap is not ours to
# say. The environment fixes the allocator's choices: blocks up to 32 MB come from the heap,
# nothing is trimmed automatically, and numpy does not ask for huge pages (which a partial
# trim would have to split).
_SCRIPT = r"""
import re
from pathlib import Path

import numpy as np

from ampq_pass.core.memory import release_freed_memory


def rss_mb():
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


blocks, pins = [], []
for _ in range(64):
    blocks.append(np.ones(4 << 20, np.uint8))
    pins.append(bytearray(64 << 10))  # live objects between the blocks keep the heap from shrinking by itself
del blocks
before = rss_mb()
release_freed_memory()
print(before, rss_mb(), len(pins))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and trims glibc's heap")
def test_freed_heap_memory_goes_back_to_the_system():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(32 << 20), MALLOC_TRIM_THRESHOLD_=str(1 << 40),
               NUMPY_MADVISE_HUGEPAGE="0")
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True)
    before, after, pins = out.stdout.split()
    # 256 MB were freed into the heap; the trim hands most of it back.
    assert float(before) - float(after) > 128, out.stdout
    assert int(pins) == 64


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and trims glibc's heap")
def test_without_the_trim_the_freed_heap_stays_resident():
    # The control: the same allocations without release_freed_memory keep their pages, so the
    # test above measures the trim and not the allocator giving memory back on its own.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(32 << 20), MALLOC_TRIM_THRESHOLD_=str(1 << 40),
               NUMPY_MADVISE_HUGEPAGE="0")
    script = _SCRIPT.replace("release_freed_memory()\n", "")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    before, after, _ = out.stdout.split()
    assert abs(float(before) - float(after)) < 16, out.stdout
