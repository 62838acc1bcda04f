# omnitrain: `make demo` trains the embedded default, `make test` runs the test suite.
#
# Both create .venv on first use and install the project into it (pip install -e .[dev]).
# PyTorch is installed first and on its own, so that the right build is chosen:
#   - a machine without an NVIDIA GPU gets the CPU build (torch==2.13.0, a few hundred MB);
#   - a machine with one (nvidia-smi answers) gets the CUDA build pip resolves for
#     torch>=2.11,<=2.14.1.
# Override with `make TORCH_SPEC='torch==2.14.1' ...` to pin a build yourself.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
RECIPE ?= hybrid

HAS_NVIDIA_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_NVIDIA_GPU),yes)
TORCH_SPEC ?= torch>=2.11,<=2.14.1
else
TORCH_SPEC ?= torch==2.13.0
endif

.PHONY: install demo test compare clean-runs

# `make compare`: the four schedules on the demo data for the same token budget, one process
# each, then the comparison report (runs/compare/report/report.md and plots). Each schedule's
# folder is started afresh (checkpoint.resume=never refuses a folder that holds another run).
COMPARE_TOKENS ?= 250000
COMPARE_DIR ?= runs/compare
COMPARE_ARGS ?= eval.max_samples=16

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) engine/train.py --recipe $(RECIPE)

test: install
	$(PY) -m pytest tests -q

compare: install
	for recipe in random tpc ads hybrid; do \
		rm -rf $(COMPARE_DIR)/$$recipe && $(PY) engine/train.py --recipe $$recipe max_steps=0 max_tokens=$(COMPARE_TOKENS) \
			output_dir=$(COMPARE_DIR)/$$recipe checkpoint.every=0 checkpoint.resume=never \
			metrics.progress_bar=false $(COMPARE_ARGS) || exit 1; \
	done
	$(PY) -m engine.report $(COMPARE_DIR)/random $(COMPARE_DIR)/tpc $(COMPARE_DIR)/ads $(COMPARE_DIR)/hybrid \
		--out $(COMPARE_DIR)/report

clean-runs:
	rm -rf runs
