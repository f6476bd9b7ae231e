"""A CPU replica keeps freed large blocks on its heap: the next round's buffers reuse mapped pages."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# in a fresh process: 12 rounds of a 64 MiB tensor filled and freed; each round's page faults
PROBE = """
import json, resource, sys
import torch
from cullmt_ray.heap import keep_heap
kept = keep_heap()
def faults(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(n, dtype=torch.uint8); t.fill_(1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del t
    return after - before
print(json.dumps({"kept": kept, "faults": [faults(64 << 20) for _ in range(12)]}))
"""


def _probe(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_large_blocks_are_reused_without_page_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    kept = _probe({"CULLMT_KEEP_HEAP": "1"})
    assert kept["kept"] is True
    assert kept["faults"][0] > pages // 2  # the first block is new memory either way
    assert sum(kept["faults"][-4:]) < pages // 10  # once the heap has settled, rounds reuse its pages
    off = _probe({"CULLMT_KEEP_HEAP": "0"})
    assert off["kept"] is False
    assert all(f > pages // 2 for f in off["faults"][-4:])  # glibc's default: unmapped on free, faulted in again
