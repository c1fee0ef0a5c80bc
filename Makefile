# Two commands do all the set-up on a fresh machine with Python 3.11+:
#   make demo   creates .venv, installs tokensvc, shows the whole flow on loopback
#   make test   creates .venv, installs tokensvc with test tools, runs the tests
# and make run serves tokensvc on 127.0.0.1:50051 (SQLite in ./data).
# make image builds the container image (podman or docker); make image-test
# builds it on a Debian base made here, runs it with podman and checks it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DEMO_ARGS ?=
IMAGE ?= tokensvc
ENGINE ?= $(shell command -v podman || command -v docker)

.PHONY: demo run test lint protos check-protos image image-test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tokensvc demo $(DEMO_ARGS)

run: $(STAMP)
	$(BIN)/tokensvc serve --data-dir ./data

test: $(STAMP)
	$(BIN)/pytest -q

# podman's default (OCI) format would drop the HEALTHCHECK.
image:
	$(ENGINE) build $(if $(findstring podman,$(ENGINE)),--format docker) -t $(IMAGE) .

image-test: $(STAMP)
	tests/image/prepare
	$(BIN)/pytest -q -m image tests/test_image.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/tokensvc/v1/tokensvc.proto

check-protos: protos
	git diff --exit-code -- tokensvc/v1 || (echo "generated stubs are stale: run 'make protos' and commit" >&2; exit 1)
	test -z "$$(git status --porcelain -- tokensvc/v1)" || (echo "untracked generated stubs: commit them" >&2; exit 1)

clean:
	rm -rf $(VENV) data
