/*
 * NF4 round trips through the C API: quantize random fp32 / fp16 / bf16
 * tensors of several shapes at every blocksize, with and without double
 * quantization; dequantize into all three dtypes and bound the error;
 * check lora_nf4_get_info, the accessors, save / list / load, unaligned
 * buffers, and concurrent use of one context.
 *
 * Usage: nf4_roundtrip [scratch-dir]   (a temporary directory is made in it)
 * Environment: LORA_TEST_BACKEND=cpu|auto|cuda (default cpu).
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

/* ---- the NF4 table (DESIGN.md section 4, bitsandbytes) -------------- */

static const float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

/* Largest distance from a value in [-1, 1] to its nearest NF4 code: half
 * the widest gap of the table, which is the first one,
 * (-0.6961928 - -1) / 2 = 0.1519036. A weight x in a block with scale
 * a = max|x| has x/a in [-1, 1] and is stored as the nearest code c, so
 * |x - c·a| <= a·NF4_MAX_HALF_GAP (plus fp32 rounding of x·(1/a)). */
static double nf4_max_half_gap(void) {
    double m = 0;
    int i;
    for (i = 0; i < 15; i++) {
        double g = ((double)NF4[i + 1] - (double)NF4[i]) / 2;
        if (g > m) m = g;
    }
    return m;
}

/* Double quantization stores each block scale a_i as an 8-bit code of the
 * signed dynamic map: a_i' = map[q_i]·s_j + offset, s_j = max over its 256
 * blocks of |a_i - offset|, q_i chosen for z = (a_i - offset)/s_j in
 * [-1, 1]. The map's widest gap is 0.0140625 (its top decade: midpoints
 * of linspace(0.1, 1, 65)), so the nearest entry is within 0.00703125 of
 * z; bitsandbytes' CPU decision thresholds sit slightly off the midpoints
 * (the worst, between codes 28 and 29, leaves 0.0070463), hence
 * |a_i' - a_i| <= s_j·DQ_MAX_ERR, plus fp32 rounding. */
#define DQ_MAX_ERR 0.00705

/* ---- fp16 / bf16 conversions (round to nearest even) ----------------- */

static uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}
static float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint16_t f32_to_bf16(float f) {
    uint32_t u = f2u(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

static uint16_t f32_to_f16(float f) {
    uint32_t u = f2u(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* rounds to >= 65520: Inf */
    if (a < 0x38800000u) {                                     /* below 2^-14: subnormal or 0 */
        /* value = a_float; f16 subnormal unit 2^-24: round(a·2^24) */
        float x = u2f(a) * 16777216.0f; /* exact: power-of-two scaling */
        uint32_t m = (uint32_t)x;
        float r = x - (float)m;
        if (r > 0.5f || (r == 0.5f && (m & 1u))) m++;
        return (uint16_t)(sign | m); /* m may reach 0x400: the smallest normal, correctly */
    }
    {
        uint32_t e = ((a >> 23) - 127 + 15) << 10, m = a & 0x7FFFFFu;
        uint32_t h = e | (m >> 13), rest = m & 0x1FFFu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
        return (uint16_t)(sign | h);
    }
}
static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) {
        float v = (float)m / 16777216.0f;
        return sign ? -v : v;
    }
    if (e == 31) return u2f(sign | 0x7F800000u | (m << 13));
    return u2f(sign | ((e - 15 + 127) << 23) | (m << 13));
}

static void test_conversions(void) {
    /* Spot checks of the helpers themselves. */
    CHECK(f32_to_f16(1.0f) == 0x3C00);
    CHECK(f32_to_f16(-2.0f) == 0xC000);
    CHECK(f32_to_f16(65504.0f) == 0x7BFF);
    CHECK(f32_to_f16(65520.0f) == 0x7C00);
    CHECK(f32_to_f16(5.9604645e-8f) == 0x0001);
    CHECK(f32_to_f16(6.1035156e-5f) == 0x0400);
    CHECK(f32_to_f16(1.0f + 1.0f / 2048) == 0x3C00); /* tie to even */
    CHECK(f32_to_f16(1.0f + 3.0f / 2048) == 0x3C02); /* tie to even (up) */
    CHECK(f16_to_f32(0x3555) == u2f(0x3EAAA000u));
    CHECK(f16_to_f32(0x0001) == 5.9604645e-8f);
    CHECK(f32_to_bf16(1.0f) == 0x3F80);
    CHECK(f32_to_bf16(u2f(0x3F808000u)) == 0x3F80); /* tie to even */
    CHECK(f32_to_bf16(u2f(0x3F818000u)) == 0x3F82);
    CHECK(bf16_to_f32(0xC040) == -3.0f);
    {
        uint32_t h;
        for (h = 0; h < 0x7C00u; h++) CHECK(f32_to_f16(f16_to_f32((uint16_t)h)) == h);
    }
}

/* ---- deterministic random data --------------------------------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng_next(void) {
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}
static double rng_uniform(void) { return ((double)(rng_next() >> 11) + 0.5) / 9007199254740992.0; }
static double rng_gauss(void) { return sqrt(-2.0 * log(rng_uniform())) * cos(6.283185307179586 * rng_uniform()); }

/* n values: gaussian, scaled differently every 97 elements (so block
 * scales vary), with an all-zero stretch and a few large outliers. */
static void fill_random(float *x, size_t n) {
    size_t i;
    double scale = 1.0;
    for (i = 0; i < n; i++) {
        if (i % 97 == 0) scale = exp(4.0 * rng_uniform() - 2.0);
        x[i] = (float)(scale * rng_gauss());
        if (rng_next() % 1000 == 0) x[i] *= 20.0f;
    }
    if (n > 300)
        for (i = 200; i < 300; i++) x[i] = 0.0f;
}

static size_t dtype_size(lora_dtype d) { return d == LORA_DTYPE_F32 ? 4 : 2; }
static const char *dtype_name(lora_dtype d) { return d == LORA_DTYPE_F32 ? "f32" : d == LORA_DTYPE_F16 ? "f16" : "bf16"; }

/* Encodes fp32 values as `d` into `out` (bytes, any alignment). The
 * values actually stored are written back to `x`. */
static void encode(float *x, size_t n, lora_dtype d, unsigned char *out) {
    size_t i;
    for (i = 0; i < n; i++) {
        if (d == LORA_DTYPE_F32) {
            memcpy(out + 4 * i, &x[i], 4);
        } else {
            uint16_t h = d == LORA_DTYPE_F16 ? f32_to_f16(x[i]) : f32_to_bf16(x[i]);
            memcpy(out + 2 * i, &h, 2);
            x[i] = d == LORA_DTYPE_F16 ? f16_to_f32(h) : bf16_to_f32(h);
        }
    }
}

static float decode_at(const unsigned char *p, size_t i, lora_dtype d) {
    if (d == LORA_DTYPE_F32) {
        float f;
        memcpy(&f, p + 4 * i, 4);
        return f;
    } else {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        return d == LORA_DTYPE_F16 ? f16_to_f32(h) : bf16_to_f32(h);
    }
}

/* Rounds an fp32 value as the library must when writing dtype d. */
static float round_to(float v, lora_dtype d) {
    if (d == LORA_DTYPE_F16) return f16_to_f32(f32_to_f16(v));
    if (d == LORA_DTYPE_BF16) return bf16_to_f32(f32_to_bf16(v));
    return v;
}

/* ---- one quantization case ------------------------------------------- */

static lora_context *g_ctx;

/* LORA_TEST_BACKEND=cpu (default), auto or cuda: the backend of the
 * context the NF4 calls run on, so the same checks can be pointed at a
 * GPU. */
static lora_backend test_backend(void) {
    const char *b = getenv("LORA_TEST_BACKEND");
    if (!b || strcmp(b, "cpu") == 0) return LORA_BACKEND_CPU;
    if (strcmp(b, "auto") == 0) return LORA_BACKEND_AUTO;
    if (strcmp(b, "cuda") == 0) return LORA_BACKEND_CUDA;
    fprintf(stderr, "LORA_TEST_BACKEND=%s: expected cpu, auto or cuda\n", b);
    exit(2);
}
static double g_worst_rel[2]; /* max |x - deq| / absmax, without and with DQ */

static size_t numel_of(const size_t *shape, size_t ndim) {
    size_t n = 1, i;
    for (i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

static void check_case(const size_t *shape, size_t ndim, lora_dtype in_dt, uint32_t bs, int dq) {
    const size_t n = numel_of(shape, ndim), esz = dtype_size(in_dt), nb = (n + bs - 1) / bs;
    const double H = nf4_max_half_gap();
    float *x = malloc(n * sizeof *x), *amax_true = calloc(nb, sizeof(float)), *amax = malloc(nb * sizeof(float));
    unsigned char *in = malloc(n * esz + 1);
    lora_nf4 *t = NULL, *t2 = NULL;
    lora_nf4_params p = lora_nf4_default_params();
    lora_nf4_info info;
    const uint8_t *packed = NULL;
    size_t plen = 0, i, b;
    const uint8_t *codes = NULL;
    const float *nested = NULL;
    size_t ncodes = 0, nnested = 0;
    float offset = 0;
    lora_dtype out_dt;
    char label[128];
    snprintf(label, sizeof label, "n=%zu ndim=%zu %s bs=%u dq=%d", n, ndim, dtype_name(in_dt), (unsigned)bs, dq);
    REQUIRE(x && amax_true && amax && in);

    fill_random(x, n);
    encode(x, n, in_dt, in);
    for (i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        if (a > amax_true[i / bs]) amax_true[i / bs] = a;
    }

    p.blocksize = bs;
    p.double_quant = (uint32_t)dq;
    REQUIRE_OK(lora_quantize_nf4(g_ctx, in, n * esz, in_dt, shape, ndim, &p, &t));

    /* Info: every field from its formula. */
    memset(&info, 0xAB, sizeof info);
    REQUIRE_OK(lora_nf4_get_info(t, &info));
    CHECKF(info.ndim == ndim, "%s: ndim %u", label, info.ndim);
    for (i = 0; i < 8; i++) CHECKF(info.shape[i] == (i < ndim ? shape[i] : 0), "%s: shape[%zu] = %zu", label, i, info.shape[i]);
    CHECKF(info.numel == n, "%s: numel %zu", label, info.numel);
    CHECK(info.dtype == in_dt);
    CHECK(info.blocksize == bs);
    CHECKF(info.num_blocks == nb, "%s: num_blocks %zu, want %zu", label, info.num_blocks, nb);
    CHECK(info.double_quant == (uint32_t)dq);
    CHECK(info.packed_bytes == (n + 1) / 2);
    {
        size_t nn = dq ? (nb + 255) / 256 : 0;
        /* packed codes + fp32 scales, or + u8 codes + fp32 nested scales + the fp32 offset */
        size_t fp = (n + 1) / 2 + (dq ? nb + 4 * nn + 4 : 4 * nb);
        double bpw = 8.0 * (double)fp / (double)n;
        CHECK(info.nested_blocksize == (dq ? 256u : 0u));
        CHECKF(info.num_nested == nn, "%s: num_nested %zu", label, info.num_nested);
        CHECKF(info.footprint_bytes == fp, "%s: footprint %zu, want %zu", label, info.footprint_bytes, fp);
        CHECKF(fabs(info.bits_per_weight - bpw) <= 1e-12 * bpw, "%s: bits_per_weight %.15g, want %.15g", label,
               info.bits_per_weight, bpw);
        if (!dq) CHECK(info.offset == 0.0f);
    }

    /* Packed codes. */
    REQUIRE_OK(lora_nf4_packed(t, &packed, &plen));
    CHECK(plen == (n + 1) / 2);

    /* Scales. */
    REQUIRE_OK(lora_nf4_absmax(t, amax, nb));
    if (!dq) {
        /* Exactly max|x| per block. */
        for (b = 0; b < nb; b++)
            CHECKF(f2u(amax[b]) == f2u(amax_true[b]), "%s: absmax[%zu] = %.9g, max|x| = %.9g", label, b, amax[b], amax_true[b]);
        EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_nf4_double_quant(t, &codes, &ncodes, &nested, &nnested, &offset));
        CHECK(codes == NULL && nested == NULL && ncodes == 0 && nnested == 0 && offset == 0.0f);
    } else {
        double sum = 0;
        REQUIRE_OK(lora_nf4_double_quant(t, &codes, &ncodes, &nested, &nnested, &offset));
        CHECK(ncodes == nb);
        CHECK(nnested == (nb + 255) / 256);
        CHECK(f2u(offset) == f2u(info.offset));
        for (b = 0; b < nb; b++) sum += amax_true[b];
        /* offset = mean(absmax) (in fp32, torch's summation order) */
        CHECKF(fabs(offset - sum / (double)nb) <= 1e-4 * (sum / (double)nb) + 1e-30, "%s: offset %.9g, mean %.9g", label, offset,
               sum / (double)nb);
        for (b = 0; b < nb; b++) {
            /* nested scale = max |a - offset| over its 256 blocks (exactly,
             * as fp32 differences): check the bound it implies. */
            double s = nested[b / 256];
            double err = fabs((double)amax[b] - (double)amax_true[b]);
            double tol = s * DQ_MAX_ERR + 4 * ldexp(fabs(amax_true[b]) + s, -24);
            CHECKF(err <= tol, "%s: decoded absmax[%zu] = %.9g vs %.9g (err %.3g > %.3g)", label, b, amax[b], amax_true[b], err, tol);
            CHECK(s >= fabs((double)amax_true[b] - (double)offset) * (1 - 1e-6));
        }
    }

    /* Dequantize into each dtype: exactly round_to(NF4[q]·a'), and within
     * the NF4 bound of the input. */
    for (out_dt = LORA_DTYPE_F32; out_dt <= LORA_DTYPE_BF16; out_dt++) {
        const size_t osz = dtype_size(out_dt);
        unsigned char *out = malloc(n * osz), *out_u = malloc(n * osz + 1);
        const double u_out = out_dt == LORA_DTYPE_F32 ? 0 : out_dt == LORA_DTYPE_F16 ? ldexp(1, -11) : ldexp(1, -8);
        size_t bad = 0;
        REQUIRE(out && out_u);
        REQUIRE_OK(lora_nf4_dequantize(g_ctx, t, out_dt, out, n * osz));
        for (i = 0; i < n; i++) {
            int q = (packed[i / 2] >> (i % 2 == 0 ? 4 : 0)) & 0x0F;
            float a = amax[i / bs];
            float want = round_to(NF4[q] * a, out_dt);
            float got = decode_at(out, i, out_dt);
            double err = fabs((double)got - (double)x[i]);
            double a_true = amax_true[i / bs];
            double dq_err = fabs((double)a - a_true);
            double tol = a_true * (H + 1e-6) + dq_err + u_out * fabs((double)a) + ldexp(1, -24);
            if (f2u(got) != f2u(want) && bad++ < 5)
                CHECKF(0, "%s -> %s: element %zu = %.9g, NF4[%d]·%.9g rounded = %.9g", label, dtype_name(out_dt), i, got, q, a, want);
            if (err > tol) CHECKF(0, "%s -> %s: element %zu: |%.9g - %.9g| = %.3g > %.3g", label, dtype_name(out_dt), i, x[i], got, err, tol);
            if (out_dt == LORA_DTYPE_F32 && a_true > 0) {
                double rel = err / a_true;
                if (rel > g_worst_rel[dq]) g_worst_rel[dq] = rel;
            }
        }
        /* Unaligned output: same bytes. */
        REQUIRE_OK(lora_nf4_dequantize(g_ctx, t, out_dt, out_u + 1, n * osz));
        CHECKF(memcmp(out, out_u + 1, n * osz) == 0, "%s -> %s: unaligned output differs", label, dtype_name(out_dt));
        free(out);
        free(out_u);
    }

    /* Unaligned input: same tensor. */
    memmove(in + 1, in, n * esz);
    REQUIRE_OK(lora_quantize_nf4(g_ctx, in + 1, n * esz, in_dt, shape, ndim, &p, &t2));
    {
        const uint8_t *packed2;
        size_t plen2;
        float *amax2 = malloc(nb * sizeof *amax2);
        REQUIRE(amax2);
        REQUIRE_OK(lora_nf4_packed(t2, &packed2, &plen2));
        CHECK(plen2 == plen && memcmp(packed, packed2, plen) == 0);
        REQUIRE_OK(lora_nf4_absmax(t2, amax2, nb));
        CHECK(memcmp(amax, amax2, nb * sizeof *amax2) == 0);
        free(amax2);
    }

    lora_nf4_free(t2);
    lora_nf4_free(t);
    free(x);
    free(amax_true);
    free(amax);
    free(in);
}

static void test_all_cases(void) {
    static const size_t s64[] = {64, 64}, s_odd[] = {37, 53}, s1[] = {1000}, s1odd[] = {1}, s3[] = {3, 5, 7},
                        s_big[] = {17, 40, 33}; /* 22440: more than 256 blocks at bs 32, 64 */
    static const struct {
        const size_t *shape;
        size_t ndim;
    } shapes[] = {{s64, 2}, {s_odd, 2}, {s1, 1}, {s1odd, 1}, {s3, 3}, {s_big, 3}};
    size_t si;
    uint32_t bs;
    lora_dtype dt;
    int dq;
    for (si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (dt = LORA_DTYPE_F32; dt <= LORA_DTYPE_BF16; dt++)
            for (bs = 32; bs <= 4096; bs *= 2)
                for (dq = 0; dq <= 1; dq++) check_case(shapes[si].shape, shapes[si].ndim, dt, bs, dq);
    printf("worst |x - deq| / max|x| of the block: %.6f without double quant (NF4 bound %.6f), %.6f with\n", g_worst_rel[0],
           nf4_max_half_gap(), g_worst_rel[1]);
}

/* bits per weight at the sizes DESIGN.md quotes. */
static void test_bits_per_weight(void) {
    const size_t shape[2] = {1024, 1024}, n = 1024 * 1024;
    float *x = malloc(n * sizeof *x);
    lora_nf4_params p = lora_nf4_default_params();
    lora_nf4 *t = NULL;
    lora_nf4_info info;
    REQUIRE(x);
    fill_random(x, n);
    p.double_quant = 0;
    REQUIRE_OK(lora_quantize_nf4(g_ctx, x, n * 4, LORA_DTYPE_F32, shape, 2, &p, &t));
    REQUIRE_OK(lora_nf4_get_info(t, &info));
    /* 4 + 32/64 = 4.5 exactly: (n/2 + 4·n/64)·8/n */
    CHECKF(info.bits_per_weight == 4.5, "bs64 no DQ: %.15g bits per weight", info.bits_per_weight);
    lora_nf4_free(t);
    t = NULL;
    p.double_quant = 1;
    REQUIRE_OK(lora_quantize_nf4(g_ctx, x, n * 4, LORA_DTYPE_F32, shape, 2, &p, &t));
    REQUIRE_OK(lora_nf4_get_info(t, &info));
    {
        /* n/2 packed + n/64 codes + 4·n/(64·256) nested + 4 offset bytes */
        double want = 8.0 * (double)(n / 2 + n / 64 + 4 * (n / 64 / 256) + 4) / (double)n;
        CHECKF(info.bits_per_weight == want, "bs64 DQ: %.15g bits per weight, want %.15g", info.bits_per_weight, want);
        CHECKF(fabs(info.bits_per_weight - 4.127) < 0.0005, "bs64 DQ: %.15g bits per weight, DESIGN.md says ~4.127",
               info.bits_per_weight);
    }
    lora_nf4_free(t);
    free(x);
}

/* ---- save / list / load ---------------------------------------------- */

static void compare_tensors(const lora_nf4 *a, const lora_nf4 *b, const char *what) {
    lora_nf4_info ia, ib;
    const uint8_t *pa, *pb;
    size_t la, lb;
    REQUIRE_OK(lora_nf4_get_info(a, &ia));
    REQUIRE_OK(lora_nf4_get_info(b, &ib));
    CHECKF(ia.ndim == ib.ndim && memcmp(ia.shape, ib.shape, sizeof ia.shape) == 0, "%s: shape", what);
    CHECKF(ia.numel == ib.numel && ia.dtype == ib.dtype && ia.blocksize == ib.blocksize && ia.num_blocks == ib.num_blocks,
           "%s: numel/dtype/blocksize", what);
    CHECKF(ia.double_quant == ib.double_quant && ia.nested_blocksize == ib.nested_blocksize && ia.num_nested == ib.num_nested &&
               f2u(ia.offset) == f2u(ib.offset),
           "%s: double quant layout", what);
    CHECKF(ia.packed_bytes == ib.packed_bytes && ia.footprint_bytes == ib.footprint_bytes &&
               ia.bits_per_weight == ib.bits_per_weight,
           "%s: sizes", what);
    REQUIRE_OK(lora_nf4_packed(a, &pa, &la));
    REQUIRE_OK(lora_nf4_packed(b, &pb, &lb));
    CHECKF(la == lb && memcmp(pa, pb, la) == 0, "%s: packed bytes differ", what);
    {
        float *sa = malloc(ia.num_blocks * 4), *sb = malloc(ia.num_blocks * 4);
        REQUIRE(sa && sb);
        REQUIRE_OK(lora_nf4_absmax(a, sa, ia.num_blocks));
        REQUIRE_OK(lora_nf4_absmax(b, sb, ia.num_blocks));
        CHECKF(memcmp(sa, sb, ia.num_blocks * 4) == 0, "%s: absmax differs", what);
        free(sa);
        free(sb);
    }
    if (ia.double_quant) {
        const uint8_t *ca, *cb;
        const float *na, *nb;
        size_t nca, ncb, nna, nnb;
        float oa, ob;
        REQUIRE_OK(lora_nf4_double_quant(a, &ca, &nca, &na, &nna, &oa));
        REQUIRE_OK(lora_nf4_double_quant(b, &cb, &ncb, &nb, &nnb, &ob));
        CHECKF(nca == ncb && memcmp(ca, cb, nca) == 0, "%s: absmax codes differ", what);
        CHECKF(nna == nnb && memcmp(na, nb, nna * 4) == 0, "%s: nested absmax differs", what);
        CHECKF(f2u(oa) == f2u(ob), "%s: offset differs", what);
    }
}

static void test_save_load(const char *dir) {
    char path[1024];
    const size_t s1[2] = {48, 96}, s2[3] = {3, 7, 33};
    float x1[48 * 96], x2[3 * 7 * 33];
    unsigned char x2_bf16[3 * 7 * 33 * 2];
    lora_nf4_params p = lora_nf4_default_params();
    lora_nf4 *a = NULL, *b = NULL, *la = NULL, *lb = NULL;
    const char *prefixes[2] = {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"};
    const lora_nf4 *tensors[2];
    const char *want_list = "model.layers.0.mlp.up_proj\nmodel.layers.0.self_attn.q_proj\n";
    char list[256], small[8];
    size_t needed = 0;

    fill_random(x1, 48 * 96);
    fill_random(x2, 3 * 7 * 33);
    encode(x2, 3 * 7 * 33, LORA_DTYPE_BF16, x2_bf16);
    REQUIRE_OK(lora_quantize_nf4(g_ctx, x1, sizeof x1, LORA_DTYPE_F32, s1, 2, &p, &a)); /* DQ, bs 64 */
    p.double_quant = 0;
    p.blocksize = 128;
    REQUIRE_OK(lora_quantize_nf4(g_ctx, x2_bf16, sizeof x2_bf16, LORA_DTYPE_BF16, s2, 3, &p, &b));
    tensors[0] = a;
    tensors[1] = b;
    snprintf(path, sizeof path, "%s/two.safetensors", dir);
    REQUIRE_OK(lora_nf4_save(path, prefixes, tensors, 2));

    /* List: sorted, '\n'-terminated; length query; truncation. */
    REQUIRE_OK(lora_nf4_list(path, list, sizeof list, &needed));
    CHECKF(strcmp(list, want_list) == 0, "list = \"%s\"", list);
    CHECK(needed == strlen(want_list));
    needed = 0;
    CHECK_OK(lora_nf4_list(path, NULL, 0, &needed));
    CHECK(needed == strlen(want_list));
    memset(small, 'X', sizeof small);
    CHECK_OK(lora_nf4_list(path, small, 5, &needed));
    CHECK(needed == strlen(want_list));
    CHECK(small[4] == '\0' && memcmp(small, want_list, 4) == 0 && small[5] == 'X');

    /* Load each back: identical. */
    REQUIRE_OK(lora_nf4_load(path, prefixes[0], &la));
    REQUIRE_OK(lora_nf4_load(path, prefixes[1], &lb));
    compare_tensors(a, la, "q_proj (DQ, f32) after save/load");
    compare_tensors(b, lb, "up_proj (no DQ, bf16) after save/load");

    /* Saving the loaded tensors again gives the same bytes. */
    {
        char path2[1024];
        unsigned char *f1 = NULL, *f2 = NULL;
        size_t n1 = 0, n2 = 0;
        FILE *f;
        const lora_nf4 *again[2];
        again[0] = la;
        again[1] = lb;
        snprintf(path2, sizeof path2, "%s/again.safetensors", dir);
        REQUIRE_OK(lora_nf4_save(path2, prefixes, again, 2));
        f = fopen(path, "rb");
        REQUIRE(f);
        fseek(f, 0, SEEK_END);
        n1 = (size_t)ftell(f);
        fseek(f, 0, SEEK_SET);
        f1 = malloc(n1);
        REQUIRE(f1 && fread(f1, 1, n1, f) == n1);
        fclose(f);
        f = fopen(path2, "rb");
        REQUIRE(f);
        fseek(f, 0, SEEK_END);
        n2 = (size_t)ftell(f);
        fseek(f, 0, SEEK_SET);
        f2 = malloc(n2 ? n2 : 1);
        REQUIRE(f2 && fread(f2, 1, n2, f) == n2);
        fclose(f);
        CHECKF(n1 == n2 && memcmp(f1, f2, n1) == 0, "re-saved file differs (%zu vs %zu bytes)", n1, n2);
        free(f1);
        free(f2);
        unlink(path2);
    }

    lora_nf4_free(la);
    lora_nf4_free(lb);
    lora_nf4_free(a);
    lora_nf4_free(b);
    unlink(path);
}

/* ---- one context, several threads ------------------------------------ */

#define MT_N (64 * 1024)
static float mt_x[MT_N];
static unsigned char mt_ref_packed[MT_N / 2];
static float mt_ref_deq[MT_N];

static void *mt_worker(void *arg) {
    const size_t shape[2] = {256, MT_N / 256};
    int *bad = arg, r;
    for (r = 0; r < 4; r++) {
        lora_nf4 *t = NULL;
        const uint8_t *pk;
        size_t pl;
        float *deq = malloc(sizeof(float) * MT_N);
        if (!deq || lora_quantize_nf4(g_ctx, mt_x, sizeof mt_x, LORA_DTYPE_F32, shape, 2, NULL, &t) != LORA_OK ||
            lora_nf4_packed(t, &pk, &pl) != LORA_OK || pl != sizeof mt_ref_packed || memcmp(pk, mt_ref_packed, pl) != 0 ||
            lora_nf4_dequantize(g_ctx, t, LORA_DTYPE_F32, deq, sizeof(float) * MT_N) != LORA_OK ||
            memcmp(deq, mt_ref_deq, sizeof mt_ref_deq) != 0)
            ++*bad;
        lora_nf4_free(t);
        free(deq);
    }
    return NULL;
}

static void test_threads(void) {
    const size_t shape[2] = {256, MT_N / 256};
    lora_nf4 *t = NULL;
    const uint8_t *pk;
    size_t pl;
    pthread_t th[4];
    int bad[4] = {0, 0, 0, 0}, i;
    fill_random(mt_x, MT_N);
    REQUIRE_OK(lora_quantize_nf4(g_ctx, mt_x, sizeof mt_x, LORA_DTYPE_F32, shape, 2, NULL, &t));
    REQUIRE_OK(lora_nf4_packed(t, &pk, &pl));
    REQUIRE(pl == sizeof mt_ref_packed);
    memcpy(mt_ref_packed, pk, pl);
    REQUIRE_OK(lora_nf4_dequantize(g_ctx, t, LORA_DTYPE_F32, mt_ref_deq, sizeof mt_ref_deq));
    lora_nf4_free(t);
    for (i = 0; i < 4; i++) REQUIRE(pthread_create(&th[i], NULL, mt_worker, &bad[i]) == 0);
    for (i = 0; i < 4; i++) REQUIRE(pthread_join(th[i], NULL) == 0);
    for (i = 0; i < 4; i++) CHECKF(bad[i] == 0, "thread %d: %d of 4 rounds differed from the single-threaded result", i, bad[i]);
}

int main(int argc, char **argv) {
    char dir[1024];
    lora_context_params cp = lora_context_default_params();
    snprintf(dir, sizeof dir, "%s/lora-roundtrip-XXXXXX", argc > 1 ? argv[1] : "/tmp");
    REQUIRE(mkdtemp(dir) != NULL);

    cp.backend = test_backend();
    cp.n_threads = 2;
    REQUIRE_OK(lora_context_new(&cp, &g_ctx));
    {
        char desc[256];
        REQUIRE_OK(lora_context_describe(g_ctx, desc, sizeof desc, NULL));
        printf("context: %s\n", desc);
    }

    test_conversions();
    test_all_cases();
    test_bits_per_weight();
    test_save_load(dir);
    test_threads();

    lora_context_free(g_ctx);
    rmdir(dir);
    return check_exit_code();
}
