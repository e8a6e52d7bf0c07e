# `make test` and `make bench` set up everything they need on a fresh machine (tools/ensure_env.sh).
PY = $(shell cat .attn_fast_env)
PYTEST_ARGS ?=

.PHONY: env test fuzz bench compile-profile clean

env:
	@./tools/ensure_env.sh

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Release check: the property tests of tests/test_fuzz.py with random draws, ATTN_FAST_FUZZ_EXAMPLES
# examples per op (default 500, attention twice that). The profile is chosen by HYPOTHESIS_PROFILE:
# pytest's --hypothesis-profile is applied before the test module registers "fuzz".
fuzz: env
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics $(PYTEST_ARGS)

bench: env
	$(PY) -m bench

compile-profile: env
	$(PY) -m attn_fast.kernels.aot

clean:
	rm -rf .venv .attn_fast_env .pytest_cache build *.egg-info
