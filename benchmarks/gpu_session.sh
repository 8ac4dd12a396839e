#!/usr/bin/env bash
# GPU validation and benchmarks in a few calls of at most 10 minutes each, on one GPU.
# Usage: OUT=/some/dir bash benchmarks/gpu_session.sh STAGE
#   kernels      GPU tests (kernels, host copies, engine graphs, contract on the nvidia backend),
#                conformance --quick, demo models cpu_ref vs nvidia (graphs / eager),
#                bench_ops --sections moe,attention,prefill
#   e2e-llama    bench_e2e.py on the Llama-3-8B-shaped model, with serving (needs the
#                fastapi/uvicorn wheels in .gpu_wheels)
#   e2e-deepseek bench_e2e.py on the 4-layer DeepSeek-V3-shaped FP8 model
#   fp8-gemm     bench_ops gemm at M 1..256 with the auto column (soft, native, native via
#                cuBLAS at every M, auto, cuBLAS bf16)
#   fp8-check    GPU tests of the --fp8-compute paths and batch-256 graphs, then
#                conformance --quick for --fp8-compute auto, soft and native
#   fp8-e2e      bench_e2e.py Llama-8B-shaped: --fp8-compute auto,soft and the bf16 twin at
#                batch 1, 16, 64, 256 (decode tok/s, ratios, host work per step at 256)
#   tp2          (2 GPUs, <= 9 min) Llama-3-8B-shaped and 4-layer DeepSeek-V3-shaped FP8:
#                step logits (tp_logits.py) of 1 GPU vs TP=2 vs PP=2 on identical inputs,
#                compared; bench_distributed 1x1 / 2x1 / 1x2 at batch 1 and 32 on Llama with
#                a decode profile of 1x1 and 2x1; serve --tp 2 at c=16
#   serve-tp2    (2 GPUs, <= 5 min) serve --tp 2 at c=16 alone, and its SIGTERM shutdown
#                (every process's stacks if it has not exited 45 s after SIGTERM)
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/chitu-gpu}; mkdir -p "$OUT"
STAGE=${1:?stage: kernels, gemm, e2e-llama, e2e-deepseek, tp2 or serve-tp2}
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

# `chitu serve --tp 2` on /tmp/ll8, benchmark_serving at concurrency 16, then SIGTERM: how long
# the shutdown takes, and every process's stacks (SIGUSR1) if it is not done in 45 s.
serve_tp2() {
    log "chitu serve --tp 2, benchmark_serving at concurrency 16"
    python3 -m chitu_core -v serve /tmp/ll8 --backend nvidia --tp 2 --port 21078 --skip-conformance \
        --max-model-len 4096 >"$OUT/serve-tp2.log" 2>&1 &
    local server=$! waited=0
    for _ in $(seq 60); do
        curl -sf --max-time 5 http://127.0.0.1:21078/health >/dev/null && break
        [ "$SECONDS" -lt "$BUDGET" ] || break
        sleep 2
    done
    timeout "$(tmo 120)" python3 benchmarks/benchmark_serving.py --base-url http://127.0.0.1:21078 --concurrency 16 \
        --num-prompts 32 --input-len 128 --output-len 128 --ignore-eos --json "$OUT/serving-tp2.json" \
        2>&1 | tail -25 | tee -a "$OUT/summary.txt"
    log "SIGTERM to the server"
    kill "$server"
    while kill -0 "$server" 2>/dev/null && [ "$waited" -lt 45 ]; do sleep 1; waited=$((waited + 1)); done
    if kill -0 "$server" 2>/dev/null; then
        log "serve --tp 2 still running 45 s after SIGTERM: stacks (SIGUSR1) into serve-tp2.log, then SIGKILL"
        ps -o pid,ppid,stat,etime,args -C python3 | cut -c1-150 | tee -a "$OUT/summary.txt"
        pkill -USR1 -f "serve /tmp/ll8"
        sleep 3
        pkill -9 -f "serve /tmp/ll8"
    else
        log "serve --tp 2 exited $waited s after SIGTERM"
    fi
    wait "$server" 2>/dev/null
}

case "$STAGE" in
kernels)
    log "GPU tests: kernels (-m gpu), engine decode graphs, contract + nvidia plugin"
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/engine/test_host_copy.py 2>&1 | tail -8 | tee -a "$OUT/summary.txt"
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
fp8-gemm)
    log "bench_ops gemm, M 1..256, with the auto column"
    PYTHONPATH=.:plugins/nvidia:benchmarks timeout 560 python3 benchmarks/bench_ops.py \
        --ms ${GEMM_MS:-1,16,32,64,96,128,256} --out "$OUT/gemm.json" 2>&1 \
        | grep -v -i "warn" | tee -a "$OUT/summary.txt" | tail -70
    ;;
