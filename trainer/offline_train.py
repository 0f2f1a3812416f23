"""Train and evaluate HSTU (or the SASRec baseline) on MovieLens with the paper's protocol.

    python -m trainer.offline_train --config trainer/configs/hstu.yaml
    python -m trainer.offline_train --config trainer/configs/hstu.yaml data.dataset=ml-1m-subset train.epochs=20
    python -m trainer.offline_train --config trainer/configs/sasrec.yaml --out .state/offline/sasrec
    python -m trainer.offline_train --config trainer/configs/hstu.yaml model.layout=interleaved \\
        --publish .state/registry

Arguments after the options are `key=value` overrides of the YAML (see trainer/offline.py
`OfflineConfig`). Writes `metrics.json`, `curves.png`, `best.safetensors` and `last.safetensors`
to `--out` (default `.state/offline/<name>-<dataset>`), shows a progress bar with rate and ETA,
and prints one line per epoch on stderr plus the final results as one JSON line on stdout.
`--publish REGISTRY_DIR` also publishes the model of the epoch chosen on validation as a new
version of that model registry (trainer/registry.py), which serving follows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python trainer/offline_train.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.loader import ConfigError, load_config  # noqa: E402
from config.paths import state_dir  # noqa: E402
from trainer.offline import OfflineConfig, run_offline  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="YAML config (trainer/configs/*.yaml)")
    parser.add_argument("--out", type=Path, help="output folder (default .state/offline/<name>-<dataset>)")
    parser.add_argument("--no-progress", action="store_true", help="one log line per epoch instead of a bar")
    parser.add_argument("--publish", type=Path, metavar="REGISTRY_DIR", help="publish the chosen model as a version")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    args = parser.parse_args(argv)
    try:
        config = load_config(OfflineConfig, args.config, args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    out = args.out or state_dir("offline", f"{config.name}-{config.data.dataset}")
    results = run_offline(config, out_dir=out, progress=not args.no_progress, publish=args.publish)
    summary = {k: results[k] for k in ("name", "dataset", "best_epoch", "test", "seconds_per_epoch_median")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
