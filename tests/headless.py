"""A small Chrome DevTools Protocol client over headless Chromium, for the page tests.

Why not playwright: its pip wheel is a 45 MB node driver that wants its own browser download;
a system `chromium` (Debian's package, `make test` installs it) plus `websocket-client` is a few
hundred lines less machinery. The page is loaded with the network emulated offline, and every
request that is not `file:` or `data:` is recorded, so a test can say "loads nothing remote".
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def need_chromium() -> str:
    """The browser's path, or skip the test with the reason and the fix."""
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium on PATH: `make test` installs Debian's chromium when run as root "
                    "(apt-get install chromium); as a user, install it yourself to run the browser tests")
    try:
        import websocket  # noqa: F401  (websocket-client, the `test` extra)
    except ImportError:
        pytest.skip("websocket-client is not installed: pip install -e '.[test]'")
    return path


class Browser:
    """One headless Chromium with one page; use as a context manager."""

    def __init__(self, width: int = 1280, height: int = 900):
        self.width, self.height = width, height
        self.remote_requests: list[str] = []
        self.errors: list[str] = []  # uncaught exceptions and console.error messages
        self._ids = itertools.count(1)

    def __enter__(self) -> "Browser":
        import websocket

        self._profile = tempfile.mkdtemp(prefix="mer-chromium-")
        args = [need_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--allow-file-access-from-files", f"--user-data-dir={self._profile}",
                "--remote-debugging-port=0", f"--window-size={self.width},{self.height}", "about:blank"]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = self._devtools_port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            page = next(t for t in json.load(resp) if t["type"] == "page")
        self._ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        for method in ("Page.enable", "Runtime.enable", "Network.enable", "Log.enable"):
            self.call(method)
        self.call("Network.emulateNetworkConditions", offline=True, latency=0,
                  downloadThroughput=-1, uploadThroughput=-1)
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        return self

    def _devtools_port(self) -> int:
        marker = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if marker.is_file() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            if self._proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self._proc.returncode} before DevTools started")
            time.sleep(0.05)
        raise RuntimeError("chromium did not open its DevTools port within 30 s")

    def __exit__(self, *exc) -> None:
        try:
            self._ws.close()
        finally:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            shutil.rmtree(self._profile, ignore_errors=True)

    def _event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(("file:", "data:", "about:", "blob:")):
                self.remote_requests.append(url)
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))

    def call(self, method: str, **params) -> dict:
        """Send one command and return its result; events that arrive meanwhile are recorded."""
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def open(self, path: Path, fragment: str = "", timeout: float = 60) -> float:
        """Navigate to a local file and wait for its load event; returns the seconds it took."""
        url = Path(path).resolve().as_uri() + (f"#{fragment}" if fragment else "")
        # via about:blank: a navigation that changes only the fragment would fire no load event
        self._navigate("about:blank", timeout)
        start = time.monotonic()
        self._navigate(url, timeout)
        return time.monotonic() - start

    def _navigate(self, url: str, timeout: float) -> None:
        self.call("Page.navigate", url=url)
        self._ws.settimeout(timeout)
        while True:
            message = json.loads(self._ws.recv())
            self._event(message)
            if message.get("method") == "Page.loadEventFired":
                return

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20) -> object:
        """Poll until the expression is truthy (e.g. vega-embed has drawn its charts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {expression!r}")

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the centre of the first element matching `selector`."""
        box = self.evaluate(f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
                            "el.scrollIntoView({block: 'center'}); const r = el.getBoundingClientRect();"
                            "return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self, full_page: bool = False) -> bytes:
        params = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        return base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])


def pixel_spread(png: bytes) -> tuple[float, float]:
    """(standard deviation of the grey levels, share of pixels that are not the background colour):
    a blank page is (0, 0); a page with charts or cards has both well above that."""
    import numpy as np
    from PIL import Image

    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    background = np.bincount(grey.astype(np.uint8).ravel()).argmax()
    return float(grey.std()), float((np.abs(grey - background) > 8).mean())


def save_artifact(name: str, data: bytes) -> None:
    """Keep a screenshot for a person to look at when MER_TEST_ARTIFACTS names a folder."""
    folder = os.environ.get("MER_TEST_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(data)
