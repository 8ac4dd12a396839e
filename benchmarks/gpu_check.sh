#!/usr/bin/env bash
# One-call GPU validation on the device machine (1 or 2 GPUs): installs the packages
# without network, runs the GPU tests, an end-to-end generate on the NVIDIA backend,
# the single-rank NCCL path and, with 2 GPUs, TP=2 / PP=2 against one GPU.
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/chitu-gpu}; mkdir -p "$OUT"
log() { echo "=== $*" | tee -a "$OUT/summary.txt"; }
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/cpu_ref -e plugins/nvidia >"$OUT/pip.txt" 2>&1 || { cat "$OUT/pip.txt"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/summary.txt"
python3 -m chitu_core plugins | tee -a "$OUT/summary.txt"

log "GPU tests: contract on the nvidia backend, nvidia plugin tests"
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_contract.py plugins/nvidia/tests \
    2>&1 | tail -15 | tee -a "$OUT/summary.txt"

log "conformance --quick on the nvidia backend"
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m conformance.cli --backend nvidia --quick --out "$OUT/conformance" \
    2>&1 | tail -25 | tee -a "$OUT/summary.txt"

python3 -c "from chitu_core.demo_model import write_demo_model as w; w('/tmp/ds', 'deepseek_v3', 'small'); w('/tmp/ll', 'llama', 'small')"
gen() { timeout 240 "$@" --prompt "The capital of France is" --max-tokens 24 2>"$OUT/stderr.txt" | tail -1; }
for model in /tmp/ds /tmp/ll; do
    log "generate $model: cpu_ref vs nvidia (1 GPU) vs torchrun NCCL 1 rank"
    ref=$(CUDA_VISIBLE_DEVICES=0 gen python3 -m chitu_core generate --backend cpu_ref --model $model)
    one=$(CUDA_VISIBLE_DEVICES=0 gen python3 -m chitu_core generate --backend nvidia --model $model)
    nccl1=$(CUDA_VISIBLE_DEVICES=0 gen torchrun --standalone --nproc_per_node 1 -m chitu_core generate --backend nvidia --model $model)
    printf 'cpu_ref : %q\nnvidia  : %q\nnccl x1 : %q\n' "$ref" "$one" "$nccl1" | tee -a "$OUT/summary.txt"
    if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
        tp2=$(gen torchrun --standalone --nproc_per_node 2 -m chitu_core generate --backend nvidia --model $model --tp 2)
        pp2=$(gen torchrun --standalone --nproc_per_node 2 -m chitu_core generate --backend nvidia --model $model --pp 2)
        printf 'tp=2    : %q\npp=2    : %q\n' "$tp2" "$pp2" | tee -a "$OUT/summary.txt"
    fi
done
tail -5 "$OUT/stderr.txt"
