"""Take docs/mlflow-compare.png: MLflow's compare view of a grid's train runs in a real browser.

    python docs/screenshot_compare.py --tracking-uri sqlite:///$PWD/.bpfm/mlflow.db \
        --experiment bpfm-demo --out docs/mlflow-compare.png

Starts `mlflow server` on a free loopback port, opens the compare view of the experiment's
finished train runs (the latest grid launch) in headless Chromium (Debian's `chromium`), driven
over the DevTools protocol, and saves a full-page screenshot. Needs `chromium` on PATH."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

PARAMS = ["size", "freeze", "init", "epochs"]  # the paper's axes (source: one plot per source)
METRICS = ["bhs_sbp", "aami_pass", "dbp_mae", "sbp_mae"]  # the last colours the lines
PLOT_INPUTS = "input[role=combobox]"  # the parameter and metric pickers of the plot
CLOSE_ASSISTANT = ("[...document.querySelectorAll('button')].filter(b => "
                   "/close/i.test(b.getAttribute('aria-label') || '')).forEach(b => b.click())")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url}: not up after {timeout:.0f} s")


def compare_url(base: str, tracking_uri: str, experiment: str) -> str:
    from bpfm import tracking

    client = tracking.client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    grid = tracking.find_runs(client, found.experiment_id, {tracking.KIND: "grid"})[0]
    runs = [r.info.run_id for r in tracking.runs_of(client, found.experiment_id,
                                                     grid.info.run_id, "train")]
    query = urllib.parse.urlencode({"runs": json.dumps(runs),
                                    "experiments": json.dumps([found.experiment_id])})
    return f"{base}/#/compare-runs?{query}"


async def screenshot(devtools: int, url: str, out: Path, width: int, height: int,
                     wait_s: float = 40) -> None:
    import aiohttp

    with urllib.request.urlopen(f"http://127.0.0.1:{devtools}/json/list") as response:
        page = next(t for t in json.load(response) if t["type"] == "page")
    async with aiohttp.ClientSession() as session, session.ws_connect(
        page["webSocketDebuggerUrl"], max_msg_size=0
    ) as ws:
        counter = 0

        async def call(method: str, **params):
            nonlocal counter
            counter += 1
            await ws.send_json({"id": counter, "method": method, "params": params})
            async for message in ws:
                data = json.loads(message.data)
                if data.get("id") == counter:
                    return data.get("result", {})
            raise RuntimeError(f"DevTools closed during {method}")

        await call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                   deviceScaleFactor=1, mobile=False)
        async def js(expression: str):
            result = await call("Runtime.evaluate", expression=expression, returnByValue=True)
            return result.get("result", {}).get("value")

        async def choose(select: int, names: list[str]) -> None:
            for name in names:
                await js(f"document.querySelectorAll('{PLOT_INPUTS}')[{select}].focus()")
                await call("Input.insertText", text=name)
                await asyncio.sleep(1.0)
                for kind in ("keyDown", "keyUp"):
                    await call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                               windowsVirtualKeyCode=13)
                await asyncio.sleep(0.5)

        await call("Page.navigate", url=url)
        await asyncio.sleep(wait_s)  # the single-page app loads its runs and draws its plots
        await js(CLOSE_ASSISTANT)
        await js("[...document.querySelectorAll('button')].find(b => b.innerText.trim() == "
                 "'Clear All')?.click()")
        await asyncio.sleep(1.0)
        await choose(0, PARAMS)
        await choose(1, METRICS)
        await js("document.activeElement.blur()")
        await asyncio.sleep(3.0)
        shot = await call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", default="bpfm-demo")
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow-compare.png"))
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--height", type=int, default=1400)
    args = parser.parse_args()
    port, devtools = free_port(), free_port()
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    with tempfile.TemporaryDirectory(prefix="bpfm-shot-") as tmp:
        server = subprocess.Popen([mlflow, "server", "--backend-store-uri", args.tracking_uri,
                                   "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        browser = None
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/health")
            browser = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox",
                                        "--disable-gpu", f"--remote-debugging-port={devtools}",
                                        f"--user-data-dir={tmp}", "about:blank"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_http(f"http://127.0.0.1:{devtools}/json/version")
            url = compare_url(base, args.tracking_uri, args.experiment)
            asyncio.run(screenshot(devtools, url, args.out, args.width, args.height))
        finally:
            for process in (browser, server):
                if process is not None:
                    process.terminate()
                    process.wait(timeout=30)
    print(f"{args.out}: {args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
