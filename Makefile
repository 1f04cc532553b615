# Set-up is part of every target: a fresh machine needs only python3 (>= 3.10) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-slow lint install

# torch first, pinned: the machine carries a CPU build of 2.13.0; an unpinned torch would pull
# a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,flower,mobile,train-mobile]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cadfl run

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q
	$(VENV)/bin/ruff check cadfl tests benchmarks scripts

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

lint: $(STAMP)
	$(VENV)/bin/ruff check cadfl tests benchmarks scripts
