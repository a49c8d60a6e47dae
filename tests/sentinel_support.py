"""A Redis primary, its replica and three Sentinels on free ports, for failover tests.

Sentinel's timing is small (down-after-milliseconds 1000) so a SIGKILLed primary is replaced
in a few seconds. Passwords on both Redis and Sentinel, as production sets them; with `tls`
(tests.tls_support) every server and Sentinel speaks TLS only and asks for a client certificate,
and `url` is a `rediss+sentinel://` URL with the client's certificate options."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import redis

from tests.support import free_port, redis_server_binary, wait_for
from tests.tls_support import TlsFiles

SERVICE = "mymaster"
REDIS_PASSWORD = "redis-secret"
SENTINEL_PASSWORD = "sentinel-secret"
DOWN_AFTER_MS = 1000


class SentinelCluster:
    def __init__(self, tls: TlsFiles | None = None) -> None:
        self.tls = tls
        self.dir = Path(tempfile.mkdtemp(prefix="jobyard-sentinel-"))
        self.primary_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        if self.tls is None:
            query = f"sentinel_password={SENTINEL_PASSWORD}"
            return f"redis+sentinel://:{REDIS_PASSWORD}@{hosts}/{SERVICE}/0?{query}"
        query = self.tls.url_query(sentinel_password=SENTINEL_PASSWORD)
        return f"rediss+sentinel://:{REDIS_PASSWORD}@{hosts}/{SERVICE}/0?{query}"

    def start(self) -> SentinelCluster:
        self._redis(self.primary_port)
        self._redis(self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port))
        wait_for(
            lambda: self.node(self.replica_port).info("replication")["master_link_status"] == "up"
        )
        for port in self.sentinel_ports:
            self._sentinel(port)
        wait_for(self._sentinels_agree, timeout=30)
        return self

    def _redis(self, port: int, *extra: str) -> None:
        self._spawn(port, [
            redis_server_binary(), *self._listen(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.dir), "--dbfilename", f"{port}.rdb",
            "--requirepass", REDIS_PASSWORD, "--masterauth", REDIS_PASSWORD,
            # A replica's full sync at once, not after the default 5 s wait for others.
            "--repl-diskless-sync-delay", "0", *extra,
        ])  # fmt: skip
        wait_for(lambda: _pings(self.node(port)))

    def _sentinel(self, port: int) -> None:
        config = self.dir / f"sentinel-{port}.conf"
        config.write_text(
            f"bind 127.0.0.1\ndir {self.dir}\n"
            f"requirepass {SENTINEL_PASSWORD}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2\n"
            f"sentinel auth-pass {SERVICE} {REDIS_PASSWORD}\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} 3000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self._spawn(port, [redis_server_binary(), str(config), "--sentinel", *self._listen(port)])
        wait_for(lambda: _pings(self.sentinel(port)))

    def _listen(self, port: int) -> list[str]:
        return ["--port", str(port)] if self.tls is None else self.tls.server_args(port)

    def _client(self, port: int, password: str) -> redis.Redis:
        tls: dict[str, Any] = {} if self.tls is None else self.tls.client_options()
        return redis.Redis(port=port, password=password, socket_timeout=2,
                           socket_connect_timeout=0.5, **tls)  # fmt: skip

    def _spawn(self, port: int, argv: list[str]) -> None:
        self.procs[port] = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _sentinels_agree(self) -> bool:
        """Every Sentinel knows the replica and the other two Sentinels."""
        for port in self.sentinel_ports:
            state = self.sentinel(port).sentinel_master(SERVICE)
            if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                return False
        return True

    def node(self, port: int) -> redis.Redis:
        return self._client(port, REDIS_PASSWORD)

    def sentinel(self, port: int) -> redis.Redis:
        return self._client(port, SENTINEL_PASSWORD)

    def primary(self) -> int:
        """The port Sentinel names as primary now."""
        return int(
            self.sentinel(self.sentinel_ports[0]).sentinel_get_master_addr_by_name(SERVICE)[1]
        )

    def client(self) -> redis.Redis:
        """The current primary (as tests.engines.Engines expects of its Redis)."""
        return self.node(self.primary())

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.kill()
        proc.wait()

    def restart(self, port: int) -> None:
        """A killed node back, empty (no persistence), as a primary of its own: what a crashed
        primary is when it returns; the Sentinels make it a replica of the one they promoted."""
        self._redis(port)

    def replica_of_primary(self, port: int) -> bool:
        """Whether `port` replicates the current primary with its link up."""
        try:
            info = self.node(port).info("replication")
        except redis.RedisError:
            return False
        return (
            info.get("role") == "slave"
            and int(info.get("master_port", 0)) == self.primary()
            and info.get("master_link_status") == "up"
        )

    def rejoin(self, port: int, patience: float = 15.0) -> bool:
        """Until the restarted `port` replicates the primary: the Sentinels convert it; if they
        have not within `patience` seconds, it is told to (REPLICAOF), as an operator would.
        Whether the Sentinels did it themselves."""
        try:
            wait_for(lambda: self.replica_of_primary(port), timeout=patience, interval=0.2)
            return True
        except AssertionError:
            self.node(port).replicaof("127.0.0.1", self.primary())
            wait_for(lambda: self.replica_of_primary(port), timeout=60, interval=0.2)
            return False

    def cut_replication(self, replica: int) -> None:
        """The replica's link to its primary cut and kept down (it cannot authenticate again)
        until `mend_replication`: it misses every write from now on."""
        node = self.node(replica)
        node.config_set("masterauth", "not-the-password")
        node.client_kill_filter(_type="master")

    def mend_replication(self, node_port: int) -> None:
        self.node(node_port).config_set("masterauth", REDIS_PASSWORD)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