fp8-check)
    log "GPU tests: linear paths per --fp8-compute mode, batch-256 graphs"
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu plugins/nvidia/tests/test_gpu_linear.py \
        plugins/nvidia/tests/test_gpu_engine_batch256.py 2>&1 | tail -15 | tee -a "$OUT/summary.txt"
    for mode in auto soft native; do
        log "conformance --quick --fp8-compute $mode"
        timing=--no-timing; [ $mode = auto ] && timing=  # speeds once, for the default mode
        timeout 130 python3 -m conformance.cli --backend nvidia --quick --fp8-compute $mode $timing \
            --no-progress --out /tmp/conformance-$mode --cert-dir /tmp/certs 2>&1 | tail -8 | tee -a "$OUT/summary.txt"
        cp /tmp/conformance-$mode/report.md "$OUT/conformance-$mode.md" 2>/dev/null
    done
    ls /tmp/certs | tee -a "$OUT/summary.txt"
    ;;
fp8-e2e)
    log "bench_e2e llama (real size): --fp8-compute auto,soft and bf16 at batch 1, 16, 64, 256"
    timeout 570 python3 benchmarks/bench_e2e.py --arch llama --workdir /tmp/e2e --out "$OUT/e2e.json" \
        --fp8-compute ${E2E_MODES:-auto,soft} --baselines bf16 --batches 1,16,64,256 2>&1 \
        | grep -v "it/s\]\|Warning" | tee -a "$OUT/summary.txt" | tail -60
    ;;
gemm)
    log "soft-FP8 numerics on the GPU: every e4m3 code through both widenings and all kernels"
    PYTHONPATH=.:plugins/nvidia timeout 120 python3 tests/kernels/interp_cases.py --device cuda 2>&1 \
        | tail -6 | tee -a "$OUT/summary.txt"
    log "bench_ops --sections gemm,moe"
    PYTHONPATH=.:plugins/nvidia:benchmarks timeout 520 python3 benchmarks/bench_ops.py --sections gemm,moe \
        --ms 1,4,16,32,64,128,256,1024,4096 --out "$OUT/gemm.json" --moe-attn-out "$OUT/moe.json" 2>&1 \
        | grep -v -i "warn" | tee -a "$OUT/summary.txt" | tail -90
    ;;
