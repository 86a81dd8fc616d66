# make demo: install into .venv, then run reference images → stage 1 → stage 2 → evaluation end to
#            end on the trained toy-world model shipped in coerasing/assets/toy_world (no download).
# make test: install into .venv, then run the whole test suite (what CI and newcomers run).
# make test-fast: the inner loop: every test not marked slow.
# Tests run in parallel worker processes (pytest-xdist, one torch thread each): one per core, at most
# 4 (TEST_WORKERS=0: all in this one process); whole modules, longest first (tests/conftest.py).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)
DEMO   ?= outputs/demo
TEST_WORKERS ?= auto
XDIST   = -n $(TEST_WORKERS) --maxprocesses 4 --dist loadscope --no-loadscope-reorder
export HF_HUB_OFFLINE = 1
export PYTHONUNBUFFERED = 1

.PHONY: install test test-fast demo lint clean

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST)

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) -m coerasing.toy.demo --out $(DEMO)

clean:
	rm -rf $(VENV) outputs
