#!/usr/bin/env bash
# Finds or makes the Python environment for `make test` / `make bench` and writes its interpreter's
# path to .attn_fast_env. Order:
#   1. an existing .venv whose python imports torch and triton;
#   2. the current python3 when it already imports torch and triton (a GPU machine: preinstalled
#      packages, no network). attn_fast runs from the source tree there, without installing;
#   3. otherwise a new .venv: torch==2.14.1 torchvision==0.29.1 (on this kind of machine they come
#      from the local disk), then attn_fast itself, editable, with its test/bench/models extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON3=${PYTHON:-python3}
have_torch() { "$1" -c "import torch, triton" >/dev/null 2>&1; }

if [ -x .venv/bin/python ] && have_torch .venv/bin/python; then
  py=.venv/bin/python
elif have_torch "$PYTHON3"; then
  py=$(command -v "$PYTHON3")
else
  echo "== making .venv (torch, triton, attn_fast and its extras)" >&2
  "$PYTHON3" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >&2 || true
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" >&2
  py=.venv/bin/python
fi

# In our own .venv, install attn_fast (editable) and its extras whenever setup.py changed.
if [ "$py" = .venv/bin/python ]; then
  stamp=.venv/.attn_fast-setup
  sum=$(sha1sum setup.py | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
    echo "== installing attn_fast (editable) with extras test, bench, models" >&2
    .venv/bin/python -m pip install -q -e ".[test,bench,models]" >&2
    echo "$sum" > "$stamp"
  fi
fi
echo "$py" > .attn_fast_env
echo "== python: $py" >&2
