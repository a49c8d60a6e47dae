"""REDIS_URL read into what the client factory needs: one server, or a Sentinel-watched primary.

    redis://[[user]:password@]host:port/db            one server (or a managed endpoint behind DNS)
    rediss://...?ssl_ca_certs=/ca.pem                 the same over TLS
    redis+sentinel://[[user]:password@]host1:26379,host2:26379/service/db?option=value
    rediss+sentinel://...                             TLS to the Sentinels and to Redis

The user and password are Redis's. Options of a Sentinel URL: `sentinel_username` and
`sentinel_password` (Sentinel's own auth), and the TLS options. TLS options, of a `rediss://` or
`rediss+sentinel://` URL only: `ssl_ca_certs` (a PEM file of CA certificates; default: the
system's), `ssl_ca_path` (a folder of them), `ssl_certfile` and `ssl_keyfile` (a client
certificate, for a server that asks for one), `ssl_cert_reqs` (`required`, the default;
`optional`; `none`) and `ssl_check_hostname` (true, the default, or false). A plain URL's other
options are redis-py's own. A malformed URL raises `RedisUrlError`, which names what is wrong (a
TLS option on a URL without TLS, a file that is not there, a misspelt option):
`jobyard.queue.client.make_client` checks it, which every process calls as it starts (the
dispatcher, so the API in `warm_up`; the worker; `jobyard dev`). Without these checks each
mistake would surface at the first connection, as a Redis that seems down (so dispatch falls
back to Temporal for good) or a TypeError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.connection import parse_url

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
PLAIN_SCHEMES = {"redis": False, "rediss": True, "unix": False}  # scheme -> TLS
DEFAULT_SENTINEL_PORT = 26379
_AUTH_OPTIONS = ("sentinel_username", "sentinel_password")
#: The TLS options (redis-py's SSLConnection arguments), and for those naming a file or a
#: folder, which.
_SSL_OPTIONS = (
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
_SSL_PATHS = {"ssl_ca_certs": "file", "ssl_ca_path": "folder", "ssl_certfile": "file",
              "ssl_keyfile": "file"}  # fmt: skip
_CERT_REQS = ("required", "optional", "none")
_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class RedisUrlError(ValueError):
    """REDIS_URL cannot be used; the message says why (never the password)."""


@dataclass(frozen=True)
class SentinelUrl:
    """A `redis+sentinel://` URL, parsed."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    ssl: bool = False
    ssl_options: dict[str, object] = field(default_factory=dict)


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelUrl:
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SENTINEL_SCHEMES or not rest:
        raise RedisUrlError(
            "not a Sentinel URL (redis+sentinel://host:port,.../service/db): "
            + shown_redis_url(url)
        )
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username, password = _userinfo(userinfo) if at else (None, None)
    service, db = _path(parts.path, url)
    options = _options(parts.query, url)
    _check_tls_options(options, SENTINEL_SCHEMES[scheme.lower()], url)
    return SentinelUrl(
        sentinels=_hosts(hosts, url),
        service=service,
        db=db,
        username=username,
        password=password,
        sentinel_username=_text_option(options, "sentinel_username"),
        sentinel_password=_text_option(options, "sentinel_password"),
        ssl=SENTINEL_SCHEMES[scheme.lower()],
        ssl_options={name: value for name, value in options.items() if name in _SSL_OPTIONS},
    )


def check_redis_url(url: str) -> None:
    """Raises RedisUrlError for a REDIS_URL no client can be made from (a process's start-up)."""
    if is_sentinel(url):
        parse_sentinel_url(url)
        return
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in PLAIN_SCHEMES:
        raise RedisUrlError(
            f"REDIS_URL must start with redis://, rediss://, unix://, redis+sentinel:// or "
            f"rediss+sentinel://: {shown_redis_url(url)}"
        )
    options: dict[str, object] = {}
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if name.startswith("ssl_") and name not in _SSL_OPTIONS:
            raise RedisUrlError(
                f"unknown TLS option {name!r} (known: {', '.join(_SSL_OPTIONS)}): "
                + shown_redis_url(url)
            )
        if name in _SSL_OPTIONS:
            options[name] = _option_value(name, value, url)
    _check_tls_options(options, PLAIN_SCHEMES[scheme], url)
    _check_with_redis_py(url)


