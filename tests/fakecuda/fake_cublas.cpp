// An emulated cuBLAS (libcublas.so) for the emulated CUDA device
// (tests/fakecuda/fake_cuda.cpp): device memory is host memory, so
// cublasGemmEx is a host loop. Column-major, as cuBLAS: C = α·op(A)·op(B)
// + β·C, operands fp32 or bf16 (both one type), C fp32 or bf16, fp32
// accumulation in k order; β = 0 never reads C (it may hold NaN poison).
// The product runs in the fake driver's stream order
// (`lora_fakecuda_enqueue`: queued until a synchronization); α and β are read
// at the call (host pointers, as cuBLAS's default pointer mode).
#include <cmath>
#include <dlfcn.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <algorithm>
#include <map>
#include <tuple>
#include <vector>

typedef int cublasStatus_t;
enum { OK = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, NOT_SUPPORTED = 15 };
enum { R_32F = 0, R_16BF = 14 };
static int handle_token;
// Products asked for and their multiply-adds ×2 (FLOPs), counted in every
// mode (lora_fakecublas_work; examples/device_memory.rs reads them).
static unsigned long long gemm_calls, gemm_flops;
// A roofline estimate of the products' time on a given card
// (lora_fakecublas_set_roofline, lora_fakecublas_roofline): each product
// takes at least the larger of its FLOPs at the peak rate of its operand
// type and its bytes at the memory bandwidth (A and B read once, C
// written, and read too when beta != 0). Rank-sized products (a dimension
// of at most 128: the adapters') are summed apart from the rest. A lower
// bound, not a timing: no tile quantization, launch or tail effects.
static std::mutex rf_mu;
static double rf_peak_bf16, rf_peak_f32, rf_bw;
static double rf_big_s, rf_small_s, rf_small_bytes, rf_bytes;
// The same by product shape (m, n, k, operand and output bytes, reads C):
// calls, roofline seconds, and seconds with tile quantization (a
// product's 128x128 output tiles in whole waves over the card's RF_SMS
// multiprocessors, K split when the tiles are fewer than them: a product
// whose tiles just miss a whole wave leaves multiprocessors idle).
struct Shape {
    int m, n, k, op, cb, reads_c;
    bool operator<(const Shape& o) const { return std::tie(m, n, k, op, cb, reads_c) < std::tie(o.m, o.n, o.k, o.op, o.cb, o.reads_c); }
};
struct ShapeCost { unsigned long long calls = 0; double s = 0, tiled_s = 0; };
static std::map<Shape, ShapeCost> rf_shapes;
static double rf_tiled_s;
static constexpr int RF_SMS = 132, RF_TILE = 128;

