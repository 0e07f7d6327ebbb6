#!/usr/bin/env bash
# The GPU figures issue #5 asks for, in one run on a lent GPU machine (the `device` tool; an H100/H200 here).
#
#   make gpu-wheels                                   # here: the packages the GPU image lacks, as wheels in .whl/
#   device run: bash scripts/gpu_check.sh, carry [".whl"], timeout_s 600
#
# It uses the machine's own python3 and PyTorch (nothing is downloaded there), installs the carried wheels into a
# scratch folder, and writes into $OUT (the tool's output folder; runs/gpu elsewhere):
#   gpu.txt          the GPU, driver, torch and package versions
#   cuda_tests.txt   the cuda-marked tests (the benchmark suites, the Flamingo step on the GPU, and one FSDP2 run
#                    of configs/flamingo/hf_lm.yaml with a tiny local decoder: NCCL, bf16 autocast, up to 2 GPUs)
#   bench.jsonl      scripts/benchmark.py --device cuda --precision bf16-mixed --json: the roofline, vit, clip
#                    (with the ViT-B/16 CLIP training step's model FLOPs utilisation), memory (with 2+ GPUs: the
#                    per-rank peak of the Flamingo step under FSDP2 vs DDP) and ddp suites
#   bench.log        its stderr
# Each step has its own time limit, so one that hangs still leaves the others' results (about 5 minutes in all
# on an H200 is the plan; the budget is the tool's 10 minutes a command).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
site=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vlm-site \
        .whl/*.whl || { echo "installing the carried wheels failed" >&2; exit 1; }
    site=/tmp/vlm-site:$site
fi
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$py" -c "import torch, lightning, timm, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'| lightning', lightning.__version__, '| timm', timm.__version__, '| open_clip', open_clip.__version__)"
} >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

timeout 200 "$py" -m pytest -q -p no:cacheprovider -m cuda tests/test_benchmark.py tests/test_flamingo.py \
    tests/test_fsdp.py >"$out/cuda_tests.txt" 2>&1
echo "cuda tests: exit $?"; tail -n 3 "$out/cuda_tests.txt"

timeout 330 "$py" scripts/benchmark.py --device cuda --precision bf16-mixed --json >"$out/bench.jsonl" \
    2>"$out/bench.log"
status=$?
echo "benchmark: exit $status, $(wc -l <"$out/bench.jsonl") rows"
"$py" - "$out/bench.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['suite']:8} {r['name'][:96]:96} {r['ours']!s:>10} {r['peer']!s:>10} {r['unit']:8} {r['ratio']}")
PY
exit $status
