#!/usr/bin/env bash
# Builds, on this machine (no GPU, no CUDA toolkit needed), everything that
# scripts/gpu-check.sh runs on a GPU machine (which has no Rust toolchain),
# into .gpu/ (git-ignored):
#
#   .gpu/bin/cuda_nf4        tests/cuda_nf4.rs: every NF4 kernel vs its CPU twin
#   .gpu/bin/cuda_ops        tests/cuda_ops.rs: training-step kernels (norm, rope, swiglu, embed, loss, adamw) vs CPU
#   .gpu/bin/cuda_compile    tests/cuda_compile.rs: NVRTC compiles cuda/*.cu (there: the device's NVRTC)
#   .gpu/bin/cuda_blas       tests/cuda_blas.rs: cuBLAS products and elementwise kernels vs CPU
#   .gpu/bin/cuda_lora       tests/cuda_lora.rs: LoRA product kernels vs CPU
#   .gpu/bin/cuda_attention  tests/cuda_attention.rs: attention kernels vs CPU
#   .gpu/bin/cuda_train      tests/cuda_train.rs: whole training steps on the GPU vs the CPU trainer
#   .gpu/bin/cuda_paged      tests/cuda_paged.rs: paged memory as CUDA managed memory (prefetch, budget, refusal)
#   .gpu/bin/cuda_fuzz       tests/cuda_fuzz.rs: random model configs on the GPU vs the CPU
#   .gpu/bin/gpu_bench_nf4   examples/gpu_bench_nf4.rs: bandwidth and GEMV benchmark
#   .gpu/bin/gpu_bench_train examples/gpu_bench_train.rs: 1B-parameter training-step benchmark
#   .gpu/bin/finetune        examples/c/finetune.c (make demo), with .gpu/lib/liblora.so.0
#   .gpu/MANIFEST            git revision, toolchain, sizes, glibc symbol versions needed
#
# Release builds (`cargo test --release --no-run`), debug info stripped to
# keep the bundle small. Nothing else is needed at run time: the kernel
# sources (cuda/*.cu) and the NF4 fixtures are embedded in the binaries
# (include_str!/include_bytes!), and NVRTC is loaded from the GPU machine.
#
# Usage: scripts/build-gpu-bundle.sh      (then carry .gpu/ to the GPU machine
#        and run scripts/gpu-check.sh from the repository root there)
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLE=.gpu
TESTS=(cuda_nf4 cuda_ops cuda_blas cuda_lora cuda_attention cuda_train cuda_compile cuda_paged cuda_fuzz)
EXAMPLES=(gpu_bench_nf4 gpu_bench_train)

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/bin"

targs=()
for t in "${TESTS[@]}"; do targs+=(--test "$t"); done
eargs=()
for e in "${EXAMPLES[@]}"; do eargs+=(--example "$e"); done

# The JSON messages name each executable built.
echo "== cargo test --release --no-run ${targs[*]}"
cargo test --release --no-run "${targs[@]}" --message-format=json-render-diagnostics > "$BUNDLE/cargo-messages.json"
# Examples through `cargo build` (under `cargo test` they would be built as
# test harnesses).
echo "== cargo build --release ${eargs[*]}"
cargo build --release "${eargs[@]}" --message-format=json-render-diagnostics >> "$BUNDLE/cargo-messages.json"

python3 - "$BUNDLE" "${TESTS[@]}" "${EXAMPLES[@]}" <<'PY'
import json, shutil, sys, os
bundle, wanted = sys.argv[1], set(sys.argv[2:])
found = {}
for line in open(os.path.join(bundle, "cargo-messages.json")):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    kinds = set(t.get("kind", []))
    test_harness = m.get("profile", {}).get("test", False)
    if t["name"] in wanted and (("test" in kinds and test_harness) or ("example" in kinds and not test_harness)):
        found[t["name"]] = m["executable"]
missing = wanted - set(found)
if missing:
    sys.exit(f"build-gpu-bundle: no executable for {sorted(missing)}")
for name, exe in sorted(found.items()):
    dst = os.path.join(bundle, "bin", name)
    shutil.copy2(exe, dst)
    print(f"{name}: {exe}")
PY
rm -f "$BUNDLE/cargo-messages.json"

# The C demo (make demo's examples/c/finetune.c) and the library it links,
# to run the main job through the C API on the GPU (LORA_DEMO_DEVICE).
echo "== make build/finetune"
make build/finetune >/dev/null
mkdir -p "$BUNDLE/lib"
cp build/finetune "$BUNDLE/bin/finetune"
cp -L target/release/liblora.so "$BUNDLE/lib/liblora.so.0"
command -v objcopy >/dev/null && objcopy --strip-debug "$BUNDLE/lib/liblora.so.0"

for f in "$BUNDLE"/bin/*; do
  if command -v objcopy >/dev/null; then objcopy --strip-debug "$f"; fi
  chmod +x "$f"
done

{
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' + uncommitted changes')"
  echo "rustc: $(rustc --version)"
  echo "glibc here: $(ldd --version 2>/dev/null | head -1)"
  for f in "$BUNDLE"/bin/*; do
    need=""
    if command -v objdump >/dev/null; then
      need="$(objdump -T "$f" | grep -o 'GLIBC_[0-9.]*' | sort -u -V | tail -1)"
    fi
    echo "$(basename "$f"): $(du -k "$f" | cut -f1) KiB, needs ${need:-?}"
  done
} > "$BUNDLE/MANIFEST"
cat "$BUNDLE/MANIFEST"

total_kib=$(du -sk "$BUNDLE" | cut -f1)
echo "bundle: $BUNDLE ($total_kib KiB)"
if [ "$total_kib" -gt $((60 * 1024)) ]; then
  echo "build-gpu-bundle: $BUNDLE is over 60 MiB; the GPU machine accepts 64 MiB of carried files" >&2
  exit 1
fi
