"""How every Kafka client of the project authenticates: one typed config, turned into the kwargs of
kafka-python and the config of confluent-kafka here and nowhere else.

`KafkaSecurityConfig` is `kafka.security` of the streaming job's config (and of every config that
embeds it). It names where the credentials are, never what they are:

    kafka:
      security:
        protocol: SASL_SSL                  # PLAINTEXT (default) | SSL | SASL_PLAINTEXT | SASL_SSL
        sasl_mechanism: SCRAM-SHA-512       # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
        username_env: HSTU_KAFKA_SASL_USERNAME
        password_env: HSTU_KAFKA_SASL_PASSWORD   # or password_file: /etc/hstu/kafka/password
        ca_file: /etc/hstu/tls/ca.crt

The password is read (config/secrets.py) in the process that builds a client, when it builds it:
in the job's process and in each Ray read task, never shipped in a task's arguments. Passing a
`SaslCredentials` instead is for code that holds the credentials itself (the local broker's
controller, tests).

    >>> kafka_python_kwargs(KafkaSecurityConfig())      # PLAINTEXT: nothing to add
    {}
    >>> import os; os.environ.update(U="alice", P="s3cret")
    >>> sec = KafkaSecurityConfig(protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", username_env="U", password_env="P")
    >>> sorted(confluent_config(sec))
    ['sasl.mechanism', 'sasl.password', 'sasl.username', 'security.protocol']
    >>> describe(sec)
    "SASL_PLAINTEXT, PLAIN as 'alice' (password from $P)"

`check_broker` is the job's first contact with a broker: a bounded probe, in Kafka's own protocol,
that turns what the client libraries report as "connection closed" or "timed out" into the reason:
the listener wants TLS, or SASL, or other mechanisms, or the credentials were refused.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from config.loader import ConfigError
from config.secrets import RedactedStr, Secret, SecretError, check_tls_files, read_plain, read_secret

Protocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
Mechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaSecurityError(RuntimeError):
    """The broker and this client do not agree on security (TLS, SASL), or the credentials are
    missing or refused. Never retried: the job stops with this message (exit 1)."""


class KafkaAuthenticationError(KafkaSecurityError):
    """The broker refused this client's SASL credentials (wrong user name or password)."""


@dataclass(frozen=True, kw_only=True)
class KafkaSecurityConfig:
    """How the job's Kafka clients connect: TLS and SASL. Only names of variables and files:
    secrets are never written in a config file.

    protocol: PLAINTEXT (default: no TLS, no authentication), SSL (TLS), SASL_PLAINTEXT (SASL
      over plain TCP) or SASL_SSL (SASL over TLS: what a real cluster wants).
    sasl_mechanism: for the SASL protocols: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    username / username_env: the SASL user name, or the environment variable that holds it.
    password_env / password_file: the environment variable, or the file (wins when both are set),
      that holds the SASL password; read by each process that connects.
    ca_file: PEM bundle of the CA(s) the broker's certificate is checked against (TLS
      protocols); null: the system's CAs. Kubernetes mounts it at /etc/hstu/tls/ca.crt.
    cert_file / key_file: a client certificate and its key, for brokers that ask for one (mTLS).
    check_hostname: check that the broker's certificate names the host connected to.
    """

    protocol: Protocol = "PLAINTEXT"
    sasl_mechanism: Mechanism = "SCRAM-SHA-512"
    username: str | None = None
    username_env: str | None = "HSTU_KAFKA_SASL_USERNAME"
    password_env: str | None = "HSTU_KAFKA_SASL_PASSWORD"
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        check_tls_files(
            self,
            where="kafka.security",
            tls=self.tls,
            fix=f"protocol {self.protocol} uses no TLS: set protocol to SASL_SSL or SSL, or remove it",
        )
        if self.sasl and not (self.username or self.username_env):
            raise ConfigError(f"kafka.security: protocol {self.protocol} needs username or username_env")
        if self.sasl and not (self.password_env or self.password_file):
            raise ConfigError(f"kafka.security: protocol {self.protocol} needs password_env or password_file")

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")


@dataclass(frozen=True, kw_only=True)
class SaslCredentials:
    """A SASL user name and password (a Secret: it prints as '***')."""

    username: str
    password: Secret


