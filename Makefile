# Two front-door commands: `make demo` (install, train, zero-shot, caption) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VLM := $(VENV)/bin/vlm
# CLIP trains on one-object scenes (configs/clip/shapes.yaml -> runs/clip), then on the mixed data/shapes
# (+ configs/clip/shapes_scenes.yaml -> runs/clip-scenes), whose tower the Flamingo stage reads; LM and Flamingo
# train on data/shapes. The validation split is the same in both folders.
CLIP_CKPT := runs/clip-scenes/checkpoints/last.ckpt
# Nothing reaches for a hub: all data and weights are built locally or shipped by packages.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo demo-clip demo-lm demo-flamingo lint benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

demo: install demo-clip demo-lm demo-flamingo

demo-clip: install
	$(VLM) fit --config configs/clip/shapes.yaml
	$(VLM) fit --config configs/clip/shapes.yaml --config configs/clip/shapes_scenes.yaml
	$(PY) scripts/zero_shot.py --checkpoint $(CLIP_CKPT) --labels-file data/shapes/classnames.txt \
		--top-k 3 data/shapes/validation/00000.png data/shapes/validation/00001.png data/shapes/validation/00002.png
	$(PY) scripts/zero_shot.py --checkpoint $(CLIP_CKPT) --labels-file data/shapes/classnames.txt \
		--heldout-labels-file data/shapes/heldout.txt --accuracy-only data/shapes/validation

demo-lm: install
	$(VLM) fit --config configs/lm/shapes.yaml

demo-flamingo: install
	$(VLM) fit --config configs/flamingo/shapes.yaml
	$(PY) scripts/caption.py --checkpoint runs/flamingo/checkpoints/last.ckpt \
		data/shapes/validation/00000.png data/shapes/validation/00001.png data/shapes/validation/00002.png
	$(PY) scripts/caption.py --checkpoint runs/flamingo/checkpoints/last.ckpt --score-only data/shapes/validation

benchmark: install
	$(PY) scripts/benchmark.py

clean:
	rm -rf runs data lightning_logs
