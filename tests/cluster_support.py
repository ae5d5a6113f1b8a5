"""A private Redis Cluster on loopback for tests (issue 18): three masters, three replicas.

Six ``redis-server`` processes (``EmbeddedRedis`` with the cluster options: ``--cluster-enabled
yes``, a nodes file of their own, ``--cluster-node-timeout 1000`` so a dead master's replica
takes over within a few seconds) on free loopback ports below 55000 whose bus ports (P + 10000)
are free too, joined by ``redis-cli --cluster create … --cluster-replicas 1 --cluster-yes``.
``start()`` returns once every node says ``cluster_state:ok``, all 16384 slots are served, every
node sees three masters and three replicas and every replica's link to its master is up::

    cluster = PrivateCluster()
    cluster.start()
    try:
        client = RedisCluster.from_url(cluster.url)
        killed = cluster.kill_master_of("some-key")  # SIGKILL by PID
        promoted = await cluster.wait_promoted(killed)  # its replica serves its slots
    finally:
        cluster.stop()  # every PID, the temp dir too

The topology is read from the nodes themselves (``CLUSTER NODES``/``CLUSTER INFO`` through
redis-py's sync client, one-second timeouts: loopback answers in microseconds or not at all).
Every wait is bounded; a failed wait names what it was waiting for and ends with the nodes' log
tails. Processes are stopped by their PIDs, also when ``start()`` fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis as redis_sync
from redis.crc import key_slot

from regstream.realtime.embedded import EmbeddedRedis, find_server_binary
from tests.support import free_port, wait_until

SLOTS = 16384
BUS_OFFSET = 10000  # Redis's default cluster bus port: the data port + 10000
NODE_TIMEOUT_MS = 1000
MAX_PORT = 55000  # every test server's data port stays below this


@dataclass(frozen=True)
class NodeInfo:
    """One node as it sees itself: ``role`` is ``master``, ``replica`` or ``dead`` (killed)."""

    port: int
    pid: int | None
    role: str
    node_id: str
    master_id: str | None  # a replica's master
    slots: tuple[tuple[int, int], ...]  # a master's slot ranges, inclusive

    def serves(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


class ClusterNotReady(AssertionError):
    pass


class PrivateCluster:
    """``masters`` masters with ``replicas`` replicas each, on loopback, in a temp dir."""

    def __init__(self, *, masters: int = 3, replicas: int = 1) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.size = masters * (1 + replicas)
        self.replicas = replicas
        self.directory: Path | None = None
        self.servers: dict[int, EmbeddedRedis] = {}  # by data port, in start order
        self.paused: set[int] = set()  # ports of nodes stopped by SIGSTOP (``pause``)

    # --- life cycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, form the cluster and wait (at most ``timeout`` s) until it is ok."""
        binary, cli = find_server_binary(), shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not on PATH (Debian: redis-tools)")
        self.directory = Path(tempfile.mkdtemp(prefix="regstream-cluster-"))
        try:
            for port in self._ports():
                server = EmbeddedRedis(
                    self.directory / str(port), port=port, binary=binary,
                    extra_args=["--cluster-enabled", "yes",
                                "--cluster-config-file", f"nodes-{port}.conf",
                                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                                # the replicas sync at once (no 5 s wait for more replicas)
                                "--repl-diskless-sync-delay", "0"],
                )  # fmt: skip
                self.servers[port] = server
                server.start()
            addresses = [f"127.0.0.1:{port}" for port in self.servers]
            created = subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas",
                 str(self.replicas), "--cluster-yes"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False,
            )  # fmt: skip
            if created.returncode != 0:
                out = (created.stdout + created.stderr).decode(errors="replace")[-1500:]
                raise RuntimeError(f"redis-cli --cluster create failed:\n{out}")
            self._wait(self._formed, timeout, "the cluster to form")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node by its PID (SIGTERM, then SIGKILL) and remove the temp dir."""
        self.resume(*self.paused)  # a stopped process would sit on SIGTERM until SIGKILL
        for server in self.servers.values():
            server.stop()
        self.servers.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def _ports(self) -> list[int]:
        """Distinct data ports below 55000 whose bus ports are free and no other node's port."""
        ports: list[int] = []
        taken: set[int] = set()
        for _ in range(self.size * 20):
            port = free_port(below=MAX_PORT, also_free=BUS_OFFSET)
            if {port, port + BUS_OFFSET} & taken:
                continue
            ports.append(port)
            taken |= {port, port + BUS_OFFSET}
            if len(ports) == self.size:
                return ports
        raise RuntimeError(f"no {self.size} distinct free port pairs below {MAX_PORT}")

    # --- reading the topology -----------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>`` of the first master (any node is a startup node)."""
        return f"redis://127.0.0.1:{self.masters()[0].port}"

    def client(self, port: int) -> redis_sync.Redis:
        return redis_sync.Redis(
            host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1
        )

    def alive(self) -> list[int]:
        return [port for port, server in self.servers.items() if _running(server)]

    def nodes(self) -> list[NodeInfo]:
        """Every node started, in start order, with its PID and its role as it sees itself."""
        found = []
        for port, server in self.servers.items():
            pid = server.process.pid if server.process is not None else None
            view = self._view(port) if _running(server) else None
            me = next((n for n in (view or {}).values() if "myself" in n["flags"]), None)
            if me is None:
                found.append(NodeInfo(port, pid, "dead", "", None, ()))
                continue
            found.append(_node_info(port, pid, me))
        return found

    def masters(self) -> list[NodeInfo]:
        return [node for node in self.nodes() if node.role == "master"]

    def name_per_master(
        self, prefix: str, key: Callable[[str], str] = str, *, tries: int = 10_000
    ) -> dict[int, str]:
        """A name for each master (by port) such that ``key(name)`` hashes to a slot it serves:
        channels, identifiers or ids that put a test's keys on every shard (or on a chosen one)."""
        masters = self.masters()
        names: dict[int, str] = {}
        for i in range(tries):
            name = f"{prefix}-{i}"
            slot = _slot(key(name))
            owner = next(m for m in masters if m.serves(slot))
            names.setdefault(owner.port, name)
            if len(names) == len(masters):
                return names
        raise AssertionError(f"no name per master in {tries} tries")

    def master_of(self, key_or_slot: str | bytes | int) -> NodeInfo:
        slot = _slot(key_or_slot)
        for node in self.masters():
            if node.serves(slot):
                return node
        raise ClusterNotReady(f"no live master serves slot {slot}")

    def _view(self, port: int) -> dict[str, dict[str, Any]] | None:
        """``CLUSTER NODES`` as ``port`` sees it (redis-py's parsed form), None if it is down."""
        try:
            with self.client(port) as client:
                return dict(client.execute_command("CLUSTER NODES"))
        except (redis_sync.RedisError, OSError):
            return None

    def _state_ok(self, port: int) -> bool:
        try:
            with self.client(port) as client:
                info = client.execute_command("CLUSTER INFO")
        except (redis_sync.RedisError, OSError):
            return False
        return bool(info["cluster_state"] == "ok" and int(info["cluster_slots_ok"]) == SLOTS)

    # --- waiting ------------------------------------------------------------------------------

    def _formed(self) -> bool:
        """Every node ok and seeing every node, the masters' slots cover all 16384, every
        replica's link up."""
        for port in self.servers:
            view = self._view(port)
            if view is None or not self._state_ok(port) or len(view) != self.size:
                return False
            if any("fail" in node["flags"] or not node["connected"] for node in view.values()):
                return False
        masters = self.masters()
        if sum(last - first + 1 for node in masters for first, last in node.slots) != SLOTS:
            return False
        replicas = [node for node in self.nodes() if node.role == "replica"]
        return len(replicas) == self.size - len(masters) and all(
            self._link_up(node.port) for node in replicas
        )

    def _link_up(self, port: int) -> bool:
        try:
            with self.client(port) as client:
                return bool(client.info("replication").get("master_link_status") == "up")
        except (redis_sync.RedisError, OSError):
            return False

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """``wait_until`` from synchronous code (a fixture): its own short-lived event loop."""
        try:
            asyncio.run(wait_until(predicate, timeout=timeout, interval=0.1, what=what))
        except AssertionError as exc:
            raise ClusterNotReady(f"{exc}\n{self.log_tails()}") from None

    def log_tails(self, size: int = 600) -> str:
        tails = []
        for port, server in self.servers.items():
            log = server.directory / "redis.log"
            text = log.read_text(errors="replace")[-size:] if log.exists() else "(no log)"
            tails.append(f"--- node {port} ---\n{text}")
        return "\n".join(tails)

    # --- faults -------------------------------------------------------------------------------

    def kill_master_of(self, key_or_slot: str | bytes | int) -> NodeInfo:
        """SIGKILL (by PID) the master serving this key's (or this) slot; returns it as it was."""
        victim = self.master_of(key_or_slot)
        self.servers[victim.port].kill()
        return victim

    def pause(self, *ports: int) -> None:
        """SIGSTOP these nodes (by PID): a paused replica cannot take over, so a test decides
        when a failover may begin (``resume``) instead of racing the node timeout."""
        for port in ports:
            process = self.servers[port].process
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGSTOP)
                self.paused.add(port)

    def resume(self, *ports: int) -> None:
        """SIGCONT nodes ``pause`` stopped."""
        for port in ports:
            process = self.servers[port].process
            if port in self.paused and process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
            self.paused.discard(port)

    def replicas_of(self, master: NodeInfo) -> list[NodeInfo]:
        return [node for node in self.nodes() if node.master_id == master.node_id]

    async def wait_promoted(self, killed: NodeInfo, timeout: float = 30.0) -> NodeInfo:
        """Wait (bounded) until one of ``killed``'s replicas serves all its slots as a master and
        every live node says ``cluster_state:ok``; returns the promoted node."""
        promoted: list[NodeInfo] = []

        def took_over() -> bool:
            survivors = self.alive()
            if not all(self._state_ok(port) for port in survivors):
                return False
            for node in self.masters():
                if node.port != killed.port and set(killed.slots) <= set(node.slots):
                    promoted[:] = [node]
                    return self._agreed(node, survivors)
            return False

        try:
            await wait_until(took_over, timeout=timeout, interval=0.1,
                             what=f"a replica of node {killed.port} to serve its slots")  # fmt: skip
        except AssertionError as exc:
            raise ClusterNotReady(f"{exc}\n{self.log_tails()}") from None
        return promoted[0]

    def _agreed(self, master: NodeInfo, survivors: list[int]) -> bool:
        """Every live node sees ``master`` as a healthy master (a client may ask any of them)."""
        for port in survivors:
            view = self._view(port) or {}
            entry = next((n for n in view.values() if n["node_id"] == master.node_id), None)
            if entry is None or "master" not in entry["flags"] or "fail" in entry["flags"]:
                return False
        return True


def _running(server: EmbeddedRedis) -> bool:
    return server.process is not None and server.process.poll() is None


def _node_info(port: int, pid: int | None, me: dict[str, Any]) -> NodeInfo:
    role = "master" if "master" in me["flags"] else "replica"
    slots = tuple(
        (int(item[0]), int(item[-1])) for item in me["slots"]
    )  # [first, last] or [slot] for one slot
    master_id = None if me["master_id"] == "-" else str(me["master_id"])
    return NodeInfo(port, pid, role, str(me["node_id"]), master_id, slots)


def _slot(key_or_slot: str | bytes | int) -> int:
    if isinstance(key_or_slot, int):
        if not 0 <= key_or_slot < SLOTS:
            raise ValueError(f"a slot is 0..{SLOTS - 1}, not {key_or_slot}")
        return key_or_slot
    key = key_or_slot.encode() if isinstance(key_or_slot, str) else key_or_slot
    return int(key_slot(key))
