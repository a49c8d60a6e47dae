"""REDIS_URL naming a Sentinel-watched primary: parsed with clear errors, followed through a
failover by dispatch and a real worker, READONLY and NOSCRIPT survived (issue 31)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from jobyard.dispatcher import dispatch_job, reset_dispatcher
from jobyard.queue import keys
from jobyard.queue.client import DemotedPrimary, make_client, reset_clients
from jobyard.queue.redis_url import RedisUrlError, check_redis_url, parse_sentinel_url
from tests.engines import Engines
from tests.sentinel_support import DOWN_AFTER_MS, SentinelCluster
from tests.support import ROOT, free_port, redis_server_binary, wait_for
from tests.tls_support import TlsFiles, TlsRedisServer, tls_built_in

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


def test_passwords_percent_encoded_as_the_readme_says_read_back_whole() -> None:
    reserved = "p@ss:w/rd&+%"
    encoded = "p%40ss%3Aw%2Frd%26%2B%25"
    parsed = parse_sentinel_url(f"redis+sentinel://:{encoded}@h1/m?sentinel_password={encoded}")
    assert (parsed.password, parsed.sentinel_password) == (reserved, reserved)
    plain = make_client(f"redis://:{encoded}@h1:6379/0").connection_pool.connection_kwargs
    assert plain["password"] == reserved


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
        # TLS options: on a URL with TLS only, files that are there, values redis-py takes
        ("redis+sentinel://h1/m?ssl_ca_certs=/etc/hostname", "given to a URL without TLS"),
        ("redis://h1:6379/0?ssl_certfile=/etc/hostname", "given to a URL without TLS"),
        ("rediss+sentinel://h1/m?ssl_cert_reqs=Required", "is none of required, optional, none"),
        ("rediss://h1:6379/0?ssl_ca_certs=/no/such/ca.pem", "ssl_ca_certs: no such file"),
        ("rediss+sentinel://h1/m?ssl_ca_path=/no/such", "ssl_ca_path: no such folder"),
        ("rediss://h1:6379/0?ssl_ca_cert=/etc/hostname", "unknown TLS option 'ssl_ca_cert'"),
        ("rediss://h1:6379/0?ssl_check_hostname=maybe", "is not true or false"),
        # a plain URL's other options, as redis-py reads them
        ("redis://h1:6379/0?pasword=x", "unknown REDIS_URL option 'pasword'"),
        ("redis://h1:6379/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
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


def running(cluster: SentinelCluster) -> Iterator[SentinelCluster]:
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def sentinel_cluster() -> Iterator[SentinelCluster]:
    yield from running(SentinelCluster())


@pytest.fixture
def sentinel_engines(
    jobyard_env: dict[str, str], sentinel_cluster: SentinelCluster, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Engines]:
    """Every process of the test reaches Redis through the Sentinels."""
    yield from engines_on(sentinel_cluster.url, sentinel_cluster, monkeypatch)


def engines_on(
    url: str, server: SentinelCluster | TlsRedisServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Engines]:
    """Engines whose processes (and this one) take `url` as REDIS_URL."""
    monkeypatch.setenv("REDIS_URL", url)
    reset_dispatcher()
    reset_clients()
    engines = Engines(server)  # type: ignore[arg-type] - a cluster's client() is the primary's
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


def jobyard_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """A `jobyard` command in a process of its own, on the test's REDIS_URL."""
    return subprocess.run(
        [sys.executable, "-m", "jobyard.cli", *args],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=90,
        cwd=ROOT,
    )  # fmt: skip


def cli_dispatches_and_reads(payload: dict) -> None:
    """`jobyard dispatch` lands on Dramatiq and `jobyard status` sees the job succeed."""
    dispatched = jobyard_cli("dispatch", "system.echo", "--payload", json.dumps(payload))
    assert dispatched.returncode == 0, dispatched.stderr
    handle = json.loads(dispatched.stdout)
    assert handle["engine"] == "dramatiq"

    def succeeded() -> dict | None:
        done = jobyard_cli("status", handle["job_id"])
        status = json.loads(done.stdout) if done.returncode == 0 else {}
        return status if status.get("state") == "succeeded" else None

    status = wait_for(succeeded, timeout=60, interval=0.5)
    assert (status["engine"], status["result"]) == ("dramatiq", payload)


