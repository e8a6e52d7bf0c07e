# `make test` and `make bench` set up everything they need on a fresh machine (tools/ensure_env.sh).
PY = $(shell cat .attn_fast_env)
PYTEST_ARGS ?=

.PHONY: env test bench compile-profile clean

env:
	@./tools/ensure_env.sh

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: env
	$(PY) -m bench

compile-profile: env
	$(PY) -m attn_fast.kernels.aot

clean:
	rm -rf .venv .attn_fast_env .pytest_cache build *.egg-info
