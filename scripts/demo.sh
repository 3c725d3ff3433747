#!/usr/bin/env bash
# Installs ckpt_async with its fast extra (zlib-ng's crc32) into .venv (created if missing) and
# runs the training demo.
source "$(dirname "$0")/_venv.sh" "[fast]"
exec .venv/bin/python -m ckpt_async.demo "$@"
