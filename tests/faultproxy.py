"""Small fault-injecting proxies for tests and the soak: one in front of the S3 server (HTTP: 500/503 bursts,
stalls, outages), one in front of PostgreSQL (TCP: connections dropped at the moment of COMMIT)."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy.engine import make_url

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
S3_ERRORS = {500: "InternalError", 503: "SlowDown"}


class _Fault:
    """The next `count` requests with a method in `methods` get this fault."""

    def __init__(self, count: int, methods: set[str] | None, status: int = 0, stall: float = 0.0) -> None:
        self.count, self.methods, self.status, self.stall = count, methods, status, stall


class _Every:
    """A standing fault in proportion to traffic: among requests with a method in `methods`, after every `every`
    that pass, the next `burst()` fail with a status from `statuses`. A slow machine sends fewer requests and
    gets fewer faults, so a test checks Kiln, not the machine's speed."""

    def __init__(self, every: int, burst: Callable[[], int], statuses: Callable[[], int], methods: set[str]) -> None:
        self.every, self.burst, self.statuses, self.methods = every, burst, statuses, methods
        self.passed, self.failing, self.status = 0, 0, 0

    def take(self, method: str) -> _Fault | None:
        if method not in self.methods:
            return None
        if self.failing:
            self.failing -= 1
            return _Fault(0, None, status=self.status)
        self.passed += 1
        if self.passed % self.every == 0:
            self.failing, self.status = self.burst(), self.statuses()
        return None


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.open: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up on a stalled answer closed its end: expected here

    def cut_all(self) -> None:
        """Drop every open connection too, kept-alive ones included: a real outage."""
        for sock in list(self.open):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class S3FaultProxy:
    """An HTTP proxy in front of an S3-compatible server that fails, stalls or disappears when told to.

    Stalls happen after the request reached the server: the write lands, the answer comes too late, so the
    client retries a request that already took effect (the nastiest kind)."""

    def __init__(self, upstream: str, port: int) -> None:
        host, _, upstream_port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(upstream_port))
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.faults: list[_Fault] = []
        self.rules: list[_Every] = []
        self.injected: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server: _Server | None = None
        self.start()

    def start(self) -> None:
        """Listen (again) on the same port."""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._take(self.command)
                if fault and fault.status:
                    return self._error(fault.status)
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                if fault and fault.stall:
                    time.sleep(fault.stall)
                self.send_response(answer.status, answer.reason)
                for key, value in answer.getheaders():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                length_header = answer.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length_header or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, status: int) -> None:
                body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{S3_ERRORS.get(status, 'Error')}"
                        f"</Code><Message>injected by the test proxy</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = handle_any

        self.server = _Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True).start()

    def stop(self) -> None:
        """An outage: stop listening; new connections are refused until start()."""
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server.cut_all()
            self.server = None
            self.injected["outage"] += 1

    def fail(self, count: int, status: int = 503, methods: set[str] | None = None) -> None:
        """Answer the next `count` matching requests with `status`, without passing them on."""
        with self.lock:
            self.faults.append(_Fault(count, methods, status=status))

    def stall(self, count: int, seconds: float, methods: set[str] | None = None) -> None:
        """Hold the answers to the next `count` matching requests for `seconds`, after the server acted on them."""
        with self.lock:
            self.faults.append(_Fault(count, methods, stall=seconds))

    def fail_every(self, every: int, burst: Callable[[], int], statuses: Callable[[], int], methods: set[str]) -> None:
        """From now on, after every `every` matching requests that pass, fail the next `burst()` of them."""
        with self.lock:
            self.rules.append(_Every(every, burst, statuses, methods))

    def _take(self, method: str) -> _Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.count > 0 and (fault.methods is None or method in fault.methods):
                    fault.count -= 1
                    self.injected[f"{fault.status or 'stall'} {method}"] += 1
                    self.faults = [f for f in self.faults if f.count > 0]
                    return fault
            for rule in self.rules:
                found = rule.take(method)
                if found:
                    self.injected[f"{found.status} {method}"] += 1
                    return found
        return None


class CommitCutter:
    """A TCP proxy in front of PostgreSQL that drops the connection carrying COMMIT number `first`, then every
    `every`-th after it: in turn after the server got it (it landed, but the client never hears so) and before
    (the transaction is rolled back). Either way the client only knows that its connection died mid-commit."""

    def __init__(self, database_url: str, every: int = 5, first: int | None = None) -> None:
        target = make_url(database_url)
        self.upstream = (target.host or "127.0.0.1", target.port or 5432)
        self.every, self.first = every, every if first is None else first
        self.commits = 0
        self.cut: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        # the same database through this proxy, in clear so that the COMMITs can be seen
        self.url = target.set(host="127.0.0.1", port=self.port).update_query_dict({"sslmode": "disable"}) \
            .render_as_string(hide_password=False)
        threading.Thread(target=self._accept, name="commit-cutter", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            cutting = threading.Event()
            threading.Thread(target=self._pump, args=(client, server, cutting, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, cutting, False), daemon=True).start()

    def _decide(self, chunk: bytes) -> str | None:
        if b"COMMIT" not in chunk:
            return None
        with self.lock:
            self.commits += 1
            n = self.commits - self.first
            if n < 0 or n % self.every:
                return None
            when = "before" if (n // self.every) % 2 else "after"
            self.cut[when] += 1
            return when

    def _pump(self, source: socket.socket, sink: socket.socket, cutting: threading.Event, from_client: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if cutting.is_set():
                    break
                cut = self._decide(chunk) if from_client else None
                if cut:
                    cutting.set()  # from now on nothing the server says reaches the client
                if cut == "after":
                    sink.sendall(chunk)
                    time.sleep(0.2)  # the server commits; its answer is never delivered
                if cut:
                    break
                sink.sendall(chunk)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()