def test_the_cli_dispatches_and_reads_a_job_through_sentinel(
    sentinel_engines: Engines, sentinel_cluster: SentinelCluster
) -> None:
    """`jobyard dispatch` and `jobyard status` as separate processes on a sentinel URL."""
    sentinel_engines.start_worker(queues="default")
    cli_dispatches_and_reads({"via": "sentinel"})


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


def test_a_tls_sentinel_url_speaks_tls_to_sentinels_and_redis(tmp_path: Path) -> None:
    """No TLS server is started here (the check is of what the client is built with)."""
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    client = make_client(
        f"rediss+sentinel://:pw@h1:26379/mymaster/2?sentinel_password=sp&ssl_ca_certs={ca}",
        timeout=1.0,
    )
    pool = client.connection_pool
    assert issubclass(pool.connection_class, redis.SSLConnection)
    assert (pool.connection_kwargs["ssl_ca_certs"], pool.connection_kwargs["db"]) == (str(ca), 2)
    assert pool.connection_kwargs["password"] == "pw"
    sentinel = pool.sentinel_manager.sentinels[0].connection_pool
    assert issubclass(sentinel.connection_class, redis.SSLConnection)
    assert sentinel.connection_kwargs["password"] == "sp"


# -- TLS and passwords, for real -----------------------------------------------------------
# Every server and Sentinel below speaks TLS only, asks for a password and for a client
# certificate signed by the test's CA, and checks the client's hostname (tests.tls_support).


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    if not tls_built_in():
        pytest.skip(f"{redis_server_binary()} is built without TLS")
    return TlsFiles.create(tmp_path)


@pytest.fixture
def tls_sentinel_cluster(tls_files: TlsFiles) -> Iterator[SentinelCluster]:
    yield from running(SentinelCluster(tls=tls_files))


@pytest.fixture
def tls_sentinel_engines(
    jobyard_env: dict[str, str],
    tls_sentinel_cluster: SentinelCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Engines]:
    """Every process of the test on the `rediss+sentinel://` URL."""
    yield from engines_on(tls_sentinel_cluster.url, tls_sentinel_cluster, monkeypatch)


@pytest.fixture
def tls_server_engines(
    jobyard_env: dict[str, str], tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Engines]:
    """Every process of the test on a `rediss://` URL to one TLS server."""
    server = TlsRedisServer(tls_files).start()
    try:
        yield from engines_on(server.url, server, monkeypatch)
    finally:
        server.stop()


def test_over_tls_sentinel_dispatch_a_worker_and_the_cli_work_and_follow_a_failover(
    tls_sentinel_engines: Engines, tls_sentinel_cluster: SentinelCluster
) -> None:
    engines, cluster = tls_sentinel_engines, tls_sentinel_cluster
    assert cluster.url.startswith("rediss+sentinel://")
    engines.start_worker(queues="default")
    handle = dispatch_job("system.echo", {"over": "tls"})
    assert handle.engine == "dramatiq"
    status = engines.wait(handle.job_id)
    assert (status.engine, status.state, status.result) == (
        "dramatiq",
        "succeeded",
        {"over": "tls"},
    )
    cli_dispatches_and_reads({"cli": "over tls"})

    # Through a failover the Sentinels run over TLS too (replication and their checks).
    killed = time.monotonic()
    cluster.kill(cluster.primary_port)
    after = wait_for(
        lambda: (h := dispatch_job("system.echo", {"n": "after"})).engine == "dramatiq" and h,
        timeout=60,
        interval=0.1,
    )
    status = engines.wait(after.job_id, timeout=60)
    ran_in = time.monotonic() - killed
    print(f"over TLS, after SIGKILL of the primary: the worker ran a job in {ran_in:.2f} s")
    assert cluster.primary() == cluster.replica_port
    assert (status.engine, status.state) == ("dramatiq", "succeeded")
    assert ran_in < FOLLOW_BOUND, engines.logs()


