"""Command-line flags for the Kafka clients of infra's tools (producer, recorded-log replay):
the same `streaming.kafka_security.KafkaSecurityConfig` the streaming job reads from its config.

    python -m infra.producer --security SASL_SSL --sasl-mechanism SCRAM-SHA-512 --ca-file ca.crt

Credentials come from $HSTU_KAFKA_SASL_USERNAME and $HSTU_KAFKA_SASL_PASSWORD (or
--password-file), never from a flag.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from streaming.kafka_security import KafkaSecurityConfig, Mechanism, Protocol


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Kafka security (see docs/security.md)")
    group.add_argument("--security", choices=get_args(Protocol), default="PLAINTEXT", help="security protocol")
    group.add_argument("--sasl-mechanism", choices=get_args(Mechanism), default="SCRAM-SHA-512")
    group.add_argument("--ca-file", type=Path, help="PEM CA bundle the broker's certificate is checked against")
    group.add_argument("--password-file", type=Path, help="read the SASL password from this file, not the environment")


def security_from_args(args: argparse.Namespace) -> KafkaSecurityConfig | None:
    """The flags' security config; None for PLAINTEXT."""
    if args.security == "PLAINTEXT":
        return None
    return KafkaSecurityConfig(
        protocol=args.security,
        sasl_mechanism=args.sasl_mechanism,
        ca_file=args.ca_file,
        password_file=args.password_file,
    )
