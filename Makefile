# Two commands do all the set-up on a fresh machine:
#   make train   the main job (DATA_DIR=... for a local copy of CIFAR-10, else TFDS downloads it)
#   make test    lint + format check + the whole test suite (slow tests included)
# Another recipe: make train RECIPE=app/configs/cifar10_tutorial.flags (it writes into its own
# --model_dir; MODEL_DIR=... overrides it). make tensorboard RUN=runs/cpu_quick shows a run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RECIPE ?= app/configs/cifar10_cpu_quick.flags
# Unset: the recipe's own --model_dir.
MODEL_DIR ?=
# The run `make tensorboard` shows: MODEL_DIR, else RUN, else every run under runs/.
RUN ?= $(or $(MODEL_DIR),runs)
DATA_DIR ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist, whole files per process: module fixtures are built once).
# 2 halves the suite's wall time on 2 cores; 0 runs it in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: venv train tensorboard test test-fast lint format bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

train: venv
	$(PY) -m app.train --flagfile=$(RECIPE) $(if $(MODEL_DIR),--model_dir=$(MODEL_DIR)) \
		$(if $(DATA_DIR),--data_dir=$(DATA_DIR))

# The scalars of a run (loss, accuracy, learning rate per epoch), on http://localhost:6006.
tensorboard: venv
	$(VENV)/bin/tensorboard --logdir=$(RUN)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PYTEST) $(PYTEST_ARGS)

test-fast: lint
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: venv
	$(if $(DATA_DIR),CIFAR10_DIR=$(DATA_DIR)) $(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
