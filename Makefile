# The two set-up commands of the README. Each creates .venv and installs what it needs by itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Profile for `make run`; `make run PROFILE=profiles/slurm` on a cluster.
PROFILE ?= profiles/local
# The study set of `make run` and `make report`: config.yaml, or a whole config such as configs/osp.yaml.
CONFIG ?= config.yaml

.PHONY: run head report test test-fast venv clean paper gpu-check

venv: $(VENV)/.installed

# torch==2.13.0 first: the CPU build on disk here; an open range with no torch installed pulls a
# multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# `make run CONFIG=configs/osp.yaml`: another study set (a whole config, replacing config.yaml's grid); its
# report is the one that config names (reports/osp.html).
run: venv
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PATH="$(abspath $(BIN)):$$PATH" \
		$(BIN)/snakemake --profile $(PROFILE) $(if $(filter-out config.yaml,$(CONFIG)),--configfile $(CONFIG))
	@echo "report: $$($(BIN)/python -c 'import os, sys, yaml; print(os.path.abspath(yaml.safe_load(open(sys.argv[1])).get("report", "reports/index.html")))' $(CONFIG))"

# The head itself as a long, requeued SLURM job (docs/cluster.md "An unattended head"); its log is
# results/logs/head.log. HEAD_ARGS="-- --profile slurm --configfile my-grid.yaml" (default: --profile slurm);
# options such as --partition or --time go before the --.
HEAD_ARGS ?=
head: venv
	$(BIN)/python -m ofe head $(HEAD_ARGS)

# The partial report of a sweep in progress, from another shell at any moment (docs/workflow.md): the
# runs finished so far -> reports/index-partial.html. CONFIG=configs/paper-int8.yaml for that sweep's.
report: venv
	$(BIN)/python -m ofe report --live --config $(CONFIG)

# The paper's int8 headline at CPU scale (configs/paper-int8.yaml, about 70 minutes on 2 cores); its report
# is reports/paper-int8.html. Naming a config file replaces config.yaml's grid entirely.
paper: venv
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PATH="$(abspath $(BIN)):$$PATH" \
		$(BIN)/snakemake --profile $(PROFILE) --configfile configs/paper-int8.yaml
	@echo "report: $(abspath reports/paper-int8.html)"

test: venv
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PATH="$(abspath $(BIN)):$$PATH" \
		$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit tests only (docs/testing.md): everything but the `slow` ones, which start processes
# (tests/integration/) or train for long. Under 2 minutes on 2 cores.
test-fast: venv
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PATH="$(abspath $(BIN)):$$PATH" \
		$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The GPU self-check (README "Before the first GPU job"): twelve checks of the CUDA path on one GPU, about
# 7 minutes; exit status = failed checks. Never part of `test`. GPU_CHECK_ARGS="--device cpu" is a smoke
# run of the script itself at toy shapes, for machines without a GPU.
gpu-check: venv
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PATH="$(abspath $(BIN)):$$PATH" \
		$(BIN)/python scripts/gpu-selfcheck.py $(GPU_CHECK_ARGS)

clean:
	rm -rf results reports/*.html reports/figures reports/*-figures .snakemake
