#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite against a real Kafka broker.
#
#   bash infra/test.sh                 # everything, as CI runs it
#   bash infra/test.sh tests/kernels   # extra arguments go to pytest
#
# Uses the broker already running from this checkout if there is one; otherwise starts one on a
# free port and stops it on exit.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash infra/setup.sh
py=.venv/bin/python
if ! "$py" -m infra.kafka status >/dev/null; then
  trap '"$py" -m infra.kafka stop' EXIT
  "$py" -m infra.kafka start --port 0
fi
"$py" -m pytest "$@"
