#!/usr/bin/env bash
# Create .venv and install what is missing. Usage: scripts/setup_env.sh [--test]
# Re-running is cheap: pip runs only when a requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

pick_python() {
    for candidate in python3.11 python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] < (3, 14) else 1)'; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: Python 3.10 to 3.13 is needed (python3.11 preferred)" >&2
    return 1
}

if [ ! -x .venv/bin/python ]; then
    python_bin=$(pick_python)
    echo "creating .venv with $python_bin"
    "$python_bin" -m venv .venv
fi
# pip's own progress stays visible: the first install takes minutes and should not look stuck.
pip=(.venv/bin/python -m pip --disable-pip-version-check)

stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

runtime_stamp=".venv/.installed-runtime-$(stamp_of requirements.txt)"
if [ ! -f "$runtime_stamp" ]; then
    echo "installing runtime packages into .venv (first run takes a few minutes)"
    torch_args=()
    [ -n "${TORCH_INDEX_URL:-}" ] && torch_args=(--index-url "$TORCH_INDEX_URL")
    # torch first, so no other package pulls a different (CUDA) build.
    "${pip[@]}" install "${torch_args[@]}" "torch==2.13.0"
    "${pip[@]}" install -r requirements.txt
    # open_clip ships CLIP's BPE vocabulary; --no-deps keeps it from pulling torchvision.
    "${pip[@]}" install --no-deps "open_clip_torch>=3.3,<4"
    rm -f .venv/.installed-runtime-*
    touch "$runtime_stamp"
fi

if [ "$want_test" = 1 ]; then
    test_stamp=".venv/.installed-test-$(stamp_of requirements-test.txt)"
    if [ ! -f "$test_stamp" ]; then
        echo "installing test packages into .venv"
        "${pip[@]}" install -r requirements-test.txt
        rm -f .venv/.installed-test-*
        touch "$test_stamp"
    fi
fi
