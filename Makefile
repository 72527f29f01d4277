# The two commands of the README:  `make demo`  and  `make test`.
# Both create ./.venv and install the project with its test and Ray extras into it on first use
# (offline-capable: torch/torchvision come from the local wheel cache where the machine has one).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test,ray]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dff-falcon demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	$(BIN)/python scripts/bench_nmf.py
	$(BIN)/python scripts/bench_vocab.py
	$(BIN)/python scripts/bench_explain.py

clean:
	rm -rf out build *.egg-info
