# Two front-door commands: `make demo` (install, train, zero-shot, caption) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VLM := $(VENV)/bin/vlm
# The CLIP stage trains on one-object scenes (configs/clip/shapes.yaml); LM and Flamingo on data/shapes.
CLIP_DATA := data/shapes-single
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
	$(PY) scripts/zero_shot.py --checkpoint runs/clip/checkpoints/last.ckpt --labels-file $(CLIP_DATA)/classnames.txt \
		--top-k 3 $(CLIP_DATA)/validation/00000.png $(CLIP_DATA)/validation/00001.png $(CLIP_DATA)/validation/00002.png
	$(PY) scripts/zero_shot.py --checkpoint runs/clip/checkpoints/last.ckpt --labels-file $(CLIP_DATA)/classnames.txt \
		--heldout-labels-file $(CLIP_DATA)/heldout.txt --accuracy-only $(CLIP_DATA)/validation

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
