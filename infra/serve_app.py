"""Deploy the Serve app onto a running Ray cluster and return (the app keeps running there).

    RAY_ADDRESS=127.0.0.1:6379 python -m infra.serve_app [--port 8000] [--replicas 2] [key=value ...]

The `key=value` arguments are the app's (serving.config.ServingConfig, as for `serve run
serving.app:app key=value`). HTTP binds to 127.0.0.1 unless `--host` says otherwise (see
docs/operations.md before exposing it). Waits until `/healthz` answers (200 once a version is
loaded, 503 before) and exits 0; exit 2 on a bad config. `serve deploy serving/config.yaml`
does the same through a cluster's dashboard; this needs only the cluster's address, so the main
loop (infra/loop.py) runs it as a driver of its own (with the cluster's token in its
environment) and never connects to Ray itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import urllib.error
import urllib.request

from config.loader import ConfigError
from config.logs import setup_logging, third_party_deprecations

log = logging.getLogger("infra.serve_app")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.serve_app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for /healthz")
    parser.add_argument("args", nargs="*", help="key=value arguments of the app (serving.config)")
    args = parser.parse_args(argv)
    setup_logging()
    from serving.config import load_serving_config

    try:
        config = load_serving_config(dict(a.split("=", 1) for a in args.args))
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with third_party_deprecations():
        import ray
        from ray import serve

        from serving.app import Recommender

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), namespace="serve", log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(
        Recommender.options(num_replicas=args.replicas).bind(config), name="hstu", route_prefix="/", blocking=False
    )
    deadline = time.monotonic() + args.timeout
    url = f"http://127.0.0.1:{args.port}/healthz"
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except urllib.error.HTTPError:  # 503: up, no version loaded yet
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                print(f"error: {url} did not answer in {args.timeout:.0f} s", file=sys.stderr)
                return 1
            time.sleep(1)
    print(f"serving on http://{args.host}:{args.port} ({args.replicas} replica(s))", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
