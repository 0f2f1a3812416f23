"""A real single-node Apache Kafka broker (KRaft mode) on 127.0.0.1, without Docker.

The broker's jars come from Maven Central through `infra/kafka/pom.xml` (Maven caches them in
~/.m2); its data, config and log live in the git-ignored `.state/kafka/` of the checkout.

    python -m infra.kafka start            # port 9092, or --port 0 for a free one
    python -m infra.kafka status           # exit 0 when it answers, 3 when it does not
    python -m infra.kafka stop

From Python:

    >>> from infra.kafka.broker import BrokerConfig, start, stop
    >>> info = start(BrokerConfig(port=0))
    >>> info.bootstrap
    '127.0.0.1:39125'
    >>> stop()

A secured broker: `BrokerConfig(security=ListenerSecurity(users=..., tls_cert_file=...))` makes the
client listener SASL_SSL (or SASL_PLAINTEXT without a certificate) with PLAIN, SCRAM-SHA-256 and
SCRAM-SHA-512 for every user; clients without valid credentials are refused. The controller
listener stays PLAINTEXT on 127.0.0.1 (only this broker talks to it). `python -m infra.kafka
start --security SASL_SSL` does it from the shell (see __main__.py). The users' passwords end up
in the broker's own `server.properties` (PLAIN's JAAS users) and SCRAM credentials in its
metadata log, both in the state folder with mode 0600: what a broker needs, never a repo file.
(Kafka's storage tool takes SCRAM credentials only as arguments, so they are visible to `ps` on
this machine for the seconds `format` runs: fine for a local broker, not for a shared host.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from config.paths import REPO_ROOT, state_dir
from config.secrets import Secret

log = logging.getLogger(__name__)

POM = REPO_ROOT / "infra" / "kafka" / "pom.xml"
LOG4J_CONFIG = REPO_ROOT / "infra" / "kafka" / "log4j2.yaml"


class BrokerError(RuntimeError):
    """The broker could not be resolved, formatted, started or reached."""


@dataclass(frozen=True, kw_only=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int = -1  # keep everything: recorded logs and tests read from offset 0


# Characters that the JAAS config, the properties file or the storage tool's --add-scram syntax
# would take for syntax; user names and passwords of the local broker may not hold them.
_UNSAFE = set("\"\\';,=[]{}$#!:") | {chr(c) for c in range(33)} | {chr(127)}
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True, kw_only=True)
class SaslUser:
    """A user the broker accepts, with every mechanism of SASL_MECHANISMS."""

    name: str
    password: Secret

    def __post_init__(self) -> None:
        if not self.name or _UNSAFE & set(self.name):
            raise ValueError(f"user name {self.name!r} must be non-empty, without spaces, quotes or ,;=[]{{}}$#!:")
        if not isinstance(self.password, Secret) or not self.password or _UNSAFE & set(self.password.reveal()):
            raise ValueError(
                f"the password of user {self.name!r} must be a non-empty Secret without spaces, quotes or ,;=[]{{}}$#!:"
            )


@dataclass(frozen=True, kw_only=True)
class ListenerSecurity:
    """The client listener's security: SASL for `users` (the first one is also what the broker
    uses to reach itself, and what `start` creates topics as), over TLS when a certificate is
    given (SASL_SSL), else over plain TCP (SASL_PLAINTEXT).

    tls_cert_file: PEM certificate chain of the broker (its certificate first).
    tls_key_file: its PEM private key, PKCS#8, unencrypted.
    tls_ca_file: the CA that signed it, which clients (and the broker itself) verify it against.
    """

    users: tuple[SaslUser, ...]
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.users:
            raise ValueError("a SASL listener needs at least one user")
        if len({u.name for u in self.users}) != len(self.users):
            raise ValueError("user names must be unique")
        tls = (self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        if any(f is not None for f in tls) and not all(f is not None for f in tls):
            raise ValueError("TLS needs all of tls_cert_file, tls_key_file and tls_ca_file (or none: SASL_PLAINTEXT)")
        for f in tls:
            if f is not None and not Path(f).is_file():
                raise ValueError(f"TLS file {str(f)!r} does not exist")

    @property
    def protocol(self) -> str:
        return "SASL_SSL" if self.tls_cert_file is not None else "SASL_PLAINTEXT"

    def client_security(self, user: SaslUser | None = None, mechanism: str = "PLAIN"):
        """(KafkaSecurityConfig, SaslCredentials) for a client of this listener, as `user`
        (default: the first one)."""
        from streaming.kafka_security import KafkaSecurityConfig, SaslCredentials

        user = user or self.users[0]
        config = KafkaSecurityConfig(
            protocol=self.protocol,
            sasl_mechanism=mechanism,
            ca_file=self.tls_ca_file,
            username=user.name,
        )
        return config, SaslCredentials(username=user.name, password=user.password)


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """How to run the local broker. `port=0` picks a free port (what CI does).

    security: None (default) listens PLAINTEXT, without authentication; a ListenerSecurity
      requires SASL (and TLS when it has a certificate).
    """

    port: int = 9092
    controller_port: int = 0
    heap_mb: int = 512
    start_timeout_s: float = 90.0
    topics: tuple[TopicSpec, ...] = field(
        default_factory=lambda: (
            TopicSpec(name="engagements", partitions=4),
            TopicSpec(name="engagements.dlq", partitions=1),
        )
    )
    security: ListenerSecurity | None = None

    def __post_init__(self) -> None:
        for name in ("port", "controller_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"{name} ({value}) must be a TCP port in 0..65535 (0 picks a free one)")
        if self.heap_mb < 128:
            raise ValueError(f"heap_mb ({self.heap_mb}) must be at least 128 for a Kafka broker")


@dataclass(frozen=True, kw_only=True)
class BrokerInfo:
    """What `start` leaves in `.state/kafka/broker.json` for `status`, `stop` and the tests."""

    pid: int
    port: int
    controller_port: int
    cluster_id: str
    started_at: float
    security_protocol: str = "PLAINTEXT"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def _dir() -> Path:
    return state_dir("kafka")


def _info_path() -> Path:
    return _dir() / "broker.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); read its state to be sure.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def classpath() -> str:
    """The broker's runtime classpath, resolved by Maven once per pom.xml content."""
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:16]
    cache = _dir() / f"classpath-{digest}.txt"
    if cache.exists() and all(Path(p).exists() for p in cache.read_text().split(":")):
        return cache.read_text()
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("Maven (mvn) is not on PATH: install it (apt-get install maven) to fetch the Kafka jars")
    log.info("resolving Kafka jars from Maven Central (first run only)")
    tmp = cache.with_suffix(".tmp")
    proc = subprocess.run(
        [mvn, "-q", "-B", "-f", str(POM), "dependency:build-classpath", f"-Dmdep.outputFile={tmp}"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not tmp.exists():
        raise BrokerError(f"mvn could not resolve {POM}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    tmp.replace(cache)
    return cache.read_text()


def _java() -> str:
    java = shutil.which(
        "java", path=os.path.join(os.environ.get("JAVA_HOME", ""), "bin") + os.pathsep + os.environ.get("PATH", "")
    )
    if java is None:
        raise BrokerError("java is not on PATH: install OpenJDK 17 (apt-get install openjdk-17-jre-headless)")
    return java


def _security_properties(security: ListenerSecurity, root: Path) -> list[str]:
    """The SASL (and TLS) settings of the client listener, named after its protocol."""
    name = security.protocol.lower()
    first = security.users[0]
    plain_users = " ".join(f'user_{u.name}="{u.password.reveal()}"' for u in security.users)
    lines = [
        f"sasl.enabled.mechanisms={','.join(SASL_MECHANISMS)}",
        "sasl.mechanism.inter.broker.protocol=PLAIN",
        f"listener.name.{name}.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule "
        f'required username="{first.name}" password="{first.password.reveal()}" {plain_users};',
        f"listener.name.{name}.scram-sha-256.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        f"listener.name.{name}.scram-sha-512.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
    ]
    if security.tls_cert_file is not None:
        assert security.tls_key_file is not None and security.tls_ca_file is not None
        # Kafka's PEM key store: the private key and the certificate chain in one file.
        keystore = root / "keystore.pem"
        _write_private(
            keystore, Path(security.tls_key_file).read_bytes() + b"\n" + Path(security.tls_cert_file).read_bytes()
        )
        lines += [
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={security.tls_ca_file}",
            "ssl.client.auth=none",
        ]
    return lines


def _write_private(path: Path, data: bytes | str) -> None:
    """Write a file only its owner can read (it holds passwords or a private key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def _server_properties(
    *, port: int, controller_port: int, data_dir: Path, security: ListenerSecurity | None = None
) -> str:
    client = security.protocol if security is not None else "PLAINTEXT"
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
            f"listeners={client}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners={client}://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            f"inter.broker.listener.name={client}",
            f"listener.security.protocol.map=CONTROLLER:PLAINTEXT,{client}:{client}",
            *(_security_properties(security, data_dir.parent) if security is not None else []),
            f"log.dirs={data_dir}",
            "num.partitions=1",
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "log.retention.ms=-1",
            "message.max.bytes=10485760",
            "",
        ]
    )


def _cluster_id() -> str:
    """A random KRaft cluster id (base64url of 16 bytes), like Kafka's own Uuid.randomUuid:
    never one starting with '-', which the storage tool's argument parser takes for an option."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def read_info() -> BrokerInfo | None:
    """The running broker's info, or None when none was started from this checkout."""
    path = _info_path()
    if not path.exists():
        return None
    return BrokerInfo(**json.loads(path.read_text()))


def is_running(info: BrokerInfo | None = None) -> bool:
    info = info or read_info()
    return info is not None and _pid_alive(info.pid) and _port_open(info.port)


def start(config: BrokerConfig = BrokerConfig()) -> BrokerInfo:
    """Start the broker (or return the one already running), wait for it, create the topics."""
    existing = read_info()
    if existing is not None and is_running(existing):
        wanted = config.security.protocol if config.security is not None else "PLAINTEXT"
        if existing.security_protocol != wanted:
            raise BrokerError(
                f"the broker running at {existing.bootstrap} listens {existing.security_protocol}, not {wanted}: "
                "run `python -m infra.kafka stop` first"
            )
        log.info("broker already running at %s (pid %d)", existing.bootstrap, existing.pid)
        ensure_topics(existing.bootstrap, config.topics, **_admin_security(config))
        return existing
    if existing is not None and _pid_alive(existing.pid):
        raise BrokerError(
            f"a broker process (pid {existing.pid}) from this checkout is alive but not answering on "
            f"port {existing.port}: run `python -m infra.kafka stop` first"
        )
    port = config.port or _free_port()
    controller_port = config.controller_port or _free_port()
    if _port_open(port):
        raise BrokerError(f"port {port} is already taken by another process: pass --port 0 to pick a free one")

    cp = classpath()
    java = _java()
    root = _dir()
    data_dir = root / "data"
    # Fresh storage each start: the controller port is part of the formatted quorum, and tests
    # create their own topics. Recorded logs, not broker state, are what we keep.
    shutil.rmtree(data_dir, ignore_errors=True)
    props = root / "server.properties"
    _write_private(
        props,
        _server_properties(port=port, controller_port=controller_port, data_dir=data_dir, security=config.security),
    )
    cluster_id = _cluster_id()
    jvm = [
        java,
        f"-Xmx{config.heap_mb}m",
        f"-Xms{min(config.heap_mb, 256)}m",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        f"-Dkafka.logs.dir={root}",
        "-cp",
        cp,
    ]
    scram = []
    for user in config.security.users if config.security is not None else ():
        for mechanism in SASL_MECHANISMS[1:]:
            # SCRAM credentials live in the cluster's metadata; with KRaft they are written at format.
            scram += ["--add-scram", f"{mechanism}=[name={user.name},password={user.password.reveal()}]"]
    fmt = subprocess.run(
        jvm + ["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props), *scram],
        capture_output=True,
        text=True,
    )
    if fmt.returncode != 0:
        out = _redact(f"{fmt.stdout[-2000:]}\n{fmt.stderr[-2000:]}", config.security)
        raise BrokerError(f"formatting KRaft storage failed:\n{out}")

    t0 = time.monotonic()
    with open(root / "stdout.log", "ab") as out:
        proc = subprocess.Popen(
            jvm + ["kafka.Kafka", str(props)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=root,
        )
    info = BrokerInfo(
        pid=proc.pid,
        port=port,
        controller_port=controller_port,
        cluster_id=cluster_id,
        started_at=time.time(),
        security_protocol=config.security.protocol if config.security is not None else "PLAINTEXT",
    )
    _info_path().write_text(json.dumps(asdict(info)))
    try:
        _wait_ready(info, proc, config.start_timeout_s, _admin_security(config))
        ensure_topics(info.bootstrap, config.topics, **_admin_security(config))
    except BaseException:
        stop()
        raise
    log.info(
        "broker up at %s (%s, pid %d) in %.1f s",
        info.bootstrap,
        info.security_protocol,
        info.pid,
        time.monotonic() - t0,
    )
    return info


def _admin_security(config: BrokerConfig) -> dict:
    """`security=`/`credentials=` for this module's own admin client (the listener's first user)."""
    if config.security is None:
        return {}
    security, credentials = config.security.client_security()
    return {"security": security, "credentials": credentials}


def _redact(text: str, security: ListenerSecurity | None) -> str:
    for user in security.users if security is not None else ():
        text = text.replace(user.password.reveal(), "***")
    return text


def _wait_ready(info: BrokerInfo, proc: subprocess.Popen, timeout_s: float, security: dict) -> None:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    from streaming.kafka_security import kafka_python_kwargs

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (
                (_dir() / "server.log").read_text(errors="replace")[-3000:] if (_dir() / "server.log").exists() else ""
            )
            raise BrokerError(f"the broker exited with code {proc.returncode} while starting:\n{tail}")
        if _port_open(info.port):
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=info.bootstrap, request_timeout_ms=5000, **kafka_python_kwargs(**security)
                )
                try:
                    admin.list_topics()
                    return
                finally:
                    admin.close()
            except KafkaError:
                pass
        time.sleep(0.25)
    raise BrokerError(
        f"the broker did not accept connections on {info.bootstrap} within {timeout_s:.0f} s; "
        f"see {_dir() / 'server.log'}"
    )


def ensure_topics(bootstrap: str, topics: tuple[TopicSpec, ...], *, security=None, credentials=None) -> None:
    """Create the topics that do not exist yet (existing ones are left as they are).

    security / credentials: a `streaming.kafka_security.KafkaSecurityConfig` (and, optionally,
    the credentials to use instead of the ones it names) for a secured broker."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    from streaming.kafka_security import kafka_python_kwargs

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=15000, **kafka_python_kwargs(security, credentials)
    )
    try:
        present = set(admin.list_topics())
        new = [
            NewTopic(
                name=t.name,
                num_partitions=t.partitions,
                replication_factor=1,
                topic_configs={"retention.ms": str(t.retention_ms)},
            )
            for t in topics
            if t.name not in present
        ]
        if new:
            admin.create_topics(new, timeout_ms=15000)
        # Wait until metadata shows every partition with a leader.
        deadline = time.monotonic() + 30
        wanted = {t.name: t.partitions for t in topics}
        while time.monotonic() < deadline:
            meta = {m["name"]: m for m in admin.describe_topics(list(wanted))}
            if all(
                len(meta.get(n, {}).get("partitions", [])) >= p
                and all(pp["leader_id"] >= 0 for pp in meta[n]["partitions"])
                for n, p in wanted.items()
            ):
                return
            time.sleep(0.2)
        raise BrokerError(f"topics {sorted(wanted)} did not get partition leaders within 30 s")
    finally:
        admin.close()


def stop(timeout_s: float = 30.0) -> bool:
    """Stop the broker started from this checkout. Returns False when none was running."""
    info = read_info()
    if info is None:
        return False
    was_alive = _pid_alive(info.pid)
    if was_alive:
        try:
            os.killpg(info.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout_s
        while _pid_alive(info.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _pid_alive(info.pid):
            log.warning("broker pid %d ignored SIGTERM for %.0f s; killing it", info.pid, timeout_s)
            os.killpg(info.pid, signal.SIGKILL)
        try:  # reap it if it is our child
            os.waitpid(info.pid, os.WNOHANG)
        except ChildProcessError:
            pass
    _info_path().unlink(missing_ok=True)
    return was_alive
