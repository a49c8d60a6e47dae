"""REDIS_URL naming a Sentinel-watched primary: parsed with clear errors, followed through a
failover by dispatch and a real worker, READONLY and NOSCRIPT survived (issue 31)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from jobyard.dispatcher import dispatch_job, reset_dispatcher
from jobyard.queue.client import DemotedPrimary, make_client, reset_clients
from jobyard.queue.redis_url import RedisUrlError, check_redis_url, parse_sentinel_url
from tests.engines import Engines
from tests.sentinel_support import DOWN_AFTER_MS, SentinelCluster
from tests.support import ROOT, wait_for

#: Seconds after Sentinel's down-after-milliseconds within which dispatch and workers must use
#: the promoted replica (issue 31).
FOLLOW_BOUND = DOWN_AFTER_MS / 1000 + 5


# -- the URL --------------------------------------------------------------------------------


def test_a_sentinel_url_gives_hosts_service_db_and_both_passwords() -> None:
    parsed = parse_sentinel_url(
        "rediss+sentinel://app:p%40ss@h1:26379,h2,[::1]:26380/mymaster/3"
        "?sentinel_password=s3&sentinel_username=watch&ssl_cert_reqs=none&ssl_check_hostname=no"
    )
    assert parsed.sentinels == [("h1", 26379), ("h2", 26379), ("::1", 26380)]
    assert (parsed.service, parsed.db) == ("mymaster", 3)
    assert (parsed.username, parsed.password) == ("app", "p@ss")
    assert (parsed.sentinel_username, parsed.sentinel_password) == ("watch", "s3")
    assert parsed.ssl is True
    assert parsed.ssl_options == {"ssl_cert_reqs": "none", "ssl_check_hostname": False}


def test_a_sentinel_url_without_db_or_auth_uses_db_0() -> None:
    parsed = parse_sentinel_url("redis+sentinel://h1:26379/mymaster")
    assert (parsed.db, parsed.password, parsed.ssl) == (0, None, False)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h1:26379", "path is /<service name>[/<db>]"),
        ("redis+sentinel://h1:26379/", "path is /<service name>[/<db>]"),
        ("redis+sentinel://h1:26379/mymaster/zero", "database 'zero' is not a number"),
        ("redis+sentinel://h1:26379/mymaster/0/x", "path is /<service name>[/<db>]"),
        ("redis+sentinel:///mymaster/0", "names no Sentinel host"),
        ("redis+sentinel://h1:port/mymaster", "bad port"),
        ("redis+sentinel://h1:99999/mymaster", "bad port"),
        ("redis+sentinel://h1/mymaster?sentinel_pasword=x", "unknown Sentinel URL option"),
        ("redis+sentinel://h1/m?ssl_check_hostname=maybe", "is not true or false"),
        ("http://h1:6379/0", "REDIS_URL must start with redis://"),
    ],
)
def test_a_malformed_url_says_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(RedisUrlError, match=says.replace("[", r"\[").replace("]", r"\]")):
        check_redis_url(url)
    with pytest.raises(RedisUrlError):
        make_client(url)


def test_an_error_never_shows_a_password() -> None:
    with pytest.raises(RedisUrlError) as caught:
        check_redis_url("redis+sentinel://:hunter2@h1/m/x?sentinel_password=swordfish")
    assert "hunter2" not in str(caught.value) and "swordfish" not in str(caught.value)


# -- real Sentinels -------------------------------------------------------------------------


@pytest.fixture
def sentinel_cluster() -> Iterator[SentinelCluster]:
    cluster = SentinelCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def sentinel_engines(
    jobyard_env: dict[str, str],
    sentinel_cluster: SentinelCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Engines]:
    """Every process of the test reaches Redis through the Sentinels."""
    monkeypatch.setenv("REDIS_URL", sentinel_cluster.url)
    reset_dispatcher()
    reset_clients()
    engines = Engines(sentinel_cluster)  # type: ignore[arg-type] - its client() is the primary's
    yield engines
    engines.close()


def test_dispatch_and_a_worker_follow_the_promoted_replica(
    sentinel_engines: Engines, sentinel_cluster: SentinelCluster
) -> None:
    engines = sentinel_engines
    engines.start_temporal_worker()
    engines.start_worker(queues="default")
    before = dispatch_job("system.echo", {"n": "before"})
    assert before.engine == "dramatiq"
    assert engines.wait(before.job_id).engine == "dramatiq"

    killed = time.monotonic()
    sentinel_cluster.kill(sentinel_cluster.primary_port)
    meanwhile = []

    def on_dramatiq_again() -> object:
        handle = dispatch_job("system.echo", {"n": "after"})
        if handle.engine != "dramatiq":
            meanwhile.append(handle)
            return None
        return handle

    after = wait_for(on_dramatiq_again, timeout=60, interval=0.1)
    dispatched_in = time.monotonic() - killed
    status = engines.wait(after.job_id, timeout=60)
    ran_in = time.monotonic() - killed
    print(
        f"after SIGKILL of the primary: dispatch on Dramatiq in {dispatched_in:.2f} s, "
        f"the worker ran its job in {ran_in:.2f} s; {len(meanwhile)} went to Temporal"
    )

    assert sentinel_cluster.primary() == sentinel_cluster.replica_port
    assert (status.engine, status.state) == ("dramatiq", "succeeded")
    assert ran_in < FOLLOW_BOUND, engines.logs()
    assert meanwhile, "dispatch during the failover should have fallen back to Temporal"
    assert {h.engine for h in meanwhile} == {"temporal"}
    for handle in meanwhile:
        assert engines.wait(handle.job_id).state == "succeeded"

    # The promoted replica loses its scripts (SCRIPT FLUSH, as a restarted or new server has
    # none): the dispatcher and the worker load them again and the job runs once.
    sentinel_cluster.client().script_flush()
    flushed = dispatch_job("system.echo", {"n": "flushed"})
    assert flushed.engine == "dramatiq"
    status = engines.wait(flushed.job_id, timeout=30)
    assert (status.engine, status.state, status.attempts) == ("dramatiq", "succeeded", 1)


def test_the_cli_dispatches_and_reads_a_job_through_sentinel(
    sentinel_engines: Engines, sentinel_cluster: SentinelCluster
) -> None:
    """`jobyard dispatch` and `jobyard status` as separate processes on a sentinel URL."""
    sentinel_engines.start_worker(queues="default")
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # REDIS_URL: the sentinel URL (the fixture)

    def jobyard(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "jobyard.cli", *args],
            env=env, capture_output=True, text=True, timeout=90, cwd=ROOT,
        )  # fmt: skip

    dispatched = jobyard("dispatch", "system.echo", "--payload", '{"via": "sentinel"}')
    assert dispatched.returncode == 0, dispatched.stderr
    handle = json.loads(dispatched.stdout)
    assert handle["engine"] == "dramatiq"

    def succeeded() -> dict | None:
        done = jobyard("status", handle["job_id"])
        status = json.loads(done.stdout) if done.returncode == 0 else {}
        return status if status.get("state") == "succeeded" else None

    status = wait_for(succeeded, timeout=60, interval=0.5)
    assert status["result"] == {"via": "sentinel"}


def test_a_demoted_primary_is_left_and_sentinel_asked_again(
    sentinel_cluster: SentinelCluster,
) -> None:
    client = make_client(sentinel_cluster.url, timeout=2.0)
    connection = client.connection_pool.get_connection()
    # The connection still talks to a server that is a replica now (as after a failover that
    # demoted its primary): READONLY, nothing written, and the connection dropped.
    connection.disconnect()
    connection.connect_to(("127.0.0.1", sentinel_cluster.replica_port))
    connection.send_command("SET", "k", "v")
    with pytest.raises(DemotedPrimary, match="demoted"):
        connection.read_response()
    assert connection._sock is None
    # Its next connect asks Sentinel, and reaches the primary.
    connection.send_command("SET", "k", "v")
    assert connection.read_response() == b"OK"
    assert connection.port == sentinel_cluster.primary_port
    client.connection_pool.release(connection)
    assert client.get("k") == b"v"


def test_a_replica_behind_a_plain_url_refuses_writes_as_demoted(
    sentinel_cluster: SentinelCluster,
) -> None:
    """A managed endpoint that fails over behind DNS: READONLY drops the connection, so the
    next connect resolves the name again."""
    from tests.sentinel_support import REDIS_PASSWORD

    client = make_client(
        f"redis://:{REDIS_PASSWORD}@127.0.0.1:{sentinel_cluster.replica_port}/0", timeout=2.0
    )
    with pytest.raises(DemotedPrimary):
        client.set("k", "v")
    assert isinstance(DemotedPrimary("x"), redis.ConnectionError)


def test_the_cli_names_a_malformed_sentinel_url(tmp_path: object) -> None:
    env = dict(os.environ, REDIS_URL="redis+sentinel://h1:26379", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "jobyard.cli", "worker", "--queues", "default"],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode != 0
    assert "REDIS_URL is malformed" in done.stderr + done.stdout
    assert "/<service name>[/<db>]" in done.stderr + done.stdout


def test_a_tls_sentinel_url_speaks_tls_to_sentinels_and_redis() -> None:
    """No TLS server is started here (the check is of what the client is built with)."""
    client = make_client(
        "rediss+sentinel://:pw@h1:26379/mymaster/2?sentinel_password=sp&ssl_ca_certs=/ca.pem",
        timeout=1.0,
    )
    pool = client.connection_pool
    assert issubclass(pool.connection_class, redis.SSLConnection)
    assert (pool.connection_kwargs["ssl_ca_certs"], pool.connection_kwargs["db"]) == ("/ca.pem", 2)
    assert pool.connection_kwargs["password"] == "pw"
    sentinel = pool.sentinel_manager.sentinels[0].connection_pool
    assert issubclass(sentinel.connection_class, redis.SSLConnection)
    assert sentinel.connection_kwargs["password"] == "sp"