def _check_with_redis_py(url: str) -> None:
    """The rest of a plain URL's options as redis-py reads them: the connection it would make,
    made (no socket is opened), so that a misspelt option fails here and not as a TypeError at
    the first command."""
    try:
        arguments = parse_url(url)  # type: ignore[no-untyped-call]
        arguments.pop("max_connections", None)  # the pool's, not the connection's
        connection_class = arguments.pop("connection_class", redis.Connection)
        connection_class(**arguments)
    except TypeError as exc:
        unknown = str(exc).rpartition("argument ")[2] or str(exc)
        raise RedisUrlError(f"unknown REDIS_URL option {unknown}: {shown_redis_url(url)}") from None
    except (ValueError, redis.RedisError) as exc:
        raise RedisUrlError(f"{exc}: {shown_redis_url(url)}") from None


def _check_tls_options(options: dict[str, object], tls: bool, url: str) -> None:
    given = [name for name in _SSL_OPTIONS if name in options]
    if given and not tls:
        raise RedisUrlError(
            f"{', '.join(given)} given to a URL without TLS (rediss:// and rediss+sentinel:// "
            f"speak TLS): {shown_redis_url(url)}"
        )
    for name, kind in _SSL_PATHS.items():
        path = options.get(name)
        if path is None:
            continue
        there = os.path.isdir(str(path)) if kind == "folder" else os.path.isfile(str(path))
        if not there:
            raise RedisUrlError(f"{name}: no such {kind} {path!r}: {shown_redis_url(url)}")


def _userinfo(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _hosts(text: str, url: str) -> list[tuple[str, int]]:
    hosts = [_host(item.strip(), url) for item in text.split(",") if item.strip()]
    if not hosts:
        raise RedisUrlError(f"a Sentinel URL names no Sentinel host: {shown_redis_url(url)}")
    return hosts


def _host(item: str, url: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, port = item[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise RedisUrlError(f"Sentinel host {item!r} has no name: {shown_redis_url(url)}")
    if not port:
        return host, DEFAULT_SENTINEL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise RedisUrlError(f"Sentinel host {item!r} has a bad port: {shown_redis_url(url)}")
    return host, int(port)


def _path(path: str, url: str) -> tuple[str, int]:
    parts = [unquote(part) for part in path.strip("/").split("/")] if path.strip("/") else []
    if not parts or len(parts) > 2:
        raise RedisUrlError(
            f"a Sentinel URL's path is /<service name>[/<db>], as in "
            f"redis+sentinel://host:26379/mymaster/0: {shown_redis_url(url)}"
        )
    if len(parts) == 1:
        return parts[0], 0
    if not parts[1].isdigit():
        raise RedisUrlError(f"database {parts[1]!r} is not a number: {shown_redis_url(url)}")
    return parts[0], int(parts[1])


def _options(query: str, url: str) -> dict[str, object]:
    options: dict[str, object] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in _AUTH_OPTIONS + _SSL_OPTIONS:
            known = ", ".join(_AUTH_OPTIONS + _SSL_OPTIONS)
            raise RedisUrlError(
                f"unknown Sentinel URL option {name!r} (known: {known}): {shown_redis_url(url)}"
            )
        options[name] = _option_value(name, value, url)
    return options


def _option_value(name: str, value: str, url: str) -> object:
    if name == "ssl_cert_reqs" and value not in _CERT_REQS:
        raise RedisUrlError(
            f"option ssl_cert_reqs={value!r} is none of {', '.join(_CERT_REQS)}: "
            + shown_redis_url(url)
        )
    if name != "ssl_check_hostname":
        return value
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise RedisUrlError(
            f"option {name}={value!r} is not true or false: {shown_redis_url(url)}"
        ) from None


def _text_option(options: dict[str, object], name: str) -> str | None:
    value = options.get(name)
    return str(value) if value else None


def shown_redis_url(url: str) -> str:
    """The URL with its passwords hidden, for an error message or a log line."""
    head, at, tail = url.partition("@")
    if at and "://" in head:
        scheme, _, userinfo = head.partition("://")
        user = userinfo.partition(":")[0]
        url = f"{scheme}://{user}:***@{tail}" if ":" in userinfo else url
    if "sentinel_password=" in url:
        before, _, after = url.partition("sentinel_password=")
        url = (
            before
            + "sentinel_password=***"
            + ("&" + after.partition("&")[2] if "&" in after else "")
        )
    return url
