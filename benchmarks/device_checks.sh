#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of about ten minutes at most (docs/speed.md, "On a GPU"):
#
#   bash benchmarks/device_checks.sh [OUT]
#
# 1. machine.log   the GPU (nvidia-smi), Python, torch and the device torch sees;
# 2. cuda-tests.log the tests marked `cuda` (python -m pytest -m cuda): CUDA sweeps against the CPU's
#                  verdicts, the device reference against the mpmath oracle and against NumPy;
# 3. gpu.log       benchmarks/gpu.py: the bfloat16 audit of 2048 × 128256 logits against F.cross_entropy
#                  alone, the memory bandwidth reached, the breakdown by stage. 2048 rows, not its default
#                  8192: the inputs, the metrics and the row verdict run on the host (one implementation's
#                  1024 × 128256 cell took 6.8 s of a 2-core CPU: inputs 3.3 s, metrics 2.0 s, row verdict
#                  1.6 s), and the whole script must fit in ten minutes;
# 4. llm-sweep.log, summary.csv, report.html
#                  `ce-audit sweep --device cuda --dtype bfloat16` on a 128256-class vocabulary (Llama 3's),
#                  256 rows, every built-in that runs on CUDA.
#
# Each step has a time limit of its own and writes its log to OUT (default: $OUT where it is set, else
# ./device-checks), flat, so that a runner that fetches a folder's files gets them all; a step that fails
# or times out does not stop the next, and status.txt lists each step's exit code (124: timed out). It runs
# from this checkout without installing it (PYTHONPATH), with the python3 that holds torch; ce-audit's other
# dependencies (typer, rich, numpy, ml_dtypes, mpmath; pytest and matplotlib for steps 2 and 4) must be
# installed there. Where no CUDA device is found, step 1 says so and the others end at once.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-device-checks}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
: >"$out/status.txt"

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, its output to OUT/NAME.log
    local name="$1" seconds="$2"
    shift 2
    local started=$SECONDS status=0
    timeout "$seconds" "$@" >"$out/$name.log" 2>&1 || status=$?
    echo "$name: exit $status after $((SECONDS - started)) s" | tee -a "$out/status.txt"
    return 0
}

machine() {
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$python" - <<'EOF'
import platform, sys
import torch
print("python", platform.python_version(), "torch", torch.__version__, "CUDA", torch.version.cuda)
if not torch.cuda.is_available():
    sys.exit("no CUDA device: the other steps need one")
properties = torch.cuda.get_device_properties(0)
print(torch.cuda.get_device_name(0), f"{properties.total_memory / 2**30:.1f} GiB,",
      properties.multi_processor_count, "multiprocessors")
EOF
}

export -f machine
export python
step machine 60 bash -c machine
if ! grep -q "^machine: exit 0 " "$out/status.txt"; then
    cat "$out/machine.log"
    exit 1
fi
step cuda-tests 180 "$python" -m pytest -m cuda -q -p no:cacheprovider tests
step gpu 210 "$python" benchmarks/gpu.py --batch 2048
step llm-sweep 150 "$python" -m ce_audit sweep --device cuda --dtype bfloat16 --vocab 128256 --batch 256 \
    --distribution normal --scale 1 --offset 0 --out "$out/llm-bf16"
for file in summary.csv report.html; do
    [ -f "$out/llm-bf16/$file" ] && cp "$out/llm-bf16/$file" "$out/$file"
done
rm -rf "$out/llm-bf16"
cat "$out/status.txt"
