#!/usr/bin/env bash
# Set up (if needed), make sure this checkout's Kafka broker runs, then run a command.
#
#   bash infra/with_broker.sh .venv/bin/python -m pytest tests/streaming
#
# Uses the broker already running from this checkout if there is one; otherwise starts one on a
# free port and stops it when the command ends (success, failure or Ctrl-C). The command runs
# from the repository root. infra/run_main.sh and infra/test.sh are the two users.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash infra/setup.sh
py=.venv/bin/python
if ! "$py" -m infra.kafka status >/dev/null; then
  trap '"$py" -m infra.kafka stop' EXIT
  "$py" -m infra.kafka start --port 0
fi
"$@"
