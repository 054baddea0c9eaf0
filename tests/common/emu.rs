//! CPU emulation of CUDA kernels, shared by the GPU tests.
//!
//! Without a GPU the kernels' logic (indexing, packing, tiles, masks,
//! reductions, partial blocks, tails) is still checked: the .cu sources are
//! compiled as C++ for the host against a small shim that runs every CUDA
//! thread of a block as a fiber (a coroutine on the launching OS thread:
//! a hand-written register switch on x86-64, `ucontext` elsewhere;
//! `__syncthreads` and the warp shuffles are barriers at which the fibers
//! take turns), launched with the very launch shapes the GPU
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

pub const EMU_SHIM: &str = r#"
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sys/mman.h>
#include <ucontext.h>
#include <vector>
struct dim3 { unsigned x, y, z; };
// The fibers of a block run on the launching OS thread, one at a time;
// the scheduler sets threadIdx before resuming each. Not thread_local: one
// launch at a time per library (emu_launch_lock), and a thread-local
// variable in a shared library costs a call at every use.
static dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
// A shuffle's published values, two sets used in turn (so one barrier per
// shuffle: a lane that reaches the next shuffle writes the other set, and
// one two shuffles on has passed a barrier every lane reaches only after
// its read), and each thread's count of shuffles.
static unsigned long long emu_slots[2][1024];
static unsigned emu_shfl_count[1024];
static std::vector<char> emu_done;
static unsigned emu_cur;                        // the fiber running now
// Switching fibers. On x86-64 a few instructions that keep the registers
// the ABI says a call preserves, on the fibers' own stacks (swapcontext
// makes a signal-mask system call at every switch, which took 90% of the
// emulated device's time); elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void emu_ctx_switch(void** save_sp, void* load_sp);
asm(".text\n.p2align 4\n.hidden emu_ctx_switch\n.globl emu_ctx_switch\n.type emu_ctx_switch,@function\n"
    "emu_ctx_switch:\n"
    "pushq %rbp\npushq %rbx\npushq %r12\npushq %r13\npushq %r14\npushq %r15\n"
    "movq %rsp, (%rdi)\nmovq %rsi, %rsp\n"
    "popq %r15\npopq %r14\npopq %r13\npopq %r12\npopq %rbx\npopq %rbp\nret\n"
    ".size emu_ctx_switch, .-emu_ctx_switch\n");