def test_a_tls_sentinel_url_without_the_client_certificate_is_refused(
    tls_sentinel_cluster: SentinelCluster,
) -> None:
    """The servers do ask for TLS and a certificate: the test above would pass on plain TCP
    otherwise."""
    url = tls_sentinel_cluster.url
    plain = url.replace("rediss+sentinel://", "redis+sentinel://", 1).split("&")[0]
    with pytest.raises(redis.ConnectionError):
        make_client(plain, timeout=2.0).ping()
    no_certificate = url.split("&ssl_certfile=")[0]
    with pytest.raises(redis.ConnectionError):
        make_client(no_certificate, timeout=2.0).ping()
    assert make_client(url, timeout=2.0).ping()


def test_a_rediss_url_to_one_tls_server_carries_dispatch_a_worker_and_the_cli(
    tls_server_engines: Engines,
) -> None:
    assert tls_server_engines.redis.url.startswith("rediss://")
    tls_server_engines.start_worker(queues="default")
    status = tls_server_engines.run("dramatiq", "system.echo", {"over": "rediss"})
    assert (status.engine, status.state, status.result) == (
        "dramatiq", "succeeded", {"over": "rediss"})  # fmt: skip
    cli_dispatches_and_reads({"cli": "over rediss"})


@pytest.mark.parametrize("cluster_fixture", ["tls_sentinel_cluster", "sentinel_cluster"])
def test_jobyard_dev_and_its_api_run_jobs_on_dramatiq_through_sentinel(
    jobyard_env: dict[str, str],
    cluster_fixture: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`jobyard dev` given a `rediss+sentinel://` (or `redis+sentinel://`) REDIS_URL: its
    worker runs the canary on Dramatiq, and a job dispatched to its HTTP API process runs there
    too."""
    cluster: SentinelCluster = request.getfixturevalue(cluster_fixture)
    monkeypatch.setenv("REDIS_URL", cluster.url)
    token = "dev-sentinel-token"
    port = free_port()
    log = tmp_path / "dev.log"
    with log.open("wb") as sink:
        dev = subprocess.Popen(
            [sys.executable, "-m", "jobyard.cli", "dev", "--api-port", str(port)],
            env=dict(os.environ, JOBYARD_ADMIN_TOKEN=token), cwd=tmp_path, stdout=sink,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:

        def running() -> bool:
            assert dev.poll() is None, log.read_text()
            return "running; Ctrl-C to stop" in log.read_text()

        wait_for(running, timeout=180, interval=0.5)
        output = log.read_text()
        assert "Dramatiq workers live for all queues" in output, output
        assert "canary system.echo succeeded on dramatiq" in output, output

        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                           headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        with api:
            dispatched = wait_for(lambda: _api_dispatch(api, {"via": "the api"}), timeout=60)
            assert dispatched["engine"] == "dramatiq", dispatched

            def succeeded() -> dict | None:
                job = api.get(f"/jobs/{dispatched['job_id']}").json()
                return job if job.get("state") == "succeeded" else None

            job = wait_for(succeeded, timeout=60, interval=0.2)
        assert (job["engine"], job["result"]) == ("dramatiq", {"via": "the api"})
        # On the Sentinels' primary, not on another Redis (the shared one at the default URL).
        assert cluster.client().exists(keys.job(dispatched["job_id"]))
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
            try:
                dev.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
                dev.wait()
    assert dev.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def _api_dispatch(api: httpx.Client, payload: dict) -> dict | None:
    """POST /jobs/system.echo, or None while the API process is still starting."""
    try:
        response = api.post("/jobs/system.echo", json=payload)
    except httpx.TransportError:
        return None
    assert response.status_code == 202, response.text
    return response.json()
