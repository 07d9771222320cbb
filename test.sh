#!/usr/bin/env bash
# Install what is missing, then run the whole test suite (unit, integration, browser).
# Extra arguments go to pytest (e.g. ./test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh --test

if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian's chromium for the browser tests"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: /usr/bin/chromium is missing and cannot be installed here; browser tests will be skipped"
    fi
fi

export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