static void* emu_sched_sp;                      // the scheduler's saved stack pointer
static void* emu_sp[1024];                      // each fiber's
inline void emu_yield() { emu_ctx_switch(&emu_sp[emu_cur], emu_sched_sp); }
inline void emu_resume(unsigned t) { emu_ctx_switch(&emu_sched_sp, emu_sp[t]); }
#else
static ucontext_t emu_sched;                    // the scheduler's context
static std::vector<ucontext_t> emu_ctx;         // one per CUDA thread
inline void emu_yield() { swapcontext(&emu_ctx[emu_cur], &emu_sched); }
inline void emu_resume(unsigned t) { emu_resume(t); }
#endif
// Barriers: arrivals and a generation per block and per warp; a thread
// that has returned counts as arrived (as on the GPU).
static unsigned emu_live, emu_bar_count, emu_bar_gen;
static unsigned emu_warp_live[32], emu_warp_count[32], emu_warp_gen[32];
static unsigned long long emu_progress;
inline void emu_block_arrive_check() {
    if (emu_bar_count != 0 && emu_bar_count >= emu_live) { emu_bar_count = 0; emu_bar_gen++; emu_progress++; }
}
inline void emu_warp_arrive_check(unsigned w) {
    if (emu_warp_count[w] != 0 && emu_warp_count[w] >= emu_warp_live[w]) { emu_warp_count[w] = 0; emu_warp_gen[w]++; emu_progress++; }
}
inline void __syncthreads() {
    unsigned gen = emu_bar_gen;
    emu_bar_count++;
    emu_block_arrive_check();
    while (emu_bar_gen == gen) emu_yield();
}
inline void emu_warp_sync() {
    unsigned w = threadIdx.x / 32, gen = emu_warp_gen[w];
    emu_warp_count[w]++;
    emu_warp_arrive_check(w);
    while (emu_warp_gen[w] == gen) emu_yield();
}
#define __global__
#define __device__
#define __forceinline__ inline
#define __constant__ static const
#define __shared__ static
#define __launch_bounds__(x)
#define __align__(x) __attribute__((aligned(x)))
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
    const unsigned t = threadIdx.x;
    unsigned long long raw = 0;
    std::memcpy(&raw, &v, sizeof(T));
    unsigned long long* slots = emu_slots[emu_shfl_count[t]++ & 1u];
    slots[t] = raw;
    emu_warp_sync();
    raw = slots[(t & ~31u) | (src & 31u)];
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
    emu_warp_sync();
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
    emu_warp_sync();
    const unsigned g = lane >> 2, q = lane & 3u;
    for (int i = 0; i < 4; i++) {
        const unsigned r = g + (i >= 2 ? 8 : 0), col = 2 * q + (i & 1);
        float s = c[i];
        for (int k = 0; k < 16; k++) s += A[r][k] * B[k][col];
        c[i] = s;
    }
}
// Dynamic shared memory (extern __shared__), one block at a time: the
// last `emu_dyn_bytes` (the launch's request, rounded up to 16; set by the
// emulated device's launch wrapper) of a 256 KiB region followed by an
// inaccessible page, so that a kernel using more than its launch asked for
// faults here as it would corrupt on the GPU. Unset (the kernel tests'
// direct launches): the whole region.
static unsigned emu_dyn_bytes = ~0u;
inline unsigned char* emu_dyn_smem() {
    constexpr size_t REGION = 1 << 18;
    static unsigned char* region = [] {
        void* m = mmap(nullptr, REGION + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED || mprotect(static_cast<unsigned char*>(m) + REGION, 4096, PROT_NONE) != 0) std::abort();
        return static_cast<unsigned char*>(m);
    }();
    if (emu_dyn_bytes == ~0u) return region;
    const size_t n = (size_t(emu_dyn_bytes) + 15) / 16 * 16;
    if (n > REGION) std::abort();
    return region + REGION - n;
}
static std::mutex emu_launch_lock;  // one launch at a time: the state above is global
constexpr size_t EMU_STACK = 256 << 10;  // per fiber (mapped once, touched as used)
static char* emu_stacks;
static void (*emu_body)(void*);
static void* emu_body_arg;
static void emu_fiber_main() {
    emu_body(emu_body_arg);
    const unsigned w = threadIdx.x / 32;
    emu_done[emu_cur] = 1;
    emu_live--;
    emu_warp_live[w]--;
    emu_block_arrive_check();
    emu_warp_arrive_check(w);
    emu_progress++;
}
#if defined(__x86_64__)
// A fiber's first frame: runs the thread, then hands back for good.
[[noreturn]] static void emu_fiber_entry() {
    emu_fiber_main();
    void* dead;
    emu_ctx_switch(&dead, emu_sched_sp);
    __builtin_unreachable();
}
// A fresh fiber's stack, as emu_ctx_switch leaves one: six saved registers
// under the return address (emu_fiber_entry), under a slot that stands for
// the entry's own return address (so that the entry sees the stack
// alignment of a call).
static void emu_fiber_start(unsigned t, char* stack_top) {
    void** sp = reinterpret_cast<void**>(stack_top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(&emu_fiber_entry);
    for (int r = 0; r < 6; r++) *--sp = nullptr;
    emu_sp[t] = sp;
}
#else
static void emu_fiber_start(unsigned t, char* stack_top) {
    getcontext(&emu_ctx[t]);
    emu_ctx[t].uc_stack.ss_sp = stack_top - EMU_STACK;
    emu_ctx[t].uc_stack.ss_size = EMU_STACK;
    emu_ctx[t].uc_link = &emu_sched;  // returns there
    makecontext(&emu_ctx[t], emu_fiber_main, 0);
}
#endif
// The order the fibers take turns in: thread 0 first, or with
// LORA_EMU_ORDER=reverse the last first (and the blocks likewise). Between two barriers each fiber
// runs alone to its next one, so a missing barrier (a thread reading what
// another writes in the same phase) goes unseen in one of the two orders
// when the writer happens to run first; running the tests in both catches
// it either way.
static const bool emu_reverse = [] { const char* v = std::getenv("LORA_EMU_ORDER"); return v && std::strcmp(v, "reverse") == 0; }();
// Runs f for every block of grid (x fastest), `block` threads each.
template <class F> void emu_launch3(dim3 grid, unsigned block, F f) {
    if (block == 0 || block > 1024 || block % 32 != 0) std::abort();
    std::lock_guard<std::mutex> guard(emu_launch_lock);
    if (!emu_stacks) {
        void* m = mmap(nullptr, EMU_STACK * 1024, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) std::abort();
        emu_stacks = static_cast<char*>(m);
    }
    blockDim = dim3{block, 1, 1};
    gridDim = grid;
#if !defined(__x86_64__)
    emu_ctx.assign(block, ucontext_t{});
#endif
    emu_done.assign(block, 0);
    emu_body = [](void* p) { (*static_cast<F*>(p))(); };
    emu_body_arg = &f;
    for (unsigned zi = 0; zi < grid.z; ++zi)
        for (unsigned yi = 0; yi < grid.y; ++yi)
            for (unsigned xi = 0; xi < grid.x; ++xi) {
                // Blocks too run in reverse with LORA_EMU_ORDER=reverse (a
                // block that reads another's output is the same mistake).
                const unsigned x = emu_reverse ? grid.x - 1 - xi : xi, y = emu_reverse ? grid.y - 1 - yi : yi, z = emu_reverse ? grid.z - 1 - zi : zi;
                blockIdx = dim3{x, y, z};
                emu_live = block;
                emu_bar_count = 0;
                for (unsigned w = 0; w < block / 32; ++w) { emu_warp_live[w] = 32; emu_warp_count[w] = 0; }
                for (unsigned t = 0; t < block; ++t) {
                    emu_done[t] = 0;
                    emu_shfl_count[t] = 0;
                    emu_fiber_start(t, emu_stacks + size_t(t + 1) * EMU_STACK);
                }
                // Round robin until every thread of the block has returned;
                // a whole round without progress is a deadlock (threads of
                // one warp or block waiting at different barriers).
                for (unsigned left = block; left > 0;) {
                    const unsigned long long before = emu_progress;
                    left = 0;
                    for (unsigned i = 0; i < block; ++i) {
                        const unsigned t = emu_reverse ? block - 1 - i : i;
                        if (emu_done[t]) continue;
                        emu_cur = t;
                        threadIdx = dim3{t, 0, 0};
                        emu_resume(t);
                        left += !emu_done[t];
                    }
                    if (left > 0 && emu_progress == before) {
                        std::fprintf(stderr, "kernel emulation: block (%u, %u, %u) deadlocked at mismatched barriers\n", x, y, z);
                        std::abort();
                    }
                }
            }
}
template <class F> void emu_launch(unsigned grid, unsigned block, F f) { emu_launch3(dim3{grid, 1, 1}, block, f); }
"#;

/// The kernels' inline PTX and dynamic shared memory, and what the
/// emulation uses instead (every source gets all of them; each matches
/// one file's text exactly).
#[allow(dead_code)]
pub const SUBST: [(&str, &str); 6] = [
    (r#"asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));"#, "f = emu_f16_to_f32(h);"),
    (r#"asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));"#, "h = emu_f32_to_f16(f);"),
    (r#"asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));"#, "r = emu_cvt_bf16x2(hi, lo);"),
    (
        r#"asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));"#,
        "emu_mma(c, a0, a1, a2, a3, b0, b1);",
    ),
    ("extern __shared__ __align__(16) unsigned char atc_smem[];", "unsigned char* atc_smem = emu_dyn_smem();"),
    ("extern __shared__ __align__(16) float att_smem[];", "#define att_smem (reinterpret_cast<float*>(emu_dyn_smem()))"),
];

/// CUDA's device `min` and `max`, for the operand types the kernels use.
#[allow(dead_code)]
pub const MIN_MAX: &str = "template <class T> inline T min(T a, T b) { return a < b ? a : b; }\ntemplate <class T> inline T max(T a, T b) { return a < b ? b : a; }\n";

/// Why the emulation is skipped here, if it is.
pub fn skip_reason() -> Option<String> {
    std::env::var("LORA_SKIP_CUDA_EMULATION").is_ok_and(|v| v == "1").then(|| "LORA_SKIP_CUDA_EMULATION=1".to_string())
}

/// Compiles the kernel files `sources` (names in `cuda::SOURCES`) with the
/// text substitutions `subst` (inline PTX and the like → their host
/// emulation; every `asm(` must be replaced) after `extra` C++ (helpers a
/// family needs), followed by `entry` (the `extern "C"` entry points), into
/// a shared library, and loads it. `Err` says why it skips (no compiler,
/// no C++20, LORA_SKIP_CUDA_EMULATION=1); a source that does
/// not compile panics.
pub fn build(tag: &str, sources: &[&str], subst: &[(&str, &str)], extra: &str, entry: &str) -> Result<libloading::Library, String> {
    if let Some(why) = skip_reason() {
        return Err(why);
    }
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
    compile_cpp(&cpp, &so, &[])?;
    // SAFETY: loads the library just built; callers look up the entry
    // points they declared in `entry`.
    unsafe { libloading::Library::new(&so) }.map_err(|e| format!("cannot load {}: {e}", so.display()))
}

/// The emulation's compiler options for the compiler `cxx`.
pub fn cxx_flags(cxx: &str) -> Vec<&'static str> {
    let mut f = vec!["-std=c++20", "-O1", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-pthread", "-Wno-unknown-pragmas"];
    // GCC makes the static locals of template functions (a templated
    // kernel's `__shared__` arrays) process-wide unique symbols, one copy
    // for every library that defines them: two libraries with the same
    // kernel source (a test's build and the emulated device's module)
    // running at once would share their shared memory. Clang does not.
    static GCC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *GCC.get_or_init(|| std::process::Command::new(cxx).arg("--version").output().is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains("clang"))) {
        f.push("-fno-gnu-unique");
    }
    f
}

/// Compiles the C++ file `cpp` into the shared library `so` with the
/// emulation's options (IEEE fp32, no contraction) and `args`. `Err` when
/// there is no C++20 compiler; a source that does not compile panics.
pub fn compile_cpp(cpp: &std::path::Path, so: &std::path::Path, args: &[&str]) -> Result<(), String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = std::process::Command::new(&cxx)
        .args(cxx_flags(&cxx))
        .args(args)
        .arg("-o")
        .arg(so)
        .arg(cpp)
        .output()
        .map_err(|e| format!("no C++ compiler ({cxx}: {e})"))?;
    if !out.status.success() {
        let log = String::from_utf8_lossy(&out.stderr);
        if log.contains("unrecognized command-line option '-std=c++20'") {
            return Err(format!("{cxx} lacks C++20"));
        }
        panic!("{} does not compile as host C++ ({cxx}):\n{log}", cpp.display());
    }
    Ok(())
}
