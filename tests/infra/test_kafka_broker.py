"""The broker controller starts a real broker, reports it, creates topics and stops it."""

from __future__ import annotations

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from infra.kafka import broker
from infra.kafka.__main__ import main as cli


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_start_status_produce_stop(tmp_path, monkeypatch, capsys):
    # A second broker with its own state folder, so the session broker is untouched.
    monkeypatch.setenv("HSTU_STATE_DIR", str(tmp_path))
    info = broker.start(broker.BrokerConfig(port=0))
    try:
        assert broker.is_running(info)
        assert (tmp_path / "kafka" / "broker.json").exists()
        assert cli(["status"]) == 0
        assert info.bootstrap in capsys.readouterr().out

        admin = KafkaAdminClient(bootstrap_servers=info.bootstrap)
        topics = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(["engagements", "engagements.dlq"])}
        admin.close()
        assert topics == {"engagements": 4, "engagements.dlq": 1}

        producer = KafkaProducer(bootstrap_servers=info.bootstrap)
        producer.send("engagements", key=b"7", value=b'{"x":1}', partition=2).get(timeout=30)
        producer.close()
        consumer = KafkaConsumer(bootstrap_servers=info.bootstrap, enable_auto_commit=False)
        tp = TopicPartition("engagements", 2)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        records = consumer.poll(timeout_ms=10000)[tp]
        consumer.close()
        assert [(r.key, r.value, r.offset) for r in records] == [(b"7", b'{"x":1}', 0)]

        # Starting again returns the running broker instead of a second one.
        assert broker.start(broker.BrokerConfig(port=0)).pid == info.pid
    finally:
        assert broker.stop() is True
    assert not broker.is_running(info)
    assert cli(["status"]) == 3
    assert broker.stop() is False


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"port \(70000\)"):
        broker.BrokerConfig(port=70000)
    with pytest.raises(ValueError, match=r"heap_mb \(64\)"):
        broker.BrokerConfig(heap_mb=64)


def test_taken_port_is_refused(tmp_path, monkeypatch, kafka_bootstrap):
    monkeypatch.setenv("HSTU_STATE_DIR", str(tmp_path))
    port = int(kafka_bootstrap.rpartition(":")[2])
    with pytest.raises(broker.BrokerError, match=f"port {port} is already taken"):
        broker.start(broker.BrokerConfig(port=port))


def test_cluster_ids_never_look_like_options():
    # A leading '-' made `kafka-storage format -t <id>` fail one start in 64.
    assert not any(broker._cluster_id().startswith("-") for _ in range(2000))


def test_listener_security_is_checked_and_never_prints_a_password(tmp_path, monkeypatch):
    from config.secrets import Secret
    from infra.kafka.__main__ import listener_security

    with pytest.raises(ValueError, match="without spaces, quotes"):
        broker.SaslUser(name="alice", password=Secret('has"quote'))
    with pytest.raises(ValueError, match="at least one user"):
        broker.ListenerSecurity(users=())
    user = broker.SaslUser(name="alice", password=Secret("s3cret-pw"))
    with pytest.raises(ValueError, match="needs all of"):
        broker.ListenerSecurity(users=(user,), tls_cert_file=tmp_path / "x.crt")
    security = broker.ListenerSecurity(users=(user,))
    assert security.protocol == "SASL_PLAINTEXT"
    assert "s3cret" not in repr(broker.BrokerConfig(security=security))
    props = broker._server_properties(port=1, controller_port=2, data_dir=tmp_path / "data", security=security)
    assert "listeners=SASL_PLAINTEXT://127.0.0.1:1,CONTROLLER://127.0.0.1:2" in props
    assert 'user_alice="s3cret-pw"' in props  # PLAIN's users live in the broker's own (0600) properties

    monkeypatch.delenv("HSTU_KAFKA_SASL_PASSWORD", raising=False)
    with pytest.raises(broker.BrokerError, match="HSTU_KAFKA_SASL_PASSWORD"):
        listener_security("SASL_SSL", None)
    assert listener_security("PLAINTEXT", None) is None
