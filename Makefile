# Two entry points: `make demo` (the main job end to end on the tiny preset) and `make test` (the suite).
# Both create .venv/ from requirements/lock.txt on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Extra flags for `litegpt demo`, e.g. DEMO_ARGS=--fresh or DEMO_ARGS="--train 4000 --seed 1".
DEMO_ARGS ?=

.PHONY: venv wordnet demo test clean-demo

$(BIN)/litegpt: setup.cfg pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements/lock.txt -e '.[dev]'
	touch $@

venv: $(BIN)/litegpt

# The pipeline as a user runs it (litegpt/demo.py): synth -> prepare -> inspect -> tiny-weights -> cache-features ->
# stage 1 -> stage 2 (deepspeed, 2 CPU ranks) -> evaluate each stage on its own task, then the model beside
# the training-prior baseline. Re-running resumes; DEMO_ARGS=--fresh starts over.
demo: venv wordnet
	$(BIN)/litegpt demo $(DEMO_ARGS)

# WordNet 3.0 for the authors' METEOR (litegpt/eval/reference_text.py): Debian's wordnet-base, installed when
# missing and apt-get can (root); elsewhere the reference METEOR is reported as unavailable and its tests skip.
wordnet:
	@test -d /usr/share/wordnet || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null; } || \
	  echo "make: WordNet not installed (apt-get install wordnet-base): the authors' METEOR will be unavailable"

test: venv wordnet
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

clean-demo:
	rm -rf demo shards/demo runs/tiny  # what `litegpt demo` writes by default
