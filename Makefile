# Two entry points: `make demo` (the main job end to end on the tiny preset) and `make test` (the suite).
# Both create .venv/ from requirements/lock.txt on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo
# Size of the synthetic dataset for the demo (images in train and test).
DEMO_TRAIN ?= 120
DEMO_TEST ?= 40

.PHONY: venv demo test clean-demo

$(BIN)/litegpt: setup.cfg pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements/lock.txt -e '.[dev]'
	touch $@

venv: $(BIN)/litegpt

demo: venv
	$(BIN)/litegpt synth --out $(DEMO_DIR)/vindr --train $(DEMO_TRAIN) --test $(DEMO_TEST)
	$(BIN)/litegpt prepare --root $(DEMO_DIR)/vindr --out shards/demo
	$(BIN)/litegpt inspect shards/demo --draw 4 --draw-dir $(DEMO_DIR)/inspect

test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

clean-demo:
	rm -rf $(DEMO_DIR) shards/demo
