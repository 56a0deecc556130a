# Two entry points, both from a fresh checkout: `make demo` and `make test`; `make test-unit` is the quick
# half of the tests (in-process, about a minute), `make test-system` the other half (README.md, "Tests").
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-unit test-system bench clean

setup: $(VENV)/.installed

# PYTHON: any of Python 3.9-3.12 (e.g. `make demo PYTHON=python3.12 VENV=.venv312`). constraints.txt pins
# the tested numpy (< 2) for each; the install also puts the start-up hook of startup/ into the venv,
# which restores the numpy names MXNet 1.9.1 uses (README.md, "Python 3.12 and numpy").
# The core installs without a framework: the demo, the examples and most tests are MXNet scripts, hence the
# `mxnet` extra (it installs nothing on Python 3.13, which MXNet 1.9.1 does not reach: see .ci/run's 3.13 job).
$(VENV)/.installed: pyproject.toml setup.py csrc/_kernels.pyx csrc/_compress.pyx csrc/_delivery.pyx constraints.txt startup/*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[mxnet,test,examples]"
	touch $@

# The bundled CNN over a whole local topology: central party + 2 parties x 2 workers.
demo: setup
	$(BIN)/geomx-launch --parties 2 --workers 2 -- \
		$(BIN)/python examples/cnn.py --cpu --data-slice-idx {slice} --epoch 5 --eval-every 10

# Every test (what CI runs, .ci/run): the unit and the system tests.
test: setup
	$(BIN)/python -m pytest -q

# The tests that run inside the pytest process (marker `unit`, tests/conftest.py).
test-unit: setup
	$(BIN)/python -m pytest -q -m unit

# The tests that start processes, talk to other processes or run topologies (marker `system`).
test-system: setup
	$(BIN)/python -m pytest -q -m system

clean:
	rm -rf $(VENV) build *.egg-info geomx/*.so csrc/*.c
