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

# The pipeline as a user runs it: synth -> prepare -> stage 1 -> stage 2 (deepspeed, 2 CPU ranks; train.py
# builds the feature cache on first use) -> evaluate each stage on its own task. Re-running resumes.
TRAIN := OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu $(BIN)/deepspeed --num_gpus 2 train.py --deepspeed ds_configs/zero2.json
demo: venv
	$(BIN)/litegpt synth --out $(DEMO_DIR)/vindr --train $(DEMO_TRAIN) --test $(DEMO_TEST) --max-side-px 800
	$(BIN)/litegpt prepare --root $(DEMO_DIR)/vindr --out shards/demo --samples-per-shard 32
	$(BIN)/litegpt inspect shards/demo --draw 4 --draw-dir $(DEMO_DIR)/inspect
	$(BIN)/litegpt tiny-weights --config configs/model_tiny.yaml
	$(TRAIN) --config configs/tiny/stage1.yaml
	$(TRAIN) --config configs/tiny/stage2.yaml
	$(BIN)/litegpt evaluate --run runs/tiny/stage1 --shards shards/demo
	$(BIN)/litegpt evaluate --run runs/tiny/stage2 --shards shards/demo
	@echo "reports: runs/tiny/stage1/eval/report.md runs/tiny/stage2/eval/report.md (pictures in eval/overlays/)"
	@echo "watch the run: $(BIN)/tensorboard --logdir runs/tiny --host 127.0.0.1"

test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

clean-demo:
	rm -rf $(DEMO_DIR) shards/demo runs/tiny
