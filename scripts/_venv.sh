# Sourced by demo.sh and test.sh: creates .venv when missing and installs ckpt_async into it
# with the extras given as "$1" (e.g. "[test]").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".$1"
