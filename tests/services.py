"""Private test services started by the tests themselves: a Redis and an S3-compatible server (moto)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
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
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {seconds} s")


@contextmanager
def running(args: list[str], port: int, log: Path,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_port(port, proc)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def unavailable(message: str) -> None:
    """Skip the test for a missing service; fail it where every service must be there (CI)."""
    if os.environ.get("KILN_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


class PrivateRedis:
    """A redis-server of the test's own on a free port, which the test may restart, with or without AOF; with
    `tls` (a folder holding ca.pem, server.pem, server.key) it speaks only TLS; `users` are ACL rules."""

    def __init__(self, folder: Path, password: str | None = None, tls: Path | None = None,
                 users: list[str] | None = None) -> None:
        if shutil.which("redis-server") is None:
            unavailable("redis-server is not installed (apt-get install redis-server)")
        self.folder, self.port, self.password, self.tls, self.users = folder, free_port(), password, tls, users or []
        self.url = self.url_for(f":{password}" if password else None)
        self.proc: subprocess.Popen[bytes] | None = None

    def url_for(self, credentials: str | None) -> str:
        """The broker URL for `user:password` (or `:password`), TLS parameters included."""
        scheme, query = "redis", ""
        if self.tls:
            scheme, query = "rediss", f"?ssl_cert_reqs=required&ssl_ca_certs={self.tls / 'ca.pem'}"
        return f"{scheme}://{f'{credentials}@' if credentials else ''}127.0.0.1:{self.port}/0{query}"

    def start(self, persistent: bool = False) -> None:
        listen = ["--port", str(self.port)]
        if self.tls:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls / "server.pem"),
                      "--tls-key-file", str(self.tls / "server.key"), "--tls-ca-cert-file", str(self.tls / "ca.pem"),
                      "--tls-auth-clients", "no"]
        with open(self.folder / "redis.log", "ab") as out:
            self.proc = subprocess.Popen(
                ["redis-server", *listen, "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "yes" if persistent else "no", "--appendfsync", "always",
                 "--dir", str(self.folder), *(["--requirepass", self.password] if self.password else []),
                 *[arg for rule in self.users for arg in ("--user", *rule.split())]],
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
def redis_server(folder: Path, persistent: bool = False, password: str | None = None, tls: Path | None = None,
                 users: list[str] | None = None) -> Iterator[PrivateRedis]:
    """A private redis-server on a free port; without `persistent` it keeps nothing on disk."""
    server = PrivateRedis(folder, password, tls, users)
    server.start(persistent)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def s3_server(folder: Path, enforce_iam_after: int | None = None) -> Iterator[str]:
    """moto's S3 server on a free loopback port: a real S3 HTTP endpoint, state in memory. With
    `enforce_iam_after`, every request after that many is checked against the caller's IAM policies."""
    port = free_port()
    env = None if enforce_iam_after is None else {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(enforce_iam_after)}
    with running([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port, folder / "moto.log", env):
        yield f"http://127.0.0.1:{port}"


def make_certificates(folder: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost, as PEM files in `folder`."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    folder.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    cert.private_key_pem.write_to_path(str(folder / "server.key"))
    return folder


@contextmanager
def postgres_tls_server(tls: Path) -> Iterator[str]:
    """A PostgreSQL cluster of the test's own that accepts TLS connections only; yields a verify-full URL.
    As root it runs as the `postgres` system user (PostgreSQL refuses to run as root)."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    initdb = shutil.which("initdb") or (str(binaries[-1]) if binaries else None)
    if initdb is None:
        unavailable("PostgreSQL's initdb is not installed (apt-get install postgresql)")
    assert initdb is not None
    postgres = str(Path(initdb).with_name("postgres"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="kiln-pg-"))  # outside pytest's root-only tmp tree
    try:
        for name in ("server.pem", "server.key"):
            shutil.copy(tls / name, folder / name)
        (folder / "server.key").chmod(0o600)
        if as_user:
            shutil.chown(folder, "postgres")
            for name in ("server.pem", "server.key"):
                shutil.chown(folder / name, "postgres")
        subprocess.run([*as_user, initdb, "-D", str(folder / "data"), "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True)
        hba = folder / "data" / "pg_hba.conf"  # TCP only over TLS
        hba.write_text("local all all trust\nhostssl all all 127.0.0.1/32 trust\n")
        port = free_port()
        args = [*as_user, postgres, "-D", str(folder / "data"), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
                "-c", f"unix_socket_directories={folder}", "-c", "ssl=on", "-c", "fsync=off",
                "-c", f"ssl_cert_file={folder / 'server.pem'}", "-c", f"ssl_key_file={folder / 'server.key'}"]
        with running(args, port, tls / "postgres.log"):
            yield (f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
                   f"?sslmode=verify-full&sslrootcert={tls / 'ca.pem'}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
