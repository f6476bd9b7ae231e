"""Keep a CPU replica's freed memory for its next allocation instead of handing it back to the kernel.

glibc serves every allocation over 32 MiB (a race round's KV buffers, the lockstep batches' hidden states) with a
fresh ``mmap`` and unmaps it on free: each round then page-faults and zeroes the same hundreds of MiB again. With
``M_MMAP_MAX = 0`` and a high ``M_TRIM_THRESHOLD`` such blocks come from the heap and stay there once freed, so the
next round reuses pages already mapped (a lockstep race round in 0.74-0.95x / 0.91-0.92x of the time on
reference:llama / reference:dense, bench part ``heap``). The price is the resident size: a replica keeps the peak of its rounds (plus
fragmentation) instead of giving it back between them. ``CULLMT_KEEP_HEAP=0`` turns it off; nothing happens off
glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("cullmt_ray")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # freed memory at the heap's top handed back only above this


def keep_heap() -> bool:
    """Have this process's glibc keep freed large blocks on its heap; whether it was done."""
    if os.environ.get("CULLMT_KEEP_HEAP", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator as it is
        return False
    done = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("glibc keeps freed blocks on the heap: %s", done)
    return done
