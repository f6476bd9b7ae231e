"""Keep a CPU replica's freed memory for its next allocation instead of handing it back to the kernel.

glibc serves every allocation over 32 MiB (a race round's KV buffers, the lockstep batches' hidden states) with a
fresh ``mmap`` and unmaps it on free: each round then page-faults and zeroes the same hundreds of MiB again. With
``M_MMAP_MAX = 0`` and ``M_TRIM_THRESHOLD = -1`` (no trimming) such blocks come from the heap and stay there once
freed, so the next round reuses pages already mapped (bench part ``heap``: a lockstep race round in 0.74-0.95x of
the time on reference:llama, 0.91-0.92x on reference:dense). The price is the resident size: a replica keeps the
peak of its rounds (plus fragmentation) instead of giving it back between them. ``CULLMT_KEEP_HEAP=0`` turns it
off; nothing happens off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("cullmt_ray")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = -1  # mallopt(3): -1 turns trimming off (a 1 GiB threshold still let a dense round's free top go back)


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
