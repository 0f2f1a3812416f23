"""`python -m infra.kafka start|stop|status`: run the local Apache Kafka broker (see broker.py)."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from infra.kafka.broker import BrokerConfig, BrokerError, classpath, is_running, read_info, start, stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.kafka", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="resolve jars, format storage, start, create topics")
    p_start.add_argument("--port", type=int, default=BrokerConfig.port, help="client port; 0 picks a free one")
    p_start.add_argument("--heap-mb", type=int, default=BrokerConfig.heap_mb)
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
            info = start(BrokerConfig(port=args.port, heap_mb=args.heap_mb))
            print(f"kafka broker running at {info.bootstrap} (pid {info.pid}, ready in {time.monotonic() - t0:.1f} s)")
        elif args.command == "stop":
            print("kafka broker stopped" if stop() else "no kafka broker was running")
        elif args.command == "status":
            info = read_info()
            if info is not None and is_running(info):
                print(f"running at {info.bootstrap} (pid {info.pid})")
                return 0
            print("not running")
            return 3
    except (BrokerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
