"""A loopback HTTP proxy in front of the S3 test server that injects faults on command.

Modes (set on the instance while it runs):
- ``slowdown = N``: answer the next N requests with 503 SlowDown (S3's throttling reply);
- ``down_until = t``: reset every connection until monotonic time t (a server outage);
- ``truncate = {substring: N}``: cut the body of the next N GETs whose path holds substring.
"""
from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b'<Message>Please reduce your request rate.</Message></Error>')


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream)
        self.slowdown = 0
        self.down_until = 0.0
        self.truncate: dict[str, int] = {}
        self.counts = {"requests": 0, "slowdown": 0, "reset": 0, "truncated": 0}
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                with proxy._lock:
                    proxy.counts["requests"] += 1
                    if time.monotonic() < proxy.down_until:
                        proxy.counts["reset"] += 1
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    throttle = proxy.slowdown > 0
                    if throttle:
                        proxy.slowdown -= 1
                        proxy.counts["slowdown"] += 1
                    cut = next((k for k, n in proxy.truncate.items() if n > 0 and k in self.path
                                and self.command == "GET"), None)
                    if cut:
                        proxy.truncate[cut] -= 1
                        proxy.counts["truncated"] += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if throttle:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                sent = data[: len(data) // 2] if cut else data
                # a HEAD reply has no body but states the object's length, as S3's does
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                self.wfile.write(sent)
                if cut:
                    self.close_connection = True
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
