"""``cullmt-ray submit``: run any cullmt-ray command on a running Ray cluster through the Ray Jobs API.

The command (``search``, ``compare``, ``calibrate``, ``evaluate``, any later one) and its arguments
are passed through unchanged as the job's entrypoint, ``python -m cullmt_ray.cli COMMAND ARGS``,
with a runtime environment (this checkout as the working directory, optional pip packages), a
submission id and metadata (command, arguments, who submitted it). ``--follow`` streams the
job's logs and exits with the job's outcome.

Authentication (Ray >= 2.52 token auth, on by default in ``ray start --head`` when a token exists):
the token comes from ``--token-file``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``, in that order. It is sent only as the ``Authorization: Bearer`` header of
the requests to the dashboard (and, for ``auto``/``ray://``/``HOST:PORT`` addresses, to the
cluster's gRPC services); it is never printed, never put into the job's metadata or runtime
environment (the job gets the cluster's own token from the nodes it runs on).
"""

from __future__ import annotations

import getpass
import ipaddress
import logging
import os
import secrets
import shlex
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from . import __version__
from .dburl import mask

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".git", "results", "*.sqlite", "*.sqlite-*", ".pytest_cache", "__pycache__", "*.egg-info", ".benchmarks",
            ".ruff_cache", ".venv", "build"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
QUIET_LOGGERS = {"ray.dashboard.modules.dashboard_sdk": logging.WARNING, "ray.dashboard.modules.job.sdk": logging.WARNING,
                 "ray._private.runtime_env.packaging": logging.ERROR,
                 "ray._private.runtime_env.working_dir": logging.ERROR}


class SubmitError(ValueError):
    """Submission cannot go on; the message is one line naming the value and what is expected."""


def resolve_token(token_file: str | None) -> tuple[str | None, str]:
    """``(token, where it came from)``, or ``(None, "")`` when there is none."""
    if token_file:
        p = Path(token_file).expanduser()
        if not p.is_file():
            raise SubmitError(f"--token-file {token_file}: no such file; expected a file holding the cluster's "
                              "token (on the head node: ray get-auth-token)")
        tok = p.read_text().strip()
        if not tok:
            raise SubmitError(f"--token-file {token_file}: the file is empty; expected the cluster's token")
        return tok, f"--token-file {token_file}"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        p = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        tok = p.read_text().strip() if p.is_file() else ""
        if not tok:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={p}: no such file or empty; expected a file holding the "
                              "cluster's token")
        return tok, f"RAY_AUTH_TOKEN_PATH={p}"
    p = Path.home() / ".ray" / "auth_token"
    if p.is_file() and p.read_text().strip():
        return p.read_text().strip(), str(p)
    return None, ""


def check_address(address: str) -> str:
    """The address as given, if Ray's job client understands it; else a one-line error."""
    if address == "auto":
        return address
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    if parts.scheme not in ("http", "https", "ray", "gcs") or not parts.hostname:
        raise SubmitError(f"--address {address!r}: expected auto, http(s)://HOST:PORT (the dashboard, 8265), "
                          "ray://HOST:PORT (Ray Client, 10001) or HOST:PORT (the head's GCS, 6379)")
    try:
        _ = parts.port
    except ValueError:
        raise SubmitError(f"--address {address!r}: bad port; expected a number, e.g. http://127.0.0.1:8265") from None
    return address


def _is_loopback(host: str | None) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def project_root() -> Path | None:
    """This checkout's root (with pyproject.toml), when cullmt_ray is run from a source tree."""
    root = Path(__file__).resolve().parents[1]
    py = root / "pyproject.toml"
    return root if py.is_file() and 'name = "cullmt-ray"' in py.read_text() else None


