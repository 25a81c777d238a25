"""Private test services started by the tests themselves: a Redis and an S3-compatible server (moto)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {seconds} s")


@contextmanager
def running(args: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, proc)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


class PrivateRedis:
    """A redis-server of the test's own on a free port, which the test may restart, with or without AOF."""

    def __init__(self, folder: Path, password: str | None = None) -> None:
        if shutil.which("redis-server") is None:
            message = "redis-server is not installed (apt-get install redis-server)"
            if os.environ.get("KILN_REQUIRE_SERVICES") == "1":
                pytest.fail(message)
            pytest.skip(message)
        self.folder, self.port, self.password = folder, free_port(), password
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, persistent: bool = False) -> None:
        with open(self.folder / "redis.log", "ab") as out:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "yes" if persistent else "no", "--appendfsync", "always",
                 "--dir", str(self.folder), *(["--requirepass", self.password] if self.password else [])],
                stdout=out, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: with AOF on, Redis writes it out before exiting
            self.proc.wait(timeout=20)

    def restart(self, persistent: bool = False) -> None:
        self.stop()
        self.start(persistent)


@contextmanager
def redis_server(folder: Path, persistent: bool = False, password: str | None = None) -> Iterator[PrivateRedis]:
    """A private redis-server on a free port; without `persistent` it keeps nothing on disk."""
    server = PrivateRedis(folder, password)
    server.start(persistent)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def s3_server(folder: Path) -> Iterator[str]:
    """moto's S3 server on a free loopback port: a real S3 HTTP endpoint, state in memory."""
    port = free_port()
    with running([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port, folder / "moto.log"):
        yield f"http://127.0.0.1:{port}"
