//! CPU emulation of CUDA kernels, shared by the GPU tests.
//!
//! Without a GPU the kernels' logic (indexing, packing, tiles, masks,
//! reductions, partial blocks, tails) is still checked: the .cu sources are
//! compiled as C++ for the host against a small shim that runs every CUDA
//! thread of a block as an OS thread (`__syncthreads` and the warp
//! shuffles are barriers), launched with the very launch shapes the GPU
//! launchers use, and compared with the CPU spec like the GPU results.
//! Host fp32 arithmetic is IEEE round-to-nearest without FMA contraction
//! (-ffp-contract=off), as the kernels' explicit `_rn` intrinsics are on the
//! GPU. The tensor-core instruction `mma.sync.m16n8k16.row.col` (bf16
//! operands, fp32 accumulators) is emulated from the fragment layouts of the
//! PTX ISA: the warp's lanes publish their fragments, every lane rebuilds
//! the 16×16 and 16×8 operands and computes its own accumulators (products
//! of bf16 values are exact in fp32; the sum order differs from the
//! hardware's). What this cannot check: the GPU's own instructions, memory
//! model, alignment faults, the Rust-side argument marshalling; the GPU
//! tests do.
//!
//! Needs a C++20 compiler (`c++`, or $CXX); skipped with a message when
//! there is none or when LORA_SKIP_CUDA_EMULATION=1 (the GPU check sets it:
//! the GPU runs the real kernels).

use lora::backend::cuda;

