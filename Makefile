# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create or refresh .venv first (the `setup` target), so they work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU wheel by default; on a GPU machine install your CUDA build of torch into .venv first
# (or run `make setup TORCH_SPEC=torch`), it is kept as long as it satisfies pyproject.toml.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo
DEMO_PROCS ?= 2

.PHONY: setup system-deps demo test check lint format bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,hf]"
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m data_prep corpus=demo_books output_dir=$(DEMO_DIR)/data
	$(PY) -m data_prep.inspect_dataset $(DEMO_DIR)/data
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(DEMO_PROCS) -m pretrain experiment=demo \
		data_dir=$(DEMO_DIR)/data run_dir=$(DEMO_DIR)/run
	$(PY) -m pretrain.generate run_dir=$(DEMO_DIR)/run prompt="It was a dark and stormy night" \
		max_new_tokens=120 temperature=0.8 top_k=50 top_p=0.95 seed=0

# System packages some tests need (Chromium, Slurm, ...): one idempotent script each in .ci/deps/.
system-deps:
	@for script in .ci/deps/*.sh; do [ -e "$$script" ] || continue; bash "$$script" || exit 1; done

test: setup system-deps
	$(PY) -m pytest

check: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) benchmarks/bench_prep.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/bench_data.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
