#!/usr/bin/env bash
# Installs ckpt_async into .venv (created if missing) and runs the training demo.
source "$(dirname "$0")/_venv.sh" ""
exec .venv/bin/python -m ckpt_async.demo "$@"
