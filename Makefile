# The two commands a newcomer copies (README): `make run` and `make test`.
# CPU-only machines: torch is pinned to 2.13.0 (a plain `torch` may pull a multi-GB CUDA build);
# on a GPU machine use e.g. `make install TORCH=torch==2.13.0` from the CUDA index you need.
# torchvision is never installed (PyPI's is CUDA-linked and breaks CPU torch).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: install run demo test test-fast bench clean

$(BIN)/unigap: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

install: $(BIN)/unigap

run: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/unigap run configs/shapes.yaml

demo: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/unigap demo

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not ray and not slow"

bench: install
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) *.egg-info
