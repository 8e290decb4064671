"""Process memory policy for qgraph's commands.

glibc serves allocations below its mmap threshold from the heap, and raises that threshold
(up to 32 MiB) each time a large block is freed. Rewrites and calibration free many
megabyte-sized tensors (a layer's float64 temporaries, a window's activations), so with the
default policy freed memory stays in the heap, fragmented, and the process's RSS grows to
well above what is alive (SmolLM2 W4A16 rotation + GPTQ: 2.2 GB RSS for 0.8 GB of live
tensors). A fixed threshold serves blocks of 1 MiB and more with mmap, which returns them to
the system when freed (measured: GPTQ's peak 2.1 → 1.5 GB).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (which also stops its dynamic growth); returns
    whether it was set (False on other C libraries, where nothing changes)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
