"""The loop against a secured broker: a local Kafka broker whose only client listener is SASL_SSL
(PLAIN, SCRAM-SHA-256, SCRAM-SHA-512; a throwaway CA made here) and a Redis that wants a password
over TLS. With the right credentials the producers and the streaming job work (events in Feast,
malformed ones in the dead-letter topic, offsets committed); a client without credentials, or with
wrong ones, is refused, and the job exits 3 at once with the reason. No password ever appears in
the job's output, the broker's logs or the files either writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from config.paths import REPO_ROOT
from config.secrets import Secret
from infra.kafka.tls import DevCertificates, make_dev_certificates
from streaming.kafka_security import (
    KafkaAuthenticationError,
    KafkaSecurityConfig,
    KafkaSecurityError,
    SaslCredentials,
    check_broker,
    confluent_config,
    kafka_python_kwargs,
)
from tests.secured_servers import new_password, sasl_broker, secured_redis

pytestmark = pytest.mark.slow

USER = "hstu-job"
TOPIC, DLQ = "engagements", "engagements.dlq"
VALID, USERS = 400, 40
MALFORMED = [b'{"user_id": 1, "item_id": ', b'{"user_id": 2, "item_id": 3, "action": "nope", "ts_ms": 1}']


@dataclass(frozen=True)
class Secured:
    root: Path
    certs: DevCertificates
    bootstrap: str
    kafka_password: str
    redis_address: str
    redis_password: str
    broker_dir: Path

    def security(self, mechanism: str = "SCRAM-SHA-512", **kw) -> KafkaSecurityConfig:
        return KafkaSecurityConfig(protocol="SASL_SSL", sasl_mechanism=mechanism, ca_file=self.certs.ca_file, **kw)

    def credentials(self, password: str | None = None) -> SaslCredentials:
        return SaslCredentials(username=USER, password=Secret(password or self.kafka_password))


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    root = tmp_path_factory.mktemp("secured")
    certs = make_dev_certificates(root / "tls")
    kafka_password, redis_password = new_password(), new_password()
    users = {USER: kafka_password, "someone-else": new_password()}
    with sasl_broker(root / "broker", users, certs) as info:
        with secured_redis(root / "redis", redis_password, certs) as redis_address:
            yield Secured(
                root=root,
                certs=certs,
                bootstrap=info.bootstrap,
                kafka_password=kafka_password,
                redis_address=redis_address,
                redis_password=redis_password,
                broker_dir=root / "broker" / "state" / "kafka",
            )


def job_env(secured: Secured, tmp_path: Path, *, kafka_password: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSTU_KAFKA_SASL_")}
    env.update(HSTU_STATE_DIR=str(tmp_path / "state"), HSTU_REDIS_PASSWORD=secured.redis_password)
    if kafka_password is not None:
        env.update(HSTU_KAFKA_SASL_USERNAME=USER, HSTU_KAFKA_SASL_PASSWORD=kafka_password)
    return env


def job_args(secured: Secured, tmp_path: Path, ray_address: str, *security: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "streaming.job",
        "--source",
        f"kafka://{secured.bootstrap}/{TOPIC}",
        "--until-idle",
        *security,
        "feast.online_store=redis",
        f"feast.redis_address={secured.redis_address}",
        "feast.redis_security.password_env=HSTU_REDIS_PASSWORD",
        "feast.redis_security.tls=true",
        f"feast.redis_security.ca_file={secured.certs.ca_file}",
        f"feast.state_dir={tmp_path / 'feast'}",
        f"state_dir={tmp_path / 'job'}",
        f"dlq_topic={DLQ}",
        f"ray.address={ray_address}",
        "progress_every_s=5",
    ]


def run_job(args: list[str], env: dict, timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    return proc, time.monotonic() - t0


def secured_args(secured: Secured) -> list[str]:
    return ["kafka.security.protocol=SASL_SSL", f"kafka.security.ca_file={secured.certs.ca_file}"]


def assert_no_secret(texts: dict[str, str], *secrets: str) -> None:
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a password appears in {where}"


@pytest.mark.timeout(300)
def test_clients_need_valid_credentials(secured):
    from confluent_kafka import Consumer, KafkaException

    wrong = new_password()
    # The probe the job runs first: every mechanism logs in with the right password, none with a wrong one.
    for mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        check_broker(secured.bootstrap, secured.security(mechanism), secured.credentials(), timeout_s=20)
        with pytest.raises(KafkaAuthenticationError, match=f"refused user '{USER}' with SASL {mechanism}") as err:
            check_broker(secured.bootstrap, secured.security(mechanism), secured.credentials(wrong), timeout_s=20)
        assert wrong not in str(err.value)
    with pytest.raises(KafkaSecurityError, match="speaks TLS but kafka.security.protocol is PLAINTEXT"):
        check_broker(secured.bootstrap, KafkaSecurityConfig(), timeout_s=20)
    with pytest.raises(KafkaSecurityError, match="authentication required"):
        check_broker(
            secured.bootstrap, KafkaSecurityConfig(protocol="SSL", ca_file=secured.certs.ca_file), timeout_s=20
        )
    with pytest.raises(KafkaSecurityError, match="does not verify"):
        check_broker(secured.bootstrap, KafkaSecurityConfig(protocol="SASL_SSL"), secured.credentials(), timeout_s=20)

    # And the broker itself refuses a client library that comes without (valid) credentials.
    def refused(config: dict) -> list:
        errors: list = []
        consumer = Consumer(
            {
                "bootstrap.servers": secured.bootstrap,
                "group.id": "g",
                "log_level": 0,
                "error_cb": errors.append,
                **config,
            }
        )
        try:
            with pytest.raises(KafkaException):
                consumer.list_topics(timeout=15)
        finally:
            consumer.close()
        return errors

    refused({})
    refused({"security.protocol": "SSL", "ssl.ca.location": str(secured.certs.ca_file)})
    errors = refused(confluent_config(secured.security(), secured.credentials(wrong)))
    assert any("Authentication failed" in e.str() for e in errors), errors
    # The right ones are let in.
    consumer = Consumer(
        {
            "bootstrap.servers": secured.bootstrap,
            "group.id": "g",
            **confluent_config(secured.security(), secured.credentials()),
        }
    )
    assert TOPIC in consumer.list_topics(timeout=30).topics
    consumer.close()


@pytest.mark.timeout(900)
def test_the_job_runs_with_credentials(secured, tmp_path, monkeypatch, ray_address):
    from confluent_kafka import Producer
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    from features.redis_security import RedisSecurityConfig
    from features.sequences import SequenceStore, SequenceStoreConfig
    from infra.producer import produce_at_rate

    monkeypatch.setenv("HSTU_KAFKA_SASL_USERNAME", USER)
    monkeypatch.setenv("HSTU_KAFKA_SASL_PASSWORD", secured.kafka_password)
    # Valid events with kafka-python (SCRAM-SHA-256), malformed ones with confluent-kafka (PLAIN).
    sent = produce_at_rate(
        secured.bootstrap,
        TOPIC,
        rate=400,
        seconds=VALID / 400,
        num_users=USERS,
        security=secured.security("SCRAM-SHA-256"),
    )
    assert sent["events"] == VALID
    producer = Producer({"bootstrap.servers": secured.bootstrap, **confluent_config(secured.security("PLAIN"))})
    for value in MALFORMED:
        producer.produce(TOPIC, key=b"bad", value=value, partition=1)
    assert producer.flush(60) == 0
    del producer  # confluent-kafka's Producer has no close(): let it go before the broker does

    # The password from a file this time (the session's Ray workers, which read the topic, do not
    # have this test's environment: a file is what reaches every process of a Ray cluster).
    password_file = tmp_path / "kafka-password"
    password_file.write_text(secured.kafka_password + "\n")
    password_file.chmod(0o600)
    proc, seconds = run_job(
        job_args(
            secured,
            tmp_path,
            ray_address,
            *secured_args(secured),
            f"kafka.security.username={USER}",
            f"kafka.security.password_file={password_file}",
        ),
        job_env(secured, tmp_path),
        timeout_s=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["stopped_by"] == "idle"
    assert (summary["valid_events"], summary["invalid_events"]) == (VALID, len(MALFORMED))
    assert sum(summary["committed"].values()) == VALID + len(MALFORMED)
    assert f"kafka security: SASL_SSL, SCRAM-SHA-512 as '{USER}' (password from file {password_file})" in proc.stderr

    # The sequences are in the password-protected Redis, ...
    monkeypatch.setenv("HSTU_REDIS_PASSWORD", secured.redis_password)
    store = SequenceStore(
        SequenceStoreConfig(
            max_len=200,
            online_store="redis",
            redis_address=secured.redis_address,
            state_dir=tmp_path / "feast",
            redis_security=RedisSecurityConfig(
                password_env="HSTU_REDIS_PASSWORD", tls=True, ca_file=secured.certs.ca_file
            ),
        )
    )
    batch = store.read_many(np.arange(1, USERS + 1, dtype=np.int64))
    assert sum(len(batch.sequence(i).item_ids) for i in range(USERS)) == VALID
    # ... the malformed events in the dead-letter topic, ...
    consumer = KafkaConsumer(
        bootstrap_servers=secured.bootstrap, enable_auto_commit=False, **kafka_python_kwargs(secured.security())
    )
    tp = TopicPartition(DLQ, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    letters = []
    deadline = time.monotonic() + 60
    while len(letters) < len(MALFORMED) and time.monotonic() < deadline:
        letters += consumer.poll(timeout_ms=1000).get(tp, [])
    consumer.close()
    assert sorted(r.value for r in letters) == sorted(MALFORMED)
    # ... and no password was printed or written on the way.
    texts = {"job stdout": proc.stdout, "job stderr": proc.stderr}
    texts |= {str(p): p.read_text(errors="replace") for p in secured.broker_dir.glob("*.log")}
    texts |= {str(p): p.read_text() for p in secured.broker_dir.glob("*.json")}
    texts |= {str(p): p.read_text() for p in (tmp_path / "feast").rglob("*.yaml")}
    assert texts.keys() >= {"job stdout", "job stderr"} and any(k.endswith("server.log") for k in texts)
    assert_no_secret(texts, secured.kafka_password, secured.redis_password)
    # The broker's own files that must hold its users' passwords are for its owner only.
    assert (secured.broker_dir / "server.properties").stat().st_mode & 0o077 == 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", ["wrong password", "no credentials"])
def test_a_refused_job_says_why_and_exits(secured, tmp_path, case, ray_address):
    if case == "wrong password":
        wrong = new_password()
        args = job_args(secured, tmp_path, ray_address, *secured_args(secured))
        env = job_env(secured, tmp_path, kafka_password=wrong)
        expected = f"error: authentication failed: the broker at {secured.bootstrap} refused user '{USER}'"
    else:
        wrong = ""
        args = job_args(secured, tmp_path, ray_address)  # PLAINTEXT: the default, no credentials
        env = job_env(secured, tmp_path)
        expected = "speaks TLS but kafka.security.protocol is PLAINTEXT"
    proc, seconds = run_job(args, env, timeout_s=400)
    assert proc.returncode == 3, f"exit {proc.returncode} after {seconds:.0f} s:\n{proc.stderr[-4000:]}"
    assert expected in proc.stderr, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and not proc.stdout.strip()
    assert "Connecting to existing Ray cluster" not in proc.stderr, "the check runs before Ray starts"
    assert_no_secret(
        {"job stdout": proc.stdout, "job stderr": proc.stderr},
        *(s for s in (wrong, secured.kafka_password, secured.redis_password) if s),
    )
