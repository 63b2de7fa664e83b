"""A PostgreSQL server of the tests' own: Debian's binaries (initdb, pg_ctl), a cluster
initialised into a temporary folder, listening on a free loopback port with its unix
socket in that folder, fsync off (an acknowledged commit still survives a crash of
the server, not one of the machine). PostgreSQL refuses to run as root, so under root
the cluster belongs to the `postgres` user (Debian's package makes it), else to
`nobody`; the folder is made outside pytest's (root-only) temporary tree for that.

`PostgresServer.start()`/`stop()` keep the port and the data, so a test can take the
server away and bring it back; `shared()` is the one server of a test session."""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import NoReturn

import pytest

USER = "chat"  # the cluster's superuser, trusted on loopback


def _skip_or_fail(reason: str) -> NoReturn:
    """Skip locally; fail under CI=true, where the PostgreSQL binaries must be installed."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: PostgreSQL is required)", pytrace=False)
    pytest.skip(reason)


def find_bindir() -> Path | None:
    """Where initdb, pg_ctl, postgres and psql are: beside the initdb on PATH, else in
    Debian's newest /usr/lib/postgresql/N/bin."""
    initdb = shutil.which("initdb")
    if initdb is not None:
        bindir = Path(initdb).resolve().parent  # Debian links them into /usr/local/bin
        if all((bindir / name).exists() for name in ("pg_ctl", "postgres", "psql")):
            return bindir

    def version(path: str) -> int:
        try:
            return int(Path(path).parts[-3])
        except ValueError:
            return 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    for initdb in reversed(found):
        bindir = Path(initdb).parent
        if all((bindir / name).exists() for name in ("pg_ctl", "postgres", "psql")):
            return bindir
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    def __init__(self, *, durable: bool = False) -> None:
        """`durable`: fsync as in production (the benchmark's); else off (the tests')."""
        self.durable = durable
        bindir = find_bindir()
        if bindir is None:
            _skip_or_fail(
                "PostgreSQL's initdb and pg_ctl are not installed (apt-get install postgresql)"
            )
        self.bindir = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="chat-proxy-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._uid: int | None = None
        self._gid: int | None = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                entry = pwd.getpwnam("nobody")
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._initdb()

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self._uid,
            group=self._gid,
            extra_groups=[] if self._uid is not None else None,
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _initdb(self) -> None:
        done = self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        if done.returncode != 0:
            raise AssertionError(f"initdb failed: {done.stdout}{done.stderr}")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id, while it runs."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} "
            "-c max_connections=200 -c shared_buffers=64MB"
        )
        if not self.durable:
            options += " -c fsync=off -c full_page_writes=off"
        done = self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        if done.returncode != 0:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise AssertionError(f"pg_ctl start failed: {done.stdout}{done.stderr}{text}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: clients are disconnected; `immediate`: as a crash)."""
        if not self.running:
            return
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def new_database(self) -> str:
        """A fresh, empty database; its DSN."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = self._run(
            "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            USER,
            "-d",
            database,
            "-c",
            sql,
        )
        if done.returncode != 0:
            raise AssertionError(f"psql failed: {done.stderr}")
        return done.stdout

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


_shared: PostgresServer | None = None


def shared() -> PostgresServer:
    """The server of this test session, started at its first use and removed when the
    session's process exits."""
    global _shared
    if _shared is None:
        server = PostgresServer()
        atexit.register(server.remove)
        server.start()
        _shared = server
    elif not _shared.running:
        _shared.start()
    return _shared
