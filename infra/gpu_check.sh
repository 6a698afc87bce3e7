#!/usr/bin/env bash
# The checks that need a GPU, in one go: the compiled Triton kernels against their references and whole
# runs on CUDA (tests/test_triton_kernels.py, tests/test_gpu.py: refinement with the torch z-buffer among
# them), then the kernel, speed (a refinement step and its CUDA visibility pass included), guidance and
# text (where diffusers is installed: the embedding cache's start-up and the CLIP judge's cost) and
# quality benchmarks. Run from the repository root on a CUDA machine:
#
#     bash infra/gpu_check.sh [OUT] [SECONDS]
#
# Logs and benchmark tables go to OUT (default gpu-check/). The quality benchmark gets whatever is left
# of SECONDS (default 1800) and writes its table after every run, so a cut-off run still leaves a table.
# QUALITY_PROMPTS (';'-separated) chooses its prompts; default: all ten, without the ablations.
# QUALITY_SET (space-separated KEY=VALUE) sets config keys for it; default: refine.iterations=100, so
# its table holds stage 1 alone and with refinement side by side.
# GPU_CHECK_STEPS (space-separated) runs a subset: tests kernels speed guidance text quality (default: all),
# for a lease too short for all of them.
set -uo pipefail
out=${1:-gpu-check}
budget=${2:-1800}
mkdir -p "$out"
# Compiled kernels: tests/conftest.py only sets TRITON_INTERPRET=1 where it is unset.
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output in OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    [[ " ${GPU_CHECK_STEPS:-tests kernels speed guidance text quality} " == *" $name "* ]] || return 0
    echo "== $name (at most ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
step tests 300 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_gpu.py
step kernels 120 python3 -m dreamfusion.cli bench kernels --out "$out"
step speed 300 python3 -m dreamfusion.cli bench speed --out "$out"
# Full-size Stable Diffusion steps (random weights, nothing downloaded) need diffusers, which a bare
# CUDA image may lack: carry its wheel (the device README says how) or pip install '.[guidance]'.
if python3 -c "import diffusers" 2>/dev/null; then
    step guidance 300 python3 -m dreamfusion.cli bench guidance --out "$out" --repeats 3
    step text 600 python3 -m dreamfusion.cli bench text --out "$out" --repeats 3
else
    echo "== guidance skipped: diffusers is not installed" | tee "$out/guidance.log"
fi
left=$((budget - SECONDS))
if [ "$left" -gt 30 ]; then
    quality_set=()
    for pair in ${QUALITY_SET-refine.iterations=100}; do quality_set+=(--set "$pair"); done
    step quality "$left" python3 -m dreamfusion.cli bench quality --out "$out" --no-ablations \
        ${QUALITY_PROMPTS:+--prompts "$QUALITY_PROMPTS"} "${quality_set[@]}"
else
    failed+=("quality (no time left of ${budget} s)")
fi
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "all GPU checks passed; results in $out"
