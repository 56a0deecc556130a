# Two entry points, both from a fresh checkout: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# numpy is pinned (constraints.txt): MXNet 1.9.1 breaks with numpy >= 1.24.
$(VENV)/.installed: pyproject.toml setup.py csrc/_kernels.pyx csrc/_compress.pyx csrc/_delivery.pyx constraints.txt startup/*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test,examples]"
	touch $@

# The bundled CNN over a whole local topology: central party + 2 parties x 2 workers.
demo: setup
	$(BIN)/geomx-launch --parties 2 --workers 2 -- \
		$(BIN)/python examples/cnn.py --cpu --data-slice-idx {slice} --epoch 5 --eval-every 10

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info geomx/*.so csrc/*.c
