#!/usr/bin/env bash
# The GPU figures in one prepared run (issue 3: Llama-2-7B scoring; issue 5: Llama-2-13B --stream
# under a memory cap). Prints JSON lines; with $OUT set (the device tool) also $OUT/gpu_check.jsonl.
#
#   bash benchmarks/gpu_check.sh kernel|score|stream|all [DATA_DIR]
#
# kernel: the fused Triton |grad| kernel against float64, and its speed against bmm (kernel_check.py);
# score: Llama-2-7B shape, bf16, 128 rows: pass time, peak, top-K vs an fp32 reference on 8
# samples, the same run twice (byte-identical or how many top-K entries differ), wanda.
#
# DATA_DIR holds the shared CSVs: ../shared/data, else .gpu-data/ in the repo (the device tool
# carries only the repo: `mkdir -p .gpu-data && cp ../shared/data/*.csv .gpu-data/`, carry
# .gpu-data). GPU_CHECK_SHAPE=tiny runs both parts at toy size, on CPU too. Each part has its own
# time limit so the figures of a finished part come back even when the other overruns.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
data=${2:-}
for d in "$data" ../shared/data .gpu-data; do
    if [ -n "$d" ] && [ -f "$d/beaver_train330k_fairness_safe_1k.csv" ]; then data=$d; break; fi
done
if [ ! -f "$data/beaver_train330k_fairness_safe_1k.csv" ]; then
    echo "gpu_check: no calibration CSVs found; pass DATA_DIR or copy ../shared/data/*.csv into .gpu-data/" >&2
    exit 1
fi
tiny=${GPU_CHECK_SHAPE:-}
log=${OUT:+$OUT/gpu_check.jsonl}
log=${log:-/dev/null}
work=$(mktemp -d "${GPU_CHECK_WORKDIR:-${TMPDIR:-/tmp}}/spinctl-gpu.XXXXXX")
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1

# No install needed (an editable one builds the compiled kernels, which needs the build tools):
# the tree on PYTHONPATH, kernels/ under its installed name, numba's JIT for them.
if ! python3 -c "import spinctl, spinctl_kernels" 2>/dev/null; then
    mkdir -p "$work/path" && ln -s "$PWD/kernels" "$work/path/spinctl_kernels"
    export PYTHONPATH="$PWD:$work/path${PYTHONPATH:+:$PYTHONPATH}" SPINCTL_KERNELS=jit
fi
python3 - <<'EOF' | tee -a "$log"
import json, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print(json.dumps({"bench": "env", "gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__}))
EOF

rc=0
run() {  # run LIMIT_S CMD...: a part under its own limit; its JSON lines to stdout and the log
    local limit=$1; shift
    timeout "$limit" "$@" --data-dir "$data" --data "$data/beaver_train330k_fairness_safe_1k.csv" --workdir "$work" \
        | tee -a "$log"
    local s=${PIPESTATUS[0]}
    [ "$s" -eq 0 ] || { echo "{\"bench\": \"gpu_check\", \"failed\": \"$*\", \"rc\": $s}" | tee -a "$log"; rc=1; }
}
if [ "$part" = kernel ] || [ "$part" = all ]; then
    if [ -n "$tiny" ]; then args=(--device cpu --dtypes float32,float16); export TRITON_INTERPRET=1; else args=(--speed); fi
    timeout 120 python3 benchmarks/kernel_check.py "${args[@]}" | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo '{"bench": "gpu_check", "failed": "kernel_check"}' | tee -a "$log"; rc=1; }
    unset TRITON_INTERPRET
fi
if [ "$part" = score ] || [ "$part" = all ]; then
    run 330 python3 benchmarks/bench_score.py --shape "${tiny:-llama2-7b}"
fi
if [ "$part" = stream ] || [ "$part" = all ]; then
    run 560 python3 benchmarks/bench_stream.py --gpu --shape "${tiny:-llama2-13b}"
fi
exit $rc
