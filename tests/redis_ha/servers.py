"""Real Redis deployments for the tests, started as child processes on free loopback
ports and killed afterwards: a lone server, a master with a replica watched by three
sentinels, and a three-master cluster. Debian's redis-server (and redis-sentinel,
else `redis-server --sentinel`, the same program); every wait is bounded."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

SERVICE = "mymaster"
DOWN_AFTER_MS = 500  # a sentinel holds a master down after this long without an answer
FAILOVER_TIMEOUT_MS = 3000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def binary(name: str) -> str:
    """The path of a Redis program; skip without it, except under CI=true (fail)."""
    found = shutil.which(name)
    if found is None:
        reason = f"{name} is not installed (Debian: apt-get install redis-server redis-sentinel)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires it")
        pytest.skip(reason)
    return found


def wait_for(what: str, check: Callable[[], bool], timeout: float, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s" + (f" ({last})" if last else ""))


def admin(port: int) -> redis.Redis:
    """A plain client for the test's own checks, with short timeouts."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        decode_responses=True,
        socket_timeout=1,
        socket_connect_timeout=1,
    )


class Node:
    """One redis-server (or sentinel) process."""

    def __init__(self, tmp: Path, name: str, args: list[str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.dir / "log").open("ab")
        self.proc = subprocess.Popen(
            self.args,
            cwd=self.dir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log()}")
            return bool(admin(self.port).ping())

        wait_for(f"{self.name} on port {self.port}", answers, 10)

    def kill(self) -> None:
        """SIGKILL: the process dies at once, with nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        path = self.dir / "log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def server_args(port: int, directory: Path, *extra: str) -> list[str]:
    return [
        binary("redis-server"),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        str(directory),
        *extra,
    ]


class Server(Node):
    """A lone redis-server on a port that stays the same across restarts; `durable`:
    with an append-only file synced on every write, so that its data survive a
    restart."""

    def __init__(self, tmp: Path, name: str = "redis", *, durable: bool = False) -> None:
        port = free_port()
        args = server_args(port, tmp / name)
        if durable:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        super().__init__(tmp, name, args, port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class SentinelSet:
    """A master, one replica of it, and three sentinels watching it (quorum 2, the
    master held down after DOWN_AFTER_MS)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        mport, rport = free_port(), free_port()
        # (the master sends its data to a replica at once, not after 5 s)
        self.master = Node(
            tmp,
            "master",
            server_args(mport, tmp / "master", "--repl-diskless-sync-delay", "0"),
            mport,
        )
        self.replica = Node(
            tmp,
            "replica",
            server_args(
                rport,
                tmp / "replica",
                "--replicaof",
                "127.0.0.1",
                str(mport),
            ),
            rport,
        )
        self.sentinels: list[Node] = []
        for i in range(3):
            port = free_port()
            directory = tmp / f"sentinel{i}"
            directory.mkdir(parents=True, exist_ok=True)
            conf = directory / "sentinel.conf"  # a sentinel rewrites its own file
            conf.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                "daemonize no\n"
                f"dir {directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {mport} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            program = shutil.which("redis-sentinel")
            args = (
                [program, str(conf)]
                if program is not None
                else [binary("redis-server"), str(conf), "--sentinel"]
            )
            self.sentinels.append(Node(tmp, f"sentinel{i}", args, port))
        self.nodes = [self.master, self.replica, *self.sentinels]

    @property
    def hosts(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def store_config(self, prefix: str) -> dict[str, Any]:
        """The `store` section of a proxy on this deployment."""
        return {
            "backend": "redis",
            "url": "redis://127.0.0.1/0",
            "prefix": prefix,
            "sentinel": {"hosts": self.hosts, "service": SERVICE},
        }

    def start(self, failover: bool = True) -> None:
        """Start every process; with `failover`, wait until the sentinels could fail
        the master over (a few seconds: they find each other by hello messages every
        2 s)."""
        try:
            for node in self.nodes:
                node.start()
            wait_for(
                "the replica in sync",
                lambda: admin(self.replica.port).info("replication")["master_link_status"] == "up",
                10,
            )
            if not failover:
                return
            # each sentinel knows the replica and the two other sentinels: only then
            # can they agree that the master is down and elect one to fail it over
            for s in self.sentinels:
                wait_for(
                    f"sentinel {s.port} seeing the replica and its peers",
                    lambda s=s: self._sees_all(s.port),
                    15,
                    0.1,
                )
        except BaseException:
            self.stop()
            raise

    def _sees_all(self, port: int) -> bool:
        info: Any = admin(port).sentinel_master(SERVICE)
        return int(info["num-slaves"]) >= 1 and int(info["num-other-sentinels"]) >= 2

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers names it."""
        for s in self.sentinels:
            try:
                addr: Any = admin(s.port).sentinel_get_master_addr_by_name(SERVICE)
                return int(addr[1])
            except (redis.RedisError, OSError):
                continue
        raise AssertionError("no sentinel answers")

    def wait_failover(self, old: int, timeout: float = 15) -> int:
        """Wait until every sentinel names a master other than `old` and that master
        takes writes; its port."""

        def promoted() -> bool:
            for s in self.sentinels:
                addr: Any = admin(s.port).sentinel_get_master_addr_by_name(SERVICE)
                if int(addr[1]) == old:
                    return False
            role: Any = admin(self.master_port()).role()
            return bool(role[0] == "master")

        wait_for("the failover", promoted, timeout, 0.05)
        return self.master_port()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class Cluster:
    """Three masters, no replicas, every slot assigned (`redis-cli --cluster create`)."""

    def __init__(self, tmp: Path, masters: int = 3) -> None:
        self.nodes: list[Node] = []
        for i in range(masters):
            port = free_port()
            directory = tmp / f"node{i}"
            self.nodes.append(
                Node(
                    tmp,
                    f"node{i}",
                    server_args(
                        port,
                        directory,
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(directory / "nodes.conf"),
                        "--cluster-node-timeout",
                        "2000",
                        # the bus port given, not the default port + 10000 (which
                        # may be past 65535, or taken)
                        "--cluster-port",
                        str(free_port()),
                    ),
                    port,
                )
            )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def store_config(self, prefix: str) -> dict[str, Any]:
        return {"backend": "redis", "url": self.url, "prefix": prefix, "cluster": True}

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [
                    binary("redis-cli"),
                    "--cluster",
                    "create",
                    *[f"127.0.0.1:{n.port}" for n in self.nodes],
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=20,
            )
            for node in self.nodes:
                wait_for(
                    f"cluster node {node.port} ok",
                    lambda node=node: self._ok(node.port),
                    15,
                    0.1,
                )
        except BaseException:
            self.stop()
            raise

    def _ok(self, port: int) -> bool:
        info: Any = admin(port).cluster("info")
        return (
            str(info.get("cluster_state")) == "ok"
            and int(info.get("cluster_slots_ok", 0)) == 16384
            and int(info.get("cluster_known_nodes", 0)) == len(self.nodes)
        )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
