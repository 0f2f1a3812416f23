#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default: local broker, local data.
#
#   bash infra/run_main.sh            # extra arguments go to the job
#
# Uses the broker already running from this checkout if there is one; otherwise starts one and
# stops it on exit (infra/with_broker.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec bash "$root/infra/with_broker.sh" .venv/bin/python -m infra.main_job "$@"
