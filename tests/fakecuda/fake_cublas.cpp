// An emulated cuBLAS (libcublas.so) for the emulated CUDA device
// (tests/fakecuda/fake_cuda.cpp): device memory is host memory, so
// cublasGemmEx is a host loop. Column-major, as cuBLAS: C = α·op(A)·op(B)
// + β·C, operands fp32 or bf16 (both one type), C fp32 or bf16, fp32
// accumulation in k order; β = 0 never reads C (it may hold NaN poison).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

typedef int cublasStatus_t;
enum { OK = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, NOT_SUPPORTED = 15 };
enum { R_32F = 0, R_16BF = 14 };
static int handle_token;

static float bf16_to_f32(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static uint16_t f32_to_bf16(float f) {
    uint32_t x; std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);
    return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
static float load(const void* p, int type, long i) {
    return type == R_32F ? static_cast<const float*>(p)[i] : bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

extern "C" {
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
    static const bool count_only = [] { const char* v = std::getenv("LORA_FAKECUDA_COUNT_ONLY"); return v && std::strcmp(v, "1") == 0; }();
    if (count_only) return OK;  // fake_cuda.cpp: nothing runs
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float s = 0.0f;
            for (int l = 0; l < k; l++) {
                float a = load(A, at, ta ? long(i) * lda + l : long(l) * lda + i);
                float b = load(B, bt, tb ? long(l) * ldb + j : long(j) * ldb + l);
                s += a * b;
            }
            long c = long(j) * ldc + i;
            float v = al * s;
            if (be != 0.0f) v += be * load(C, ct, c);
            if (ct == R_32F) static_cast<float*>(C)[c] = v;
            else static_cast<uint16_t*>(C)[c] = f32_to_bf16(v);
        }
    return OK;
}
}