static float bf16_to_f32(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static uint16_t f32_to_bf16(float f) {
    uint32_t x; std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);
    return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
static float load(const void* p, int type, long i) {
    return type == R_32F ? static_cast<const float*>(p)[i] : bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

// One product, its operands' addresses and α, β read at the call.
struct Gemm {
    int ta, tb, m, n, k;
    float al, be;
    const void* A;
    int at, lda;
    const void* B;
    int bt, ldb;
    void* C;
    int ct, ldc;
};

static void run(const Gemm& g) {
    for (int j = 0; j < g.n; j++)
        for (int i = 0; i < g.m; i++) {
            float s = 0.0f;
            for (int l = 0; l < g.k; l++) {
                float a = load(g.A, g.at, g.ta ? long(i) * g.lda + l : long(l) * g.lda + i);
                float b = load(g.B, g.bt, g.tb ? long(l) * g.ldb + j : long(j) * g.ldb + l);
                s += a * b;
            }
            long c = long(j) * g.ldc + i;
            float v = g.al * s;
            if (g.be != 0.0f) v += g.be * load(g.C, g.ct, c);
            if (g.ct == R_32F) static_cast<float*>(g.C)[c] = v;
            else static_cast<uint16_t*>(g.C)[c] = f32_to_bf16(v);
        }
}

extern "C" {
// Test hook (not cuBLAS API): the products counted since the last call
// with `reset`.
void lora_fakecublas_work(unsigned long long* calls, unsigned long long* flops, int reset) {
    *calls = __atomic_load_n(&gemm_calls, __ATOMIC_RELAXED);
    *flops = __atomic_load_n(&gemm_flops, __ATOMIC_RELAXED);
    if (reset) {
        __atomic_store_n(&gemm_calls, 0ull, __ATOMIC_RELAXED);
        __atomic_store_n(&gemm_flops, 0ull, __ATOMIC_RELAXED);
    }
}
// Test hook (not cuBLAS API): the card the roofline estimate assumes
// (FLOP/s with bf16 and with fp32 operands, bytes/s); 0 turns it off.
void lora_fakecublas_set_roofline(double peak_bf16, double peak_f32, double bytes_per_s) {
    std::lock_guard<std::mutex> g(rf_mu);
    rf_peak_bf16 = peak_bf16, rf_peak_f32 = peak_f32, rf_bw = bytes_per_s;
}
// Test hook (not cuBLAS API): the estimate since the last call with
// `reset`: seconds of the large and of the rank-sized products, and the
// bytes each group moves.
// (The tile model: a lower bound too, but with the waves' idle
// multiprocessors; split-K's reduction is not counted.)
// Test hook (not cuBLAS API): the products since the last reset by shape
// (cuBLAS's column-major m, n, k), the costliest with tile quantization
// first, to stderr with `print`; returns the sum with tile quantization
// (seconds). `reset` clears them.
double lora_fakecublas_shape_report(int print, int reset) {
    std::lock_guard<std::mutex> g(rf_mu);
    if (print) {
        std::vector<std::pair<Shape, ShapeCost>> v(rf_shapes.begin(), rf_shapes.end());
        std::sort(v.begin(), v.end(), [](auto& a, auto& b) { return a.second.tiled_s > b.second.tiled_s; });
        std::fprintf(stderr, "    products by shape (roofline; with %dx%d tiles in waves over %d SMs), costliest first:\n", RF_TILE, RF_TILE, RF_SMS);
        for (size_t i = 0; i < v.size() && i < 24; i++) {
            auto& [sh, c] = v[i];
            std::fprintf(stderr, "      %5llu x m %6d n %6d k %6d  %s->%s%s  %7.2f ms  tiled %7.2f ms\n", c.calls, sh.m, sh.n, sh.k, sh.op == 2 ? "bf16" : "f32", sh.cb == 2 ? "bf16" : "f32",
                         sh.reads_c ? " +C" : "   ", c.s * 1e3, c.tiled_s * 1e3);
        }
    }
    const double t = rf_tiled_s;
    if (reset) rf_shapes.clear(), rf_tiled_s = 0;
    return t;
}

void lora_fakecublas_roofline(double* big_s, double* small_s, double* big_bytes, double* small_bytes, int reset) {
    std::lock_guard<std::mutex> g(rf_mu);
    *big_s = rf_big_s, *small_s = rf_small_s, *big_bytes = rf_bytes, *small_bytes = rf_small_bytes;
    if (reset) rf_big_s = rf_small_s = rf_bytes = rf_small_bytes = 0;
}
cublasStatus_t cublasCreate_v2(void** h) { *h = &handle_token; return OK; }
cublasStatus_t cublasDestroy_v2(void*) { return OK; }
cublasStatus_t cublasSetStream_v2(void*, void*) { return OK; }
cublasStatus_t cublasSetWorkspace_v2(void*, void*, size_t) { return OK; }
cublasStatus_t cublasSetMathMode(void*, int) { return OK; }
const char* cublasGetStatusString(cublasStatus_t s) { return s == OK ? "CUBLAS_STATUS_SUCCESS" : "CUBLAS_STATUS_(emulated error)"; }
cublasStatus_t cublasGemmEx(void*, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int at, int lda, const void* B, int bt, int ldb,
                            const void* beta, void* C, int ct, int ldc, int compute, int) {
    if (m < 0 || n < 0 || k < 0 || (at != R_32F && at != R_16BF) || at != bt || (ct != R_32F && ct != R_16BF) || compute != 68 /* CUBLAS_COMPUTE_32F */) {
        std::fprintf(stderr, "fake cuBLAS: GemmEx with types A %d B %d C %d compute %d: not emulated\n", at, bt, ct, compute);
        return NOT_SUPPORTED;
    }
    if ((ta != 0 && ta != 1) || (tb != 0 && tb != 1)) return INVALID_VALUE;
    // Leading dimensions as cuBLAS checks them.
    if (lda < (ta ? (k > 1 ? k : 1) : (m > 1 ? m : 1)) || ldb < (tb ? (n > 1 ? n : 1) : (k > 1 ? k : 1)) || ldc < (m > 1 ? m : 1)) return INVALID_VALUE;
    __atomic_add_fetch(&gemm_calls, 1ull, __ATOMIC_RELAXED);
    __atomic_add_fetch(&gemm_flops, 2ull * (unsigned long long)m * (unsigned long long)n * (unsigned long long)k, __ATOMIC_RELAXED);
    {
        std::lock_guard<std::mutex> g(rf_mu);
        if (rf_bw > 0) {
            const double op = at == R_16BF ? 2.0 : 4.0, cb = ct == R_16BF ? 2.0 : 4.0;
            const bool reads_c = *static_cast<const float*>(beta) != 0.0f;
            const double bytes = op * ((double)m * k + (double)k * n) + cb * (double)m * n * (reads_c ? 2 : 1);
            const double flops = 2.0 * m * n * k, peak = at == R_16BF ? rf_peak_bf16 : rf_peak_f32;
            const double tc = peak > 0 ? flops / peak : 0.0, t = std::fmax(tc, bytes / rf_bw);
            if (m <= 128 || n <= 128 || k <= 128) rf_small_s += t, rf_small_bytes += bytes;
            else rf_big_s += t, rf_bytes += bytes;
            const double tiles = std::ceil(m / double(RF_TILE)) * std::ceil(n / double(RF_TILE));
            // Fewer tiles than multiprocessors: K split over them (as
            // cuBLAS's split-K does, in parts of at least 128).
            const double split = tiles >= RF_SMS ? 1.0 : std::fmax(1.0, std::fmin(std::floor(RF_SMS / tiles), std::floor(k / 128.0)));
            const double waves = std::ceil(tiles * split / RF_SMS);
            // Each wave: one tile (of K / split) per multiprocessor, at its
            // share of the peak.
            const double tiled = std::fmax(waves * 2.0 * RF_TILE * RF_TILE * (k / split) / (peak / RF_SMS), t);
            rf_tiled_s += tiled;
            ShapeCost& c = rf_shapes[Shape{m, n, k, int(op), int(cb), reads_c}];
            c.calls++, c.s += t, c.tiled_s += tiled;
        }
    }
    static const bool count_only = [] { const char* v = std::getenv("LORA_FAKECUDA_COUNT_ONLY"); return v && std::strcmp(v, "1") == 0; }();
    if (count_only) return OK;  // fake_cuda.cpp: nothing runs
    typedef void (*Enqueue)(void (*)(void*), void*);
    static const Enqueue enqueue = reinterpret_cast<Enqueue>(dlsym(RTLD_DEFAULT, "lora_fakecuda_enqueue"));
    Gemm* g = new Gemm{ta, tb, m, n, k, *static_cast<const float*>(alpha), *static_cast<const float*>(beta), A, at, lda, B, bt, ldb, C, ct, ldc};
    auto job = [](void* p) {
        Gemm* g = static_cast<Gemm*>(p);
        run(*g);
        delete g;
    };
    if (enqueue) enqueue(job, g);
    else job(g);
    return OK;
}
}
