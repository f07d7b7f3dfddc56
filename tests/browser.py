"""Headless Chromium driven over the DevTools protocol (Debian's `chromium`, no downloads)."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium; `images(url)` loads a page and reports every <img>."""

    def __init__(self):
        self.profile = Path(tempfile.mkdtemp(prefix="nf-chromium-"))
        self.proc = subprocess.Popen([chromium_path(), *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        self._id = 0
        self.events: list[dict] = []  # DevTools events received while waiting for a reply (see `inspect`)

    def _page_ws(self) -> str:
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=5))
        return next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")

    def _call(self, ws, method: str, **params):
        self._id += 1
        ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv(timeout=30))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]
            if "method" in msg:
                self.events.append(msg)

    def images(self, url: str) -> dict:
        """Load `url`; return the title, the number of <img> and those that failed to load."""
        from websockets.sync.client import connect

        with connect(self._page_ws(), max_size=None) as ws:
            self._call(ws, "Page.navigate", url=url)
            expr = ("document.readyState === 'complete' ? JSON.stringify({title: document.title, "
                    "n: document.images.length, broken: Array.from(document.images).filter(i => "
                    "!(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60)), "
                    "text: document.body.innerText.slice(0, 20000)}) : ''")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                res = self._call(ws, "Runtime.evaluate", expression=expr, returnByValue=True)
                value = res.get("result", {}).get("value")
                if value:
                    return json.loads(value)
                time.sleep(0.2)
            raise TimeoutError(f"{url} did not finish loading")

    def inspect(self, url: str, ready: str, settle_s: float = 1.0) -> dict:
        """Load `url` in a fresh tab; wait until it has loaded and the JS expression `ready` is truthy
        (its value is returned as ``value``); report the console errors, uncaught exceptions and every network
        request the page made (DevTools ``Runtime``, ``Log`` and ``Network`` events), and a PNG
        screenshot of the page as it then is (``screenshot``, bytes)."""
        from websockets.sync.client import connect

        target = json.load(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT"), timeout=5))
        try:
            with connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
                self.events = []
                for domain in ("Runtime", "Log", "Network", "Page"):
                    self._call(ws, f"{domain}.enable")
                self._call(ws, "Page.navigate", url=url)
                value, deadline = None, time.monotonic() + 60
                while time.monotonic() < deadline:
                    res = self._call(ws, "Runtime.evaluate", returnByValue=True, awaitPromise=True,
                                     expression=f"document.readyState === 'complete' ? ({ready}) : null")
                    value = res.get("result", {}).get("value")
                    if value:
                        break
                    time.sleep(0.2)
                else:
                    raise TimeoutError(f"{url}: {ready} did not become true")
                end = time.monotonic() + settle_s  # late errors (animation frames, async module scripts)
                while time.monotonic() < end:
                    self._call(ws, "Runtime.evaluate", expression="1")
                    time.sleep(0.1)
                shot = base64.b64decode(self._call(ws, "Page.captureScreenshot", format="png")["data"])
        finally:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/close/{target['id']}", timeout=5)
        errors = [" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])
                  for e in self.events if e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error"]
        errors += [e["params"]["exceptionDetails"].get("exception", {}).get("description")
                   or e["params"]["exceptionDetails"].get("text", "") for e in self.events
                   if e["method"] == "Runtime.exceptionThrown"]
        errors += [e["params"]["entry"]["text"] for e in self.events
                   if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"]
        requests = [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]
        return {"value": value, "errors": errors, "requests": requests, "screenshot": shot}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)
