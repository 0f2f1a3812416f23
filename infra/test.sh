#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite against a real Kafka broker.
#
#   bash infra/test.sh                 # everything, as CI runs it
#   bash infra/test.sh tests/kernels   # extra arguments go to pytest
#
# Uses the broker already running from this checkout if there is one; otherwise starts one on a
# free port and stops it on exit (infra/with_broker.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec bash "$root/infra/with_broker.sh" .venv/bin/python -m pytest "$@"
