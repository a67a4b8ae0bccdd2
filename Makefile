# Two commands on a fresh machine with only python3 (and make):
#   make demo   set up .venv, train gpt_tiny on the bundled KJV text under bf16, print loss + sample
#   make test   set up .venv, run the CPU test suite (8 fake devices)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean aot-tpu aot-tpu-compare

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m bf16jax.main --config=configs/gpt_tiny.py --config.precision=bf16 --workdir=runs/gpt_tiny_bf16

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check bf16jax tests configs experiments colab
	$(BIN)/ruff format --check bf16jax tests configs experiments colab

# Ahead-of-time compile gpt_1b / t5_base for TPU pods (v5e-64, v5p-128, v4-32) on this CPU
# machine: libtpu (~1.3 GB, the `tpu` extra) goes into its own venv, never into $(VENV).
TPU_VENV := .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed
AOT_ARGS ?=

$(TPU_STAMP): pyproject.toml
	$(PY) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(TPU_VENV)/bin/python -m pip install -q -e ".[tpu]"
	touch $(TPU_STAMP)

aot-tpu: $(TPU_STAMP)
	$(TPU_VENV)/bin/python experiments/aot_tpu.py $(AOT_ARGS)

# bf16jax's gpt2_124m train step beside the plain-JAX peer's, compiled for one TPU v5e chip
# (results/program_compare/: FLOPs, bytes, HBM, copies, reductions, converts, fusions).
COMPARE_ARGS ?=
aot-tpu-compare: $(TPU_STAMP)
	$(TPU_VENV)/bin/python experiments/program_compare.py --dump_hlo $(COMPARE_ARGS)

clean:
	rm -rf $(VENV) $(TPU_VENV) .pytest_cache .ruff_cache