def build_runtime_env(working_dir: str | None, no_working_dir: bool, pip: list[str]) -> dict:
    env: dict = {"env_vars": {"CULLMT_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if not no_working_dir:
        wd = Path(working_dir) if working_dir else project_root()
        if wd is None:
            raise SubmitError("--working-dir: not running from a cullmt-ray checkout; pass --working-dir DIR, or "
                              "--no-working-dir when cullmt-ray is installed on the cluster")
        if not wd.is_dir():
            raise SubmitError(f"--working-dir {working_dir}: no such folder; expected the cullmt-ray checkout to upload")
        env["working_dir"] = str(wd.resolve())
        env["excludes"] = EXCLUDES
    if pip:
        if len(pip) == 1 and pip[0].endswith(".txt"):
            if not Path(pip[0]).is_file():
                raise SubmitError(f"--pip {pip[0]}: no such requirements file")
            env["pip"] = str(Path(pip[0]).resolve())
        else:
            env["pip"] = list(pip)
    return env


def known_commands() -> list[str]:
    import argparse

    from .cli import build_parser

    subs = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return [c for a in subs for c in a.choices if c != "submit"]


def _auth_error(address: str, source: str) -> SubmitError:
    if source:
        return SubmitError(f"{address}: the cluster rejected the token from {source}; expected the cluster's "
                           "token (on the head node: ray get-auth-token)")
    return SubmitError(f"{address}: the cluster requires a token and none was found; pass --token-file PATH, "
                       "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token "
                       "(on the head node: ray get-auth-token)")


def connect(address: str, token: str | None, source: str):
    """A ``JobSubmissionClient`` for ``address`` that sends ``token``; errors as one line."""
    scheme = urlsplit(address).scheme if "://" in address else ""
    if token and scheme not in ("http", "https"):
        # auto, ray:// and HOST:PORT first ask the cluster (gRPC) for its dashboard: that needs token mode on,
        # in this process only; Ray read its config at import, so it is read again.
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = token
        try:
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
        except (ImportError, AttributeError):  # another Ray: its own start-up reads the variables
            pass
    # An explicit --address wins over RAY_ADDRESS / RAY_API_SERVER_ADDRESS (which Ray would prefer).
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Ray's chatter: every ignored file, 'large' model weights (needed), 'WebSocket closed'
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        raise _auth_error(address, source) from None
    except Exception as e:  # noqa: BLE001 - ConnectionError, or Ray's errors for an address with no cluster
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SubmitError(f"{address}: cannot reach a Ray cluster there ({first[:160]}); start one "
                          "(cluster/README.md) or pass --address") from None


def follow(client, sid: str, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; return its final status."""
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(sid):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - the log stream broke (a proxy, a restart): poll instead
        print(f"[cullmt-ray] log stream ended early ({type(e).__name__}); polling the job status", file=sys.stderr)
    status = str(client.get_job_status(sid).value)
    while status not in TERMINAL:
        time.sleep(2)
        status = str(client.get_job_status(sid).value)
    return status


def run_submit(args) -> int:
    """The ``submit`` command; ``args`` from :func:`cullmt_ray.cli.build_parser`."""
    address = check_address(args.address or os.environ.get("RAY_API_SERVER_ADDRESS")
                            or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS)
    cmd = list(args.command_args or [])
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not args.attach:
        commands = known_commands()
        if not cmd:
            raise SubmitError("submit: expected a command after --, e.g. cullmt-ray submit --follow -- search "
                              "--target-removed 2")
        if cmd[0] not in commands:
            raise SubmitError(f"submit: {cmd[0]!r} is not a cullmt-ray command; expected one of {', '.join(commands)}")
        if any(a == "--address" or a.startswith("--address=") for a in cmd[1:]):
            raise SubmitError("submit: --address after the command: the job runs on the cluster it is submitted to; "
                              "put --address before --")
    meta = {}
    for item in args.metadata:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise SubmitError(f"--metadata {item!r}: expected KEY=VALUE")
        meta[k] = v
    runtime_env = None if args.attach else build_runtime_env(args.working_dir, args.no_working_dir, args.pip)
    token, source = resolve_token(args.token_file)
    parts = urlsplit(address) if "://" in address else None
    if parts and parts.scheme == "http" and token and not _is_loopback(parts.hostname):
        print(f"[cullmt-ray] warning: the token travels unencrypted to {parts.hostname}; prefer an SSH tunnel "
              "(ray dashboard CLUSTER.yaml, kubectl port-forward) to 127.0.0.1, or https", file=sys.stderr)
    client = connect(address, token, source)
    if args.attach:
        sid = args.attach
        try:
            client.get_job_info(sid)
        except RuntimeError:
            raise SubmitError(f"--attach {sid}: no such job on {address}; expected a submission id "
                              "(the dashboard's Jobs page lists them)") from None
    else:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        sid = args.submission_id or f"cullmt-{cmd[0]}-{stamp}-{secrets.token_hex(2)}"
        metadata = {"cullmt_ray.command": cmd[0], "cullmt_ray.args": mask(shlex.join(cmd[1:])),
                    "cullmt_ray.version": __version__, "submitted_by": f"{getpass.getuser()}@{socket.gethostname()}",
                    **meta}
        entrypoint = shlex.join(["python", "-m", "cullmt_ray.cli", *cmd])
        if runtime_env.get("working_dir"):
            print(f"[cullmt-ray] uploading {runtime_env['working_dir']} as the job's working directory", flush=True)
        try:
            sid = client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env,
                                    metadata=metadata)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SubmitError(f"submitting to {address} failed: {first[:300]}") from None
        print(f"[cullmt-ray] submitted {sid}: {mask(entrypoint)}", flush=True)
        if mask(entrypoint) != entrypoint:
            print("[cullmt-ray] note: a password in a URL is part of the job's entrypoint; set PGPASSWORD on the "
                  "cluster instead (cluster/README.md)", flush=True)
        if not any(a == "--output" or a.startswith("--output=") for a in cmd):
            print("[cullmt-ray] note: the run folder is written on the cluster, under the job's working directory; "
                  "pass --output and --store on shared storage to keep it", flush=True)
    if not args.follow:
        if args.attach:
            print(f"[cullmt-ray] job {sid}: {client.get_job_status(sid).value}")
        print(f"[cullmt-ray] follow it: cullmt-ray submit --address {address} --follow --attach {sid}")
        return 0
    try:
        status = follow(client, sid)
    except KeyboardInterrupt:
        print(f"\n[cullmt-ray] stopped following; job {sid} keeps running (ray job stop {sid})", file=sys.stderr)
        return 130
    if status != "SUCCEEDED":
        info = client.get_job_info(sid)
        msg = (info.message or "").strip().splitlines()
        print(f"cullmt-ray submit: error: job {sid} {status}" + (f": {msg[-1][:300]}" if msg else ""), file=sys.stderr)
        return 1
    print(f"[cullmt-ray] job {sid} SUCCEEDED", flush=True)
    return 0


def forward(argv: list[str], address: str) -> int:
    """``cullmt-ray COMMAND --address http://... ARGS``: run COMMAND as a job there and follow it."""
    import argparse

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--address":
            skip = True
        elif not a.startswith("--address="):
            rest.append(a)
    print(f"[cullmt-ray] {address} is a dashboard address: submitting as a Ray job "
          "(same as cullmt-ray submit --follow)", flush=True)
    ns = argparse.Namespace(address=address, token_file=None, working_dir=None, no_working_dir=False, pip=[],
                            submission_id=None, metadata=[], follow=True, attach=None, command_args=rest)
    return run_submit(ns)
