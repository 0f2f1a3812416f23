"""Secrets (passwords) read from an environment variable or a file, never from a config file.

A config names where a secret is (`password_env: HSTU_KAFKA_SASL_PASSWORD`, or
`password_file: /etc/hstu/kafka-password`); `read_secret` reads it in the process that uses it,
when it is needed. The value is a `Secret`, which never prints: its repr and str are `'***'`, so
a config, a log line or an exception message that holds one shows no password. It cannot be
pickled either, so it never travels inside a Ray task's arguments: each process reads its own.

    >>> import os
    >>> os.environ["DOCTEST_PASSWORD"] = "hunter2"
    >>> secret = read_secret(env="DOCTEST_PASSWORD", file=None, what="the doctest password")
    >>> secret, f"{secret}", secret.reveal()
    (Secret('***'), '***', 'hunter2')
"""

from __future__ import annotations

import os
from pathlib import Path

from config.loader import ConfigError


class SecretError(ConfigError):
    """A secret the config names could not be read (variable unset, file missing or empty).
    The message names the variable or file, never a value."""


class Secret:
    """A secret string that does not print. `reveal()` returns the value, for the client library
    that needs it; nothing else should call it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("a Secret holds a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self):
        raise TypeError("a Secret is never pickled: read it (read_secret) in the process that uses it")


class RedactedStr(str):
    """A str holding a secret for a library that wants a str (kafka-python's password) and may
    log its config with %s (which prints a dict's values by repr): the repr is '***'."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


def read_secret(*, env: str | None, file: Path | None, what: str) -> Secret | None:
    """The secret in `file` (trailing newline stripped) if a file is named, else in the
    environment variable `env`; None when neither is named. `what` names the secret in errors.

    Raises SecretError when the named file cannot be read or is empty, or the named variable is
    unset or empty: a secret that is configured but missing is a mistake, not "no password".
    """
    if file is not None:
        try:
            value = Path(file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise SecretError(f"{what}: cannot read the file {str(file)!r} ({exc.strerror or exc})") from None
        if not value:
            raise SecretError(f"{what}: the file {str(file)!r} is empty")
        return Secret(value)
    if env:
        value = os.environ.get(env, "")
        if not value:
            raise SecretError(
                f"{what}: the environment variable {env} is not set in this process (on a Ray cluster, "
                "set it on every node before `ray start`, or give a file readable on every node instead)"
            )
        return Secret(value)
    return None


def read_plain(*, value: str | None, env: str | None, what: str) -> str | None:
    """A setting that is not secret but may come from the environment (a user name): `value` if
    given, else the variable `env` (which must then be set), else None."""
    if value:
        return value
    if env:
        found = os.environ.get(env, "")
        if not found:
            raise SecretError(f"{what}: the environment variable {env} is not set in this process")
        return found
    return None


def check_tls_files(config, *, where: str, tls: bool, fix: str) -> None:
    """The TLS file fields of a client config (`ca_file`, `cert_file`, `key_file`): a client
    certificate comes with its key, and no file is set while TLS is off (`fix` says what to do)."""
    if (config.cert_file is None) != (config.key_file is None):
        raise ConfigError(f"{where}: cert_file and key_file go together (a client certificate and its key)")
    if not tls:
        tls_only = [n for n in ("ca_file", "cert_file", "key_file") if getattr(config, n) is not None]
        if tls_only:
            raise ConfigError(f"{where}.{tls_only[0]} is set but {fix}")
