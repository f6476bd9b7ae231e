"""Run many ``cullmt-ray`` command lines fast: import the CLI and its heavy dependencies once, then fork one
child per command line, which runs ``cullmt_ray.cli.main(argv)`` exactly as ``python -m cullmt_ray.cli`` does,
with its own working directory and stdout/stderr files.

stdin: a JSON list of {"argv": [...], "cwd": DIR}; stdout: a JSON list of {"code", "stdout", "stderr", "seconds"}.
Used by the bad-input tests (tests/test_bad_input.py, test_cli.py, test_heal.py: :func:`run_cases`); a few of
test_bad_input's cases also run as real ``python -m cullmt_ray.cli`` processes to show both give the same answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cases(cases: list[dict], env: dict | None = None) -> list[dict]:
    """Run ``[{"argv": [...], "cwd": DIR}, ...]`` through one forking process; each case's code, stdout,
    stderr and seconds."""
    env = {**os.environ, "CULLMT_NO_PROGRESS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "tests.cli_forkrun"], input=json.dumps(cases), capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _child(argv: list[str], cwd: str, out: str, err: str) -> None:
    os.chdir(cwd)
    fo, fe = os.open(out, os.O_WRONLY), os.open(err, os.O_WRONLY)
    os.dup2(fo, 1)
    os.dup2(fe, 2)
    sys.argv = ["cullmt-ray", *argv]
    code = 1
    try:
        from cullmt_ray import cli

        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:  # noqa: BLE001 - an escaped exception is what the tests look for
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    cases = json.load(sys.stdin)
    import ray.exceptions  # noqa: F401 - the heavy imports happen once, before any fork (the CLI maps Ray's errors)
    import transformers  # noqa: F401
    from transformers import AutoConfig  # noqa: F401

    import cullmt_ray.calibration  # noqa: F401
    import cullmt_ray.cli  # noqa: F401
    import cullmt_ray.compare  # noqa: F401
    import cullmt_ray.expert_study  # noqa: F401
    import cullmt_ray.families  # noqa: F401
    import cullmt_ray.heal  # noqa: F401
    import cullmt_ray.search  # noqa: F401
    import cullmt_ray.session  # noqa: F401

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            out, err = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
            open(out, "w").close()
            open(err, "w").close()
            t0 = time.time()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(case["argv"], case["cwd"], out, err)
            _, status = os.waitpid(pid, 0)
            with open(out, errors="replace") as f, open(err, errors="replace") as g:
                results.append({"code": os.waitstatus_to_exitcode(status), "stdout": f.read(), "stderr": g.read(),
                                "seconds": round(time.time() - t0, 3)})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