const EMU_SHIM: &str = r#"
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
struct dim3 { unsigned x, y, z; };
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static std::barrier<>* emu_block_bar;
static std::vector<std::unique_ptr<std::barrier<>>> emu_warp_bars;
static unsigned long long emu_slots[1024];
#define __global__
#define __device__
#define __forceinline__ inline
#define __constant__ static const
#define __shared__ static
#define __launch_bounds__(x)
#define __align__(x) __attribute__((aligned(x)))
inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
using std::isfinite;
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __double2float_rn(double a) { return (float)a; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
// A warp shuffle: every lane publishes v, then reads lane `src` (0..31).
template <class T> T emu_shfl(T v, unsigned src) {
    static_assert(sizeof(T) <= 8, "shuffle of a wide type");
    unsigned t = threadIdx.x, w = t / 32;
    unsigned long long raw = 0;
    std::memcpy(&raw, &v, sizeof(T));
    emu_slots[t] = raw;
    emu_warp_bars[w]->arrive_and_wait();
    raw = emu_slots[(t & ~31u) | (src & 31u)];
    emu_warp_bars[w]->arrive_and_wait();
    T r;
    std::memcpy(&r, &raw, sizeof(T));
    return r;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int lane_mask) { return emu_shfl(v, (threadIdx.x & 31u) ^ (unsigned)lane_mask); }
template <class T> T __shfl_sync(unsigned, T v, int src_lane) { return emu_shfl(v, (unsigned)src_lane); }
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float a, float b) { return float2{a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
inline float emu_f16_to_f32(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline unsigned short emu_f32_to_f16(float f) { _Float16 x = (_Float16)f; unsigned short h; std::memcpy(&h, &x, 2); return h; }
// f32 -> bf16 bits, round to nearest even (NaN kept quiet), as cvt.rn.bf16.
inline unsigned emu_bf16_bits(float f) {
    unsigned x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (x >> 16) | 0x40u;
    return (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
}
// cvt.rn.bf16x2.f32 d, a, b: a to the upper half, b to the lower.
inline unsigned emu_cvt_bf16x2(float a, float b) { return (emu_bf16_bits(a) << 16) | emu_bf16_bits(b); }
inline float emu_bf16_f32(unsigned bits16) { return __uint_as_float((bits16 & 0xffffu) << 16); }
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, lane = 4·g + t:
//   A regs {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)},
//   B regs {(k 2t..2t+1, n g), (k 2t+8.., n g)},
//   C {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}; low half = lower index.
struct EmuFrag { unsigned a[4], b[2]; };
static EmuFrag emu_frags[1024];
inline void emu_mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    const unsigned t = threadIdx.x, w = t / 32, lane = t & 31u;
    emu_frags[t] = EmuFrag{{a0, a1, a2, a3}, {b0, b1}};
    emu_warp_bars[w]->arrive_and_wait();
    float A[16][16], B[16][8];
    for (unsigned l = 0; l < 32; l++) {
        const EmuFrag& f = emu_frags[w * 32 + l];
        const unsigned g = l >> 2, q = l & 3u;
        const unsigned rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * q, 2 * q, 2 * q + 8, 2 * q + 8};
        for (int r = 0; r < 4; r++) {
            A[rows[r]][cols[r]] = emu_bf16_f32(f.a[r]);
            A[rows[r]][cols[r] + 1] = emu_bf16_f32(f.a[r] >> 16);
        }
        B[2 * q][g] = emu_bf16_f32(f.b[0]);
        B[2 * q + 1][g] = emu_bf16_f32(f.b[0] >> 16);
        B[2 * q + 8][g] = emu_bf16_f32(f.b[1]);
        B[2 * q + 9][g] = emu_bf16_f32(f.b[1] >> 16);
    }
    emu_warp_bars[w]->arrive_and_wait();
    const unsigned g = lane >> 2, q = lane & 3u;
    for (int i = 0; i < 4; i++) {
        const unsigned r = g + (i >= 2 ? 8 : 0), col = 2 * q + (i & 1);
        float s = c[i];
        for (int k = 0; k < 16; k++) s += A[r][k] * B[k][col];
        c[i] = s;
    }
}
// Dynamic shared memory (extern __shared__), one block at a time.
alignas(16) static unsigned char emu_dyn_smem[1 << 18];
static std::mutex emu_launch_lock;  // one launch at a time: the state above is global
// Runs f for every block of grid (x fastest), `block` threads each.
template <class F> void emu_launch3(dim3 grid, unsigned block, F f) {
    if (block == 0 || block > 1024 || block % 32 != 0) std::abort();
    std::lock_guard<std::mutex> guard(emu_launch_lock);
    blockDim = dim3{block, 1, 1};
    gridDim = grid;
    std::barrier<> bar(block);
    emu_block_bar = &bar;
    emu_warp_bars.clear();
    for (unsigned w = 0; w < block / 32; ++w) emu_warp_bars.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < block; ++t)
        ts.emplace_back([&, t] {
            threadIdx = dim3{t, 0, 0};
            for (unsigned z = 0; z < grid.z; ++z)
                for (unsigned y = 0; y < grid.y; ++y)
                    for (unsigned x = 0; x < grid.x; ++x) {
                        blockIdx = dim3{x, y, z};
                        f();
                        bar.arrive_and_wait();  // static __shared__ arrays are reused by the next block
                    }
        });
    for (auto& t : ts) t.join();
}
template <class F> void emu_launch(unsigned grid, unsigned block, F f) { emu_launch3(dim3{grid, 1, 1}, block, f); }
"#;

/// Why the emulation is skipped here, if it is.
pub fn skip_reason() -> Option<String> {
    std::env::var("LORA_SKIP_CUDA_EMULATION").is_ok_and(|v| v == "1").then(|| "LORA_SKIP_CUDA_EMULATION=1".to_string())
}

/// Compiles the kernel files `sources` (names in `cuda::SOURCES`) with the
/// text substitutions `subst` (inline PTX and the like → their host
/// emulation; every `asm(` must be replaced) after `extra` C++ (helpers a
/// family needs), followed by `entry` (the `extern "C"` entry points), into
/// a shared library, and loads it. `Err` says why it skips (no compiler,
/// no C++20 `<barrier>`, LORA_SKIP_CUDA_EMULATION=1); a source that does
/// not compile panics.
pub fn build(tag: &str, sources: &[&str], subst: &[(&str, &str)], extra: &str, entry: &str) -> Result<libloading::Library, String> {
    if let Some(why) = skip_reason() {
        return Err(why);
    }
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let dir = std::env::temp_dir().join(format!("lora-cuda-emu-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut src = String::from(EMU_SHIM);
    src.push_str(extra);
    for k in cuda::SOURCES.iter().filter(|k| sources.contains(&k.name)) {
        let mut text = k.src.to_string();
        for (from, to) in subst {
            text = text.replace(from, to);
        }
        assert!(!text.contains("asm(") && !text.contains("asm volatile("), "cuda/{} has inline PTX the emulation does not know: extend the substitutions", k.name);
        src.push_str(&format!("\n// ---- cuda/{}\n{text}\n", k.name));
    }
    src.push_str(entry);
    let cpp = dir.join("emu.cpp");
    let so = dir.join("libemu.so");
    std::fs::write(&cpp, &src).unwrap();
    let out = std::process::Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-pthread", "-Wno-unknown-pragmas", "-o"])
        .arg(&so)
        .arg(&cpp)
        .output()
        .map_err(|e| format!("no C++ compiler ({cxx}: {e})"))?;
    if !out.status.success() {
        let log = String::from_utf8_lossy(&out.stderr);
        if log.contains("barrier: No such file") || log.contains("unrecognized command-line option '-std=c++20'") {
            return Err(format!("{cxx} lacks C++20 <barrier>"));
        }
        panic!("the kernels do not compile as host C++ ({cxx}); {}:\n{log}", cpp.display());
    }
    // SAFETY: loads the library just built; callers look up the entry
    // points they declared in `entry`.
    unsafe { libloading::Library::new(&so) }.map_err(|e| format!("cannot load {}: {e}", so.display()))
}
