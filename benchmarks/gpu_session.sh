#!/usr/bin/env bash
# GPU validation and benchmarks in a few calls of at most 10 minutes each, on one GPU.
# Usage: OUT=/some/dir bash benchmarks/gpu_session.sh STAGE
#   kernels      GPU tests (kernels, engine graphs, contract on the nvidia backend),
#                conformance --quick, demo models cpu_ref vs nvidia (graphs / eager),
#                bench_ops --sections moe,attention,prefill
#   e2e-llama    bench_e2e.py on the Llama-3-8B-shaped model, with serving (needs the
#                fastapi/uvicorn wheels in .gpu_wheels)
#   e2e-deepseek bench_e2e.py on the 4-layer DeepSeek-V3-shaped FP8 model
#   tp2          (2 GPUs) Llama-3-8B-shaped FP8: greedy token ids of 1 GPU vs TP=2 vs PP=2,
#                bench_distributed 1x1 / 2x1 / 1x2 at batch 1 and 32, serve --tp 2 at c=16
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/chitu-gpu}; mkdir -p "$OUT"
STAGE=${1:?stage: kernels, e2e-llama or e2e-deepseek}
log() { echo "=== [$(date +%T)] $*" | tee -a "$OUT/summary.txt"; }
if [ -d .gpu_wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu_wheels/*.whl >"$OUT/pip.txt" 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/cpu_ref -e plugins/nvidia \
    >>"$OUT/pip.txt" 2>&1 || { cat "$OUT/pip.txt"; exit 1; }
rm -f "$OUT/pip.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/summary.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/summary.txt"

case "$STAGE" in
kernels)
    log "GPU tests: kernels (-m gpu), engine decode graphs, contract + nvidia plugin"
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels 2>&1 | tail -8 | tee -a "$OUT/summary.txt"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_contract.py plugins/nvidia/tests 2>&1 | tail -4 | tee -a "$OUT/summary.txt"
    python3 -c "from chitu_core.demo_model import write_demo_model as w; w('/tmp/ds', 'deepseek_v3', 'small'); w('/tmp/ll', 'llama', 'small')"
    gen() { timeout 150 python3 -m chitu_core -v generate "$@" --prompt "The capital of France is" --max-tokens 24 2>>"$OUT/stderr.txt" | tail -1; }
    for model in /tmp/ds /tmp/ll; do
        log "generate $model: cpu_ref vs nvidia (CUDA graphs) vs nvidia --enforce-eager"
        printf 'cpu_ref : %q\n' "$(gen --backend cpu_ref --model $model)" | tee -a "$OUT/summary.txt"
        printf 'graphs  : %q\n' "$(gen --backend nvidia --model $model)" | tee -a "$OUT/summary.txt"
        printf 'eager   : %q\n' "$(gen --backend nvidia --model $model --enforce-eager)" | tee -a "$OUT/summary.txt"
    done
    grep -h "memory: \|decode graphs\|graphs off\|does not take" "$OUT/stderr.txt" | sort | uniq -c | head -12 | tee -a "$OUT/summary.txt"
    log "bench_ops --sections moe,attention,prefill"
    timeout 200 python3 benchmarks/bench_ops.py --sections moe,attention,prefill \
        --moe-attn-out "$OUT/moe-attn.json" 2>&1 | grep -v Warning | tail -30 | tee -a "$OUT/summary.txt"
    log "conformance --quick on the nvidia backend"
    timeout 150 python3 -m conformance.cli --backend nvidia --quick --out /tmp/conformance 2>&1 \
        | tail -12 | tee -a "$OUT/summary.txt"
    cp /tmp/conformance/*.md "$OUT/" 2>/dev/null
    ;;
e2e-llama)
    log "bench_e2e llama (real size) with serving and a profile"
    timeout 570 python3 benchmarks/bench_e2e.py --arch llama --workdir /tmp/e2e --out "$OUT/e2e.json" \
        --serving --profile 2>&1 | grep -v "it/s\]\|Warning" | tee -a "$OUT/summary.txt" | tail -60
    ;;
e2e-deepseek)
    log "bench_e2e deepseek_v3 (real shapes, 4 layers, FP8 only)"
    timeout 570 python3 benchmarks/bench_e2e.py --arch deepseek_v3 --workdir /tmp/e2e \
        --out "$OUT/e2e.json" --modes soft_fp8 --batches 1,4,16,64 --profile 2>&1 \
        | grep -v "it/s\]\|Warning" | tee -a "$OUT/summary.txt" | tail -60
    ;;
tp2)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    log "Llama-3-8B-shaped FP8 model, written on GPU 0"
    python3 -c "from chitu_core.demo_model import write_demo_model as w; w('/tmp/ll8', 'llama', 'real', fp8=True, device='cuda')" 2>/dev/null
    ids() { timeout 100 "$@" --backend nvidia --model /tmp/ll8 --prompt "The capital of France is" \
        --max-tokens 24 --print-token-ids 2>>"$OUT/stderr.txt" | tail -1; }
    log "greedy token ids: 1 GPU, TP=2, PP=2 (torchrun, NCCL)"
    printf '1 GPU: %s\n' "$(CUDA_VISIBLE_DEVICES=0 ids python3 -m chitu_core generate)" | tee -a "$OUT/summary.txt"
    printf 'TP=2 : %s\n' "$(ids torchrun --standalone --nproc_per_node 2 -m chitu_core generate --tp 2)" | tee -a "$OUT/summary.txt"
    printf 'PP=2 : %s\n' "$(ids torchrun --standalone --nproc_per_node 2 -m chitu_core generate --pp 2)" | tee -a "$OUT/summary.txt"
    log "decode tokens/s: 1x1, TP=2, PP=2 at batch 1 and 32"
    timeout 200 python3 benchmarks/bench_distributed.py --backend nvidia --model /tmp/ll8 \
        --layouts 1x1 2x1 1x2 --batch 1,32 --prompt-len 128 --new-tokens 64 --json "$OUT/tp.json" \
        2>>"$OUT/stderr.txt" | tee -a "$OUT/summary.txt"
    log "chitu serve --tp 2, benchmark_serving at concurrency 16"
    python3 -m chitu_core serve /tmp/ll8 --backend nvidia --tp 2 --port 21078 --skip-conformance \
        --max-model-len 4096 >"$OUT/serve-tp2.log" 2>&1 &
    server=$!
    for _ in $(seq 60); do curl -sf http://127.0.0.1:21078/health >/dev/null && break; sleep 2; done
    timeout 120 python3 benchmarks/benchmark_serving.py --base-url http://127.0.0.1:21078 --concurrency 16 \
        --num-prompts 32 --input-len 128 --output-len 128 --ignore-eos --json "$OUT/serving-tp2.json" \
        2>&1 | tail -25 | tee -a "$OUT/summary.txt"
    kill "$server"; wait
    tail -3 "$OUT/stderr.txt"
    ;;
*) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