tp2)
    # <= 9 minutes on 2 GPUs, model writing included: every step has a timeout, capped by
    # what is left of TP2_BUDGET_S (seconds since this script started).
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    BUDGET=${TP2_BUDGET_S:-530}
    tmo() { local left=$((BUDGET - SECONDS)); if [ "$left" -lt "$1" ]; then echo $((left > 5 ? left : 5)); else echo "$1"; fi; }
    errs() { grep -E "Error|error:|Traceback|FAILED" "$OUT/stderr.txt" | tail -4 | tee -a "$OUT/summary.txt"; }
    write='from chitu_core.demo_model import write_demo_model as w; import sys; w(sys.argv[1], sys.argv[2], "real", fp8=True, device="cuda")'
    log "writing the 4-layer DeepSeek-V3-shaped FP8 model on GPU 1 (in the background)"
    CUDA_VISIBLE_DEVICES=1 timeout 300 python3 -c "$write" /tmp/ds4 deepseek_v3 >/tmp/ds4-write.log 2>&1 &
    ds_writer=$!
    log "writing the Llama-3-8B-shaped FP8 model on GPU 0"
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -c "$write" /tmp/ll8 llama >/tmp/ll8-write.log 2>&1 \
        || { log "writing Llama failed"; tail -3 /tmp/ll8-write.log | tee -a "$OUT/summary.txt"; }
    log "peer-store all-reduce tests (2 GPUs)"
    timeout "$(tmo 120)" python3 -m pytest -q -p no:cacheprovider plugins/nvidia/tests/test_gpu_all_reduce.py \
        2>&1 | tail -3 | tee -a "$OUT/summary.txt"
    # Step logits: 1 GPU decodes greedily (its tokens become the forced sequence); TP=2 and
    # PP=2 (torchrun, NCCL) are teacher-forced on it, so all three see identical inputs.
    mkdir -p /tmp/lg
    LG=(benchmarks/tp_logits.py run --backend nvidia --max-model-len 1024 --kv-cache-gb 4
        --max-num-seqs 32 --dist-timeout 60 --steps 24 --batch 1,32)
    logits() {  # NAME MODEL SECONDS_PER_RUN
        local name=$1 model=$2 t=$3 ref=/tmp/lg/$1-1gpu.safetensors layout
        log "$name: step logits (prefill + 24 teacher-forced decode steps, batch 1 and 32): 1 GPU vs TP=2 vs PP=2"
        CUDA_VISIBLE_DEVICES=0 timeout "$(tmo "$t")" python3 "${LG[@]}" --model "$model" --out "$ref" \
            2>>"$OUT/stderr.txt" | tee -a "$OUT/summary.txt" || { log "$name: 1-GPU run failed"; errs; return; }
        for layout in tp pp; do
            local out=/tmp/lg/$name-${layout}2.safetensors
            timeout "$(tmo "$t")" torchrun --standalone --nproc_per_node 2 "${LG[@]}" --$layout 2 \
                --model "$model" --force-from "$ref" --out "$out" 2>>"$OUT/stderr.txt" \
                | tee -a "$OUT/summary.txt" || { log "$name: ${layout^^}=2 run failed"; errs; continue; }
            log "$name: compare 1 GPU (A) vs ${layout^^}=2 (B)"
            timeout 60 python3 benchmarks/tp_logits.py compare "$ref" "$out" 2>&1 | tee -a "$OUT/summary.txt"
        done
    }
    logits llama8b /tmp/ll8 100
    log "waiting for the DeepSeek writer"
    wait "$ds_writer" || log "writing DeepSeek failed (status $?)"
    tail -c 300 /tmp/ds4-write.log | tr '\r' '\n' | tail -2 | tee -a "$OUT/summary.txt"
    logits deepseek4l /tmp/ds4 130
    # fp32 (no bf16 rounding, no router near-ties): TP=2 must match 1 GPU to ~1e-6, with
    # decode graphs on both sides, at batch 1 and 32.
    L32=(benchmarks/tp_logits.py run --backend nvidia --dtype float32 --max-model-len 512
         --kv-cache-gb 4 --max-num-seqs 32 --dist-timeout 60 --steps 12 --batch 1,32)
    for m in ll8 ds4; do
        log "$m fp32: step logits 1 GPU vs TP=2 (compare --tol 1e-3)"
        CUDA_VISIBLE_DEVICES=0 timeout "$(tmo 80)" python3 "${L32[@]}" --model /tmp/$m --out /tmp/lg/$m-32a.st \
            2>>"$OUT/stderr.txt" | tail -1 | tee -a "$OUT/summary.txt" || { errs; continue; }
        timeout "$(tmo 80)" torchrun --standalone --nproc_per_node 2 "${L32[@]}" --tp 2 --model /tmp/$m \
            --force-from /tmp/lg/$m-32a.st --out /tmp/lg/$m-32b.st 2>>"$OUT/stderr.txt" | tail -2 \
            | tee -a "$OUT/summary.txt" || { errs; continue; }
        timeout 30 python3 benchmarks/tp_logits.py compare --tol 1e-3 /tmp/lg/$m-32a.st /tmp/lg/$m-32b.st 2>&1 \
            | grep -E "max rel|PASS|FAIL" | tee -a "$OUT/summary.txt"
    done
    log "decode tokens/s (Llama): 1x1, TP=2, PP=2 at batch 1 and 32; profile of batch-32 decode at 1x1 and TP=2"
    timeout "$(tmo 200)" python3 benchmarks/bench_distributed.py --backend nvidia --model /tmp/ll8 \
        --layouts 1x1 2x1 1x2 --batch 1,32 --prompt-len 128 --new-tokens 64 --json "$OUT/tp.json" \
        --profile-dir /tmp/prof --profile-layouts 1x1 2x1 --profile-steps 8 \
        2>>"$OUT/stderr.txt" | tee -a "$OUT/summary.txt" || { log "bench_distributed failed"; errs; }
    cp /tmp/prof/trace-2x1-b32.json.gz "$OUT/" 2>/dev/null
    serve_tp2
    log "done in $SECONDS s"
    tail -3 "$OUT/stderr.txt"
    ;;
serve-tp2)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    BUDGET=${TP2_BUDGET_S:-300}
    tmo() { local left=$((BUDGET - SECONDS)); if [ "$left" -lt "$1" ]; then echo $((left > 5 ? left : 5)); else echo "$1"; fi; }
    log "writing the Llama-3-8B-shaped FP8 model on GPU 0"
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -c 'from chitu_core.demo_model import write_demo_model as w; w("/tmp/ll8", "llama", "real", fp8=True, device="cuda")' \
        >/tmp/ll8-write.log 2>&1 || { log "writing Llama failed"; tail -3 /tmp/ll8-write.log | tee -a "$OUT/summary.txt"; }
    serve_tp2
    log "done in $SECONDS s"
    ;;
*) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
