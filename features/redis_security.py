"""How the Redis online store authenticates: a password (from an environment variable or a file)
and TLS, turned here into what each of the store's three Redis connections needs.

`RedisSecurityConfig` is `feast.redis_security` of the streaming job (and the same field of every
config that builds a `features.sequences.SequenceStoreConfig`):

    feast:
      online_store: redis
      redis_address: redis.internal:6380
      redis_security:
        password_env: HSTU_REDIS_PASSWORD     # or password_file: /etc/hstu/redis/password
        tls: true
        ca_file: /etc/hstu/tls/ca.crt

The three connections: redis-py's client (the reachability check, and Feast's own reads and
writes, whose client `SequenceStore` builds and hands to Feast so that the password is never in
Feast's config), and the raw pipelined socket of the bulk path (features/redis_pipe.py), which
sends AUTH itself. The password is read by the process that connects, when it connects.

    >>> redis_kwargs(RedisSecurityConfig())
    {}
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from config.loader import ConfigError
from config.secrets import Secret, SecretError, check_tls_files, read_secret


class RedisSecurityError(RuntimeError):
    """The Redis password cannot be read, or the server refused it, or TLS failed to verify."""


@dataclass(frozen=True, kw_only=True)
class RedisSecurityConfig:
    """Password and TLS of the Redis server (none by default). Only names of variables and files:
    the password is never written in a config file.

    password_env / password_file: the environment variable (e.g. HSTU_REDIS_PASSWORD, what the
      KubeRay manifests set) or the file (wins when both are set) that holds the password; either
      turns AUTH on. null (default): no password.
    username: the ACL user (Redis 6+) the password belongs to; null: the default user.
    tls: connect with TLS. ca_file: PEM bundle of the CA(s) the server's certificate is checked
      against (null: the system's CAs). cert_file / key_file: a client certificate and its key,
      for servers that ask for one (`tls-auth-clients yes`). check_hostname: check that the
      certificate names the host connected to.
    """

    password_env: str | None = None
    password_file: Path | None = None
    username: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        check_tls_files(self, where="redis_security", tls=self.tls, fix="tls is false: set tls: true or remove it")
        if self.username is not None and not (self.password_env or self.password_file):
            raise ConfigError("redis_security.username needs a password (password_env or password_file)")

    @property
    def auth(self) -> bool:
        return bool(self.password_env or self.password_file)


def password(security: RedisSecurityConfig) -> Secret | None:
    """The password, read now; None when the config names none."""
    try:
        return read_secret(env=security.password_env, file=security.password_file, what="the Redis password")
    except SecretError as exc:
        raise RedisSecurityError(str(exc)) from None


def _check_files(security: RedisSecurityConfig) -> None:
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(security, name)
        if path is not None and not Path(path).is_file():
            raise RedisSecurityError(f"redis_security.{name}: {str(path)!r} is not a readable file")


def redis_kwargs(security: RedisSecurityConfig) -> dict:
    """Keyword arguments for `redis.Redis(host=..., port=..., **redis_kwargs(security))`."""
    _check_files(security)
    out: dict = {}
    secret = password(security)
    if secret is not None:
        out["password"] = secret.reveal()
        if security.username:
            out["username"] = security.username
    if security.tls:
        out.update(ssl=True, ssl_cert_reqs="required", ssl_check_hostname=security.check_hostname)
        if security.ca_file is not None:
            out["ssl_ca_certs"] = str(security.ca_file)
        if security.cert_file is not None:
            out.update(ssl_certfile=str(security.cert_file), ssl_keyfile=str(security.key_file))
    return out


def ssl_context(security: RedisSecurityConfig) -> ssl.SSLContext | None:
    """The TLS context of a raw connection (features/redis_pipe.py); None without TLS."""
    if not security.tls:
        return None
    _check_files(security)
    ctx = ssl.create_default_context(cafile=str(security.ca_file) if security.ca_file else None)
    ctx.check_hostname = security.check_hostname
    if security.cert_file is not None:
        ctx.load_cert_chain(str(security.cert_file), str(security.key_file))
    return ctx


def auth_command(security: RedisSecurityConfig) -> list[bytes] | None:
    """The AUTH command a raw connection sends first (as RESP arguments); None without a password."""
    secret = password(security)
    if secret is None:
        return None
    user = [security.username.encode()] if security.username else []
    return [b"AUTH", *user, secret.reveal().encode()]


def feast_connection_params(security: RedisSecurityConfig) -> str:
    """What Feast's `connection_string` gets after "host:port": the TLS settings, never the
    password (Feast's client is built by SequenceStore, with it)."""
    params = []
    if security.tls:
        params += ["ssl=true", "ssl_cert_reqs=required", f"ssl_check_hostname={str(security.check_hostname).lower()}"]
        if security.ca_file is not None:
            params.append(f"ssl_ca_certs={security.ca_file}")
    return "".join(f",{p}" for p in params)


def describe(security: RedisSecurityConfig) -> str:
    """A log-safe summary of how the store connects."""
    parts = ["TLS" if security.tls else "no TLS"]
    if security.auth:
        source = f"file {security.password_file}" if security.password_file else f"${security.password_env}"
        parts.append(f"password from {source}" + (f" as {security.username!r}" if security.username else ""))
    else:
        parts.append("no password")
    return ", ".join(parts)