def credentials(security: KafkaSecurityConfig) -> SaslCredentials | None:
    """The SASL credentials `security` names, read now; None for a protocol without SASL.
    Raises KafkaSecurityError (naming the variable or file) when they cannot be read."""
    if not security.sasl:
        return None
    try:
        username = read_plain(value=security.username, env=security.username_env, what="the Kafka SASL user name")
        password = read_secret(env=security.password_env, file=security.password_file, what="the Kafka SASL password")
    except SecretError as exc:
        raise KafkaSecurityError(f"{exc} (kafka.security, protocol {security.protocol})") from None
    assert username is not None and password is not None  # __post_init__ requires where they come from
    return SaslCredentials(username=username, password=password)


def _resolve(security: KafkaSecurityConfig | None, creds: SaslCredentials | None):
    if security is None or security.protocol == "PLAINTEXT":
        return None, None
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(security, name)
        if path is not None and not Path(path).is_file():
            raise KafkaSecurityError(f"kafka.security.{name}: {str(path)!r} is not a readable file")
    return security, (creds if creds is not None or not security.sasl else credentials(security))


def kafka_python_kwargs(
    security: KafkaSecurityConfig | None = None, credentials: SaslCredentials | None = None
) -> dict:
    """Keyword arguments for kafka-python's KafkaConsumer, KafkaProducer and KafkaAdminClient.
    `credentials` overrides what `security` names (it is read from there otherwise)."""
    security, creds = _resolve(security, credentials)
    if security is None:
        return {}
    out: dict = {"security_protocol": security.protocol}
    if security.tls:
        out.update(ssl_check_hostname=security.check_hostname)
        if security.ca_file is not None:
            out["ssl_cafile"] = str(security.ca_file)
        if security.cert_file is not None:
            out.update(ssl_certfile=str(security.cert_file), ssl_keyfile=str(security.key_file))
    if creds is not None:
        out.update(
            sasl_mechanism=security.sasl_mechanism,
            sasl_plain_username=creds.username,
            # kafka-python's admin client logs its config at DEBUG: the password's repr is '***'.
            sasl_plain_password=RedactedStr(creds.password.reveal()),
        )
    return out


def confluent_config(security: KafkaSecurityConfig | None = None, credentials: SaslCredentials | None = None) -> dict:
    """Entries for a confluent-kafka (librdkafka) Consumer, Producer or AdminClient config."""
    security, creds = _resolve(security, credentials)
    if security is None:
        return {}
    out: dict = {"security.protocol": security.protocol}
    if security.tls:
        out["ssl.endpoint.identification.algorithm"] = "https" if security.check_hostname else "none"
        if security.ca_file is not None:
            out["ssl.ca.location"] = str(security.ca_file)
        if security.cert_file is not None:
            out.update(
                {"ssl.certificate.location": str(security.cert_file), "ssl.key.location": str(security.key_file)}
            )
    if creds is not None:
        out.update(
            {
                "sasl.mechanism": security.sasl_mechanism,
                "sasl.username": creds.username,
                "sasl.password": creds.password.reveal(),
            }
        )
    return out


def describe(security: KafkaSecurityConfig | None) -> str:
    """A log-safe summary: protocol, mechanism, user and where the password comes from."""
    if security is None or security.protocol == "PLAINTEXT":
        return "PLAINTEXT (no TLS, no authentication)"
    parts = [security.protocol]
    if security.sasl:
        try:
            user = read_plain(value=security.username, env=security.username_env, what="user")
        except SecretError:
            user = None
        source = f"file {security.password_file}" if security.password_file else f"${security.password_env}"
        who = f"as {user!r}" if user else f"as ${security.username_env} (unset)"
        parts.append(f"{security.sasl_mechanism} {who} (password from {source})")
    if security.tls:
        parts.append(f"CA {security.ca_file}" if security.ca_file else "system CAs")
    return ", ".join(parts)


def redact(text: str, *secrets: Secret | str | None) -> str:
    """`text` with every occurrence of the given secrets replaced by '***'."""
    for secret in secrets:
        value = secret.reveal() if isinstance(secret, Secret) else secret
        if value:
            text = text.replace(value, "***")
    return text


