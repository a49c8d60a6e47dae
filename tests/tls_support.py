"""TLS for tests: a throwaway CA, a certificate for the servers and one for the client, the
redis-server flags that serve TLS only and require a client certificate, and the client options
that match (issue 31: TLS to Redis and to Sentinel)."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import RedisServer, free_port, redis_server_binary


@dataclass(frozen=True)
class TlsFiles:
    """PEM files in one folder. The server certificate names 127.0.0.1 and localhost (so the
    client's hostname check passes) and is a client certificate too: a replica and a Sentinel
    present it to the primary, which asks every client for one."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path | None = None) -> TlsFiles:
        folder = directory or Path(tempfile.mkdtemp(prefix="jobyard-tls-"))
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jobyard test CA")])
        ca = (
            _builder(ca_name, ca_name, ca_key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        files = cls(
            ca=folder / "ca.pem",
            server_cert=folder / "server.pem",
            server_key=folder / "server.key",
            client_cert=folder / "client.pem",
            client_key=folder / "client.key",
        )
        files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        _leaf(ca, ca_key, "redis", files.server_cert, files.server_key,
              [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])  # fmt: skip
        _leaf(ca, ca_key, "jobyard", files.client_cert, files.client_key,
              [ExtendedKeyUsageOID.CLIENT_AUTH])  # fmt: skip
        return files

    def server_args(self, port: int) -> list[str]:
        """redis-server (or Sentinel) on `port` with TLS only, a client certificate required,
        and TLS to the primary it replicates or watches."""
        return [
            "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(self.server_cert), "--tls-key-file", str(self.server_key),
            "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "yes",
            "--tls-replication", "yes",
        ]  # fmt: skip

    def client_options(self) -> dict[str, Any]:
        """redis.Redis keyword arguments of a client that passes `server_args`' checks."""
        return {
            "ssl": True,
            "ssl_ca_certs": str(self.ca),
            "ssl_certfile": str(self.client_cert),
            "ssl_keyfile": str(self.client_key),
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,
        }

    def url_query(self, **more: str) -> str:
        """The same as REDIS_URL options (`more` first, e.g. sentinel_password)."""
        options = {k: v for k, v in self.client_options().items() if k != "ssl"}
        options["ssl_check_hostname"] = "true"
        return urlencode({**more, **options}, safe="/")


@functools.cache
def tls_built_in() -> bool:
    """Whether the tests' server binary can serve TLS (Debian's redis-server can; the
    valkey-server of `make test-valkey` cannot): it asks for a certificate when it can."""
    started = subprocess.run(
        [redis_server_binary(), "--port", "0", "--tls-port", str(free_port())],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return "tls-cert-file" in started.stdout + started.stderr


class TlsRedisServer(RedisServer):
    """A private redis-server that speaks TLS only, with a password; `url` is a rediss:// URL
    with the client's certificate options."""

    PASSWORD = "tls-secret"

    def __init__(self, tls: TlsFiles) -> None:
        super().__init__()
        self.tls = tls

    @property
    def url(self) -> str:
        return f"rediss://:{self.PASSWORD}@127.0.0.1:{self.port}/0?{self.tls.url_query()}"

    def listen_args(self) -> list[str]:
        return [*self.tls.server_args(self.port), "--requirepass", self.PASSWORD]

    def client_options(self) -> dict[str, Any]:
        return {"port": self.port, "password": self.PASSWORD, **self.tls.client_options()}

    def client(self) -> redis.Redis:
        return redis.Redis(socket_timeout=5, **self.client_options())


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> Any:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    name: str,
    cert_path: Path,
    key_path: Path,
    usages: list[x509.ObjectIdentifier],
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        _builder(subject, ca.subject, key)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
