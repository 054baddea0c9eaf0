#!/usr/bin/env bash
# The GPU check: runs on a GPU machine, from the repository root, the
# binaries that scripts/build-gpu-bundle.sh built into .gpu/ elsewhere (the
# GPU machine has no Rust toolchain and no network).
#
#   1. describes the machine (nvidia-smi, driver, glibc, nvcc);
#   2. finds NVRTC 13 (LORA_NVRTC_LIB if set; else the CUDA toolkit under
#      /usr/local/cuda*, the loader cache, or a pip wheel) and exports
#      LORA_NVRTC_LIB;
#   3. cross-checks with nvcc that cuda/*.cu compile for the device's sm_XY;
#   4. runs every test binary with LORA_REQUIRE_GPU=1 (a missing GPU or
#      NVRTC is a failure, not a skip; LORA_REQUIRE_GPU=0 in the caller's
#      environment makes them skips, to try the script without a GPU) and
#      the benchmark.
#
# The whole log goes to "$OUT/gpu-check.log" ($OUT defaults to ./gpu-out).
# Exits non-zero if anything failed. Each step has its own time limit and
# all of them share one deadline (DEADLINE_S, 430 s after the start; a step
# gets what is left of it), so the check ends within 8 minutes.
#
#   5. the training-step benchmark (examples/gpu_bench_train.rs) on a
#      1B-parameter LLaMA, and beside it on the same card PyTorch + PEFT
#      (bench/peft_train_gpu.py; bitsandbytes from .whl/site when carried,
#      for the QLoRA rows: scripts/fetch-gpu-wheels.sh prepares it).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
exec > >(tee "$LOG") 2>&1
TEE_PID=$!
# finish RC: flush the log (wait for tee) and exit.
finish() {
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit "$1"
}

BUNDLE=.gpu
START=$(date +%s)
DEADLINE_S="${DEADLINE_S:-430}"
failures=()
passes=0

section() { printf '\n==== %s (t=%ss)\n' "$1" "$(( $(date +%s) - START ))"; }

# run NAME TIMEOUT CMD...: runs a step, records pass/fail.
run() {
  local name=$1 limit=$2
  shift 2
  local left=$(( START + DEADLINE_S - $(date +%s) ))
  [ "$left" -lt "$limit" ] && limit=$left
  section "$name"
  if [ "$limit" -le 0 ]; then
    echo "---- $name: SKIPPED (the check's deadline of ${DEADLINE_S}s has passed)"
    failures+=("$name (no time left)")
    return
  fi
  echo "\$ $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    echo "---- $name: PASSED (${dt}s)"
    passes=$((passes + 1))
  else
    [ $rc -eq 124 ] && echo "---- $name: TIMED OUT after ${limit}s"
    echo "---- $name: FAILED (exit $rc, ${dt}s)"
    failures+=("$name")
  fi
}

section "machine"
date -u
uname -a
ldd --version 2>/dev/null | head -1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
else
  echo "nvidia-smi not found"
fi
command -v nvcc >/dev/null && nvcc --version | tail -2

section "bundle"
if [ ! -d "$BUNDLE/bin" ]; then
  echo "no $BUNDLE/bin: run scripts/build-gpu-bundle.sh on the build machine and carry $BUNDLE/ here"
  echo "gpu-check: 0 passed, 1 failed"
  finish 2
