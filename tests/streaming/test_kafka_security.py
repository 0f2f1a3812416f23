"""Kafka client security from config: the kwargs every client gets, secrets read from the
environment or a file and never printed, config mistakes refused, and the broker probe against the
(plaintext) session broker. tests/infra/test_kafka_sasl.py runs the job against a SASL_SSL broker."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from config.loader import ConfigError
from config.secrets import RedactedStr, Secret, SecretError, read_secret
from streaming.config import load_job_config
from streaming.kafka_security import (
    KafkaAuthenticationError,
    KafkaSecurityConfig,
    KafkaSecurityError,
    SaslCredentials,
    check_broker,
    classify_client_error,
    confluent_config,
    credentials,
    describe,
    kafka_python_kwargs,
    security_cause,
)

USER, PASSWORD = "TEST_KAFKA_USER", "TEST_KAFKA_PASSWORD"


@pytest.fixture
def sasl_env(monkeypatch):
    monkeypatch.setenv(USER, "alice")
    monkeypatch.setenv(PASSWORD, "p4ss-w0rd-xyz")
    return KafkaSecurityConfig(
        protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256", username_env=USER, password_env=PASSWORD, ca_file=__file__
    )


def test_plaintext_is_the_default_and_adds_nothing():
    assert load_job_config().kafka.security == KafkaSecurityConfig()
    assert kafka_python_kwargs(KafkaSecurityConfig()) == {} == confluent_config(None)
    assert describe(None).startswith("PLAINTEXT")


def test_client_kwargs_for_both_libraries(sasl_env):
    kp = kafka_python_kwargs(sasl_env)
    assert kp == {
        "security_protocol": "SASL_SSL",
        "ssl_check_hostname": True,
        "ssl_cafile": __file__,
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "alice",
        "sasl_plain_password": "p4ss-w0rd-xyz",
    }
    # kafka-python's admin client logs its config dict at DEBUG: the password prints as '***'.
    assert isinstance(kp["sasl_plain_password"], RedactedStr) and "p4ss" not in repr(kp) and "p4ss" not in f"{kp}"
    assert confluent_config(sasl_env) == {
        "security.protocol": "SASL_SSL",
        "ssl.endpoint.identification.algorithm": "https",
        "ssl.ca.location": __file__,
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "alice",
        "sasl.password": "p4ss-w0rd-xyz",
    }
    # Credentials given directly win over what the config names.
    direct = SaslCredentials(username="bob", password=Secret("other"))
    assert kafka_python_kwargs(sasl_env, direct)["sasl_plain_username"] == "bob"


def test_password_file_wins_and_missing_secrets_are_named(sasl_env, tmp_path, monkeypatch):
    (tmp_path / "pw").write_text("from-a-file\n")
    from_file = dataclasses.replace(sasl_env, password_file=tmp_path / "pw")
    assert credentials(from_file).password.reveal() == "from-a-file"
    monkeypatch.delenv(PASSWORD)
    with pytest.raises(KafkaSecurityError, match=f"{PASSWORD} is not set"):
        kafka_python_kwargs(sasl_env)
    with pytest.raises(KafkaSecurityError, match="cannot read the file"):
        credentials(dataclasses.replace(sasl_env, password_file=tmp_path / "absent"))
    with pytest.raises(KafkaSecurityError, match="not a readable file"):
        kafka_python_kwargs(KafkaSecurityConfig(protocol="SSL", ca_file=tmp_path / "absent.crt"))


def test_secrets_never_print_nor_pickle(sasl_env):
    secret = read_secret(env=PASSWORD, file=None, what="x")
    creds = credentials(sasl_env)
    for text in (repr(secret), str(secret), f"{secret}", repr(creds), str(creds), describe(sasl_env)):
        assert "p4ss" not in text
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(creds)
    with pytest.raises(SecretError):
        read_secret(env="TEST_NO_SUCH_VARIABLE", file=None, what="x")
    assert read_secret(env=None, file=None, what="x") is None


def test_config_from_yaml_keys_and_its_checks(monkeypatch):
    cfg = load_job_config(
        overrides=[
            "kafka.security.protocol=SASL_SSL",
            "kafka.security.sasl_mechanism=PLAIN",
            "kafka.security.ca_file=/etc/hstu/tls/ca.crt",
            "feast.redis_security.password_env=HSTU_REDIS_PASSWORD",
            "feast.redis_security.tls=true",
        ]
    )
    assert cfg.kafka.security.username_env == "HSTU_KAFKA_SASL_USERNAME"
    assert cfg.kafka.security.password_env == "HSTU_KAFKA_SASL_PASSWORD"
    assert cfg.feast.redis_security.tls
    with pytest.raises(ConfigError, match="uses no TLS"):
        load_job_config(overrides=["kafka.security.ca_file=/x.crt"])
    with pytest.raises(ConfigError, match="cert_file and key_file"):
        load_job_config(overrides=["kafka.security.protocol=SSL", "kafka.security.cert_file=/x.crt"])
    with pytest.raises(ConfigError, match="needs password_env or password_file"):
        load_job_config(overrides=["kafka.security.protocol=SASL_SSL", "kafka.security.password_env=null"])
    with pytest.raises(ConfigError, match="ray-read-kafka cannot read"):
        load_job_config(overrides=["kafka.reader=ray-read-kafka", "kafka.security.protocol=SASL_PLAINTEXT"])
    with pytest.raises(ConfigError, match="not one of"):
        load_job_config(overrides=["kafka.security.sasl_mechanism=GSSAPI"])


def test_security_errors_are_found_behind_wrappers():
    inner = KafkaAuthenticationError("authentication failed: no")
    try:
        try:
            raise inner
        except KafkaSecurityError as exc:
            raise RuntimeError("a Ray task failed") from exc
    except RuntimeError as outer:
        assert security_cause(outer) is inner
    assert security_cause(ValueError("x")) is None


def test_client_errors_that_mean_a_refused_login(sasl_env):
    from kafka.errors import SaslAuthenticationFailedError

    err = classify_client_error(SaslAuthenticationFailedError("bad"), "h:1", sasl_env)
    assert isinstance(err, KafkaAuthenticationError) and "'alice'" in str(err) and "p4ss" not in str(err)
    assert classify_client_error(TimeoutError("slow"), "h:1", sasl_env) is None


@pytest.mark.timeout(60)
def test_probe_of_a_plaintext_broker(kafka_bootstrap, sasl_env, monkeypatch):
    check_broker(kafka_bootstrap, KafkaSecurityConfig(), timeout_s=10)  # what every existing client does
    sasl_plain = KafkaSecurityConfig(protocol="SASL_PLAINTEXT", username_env=USER, password_env=PASSWORD)
    with pytest.raises(KafkaSecurityError, match="does not use SASL"):
        check_broker(kafka_bootstrap, sasl_plain, timeout_s=10)
    with pytest.raises(KafkaSecurityError, match="does not speak TLS"):
        check_broker(kafka_bootstrap, KafkaSecurityConfig(protocol="SSL"), timeout_s=10)


def test_probe_of_nothing_is_a_connection_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ConnectionError, match="not reachable"):
        check_broker(f"127.0.0.1:{port}", KafkaSecurityConfig(), timeout_s=2)
