#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default: local broker, local data.
#
#   bash infra/run_main.sh            # extra arguments go to the job
#
# Uses the broker already running from this checkout if there is one; otherwise starts one and
# stops it on exit.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash infra/setup.sh
py=.venv/bin/python
if ! "$py" -m infra.kafka status >/dev/null; then
  trap '"$py" -m infra.kafka stop' EXIT
  "$py" -m infra.kafka start --port 0
fi
"$py" -m infra.main_job "$@"
