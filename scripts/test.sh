#!/usr/bin/env bash
# Installs ckpt_async with its test extra into .venv (created if missing) and runs the suite.
# pytest's exit code 5 (no tests collected) is a failure here, as every non-zero code is.
source "$(dirname "$0")/_venv.sh" "[test]"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
