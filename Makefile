# nitrovault — the two commands that matter: `make run` (the local stack, end to end) and `make test`.
# Set-up is idempotent: the virtualenv is (re)built only when pyproject.toml or the lock file changes.
# torch is installed first and pinned (a CPU build); an unpinned torch pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS := model,demo,dev,infra,bench
export JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION := 1

.PHONY: venv system run test lint bench synth lock clean

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements/lock.txt -e '.[$(EXTRAS)]'
	touch $@

venv: $(STAMP)

## System packages from Debian's registry: redis-server is the local shared state store (real, TLS).
system:
	@command -v redis-server >/dev/null 2>&1 || command -v valkey-server >/dev/null 2>&1 \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null)

## The main job: the local stack serving a sealed model end to end, then exit.
run: venv system
	$(BIN)/nitrovault local up --once

## The whole test suite (lint first: it is cheap and catches what tests do not).
test: venv system
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/python scripts/gen_sealed_vectors.py --check
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

## Benchmarks: one JSON object per line, each with `name` and `ratio` against a baseline of the same run.
## socat (Debian's package) is bench_relay's reference splice; without it that figure is null, not an error.
bench: venv system
	command -v socat >/dev/null || (apt-get update -qq && apt-get install -y -qq socat) \
		|| echo "socat could not be installed: bench_relay reports its socat figures as null"
	$(BIN)/python -m bench.run

## Synthesize the CDK app into cdk.out/ (cdk-nag runs too). The PCR manifest is the image build's
## pcr-manifest.json when present, else the test fixture (fine for CI, never for a deploy);
## more context: make synth CDK_CONTEXT="-c account=123456789012 -c region=eu-west-1".
PCR_MANIFEST ?= $(if $(wildcard pcr-manifest.json),pcr-manifest.json,tests/infra/pcr-manifest.sample.json)
CDK_CONTEXT  ?=
synth: venv
	rm -rf cdk.out
	$(BIN)/python -m infra.app -c pcrManifest=$(PCR_MANIFEST) $(CDK_CONTEXT)

## Re-pin every dependency (after changing pyproject.toml).
lock: venv
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e ' > requirements/lock.txt

clean:
	rm -rf $(VENV) .nitrovault cdk.out .pytest_cache .ruff_cache .mypy_cache
