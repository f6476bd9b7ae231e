#!/usr/bin/env python
"""Screenshot a page of a token-protected Ray dashboard with headless Chromium.

    python cluster/local/screenshot.py --dashboard http://127.0.0.1:8265 --out docs/dashboard-actors.png

The dashboard (Ray >= 2.52, token auth on) shows a login dialog unless the browser holds the
``ray-authentication-token`` cookie, which ``POST /api/authenticate`` sets from an
``Authorization: Bearer`` header. Chromium's ``--screenshot`` flag cannot set a cookie, so this
script drives Chromium over the DevTools protocol instead (its debugging port listens on
127.0.0.1 only): set the cookie, open the page, wait until ``--wait-for`` text shows, capture.
The token (``--token-file``, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) never
appears in a URL, a command line or the output. Needs the Debian package ``chromium``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--window-size=1400,900",
         "--remote-debugging-port=0", "--no-first-run"]


async def _capture(ws_url: str, dashboard: str, page: str, token: str | None, wait_for: str, timeout: float,
                   width: int, height: int) -> bytes:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        counter = iter(range(1, 1_000_000))

        async def call(method: str, **params) -> dict:
            i = next(counter)
            await ws.send_json({"id": i, "method": method, "params": params})
            async for msg in ws:
                data = json.loads(msg.data)
                if data.get("id") == i:
                    if "error" in data:
                        raise RuntimeError(f"{method}: {data['error'].get('message')}")
                    return data.get("result", {})
            raise RuntimeError(f"{method}: the browser closed the connection")

        await call("Network.enable")
        if token:
            await call("Network.setCookie", name="ray-authentication-token", value=token, url=dashboard,
                       httpOnly=True, sameSite="Strict")
        await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        await call("Page.enable")
        await call("Page.navigate", url=f"{dashboard.rstrip('/')}/#/{page.lstrip('/')}")
        deadline, text = time.time() + timeout, ""
        while time.time() < deadline:
            res = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''")
            text = res.get("result", {}).get("value", "") or ""
            if "Authentication Token Required" in text and wait_for not in ("", "Authentication"):
                raise RuntimeError("the dashboard shows its login dialog: the token is missing or wrong; expected "
                                   "--token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
            if wait_for in text and "Loading" not in text[:200]:
                break
            await asyncio.sleep(1)
        else:
            first = " ".join(text.split())[:160]
            raise RuntimeError(f"{wait_for!r} did not appear on {page} within {timeout:.0f}s (page shows: {first!r})")
        await asyncio.sleep(2)  # let the table finish rendering
        shot = await call("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])


def wait_alive(dashboard: str, token: str | None, n: int, prefix: str = "evaluator-", timeout: float = 300) -> None:
    """Wait until ``n`` actors whose name starts with ``prefix`` are ALIVE (state API, with the token)."""
    import urllib.request

    url = f"{dashboard.rstrip('/')}/api/v0/actors?limit=1000&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.time() + timeout
    while time.time() < deadline:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            actors = json.load(r)["data"]["result"]["result"]
        if sum(1 for a in actors if (a.get("name") or "").startswith(prefix)) >= n:
            return
        time.sleep(1)
    raise RuntimeError(f"fewer than {n} ALIVE actors named {prefix}* after {timeout:.0f}s")


def screenshot(dashboard: str, out: str | Path, page: str = "actors", token: str | None = None,
               wait_for: str = "evaluator-", timeout: float = 90, width: int = 1400, height: int = 900) -> Path:
    """Write a PNG of ``dashboard``'s ``page`` to ``out`` once ``wait_for`` shows on it."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not exe:
        raise RuntimeError("chromium not found; expected the Debian package chromium (apt-get install chromium)")
    profile = Path(tempfile.mkdtemp(prefix="cullmt-chromium-"))
    proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.is_file() and port_file.read_text().strip()) and time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited with code {proc.returncode} before opening its debugging port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t.get("type") == "page"]
        png = asyncio.run(_capture(pages[0]["webSocketDebuggerUrl"], dashboard, page, token, wait_for, timeout,
                                   width, height))
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(png)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description="Screenshot a page of a token-protected Ray dashboard.")
    ap.add_argument("--dashboard", default="http://127.0.0.1:8265")
    ap.add_argument("--page", default="actors", help="dashboard route: actors, jobs, cluster, metrics ...")
    ap.add_argument("--out", default="docs/dashboard-actors.png")
    ap.add_argument("--token-file", help="the cluster's token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, "
                                         "~/.ray/auth_token)")
    ap.add_argument("--wait-for", default="evaluator-", help="text that must show before the capture")
    ap.add_argument("--timeout", type=float, default=90)
    ap.add_argument("--wait-alive", type=int, default=0, metavar="N",
                    help="first wait until N actors named evaluator-* are ALIVE (a search is running)")
    a = ap.parse_args()
    from cullmt_ray.submit import SubmitError, resolve_token

    try:
        token, _ = resolve_token(a.token_file)
        if a.wait_alive:
            wait_alive(a.dashboard, token, a.wait_alive)
        print(screenshot(a.dashboard, a.out, a.page, token, a.wait_for, a.timeout))
    except (RuntimeError, OSError, SubmitError) as e:
        print(f"screenshot: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
