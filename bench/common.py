"""Shared bits of the benchmarks: where results go, machine facts, argument defaults."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cullmt_ray.atomic import write_json

RESULTS = REPO / "results" / "bench"


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--model", default="reference:dense", help="model to benchmark (default reference:dense)")
    ap.add_argument("--sentences", type=int, default=48, help="dev sentences per direction")
    ap.add_argument("--out", default=None, help="result JSON (default results/bench/<name>.json)")
    return ap


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor elsewhere): ratios between code paths move
    with it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def save(name: str, result: dict, out: str | None = None) -> Path:
    import torch

    path = Path(out) if out else RESULTS / f"{name}.json"
    result = {"benchmark": name, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(),
                          "torch": torch.__version__, "cuda": torch.cuda.is_available()}, **result}
    write_json(path, result)
    print(f"wrote {path}")
    return path
