"""The Redis online store with a password and TLS: the sequence store works with the right
password, says why without it or with a wrong one, and never writes or prints the password."""

from __future__ import annotations

import numpy as np
import pytest

from config.loader import ConfigError
from features.redis_pipe import RedisAuthError, RedisPipe, resp_command
from features.redis_security import (
    RedisSecurityConfig,
    RedisSecurityError,
    auth_command,
    feast_connection_params,
    redis_kwargs,
    ssl_context,
)
from features.sequence_batch import SequenceBatch
from features.sequences import SequenceStore, SequenceStoreConfig
from infra.kafka.tls import make_dev_certificates
from tests.secured_servers import new_password, secured_redis

ENV = "TEST_REDIS_PASSWORD"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_dev_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def password() -> str:
    return new_password()


@pytest.fixture(scope="module")
def redis_tls(tmp_path_factory, certs, password):
    with secured_redis(tmp_path_factory.mktemp("redis"), password, certs) as address:
        yield address


def _batch(user: int) -> SequenceBatch:
    return SequenceBatch.from_sequences(
        user_ids=[user],
        item_ids=[[11, 12]],
        actions=[[1, 2]],
        timestamps_ms=[[1_700_000_000_000, 1_700_000_000_500]],
        last_partition=[0],
        last_offset=[7],
    )


def test_kwargs_from_the_config(tmp_path, monkeypatch, certs):
    assert redis_kwargs(RedisSecurityConfig()) == {}
    assert ssl_context(RedisSecurityConfig()) is None and auth_command(RedisSecurityConfig()) is None
    monkeypatch.setenv(ENV, "s3cret")
    sec = RedisSecurityConfig(password_env=ENV, username="app", tls=True, ca_file=certs.ca_file)
    assert redis_kwargs(sec) == {
        "password": "s3cret",
        "username": "app",
        "ssl": True,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": str(certs.ca_file),
    }
    assert auth_command(sec) == [b"AUTH", b"app", b"s3cret"]
    assert "s3cret" not in feast_connection_params(sec) and "ssl=true" in feast_connection_params(sec)
    # A file wins over the variable; a trailing newline is not part of the password.
    (tmp_path / "pw").write_text("from-file\n")
    assert redis_kwargs(RedisSecurityConfig(password_env=ENV, password_file=tmp_path / "pw"))["password"] == "from-file"


def test_config_checks():
    with pytest.raises(ConfigError, match="tls is false"):
        RedisSecurityConfig(ca_file="/x")
    with pytest.raises(ConfigError, match="go together"):
        RedisSecurityConfig(tls=True, cert_file="/x")
    with pytest.raises(ConfigError, match="needs a password"):
        RedisSecurityConfig(username="app")


def test_unset_variable_is_named_not_guessed(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(RedisSecurityError, match=f"{ENV} is not set"):
        redis_kwargs(RedisSecurityConfig(password_env=ENV))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("bulk_io", [True, False], ids=["bulk", "provider"])
def test_store_with_password_and_tls(tmp_path, monkeypatch, redis_tls, certs, password, bulk_io):
    monkeypatch.setenv(ENV, password)
    sec = RedisSecurityConfig(password_env=ENV, tls=True, ca_file=certs.ca_file)
    config = SequenceStoreConfig(
        max_len=10,
        online_store="redis",
        redis_address=redis_tls,
        state_dir=tmp_path,
        bulk_io=bulk_io,
        redis_security=sec,
    )
    assert password not in repr(config)
    store = SequenceStore(config)
    user = 1000 + int(bulk_io)
    store.write_many(_batch(user))
    got = store.read_many(np.array([user], dtype=np.int64)).sequence(0)
    assert got.item_ids.tolist() == [11, 12] and got.last_offset == 7
    # The Feast repository on disk holds TLS settings, never the password.
    for path in tmp_path.rglob("*.yaml"):
        assert password not in path.read_text()
    assert "ssl=true" in (tmp_path / "redis" / "feature_store.yaml").read_text()


@pytest.mark.timeout(300)
def test_wrong_or_missing_password_is_refused_with_the_reason(tmp_path, monkeypatch, redis_tls, certs, password):
    monkeypatch.setenv(ENV, "not-" + password)
    base = dict(max_len=10, online_store="redis", redis_address=redis_tls, state_dir=tmp_path)
    wrong = SequenceStore(
        SequenceStoreConfig(
            **base, redis_security=RedisSecurityConfig(password_env=ENV, tls=True, ca_file=certs.ca_file)
        )
    )
    with pytest.raises(RedisSecurityError, match="authentication failed") as err:
        _ = wrong.feature_store
    assert password not in str(err.value) and f"${ENV}" in str(err.value)

    missing = SequenceStore(
        SequenceStoreConfig(**base, redis_security=RedisSecurityConfig(tls=True, ca_file=certs.ca_file))
    )
    with pytest.raises(RedisSecurityError, match="password_env"):
        _ = missing.feature_store

    untrusted = SequenceStore(
        SequenceStoreConfig(**base, redis_security=RedisSecurityConfig(password_env=ENV, tls=True))
    )
    with pytest.raises(RedisSecurityError, match="ca_file"):
        _ = untrusted.feature_store


@pytest.mark.timeout(120)
def test_raw_pipe_authenticates_over_tls(redis_tls, certs, password):
    host, _, port = redis_tls.rpartition(":")
    sec = RedisSecurityConfig(tls=True, ca_file=certs.ca_file)
    pipe = RedisPipe(host, int(port), tls=ssl_context(sec), auth=lambda: [b"AUTH", password.encode()])
    assert pipe.round_trip(resp_command([b"SET", b"k", b"v"]) + resp_command([b"GET", b"k"]), 2) == [b"OK", b"v"]
    pipe.close()
    bad = RedisPipe(host, int(port), tls=ssl_context(sec), auth=lambda: [b"AUTH", b"zz-not-it-zz"])
    with pytest.raises(RedisAuthError, match="WRONGPASS") as err:
        bad.round_trip(resp_command([b"PING"]), 1)
    assert "zz-not-it-zz" not in str(err.value)