fi
cat "$BUNDLE/MANIFEST" 2>/dev/null
ls -l "$BUNDLE/bin"
for f in "$BUNDLE"/bin/*; do
  if ldd "$f" 2>&1 | grep -Eq 'not found|version .GLIBC'; then
    echo "$f does not load here:"; ldd "$f"
  fi
done

section "NVRTC"
find_nvrtc() {
  if [ -n "${LORA_NVRTC_LIB:-}" ] && [ -f "$LORA_NVRTC_LIB" ]; then echo "$LORA_NVRTC_LIB"; return; fi
  local d f
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib /usr/local/cuda-13*/lib64 /usr/local/cuda-13*/targets/*/lib \
           /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib; do
    for f in "$d/libnvrtc.so.13" "$d"/libnvrtc.so.13.*; do
      [ -f "$f" ] && { echo "$f"; return; }
    done
  done
  f="$(ldconfig -p 2>/dev/null | awk '$1 ~ /^libnvrtc\.so\.13/ {print $NF; exit}')"
  [ -n "$f" ] && [ -f "$f" ] && { echo "$f"; return; }
  if command -v python3 >/dev/null; then
    f="$(python3 -c 'import site,sysconfig,os
dirs=[sysconfig.get_paths()["purelib"]]+site.getsitepackages()
print(next((p for p in (os.path.join(d,"nvidia/cu13/lib/libnvrtc.so.13") for d in dirs) if os.path.isfile(p)),""))' 2>/dev/null)"
    [ -n "$f" ] && { echo "$f"; return; }
  fi
  f="$(timeout 30 find / -xdev -name 'libnvrtc.so.13*' -not -name '*builtins*' 2>/dev/null | head -1)"
  [ -n "$f" ] && echo "$f"
}
NVRTC="$(find_nvrtc)"
if [ -z "$NVRTC" ]; then
  echo "no libnvrtc.so.13 on this machine: the kernel tests will fail"
else
  export LORA_NVRTC_LIB="$NVRTC"
  # NVRTC opens libnvrtc-builtins by name; a toolkit copy may lack an
  # $ORIGIN run path, so let the loader search its directory too.
  export LD_LIBRARY_PATH="$(dirname "$NVRTC")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "LORA_NVRTC_LIB=$LORA_NVRTC_LIB"
  ls -l "$(dirname "$NVRTC")"/libnvrtc* 2>/dev/null
fi

# cuBLAS (the device training step's matrix products): the toolkit's or
# the nvidia-cublas wheel's, found the same way.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.13' && ! ls "$(dirname "${NVRTC:-/nonexistent}")"/libcublas.so.13 >/dev/null 2>&1; then
  CUBLAS="$(timeout 30 find / -xdev -name 'libcublas.so.13*' 2>/dev/null | head -1)"
  if [ -n "$CUBLAS" ]; then
    export LD_LIBRARY_PATH="$(dirname "$CUBLAS")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "cuBLAS: $CUBLAS"
  else
    echo "no libcublas.so.13 on this machine: the training-step tests will fail"
  fi
fi

# A missing GPU or NVRTC fails every test; LORA_REQUIRE_GPU=0 turns that
# into skips (to try this script on a machine without a GPU).
export LORA_REQUIRE_GPU="${LORA_REQUIRE_GPU:-1}"
echo "LORA_REQUIRE_GPU=$LORA_REQUIRE_GPU"
# The CPU emulation of the kernels is for machines without a GPU.
export LORA_SKIP_CUDA_EMULATION=1
export RUST_BACKTRACE=1

if command -v nvcc >/dev/null && command -v nvidia-smi >/dev/null; then
  CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')"
  if [ -n "$CAP" ] && ls cuda/*.cu >/dev/null 2>&1; then
    NVCC_TMP="$(mktemp -d)"
    nvcc_all() {
      local f
      for f in cuda/*.cu; do
        echo "nvcc -cubin -arch=sm_$CAP $f"
        nvcc -cubin -arch="sm_$CAP" --fmad=false -ftz=false -prec-div=true -prec-sqrt=true -Xptxas -v \
          -o "$NVCC_TMP/$(basename "$f" .cu).cubin" "$f" || return 1
      done
    }
    run "nvcc compiles cuda/*.cu for sm_$CAP" 45 bash -c "$(declare -f nvcc_all); CAP=$CAP NVCC_TMP=$NVCC_TMP nvcc_all"
    rm -rf "$NVCC_TMP"
  fi
fi

run "test cuda_compile (NVRTC here compiles every kernel)" 60 "$BUNDLE/bin/cuda_compile" --nocapture --test-threads=1
run "test cuda_nf4 (kernels vs CPU on the GPU)" 75 "$BUNDLE/bin/cuda_nf4" --nocapture --test-threads=1
run "test cuda_ops (training-step kernels vs CPU on the GPU)" 60 "$BUNDLE/bin/cuda_ops" --nocapture --test-threads=1
run "test cuda_blas (cuBLAS products and elementwise kernels vs CPU on the GPU)" 45 "$BUNDLE/bin/cuda_blas" --nocapture --test-threads=1
run "test cuda_lora (LoRA product kernels vs CPU on the GPU)" 60 "$BUNDLE/bin/cuda_lora" --nocapture --test-threads=1
run "test cuda_attention (attention kernels vs CPU on the GPU)" 45 "$BUNDLE/bin/cuda_attention" --nocapture --test-threads=1
run "test cuda_paged (paged memory: CUDA managed memory)" 60 "$BUNDLE/bin/cuda_paged" --nocapture --test-threads=1
# cuda_train's model cases in two parts: the original ones here, the other
# families' (SmolLM3, Granite, OLMo 2, Gemma 1/2/3, Phi-3) after the
# benchmark rows that decide the bar; every test on each part's cases.
CORE_CASES="llama_nf4,qwen2_fp32,mistral_bf16,random_hd128_nf4,random_mistral,qwen3,llama_bias,qwen2_window6,fold_"
FAMILY_CASES="smollm3,granite,olmo2,gemma,phi3"
run "test cuda_train (training steps on the GPU vs the CPU trainer)" 120 env LORA_TRAIN_CASES="$CORE_CASES" "$BUNDLE/bin/cuda_train" --nocapture --test-threads=1
run "bench gpu_bench_nf4" 45 "$BUNDLE/bin/gpu_bench_nf4"

# The main job through the C API on the GPU: make demo's QLoRA fine-tune
# of models/default with LORA_DEMO_DEVICE=0 (it must say the model went
# there and trained there; generation, merges, swaps and the mixed batch
# then run there too).
demo_on_gpu() {
  LD_LIBRARY_PATH="$BUNDLE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" LORA_DEMO_DEVICE=0 \
    "$BUNDLE/bin/finetune" models/default data/finetune.txt "$(mktemp -d)" > "$OUT/demo.log" 2>&1
  local rc=$?
  grep -E "model on|training on|loss .* -> |step +(1|50|100|150|200)/|merge took|swap took" "$OUT/demo.log"
  tail -3 "$OUT/demo.log"
  [ $rc -eq 0 ] && grep -q "model on CUDA device" "$OUT/demo.log" && grep -q "training on CUDA device" "$OUT/demo.log"
}
run "demo: make demo's fine-tune through the C API on the GPU" 90 bash -c "$(declare -f demo_on_gpu); BUNDLE=$BUNDLE OUT=$OUT demo_on_gpu"

# The training-step benchmark, ours and PyTorch + PEFT on the same card.
# Batch 4 x 1024 tokens, LoRA r 16 on every linear layer, bf16 compute.
# The rows that decide the speed and memory bar first (our default and
# lean QLoRA steps, with and without checkpointing, then the baselines),
# the other variants after them, so a tight deadline cuts those.
B="$BUNDLE/bin/gpu_bench_train"
LEAN="LORA_CUDA_ATTENTION=tc LORA_CUDA_LORA=bf16"
run "bench gpu_bench_train nf4 (QLoRA)" 60 "$B" nf4 4 1024 5 16
run "bench gpu_bench_train nf4, tensor-core attention + bf16 adapter products (the lean bf16 step)" 60 env $LEAN "$B" nf4 4 1024 5 16
run "bench gpu_bench_train nf4 + checkpointing, the lean bf16 step" 60 env $LEAN "$B" nf4 4 1024 5 16 ckpt
run "bench gpu_bench_train nf4 + checkpointing" 60 "$B" nf4 4 1024 5 16 ckpt
run "bench gpu_bench_train nf4, bf16 adapter products (the lean bf16 step with the fp32 attention kernels)" 60 env LORA_CUDA_LORA=bf16 "$B" nf4 4 1024 5 16
if command -v python3 >/dev/null && python3 -c 'import torch, peft' 2>/dev/null; then
  [ -d .whl/site ] && export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
  if python3 -c 'import bitsandbytes' 2>/dev/null; then
    run "baseline PyTorch + PEFT + bitsandbytes nf4 (QLoRA)" 60 python3 bench/peft_train_gpu.py nf4 4 1024 5 16
    run "baseline PyTorch + PEFT + bitsandbytes nf4 + checkpointing" 60 python3 bench/peft_train_gpu.py nf4 4 1024 5 16 ckpt
  else
    echo "bitsandbytes not importable here: no QLoRA baseline (carry .whl/site, see bench/RESULTS.md)"
  fi
  run "baseline PyTorch + PEFT bf16" 60 python3 bench/peft_train_gpu.py bf16 4 1024 5 16
else
  echo "python3 with torch and peft not found: no PyTorch baseline"
fi
run "test cuda_train, the other model families (every test on their cases)" 120 env LORA_TRAIN_CASES="$FAMILY_CASES" "$BUNDLE/bin/cuda_train" --nocapture --test-threads=1
run "test cuda_fuzz (random model configs on the GPU vs the CPU)" 60 env LORA_FUZZ_SEEDS=32 "$BUNDLE/bin/cuda_fuzz" --nocapture --test-threads=1
# head_dim 256 (Gemma's): the same 1B model regrouped into 8 heads of 256,
# the _d256 fp32 attention kernels against the tensor-core ones.
run "bench gpu_bench_train nf4, head_dim 256 (fp32 attention kernels)" 60 env LORA_BENCH_HEAD_DIM=256 "$B" nf4 4 1024 5 16
run "bench gpu_bench_train nf4, head_dim 256, the lean bf16 step (tensor-core attention)" 60 env LORA_BENCH_HEAD_DIM=256 $LEAN "$B" nf4 4 1024 5 16
run "bench gpu_bench_train nf4, the lean bf16 step without folded adapter products" 60 env $LEAN LORA_CUDA_FOLD=0 "$B" nf4 4 1024 5 16
run "bench gpu_bench_train bf16" 60 "$B" bf16 4 1024 5 16
run "bench gpu_bench_train nf4, tensor-core attention" 60 env LORA_CUDA_ATTENTION=tc "$B" nf4 4 1024 5 16
run "bench gpu_bench_train nf4, the lean bf16 step without recomputation" 60 env $LEAN LORA_CUDA_RECOMPUTE=0 "$B" nf4 4 1024 5 16
run "bench gpu_bench_train nf4 without recomputation" 60 env LORA_CUDA_RECOMPUTE=0 "$B" nf4 4 1024 5 16
run "bench gpu_bench_train nf4, tensor-core attention + bf16 adapter products, lean step off" 60 env $LEAN LORA_CUDA_LEAN=0 "$B" nf4 4 1024 5 16
run "bench gpu_bench_train nf4, LoRA kernels" 60 env LORA_CUDA_LORA=kernels "$B" nf4 4 1024 5 16
run "bench gpu_bench_train nf4, tensor-core attention + LoRA kernels" 60 env LORA_CUDA_ATTENTION=tc LORA_CUDA_LORA=kernels "$B" nf4 4 1024 5 16

section "summary"
# The training-step rows against PyTorch + PEFT (speed ratio, memory saved).
command -v python3 >/dev/null && python3 scripts/bench-summary.py "$LOG"
echo "log: $LOG"
if [ ${#failures[@]} -eq 0 ]; then
  echo "gpu-check: $passes passed, 0 failed"
  finish 0
fi
for f in "${failures[@]}"; do echo "FAILED: $f"; done
echo "gpu-check: $passes passed, ${#failures[@]} failed"
finish 1
