#!/usr/bin/env bash
# Install what is missing into .venv, build the demo models on first run, open the app.
# Extra arguments go to app.py (e.g. --port 7861, --listen --auth user:pass).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh
export GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python app.py "$@"
