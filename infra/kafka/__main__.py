"""`python -m infra.kafka start|stop|status`: run the local Apache Kafka broker (see broker.py).

A broker that requires SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), over TLS with SASL_SSL, for
the user in HSTU_KAFKA_SASL_USERNAME / HSTU_KAFKA_SASL_PASSWORD:

    export HSTU_KAFKA_SASL_USERNAME=hstu HSTU_KAFKA_SASL_PASSWORD=$(openssl rand -hex 16)
    python -m infra.kafka start --security SASL_SSL         # prints the CA file clients trust

Without --tls-dir, SASL_SSL makes a throwaway CA and broker certificate in .state/kafka/tls/
(ca.crt, server.crt, server.key); --tls-dir DIR uses those three files from DIR instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from config.paths import state_dir
from config.secrets import Secret
from infra.kafka.broker import (
    BrokerConfig,
    BrokerError,
    ListenerSecurity,
    SaslUser,
    classpath,
    is_running,
    read_info,
    start,
    stop,
)

USER_ENV, PASSWORD_ENV = "HSTU_KAFKA_SASL_USERNAME", "HSTU_KAFKA_SASL_PASSWORD"


def listener_security(protocol: str, tls_dir: str | None) -> ListenerSecurity | None:
    """The listener's security for `--security`, its user from the environment."""
    if protocol == "PLAINTEXT":
        return None
    name, password = os.environ.get(USER_ENV, ""), os.environ.get(PASSWORD_ENV, "")
    if not name or not password:
        raise BrokerError(f"--security {protocol} needs {USER_ENV} and {PASSWORD_ENV} set: the user the broker accepts")
    user = SaslUser(name=name, password=Secret(password))
    if protocol == "SASL_PLAINTEXT":
        return ListenerSecurity(users=(user,))
    if tls_dir is None:
        from infra.kafka.tls import make_dev_certificates

        certs = make_dev_certificates(state_dir("kafka", "tls"))
        ca, cert, key = certs.ca_file, certs.cert_file, certs.key_file
    else:
        ca, cert, key = (Path(tls_dir) / n for n in ("ca.crt", "server.crt", "server.key"))
    return ListenerSecurity(users=(user,), tls_cert_file=cert, tls_key_file=key, tls_ca_file=ca)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.kafka", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="resolve jars, format storage, start, create topics")
    p_start.add_argument("--port", type=int, default=BrokerConfig.port, help="client port; 0 picks a free one")
    p_start.add_argument("--heap-mb", type=int, default=BrokerConfig.heap_mb)
    p_start.add_argument(
        "--security",
        choices=("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL"),
        default="PLAINTEXT",
        help=f"the client listener's protocol; SASL ones accept the user ${USER_ENV} / ${PASSWORD_ENV}",
    )
    p_start.add_argument("--tls-dir", help="SASL_SSL: folder with ca.crt, server.crt, server.key (default: throwaway)")
    sub.add_parser("stop", help="stop the broker started from this checkout")
    sub.add_parser("status", help="exit 0 and print the address when the broker answers, else exit 3")
    sub.add_parser("fetch", help="only resolve the broker's jars from Maven Central")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.WARNING)  # the client logs every connection at INFO

    try:
        if args.command == "fetch":
            print(f"{len(classpath().split(':'))} jars resolved")
        elif args.command == "start":
            t0 = time.monotonic()
            security = listener_security(args.security, args.tls_dir)
            info = start(BrokerConfig(port=args.port, heap_mb=args.heap_mb, security=security))
            print(
                f"kafka broker running at {info.bootstrap} ({info.security_protocol}, pid {info.pid}, "
                f"ready in {time.monotonic() - t0:.1f} s)"
            )
            if security is not None and security.tls_ca_file is not None:
                print(f"clients trust its certificate with kafka.security.ca_file={security.tls_ca_file}")
        elif args.command == "stop":
            print("kafka broker stopped" if stop() else "no kafka broker was running")
        elif args.command == "status":
            info = read_info()
            if info is not None and is_running(info):
                print(f"running at {info.bootstrap} ({info.security_protocol}, pid {info.pid})")
                return 0
            print("not running")
            return 3
    except (BrokerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
