#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md, in the order they were taken (one H200).
#
# Usage: benchmarks/gpu_suite.sh STEP... [OUT_DIR]
#   tests     the CUDA-only tests (graph/compile parity, graphed flow sampler, batch synthesis)
#   infer     bench_infer.py, full size, bf16: LLM decode, flow, HiFT, e2e, first chunk, offline sweep
#   train     bench_train.py: recipe budget and larger budgets, LLM compiled
#   features  bench_features.py --device cuda (needs onnxruntime-gpu importable)
#   profile   profile_infer.py: kernel counts/times of the decode step, a streaming flow chunk, HiFT
#   api       bench_api.py (the public API, issue 14): defaults with a profile; the same 16 streams without
#             continuous batching; the opt-in stream_cache
#   attention the decode step's cache attention kinds (bench_infer --llm_only, batch 1 and 16), then bench_api
#             with SDPA's kernel choice and with the fastest other kind
#   serve     bench_serve.py: cosytune serve at 1/8/16 concurrent streams (issue 15)
#   eval      bench_eval.py: scorecard throughput on the GPU (issue 16)
# Environment: LLM_MODES / FLOW_MODES / HIFT_MODES narrow bench_infer's modes; SKIP_RECIPE=1 skips the
# recipe-budget training runs.
# JSON results go to OUT_DIR (default: $OUT when set, else ./bench_out).
set -uo pipefail
out="${OUT:-./bench_out}"
steps=()
for a in "$@"; do
    case "$a" in tests|infer|train|features|profile|api|attention|serve|eval) steps+=("$a") ;; *) out="$a" ;; esac
done
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0
for step in "${steps[@]}"; do
    echo "=== $step ($(date -u +%H:%M:%S))"
    case "$step" in
    tests)
        $py -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -15 || status=1 ;;
    infer)
        $py benchmarks/bench_infer.py --preset full --device cuda --dtype bf16 --out "$out/bench_infer.json" \
            --llm_modes "${LLM_MODES:-eager,graph,compiled}" --flow_modes "${FLOW_MODES:-fp32,eager,compile,graph,fast}" \
            --hift_modes "${HIFT_MODES:-eager,compile,graph}" \
            > "$out/bench_infer.log" 2>&1 || status=1
        sed -n '1,/^{/p' "$out/bench_infer.log" | head -80 ;;
    train)
        runs=("--model llm --max_frames 64000 --compile" "--model flow --max_frames 48000")
        [ -n "${SKIP_RECIPE:-}" ] || runs=("--model llm --max_frames 2000" "--model flow --max_frames 2000" "${runs[@]}")
        for args in "${runs[@]}"; do
            tag=$(echo "$args" | tr -d '-' | tr ' ' '_')
            $py benchmarks/bench_train.py --device cuda $args --json "$out/train_$tag.json" 2>&1 | tail -4 || status=1
        done ;;
    profile)
        $py benchmarks/profile_infer.py --device cuda --out "$out/profile.json" > "$out/profile.log" 2>&1 || status=1
        grep -E '"(ms_per_token|wall_ms|kernels_per_call|kernel_ms_per_call)"' "$out/profile.log" | head -40 ;;
    api)
        timeout 240 $py benchmarks/bench_api.py --preset full --device cuda --requests 10 --concurrency 1,16 \
            --long_text 2 --profile --out "$out/bench_api_default.json" 2>&1 | tail -12 || status=1
        timeout 150 $py benchmarks/bench_api.py --preset full --device cuda --requests 2 --concurrency 16 \
            --no_batch_decode --out "$out/bench_api_no_batch.json" 2>&1 | tail -7 || status=1
        timeout 180 $py benchmarks/bench_api.py --preset full --device cuda --requests 4 --concurrency 16 \
            --long_text 2 --stream_cache --out "$out/bench_api_stream_cache.json" 2>&1 | tail -9 || status=1 ;;
    attention)
        timeout 120 $py benchmarks/bench_infer.py --preset full --device cuda --dtype bf16 --llm_only --llm_batch 16 \
            --llm_modes graph,graph:efficient,graph:matmul --out "$out/llm_attention.json" 2>&1 \
            | grep -E '\| llm_.*(ms_per_token|tokens_per_s)' || status=1
        best=$($py -c "import json,sys; r=json.load(open(sys.argv[1])); print(min(('efficient','matmul'), key=lambda k: r['llm_graph:%s_b1' % k]['ms_per_token']))" "$out/llm_attention.json")
        [ -d /tmp/cosytune_full ] || $py -m cosytune init-model --preset full --out /tmp/cosytune_full > /dev/null
        for kind in sdpa "$best"; do
            timeout 130 $py benchmarks/bench_api.py --model_dir /tmp/cosytune_full --device cuda --requests 8 \
                --concurrency 1,16 --decode_attention "$kind" --out "$out/bench_api_$kind.json" 2>&1 | grep -v ONNX \
                | tail -9 || status=1
        done ;;
    serve)
        timeout 420 $py benchmarks/bench_serve.py --preset full --device cuda --concurrency 1,8,16 --requests 32 \
            --out "$out/bench_serve.json" 2>&1 | tail -12 || status=1 ;;
    eval)
        timeout 300 $py benchmarks/bench_eval.py --device cuda --preset full --clips 64 --sentences 8 --takes 2 \
            --out "$out/bench_eval.json" 2>&1 | tail -15 || status=1 ;;
    features)
        $py benchmarks/bench_features.py --device cuda --utts 448 --json "$out/features_gpu.json" 2>&1 | tail -25 \
            || status=1 ;;
    esac
done
exit $status