def security_cause(exc: BaseException) -> KafkaSecurityError | None:
    """The KafkaSecurityError behind `exc` (itself, a cause or context, or what a Ray task
    raised), or None: what makes an error fatal instead of retried."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, KafkaSecurityError):
            return cur
        todo += [cur.__cause__, cur.__context__, getattr(cur, "cause", None)]
    return None


# --- the probe ----------------------------------------------------------------------------------
# Three requests of Kafka's wire protocol, in their oldest versions, which every broker since
# 1.0 answers: ApiVersions v0, SaslHandshake v1 and SaslAuthenticate v0, which carries PLAIN's
# token or SCRAM's exchange (RFC 5802).
_API_VERSIONS, _SASL_HANDSHAKE, _SASL_AUTHENTICATE = 18, 17, 36
_ILLEGAL_SASL_STATE, _UNSUPPORTED_SASL_MECHANISM, _SASL_AUTHENTICATION_FAILED = 34, 33, 58
_CLIENT_ID = b"hstu-security-check"


def _request(api_key: int, version: int, correlation: int, body: bytes) -> bytes:
    header = struct.pack(">hhih", api_key, version, correlation, len(_CLIENT_ID)) + _CLIENT_ID
    payload = header + body
    return struct.pack(">i", len(payload)) + payload


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionResetError("the broker closed the connection")
        out += chunk
    return out


def _response(sock: socket.socket, correlation: int) -> bytes:
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    if not 4 <= size <= 1 << 20:
        raise ConnectionResetError(f"not a Kafka response (size {size})")
    data = _recv_exact(sock, size)
    if struct.unpack(">i", data[:4])[0] != correlation:
        raise ConnectionResetError("not a Kafka response (correlation id)")
    return data[4:]


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack(">h", len(raw)) + raw


def _handshake(sock: socket.socket, mechanism: str) -> tuple[int, list[str]]:
    """SaslHandshake v1: (error code, the mechanisms the listener enables)."""
    sock.sendall(_request(_SASL_HANDSHAKE, 1, 2, _string(mechanism)))
    body = _response(sock, 2)
    error, count = struct.unpack(">hi", body[:6])
    pos, mechanisms = 6, []
    for _ in range(max(count, 0)):
        (n,) = struct.unpack(">h", body[pos : pos + 2])
        mechanisms.append(body[pos + 2 : pos + 2 + n].decode(errors="replace"))
        pos += 2 + n
    return error, mechanisms


def _authenticate_step(sock: socket.socket, token: bytes, correlation: int) -> tuple[int, str, bytes]:
    """One SaslAuthenticate v0 round: (error code, the broker's message, its token)."""
    sock.sendall(_request(_SASL_AUTHENTICATE, 0, correlation, struct.pack(">i", len(token)) + token))
    body = _response(sock, correlation)
    (error,) = struct.unpack(">h", body[:2])
    (n,) = struct.unpack(">h", body[2:4])
    pos = 4 + max(n, 0)
    message = body[4:pos].decode(errors="replace")
    (size,) = struct.unpack(">i", body[pos : pos + 4])
    return error, message, body[pos + 4 : pos + 4 + max(size, 0)]


def _authenticate(sock: socket.socket, mechanism: str, creds: SaslCredentials) -> tuple[int, str]:
    """Log in with PLAIN or SCRAM-SHA-256/512: (error code, the broker's message); 0 is success."""
    password = creds.password.reveal().encode()
    if mechanism == "PLAIN":
        error, message, _ = _authenticate_step(sock, b"\0" + creds.username.encode() + b"\0" + password, 3)
        return error, message
    import base64
    import hashlib
    import hmac

    digest = "sha256" if mechanism == "SCRAM-SHA-256" else "sha512"
    user = creds.username.replace("=", "=3D").replace(",", "=2C")
    client_nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = f"n={user},r={client_nonce}"
    error, message, server_first = _authenticate_step(sock, f"n,,{first_bare}".encode(), 3)
    if error:
        return error, message
    fields = dict(part.split("=", 1) for part in server_first.decode().split(",") if "=" in part)
    nonce, salt, iterations = fields["r"], base64.b64decode(fields["s"]), int(fields["i"])
    if not nonce.startswith(client_nonce):
        return _SASL_AUTHENTICATION_FAILED, "the server's SCRAM nonce does not extend ours"
    salted = hashlib.pbkdf2_hmac(digest, password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", digest).digest()
    stored_key = hashlib.new(digest, client_key).digest()
    without_proof = f"c=biws,r={nonce}"
    auth_message = f"{first_bare},{server_first.decode()},{without_proof}".encode()
    signature = hmac.new(stored_key, auth_message, digest).digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()
    error, message, _ = _authenticate_step(sock, f"{without_proof},p={proof}".encode(), 4)
    return error, message


def _tls_context(security: KafkaSecurityConfig | None, *, verify: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(security.ca_file) if security and security.ca_file else None)
    if security is not None and security.cert_file is not None:
        ctx.load_cert_chain(str(security.cert_file), str(security.key_file))
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif security is not None:
        ctx.check_hostname = security.check_hostname
    return ctx


def _connect(host: str, port: int, timeout_s: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.settimeout(timeout_s)
    return sock


def _speaks_plain(host: str, port: int, timeout_s: float) -> bool:
    """Whether the listener answers an ApiVersions request in plain TCP."""
    try:
        with _connect(host, port, timeout_s) as sock:
            sock.sendall(_request(_API_VERSIONS, 0, 1, b""))
            _response(sock, 1)
            return True
    except (OSError, struct.error):
        return False


def _speaks_tls(host: str, port: int, timeout_s: float) -> bool:
    try:
        with _connect(host, port, timeout_s) as raw:
            with _tls_context(None, verify=False).wrap_socket(raw, server_hostname=host):
                return True
    except (OSError, ssl.SSLError):
        return False


def check_broker(
    bootstrap: str,
    security: KafkaSecurityConfig | None = None,
    credentials: SaslCredentials | None = None,
    *,
    timeout_s: float = 10.0,
) -> None:
    """Probe the first broker of `bootstrap` the way `security` connects, and raise
    KafkaSecurityError saying why this client would be refused: a TLS listener spoken to in plain
    TCP (or the reverse), a certificate that does not verify, a SASL listener without
    credentials (or the reverse), a mechanism the listener does not enable, credentials it
    refuses (it logs in with PLAIN or SCRAM, as the clients would). A broker that cannot be
    reached, or that drops the connection midway, raises ConnectionError (retried: it may be
    starting). Returns None when nothing is wrong that it can see."""
    security = security if security is not None else KafkaSecurityConfig()
    security, creds = _resolve(security, credentials)
    security = security if security is not None else KafkaSecurityConfig()
    first = bootstrap.split(",")[0].strip()
    host, _, port_text = first.rpartition(":")
    host, port = host.strip("[]"), int(port_text)
    where = f"the broker at {host}:{port}"
    try:
        raw = _connect(host, port, timeout_s)
    except OSError as exc:
        raise ConnectionError(f"{where} is not reachable: {exc}") from None
    sock: socket.socket = raw
    try:
        if security.tls:
            try:
                sock = _tls_context(security).wrap_socket(raw, server_hostname=host)
            except ssl.SSLCertVerificationError as exc:
                raise KafkaSecurityError(
                    f"TLS to {where}: its certificate does not verify ({exc.verify_message}): set "
                    "kafka.security.ca_file to the CA that signed it (or fix check_hostname)"
                ) from None
            except (ssl.SSLError, OSError) as exc:
                if not _speaks_plain(host, port, timeout_s):  # a broker going down, not a plain listener
                    raise ConnectionError(f"TLS to {where} failed: {exc}") from None
                raise KafkaSecurityError(
                    f"TLS to {where} failed ({exc}): its listener does not speak TLS; "
                    f"kafka.security.protocol is {security.protocol}, use "
                    f"{'SASL_PLAINTEXT' if security.sasl else 'PLAINTEXT'} if the listener is plain TCP"
                ) from None
        try:
            sock.sendall(_request(_API_VERSIONS, 0, 1, b""))
            _response(sock, 1)
        except (OSError, struct.error) as exc:
            if not security.tls and _speaks_tls(host, port, timeout_s):
                raise KafkaSecurityError(
                    f"{where} speaks TLS but kafka.security.protocol is {security.protocol}: set it to "
                    f"{'SASL_SSL' if security.sasl else 'SASL_SSL (or SSL)'} with ca_file and the credentials"
                ) from None
            raise ConnectionError(f"{where} did not answer an ApiVersions request: {exc}") from None
        error, mechanisms = _handshake(sock, security.sasl_mechanism)
        if not security.sasl:
            if error in (0, _UNSUPPORTED_SASL_MECHANISM):  # the listener takes a SASL handshake
                raise KafkaSecurityError(
                    f"authentication required: {where} asks for SASL ({', '.join(mechanisms) or 'mechanisms unknown'}) "
                    f"but kafka.security.protocol is {security.protocol}, which sends no credentials: set "
                    f"protocol to SASL_{'SSL' if security.tls else 'SSL or SASL_PLAINTEXT'}, sasl_mechanism, "
                    "and the user name and password (HSTU_KAFKA_SASL_USERNAME / HSTU_KAFKA_SASL_PASSWORD)"
                )
            return
        if error == _ILLEGAL_SASL_STATE:
            raise KafkaSecurityError(
                f"{where} does not use SASL on this listener but kafka.security.protocol is {security.protocol}: "
                f"use {'SSL' if security.tls else 'PLAINTEXT'}"
            )
        if error == _UNSUPPORTED_SASL_MECHANISM:
            raise KafkaSecurityError(
                f"{where} does not enable SASL mechanism {security.sasl_mechanism}; it enables "
                f"{', '.join(mechanisms) or 'none'}: set kafka.security.sasl_mechanism to one of them"
            )
        if error != 0:
            return  # an answer this probe does not know: leave it to the client library
        if creds is not None:
            error, message = _authenticate(sock, security.sasl_mechanism, creds)
            if error != 0:
                raise KafkaAuthenticationError(
                    f"authentication failed: {where} refused user {creds.username!r} with SASL "
                    f"{security.sasl_mechanism} "
                    f"({redact(message, creds.password) or f'error code {error}'}): check the password in "
                    f"{_password_source(security)}"
                )
    except ConnectionError:
        raise
    except (ssl.SSLError, OSError, struct.error, KeyError, ValueError) as exc:
        raise ConnectionError(f"{where}: the security check was cut off ({exc!r})") from None
    finally:
        sock.close()


def raise_if_refused(
    bootstrap: str, security: KafkaSecurityConfig | None, credentials: SaslCredentials | None = None
) -> None:
    """`check_broker`, except that a broker it cannot reach is left to the client's own retries
    and errors: for tools that produce or read once, before they build their client."""
    try:
        check_broker(bootstrap, security, credentials)
    except ConnectionError:
        pass


def _password_source(security: KafkaSecurityConfig) -> str:
    return f"the file {security.password_file}" if security.password_file else f"${security.password_env}"


_AUTH_WORDS = ("authentication failed", "invalid credentials", "code=_authentication")


def classify_client_error(
    exc: BaseException, bootstrap: str, security: KafkaSecurityConfig | None
) -> KafkaSecurityError | None:
    """A client library's error as a KafkaAuthenticationError when it is a refused login
    (kafka-python's SaslAuthenticationFailedError, librdkafka's _AUTHENTICATION), else None.
    The message names the user and where the password comes from, never the password."""
    text = f"{type(exc).__name__}: {exc}"
    try:
        from kafka.errors import SaslAuthenticationFailedError

        is_auth = isinstance(exc, SaslAuthenticationFailedError)
    except ImportError:  # pragma: no cover - kafka-python is pinned
        is_auth = False
    is_auth = is_auth or any(w in text.lower() for w in _AUTH_WORDS)
    if not is_auth or security is None or not security.sasl:
        return None
    try:
        creds = credentials(security)
    except KafkaSecurityError:
        creds = None
    user = creds.username if creds else "?"
    detail = redact(text.splitlines()[0][:300], creds.password if creds else None)
    return KafkaAuthenticationError(
        f"authentication failed: the broker at {bootstrap} refused user {user!r} with SASL "
        f"{security.sasl_mechanism} ({detail}): check the password in {_password_source(security)}"
    )
