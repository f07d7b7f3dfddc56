"""Headless Chromium driven over the DevTools protocol (Debian's `chromium`, no downloads)."""
from __future__ import annotations

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

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)
