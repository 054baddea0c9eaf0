/*
 * Bad input through the C API: every bad argument and every hostile file
 * must give its documented status, leave the outputs unwritten (they are
 * pre-set to sentinels and checked afterwards) and set a fresh, non-empty
 * lora_last_error (see EXPECT_ERR in check.h). Runs under ASan/UBSan, so
 * a crash, an out-of-bounds read of a hostile file or a write into a
 * caller's buffer on failure is caught as well.
 *
 * Double free and use after free are in double_free_noasan.c: under ASan
 * the library's (documented) detection of them would itself read freed
 * memory.
 *
 * Usage: bad_input [scratch-dir]   (a temporary directory is made in it)
 */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "st_reader.h"

#define ROWS 40
#define COLS 64
#define N (ROWS * COLS) /* 2560 elements; "1234" appears in no shape or size */

static lora_context *g_ctx;
static float g_x[N];
static const size_t g_shape[2] = {ROWS, COLS};
static char g_dir[1024];

static lora_nf4 *const SENT = (lora_nf4 *)(uintptr_t)0x5e471e10;

static void fill(void) {
    size_t i;
    uint32_t s = 12345;
    for (i = 0; i < N; i++) {
        s = s * 1664525u + 1013904223u;
        g_x[i] = (float)((int32_t)(s >> 8) - (1 << 23)) / (float)(1 << 23);
    }
}

static void path_in_dir(char *buf, size_t len, const char *name) { snprintf(buf, len, "%s/%s", g_dir, name); }

/* ---- lora_quantize_nf4 ----------------------------------------------- */

/* Calls lora_quantize_nf4 with *out pre-set to a sentinel; checks the
 * status, the message, and that *out was not written. */
static void expect_quantize(const char *file, int line, lora_status want, const lora_context *ctx, const void *data, size_t bytes,
                            lora_dtype dt, const size_t *shape, size_t ndim, const lora_nf4_params *p, const char *what) {
    lora_nf4 *out = SENT;
    lora_status st;
    check_mark_();
    st = lora_quantize_nf4(ctx, data, bytes, dt, shape, ndim, p, &out);
    check_err_(file, line, what, st, want);
    if (out != SENT) {
        fprintf(stderr, "%s:%d: %s\n    wrote *out on failure\n", file, line, what);
        ++*check_failures_();
        if (st == LORA_OK) lora_nf4_free(out);
    }
}
#define EXPECT_QUANTIZE(want, ctx, data, bytes, dt, shape, ndim, p) \
    expect_quantize(__FILE__, __LINE__, want, ctx, data, bytes, dt, shape, ndim, p, "lora_quantize_nf4(" #ctx ", " #data ", " #bytes ", " #dt ", " #shape ", " #ndim ", " #p ")")

static void test_quantize_args(void) {
    lora_nf4_params p = lora_nf4_default_params();
    lora_nf4 *t = NULL;
    lora_nf4_info info;
    const size_t nine[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1}, zero_dim[2] = {ROWS, 0}, zero_first[3] = {0, 4, 4};
    const size_t overflow[2] = {SIZE_MAX / 2 + 1, 2}, overflow2[3] = {(size_t)1 << 32, (size_t)1 << 32, 1};
    const size_t too_big[1] = {SIZE_MAX / 4 + 1}; /* elements fit size_t, bytes do not */

    /* NULL pointers. */
    EXPECT_QUANTIZE(LORA_ERR_NULL_POINTER, NULL, g_x, sizeof g_x, LORA_DTYPE_F32, g_shape, 2, &p);
    EXPECT_QUANTIZE(LORA_ERR_NULL_POINTER, g_ctx, NULL, sizeof g_x, LORA_DTYPE_F32, g_shape, 2, &p);
    EXPECT_QUANTIZE(LORA_ERR_NULL_POINTER, g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, NULL, 2, &p);
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_quantize_nf4(g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, g_shape, 2, &p, NULL));
    /* params NULL: the defaults (blocksize 64, double quantization). */
    REQUIRE_OK(lora_quantize_nf4(g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, g_shape, 2, NULL, &t));
    REQUIRE_OK(lora_nf4_get_info(t, &info));
    CHECK(info.blocksize == 64 && info.double_quant == 1 && info.numel == N);
    lora_nf4_free(t);

    /* Shapes. */
    EXPECT_QUANTIZE(LORA_ERR_INVALID_SHAPE, g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, g_shape, 0, &p);
    EXPECT_QUANTIZE(LORA_ERR_INVALID_SHAPE, g_ctx, g_x, 4, LORA_DTYPE_F32, nine, 9, &p);
    EXPECT_QUANTIZE(LORA_ERR_INVALID_SHAPE, g_ctx, g_x, 0, LORA_DTYPE_F32, zero_dim, 2, &p);
    EXPECT_QUANTIZE(LORA_ERR_INVALID_SHAPE, g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, zero_dim, 2, &p);
    EXPECT_QUANTIZE(LORA_ERR_INVALID_SHAPE, g_ctx, g_x, 0, LORA_DTYPE_F32, zero_first, 3, &p);
    EXPECT_QUANTIZE(LORA_ERR_INVALID_SHAPE, g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, overflow, 2, &p);
    EXPECT_QUANTIZE(LORA_ERR_INVALID_SHAPE, g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, overflow2, 3, &p);
    EXPECT_QUANTIZE(LORA_ERR_INVALID_SHAPE, g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, too_big, 1, &p);
    EXPECT_QUANTIZE(LORA_ERR_INVALID_SHAPE, g_ctx, g_x, SIZE_MAX, LORA_DTYPE_F32, too_big, 1, &p);

    /* data_bytes against shape × dtype size. */
    EXPECT_QUANTIZE(LORA_ERR_BUFFER_SIZE, g_ctx, g_x, sizeof g_x - 1, LORA_DTYPE_F32, g_shape, 2, &p);
    EXPECT_QUANTIZE(LORA_ERR_BUFFER_SIZE, g_ctx, g_x, sizeof g_x - 4, LORA_DTYPE_F32, g_shape, 2, &p);
    EXPECT_QUANTIZE(LORA_ERR_BUFFER_SIZE, g_ctx, g_x, sizeof g_x + 4, LORA_DTYPE_F32, g_shape, 2, &p);
    EXPECT_QUANTIZE(LORA_ERR_BUFFER_SIZE, g_ctx, g_x, 0, LORA_DTYPE_F32, g_shape, 2, &p);
    EXPECT_QUANTIZE(LORA_ERR_BUFFER_SIZE, g_ctx, g_x, SIZE_MAX, LORA_DTYPE_F32, g_shape, 2, &p);
    EXPECT_QUANTIZE(LORA_ERR_BUFFER_SIZE, g_ctx, g_x, sizeof g_x, LORA_DTYPE_F16, g_shape, 2, &p); /* f32 bytes as f16 */
    EXPECT_QUANTIZE(LORA_ERR_BUFFER_SIZE, g_ctx, g_x, sizeof g_x, LORA_DTYPE_BF16, g_shape, 2, &p);

    /* Blocksizes: powers of two from 32 to 4096 only. */
    {
        static const uint32_t bad[] = {0, 1, 16, 31, 33, 48, 65, 96, 100, 8192, 1u << 31, 0xFFFFFFFFu};
        size_t i;
        for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            char what[96];
            lora_nf4_params q = lora_nf4_default_params();
            q.blocksize = bad[i];
            snprintf(what, sizeof what, "lora_quantize_nf4(blocksize %u)", (unsigned)bad[i]);
            expect_quantize(__FILE__, __LINE__, LORA_ERR_INVALID_BLOCKSIZE, g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, g_shape, 2, &q,
                            what);
            q.double_quant = 0;
            expect_quantize(__FILE__, __LINE__, LORA_ERR_INVALID_BLOCKSIZE, g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, g_shape, 2, &q,
                            what);
        }
    }

    /* Unknown dtypes. */
    EXPECT_QUANTIZE(LORA_ERR_UNKNOWN_DTYPE, g_ctx, g_x, sizeof g_x, 3, g_shape, 2, &p);
    EXPECT_QUANTIZE(LORA_ERR_UNKNOWN_DTYPE, g_ctx, g_x, sizeof g_x, 0xFFFFFFFFu, g_shape, 2, &p);

    /* struct_size. */
    {
        static const uint32_t bad[] = {0, 4, (uint32_t)sizeof(lora_nf4_params) - 4, (uint32_t)sizeof(lora_nf4_params) + 4, 0xFFFFFFFFu};
        size_t i;
        for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            lora_nf4_params q = lora_nf4_default_params();
            q.struct_size = bad[i];
            EXPECT_QUANTIZE(LORA_ERR_STRUCT_SIZE, g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, g_shape, 2, &q);
        }
    }
}

/* Non-finite input: LORA_ERR_NON_FINITE naming the first flat index. */
static void expect_non_finite(int line, const void *data, size_t bytes, lora_dtype dt, const char *index, const char *not_index,
                              const char *what) {
    char msg[1024];
    expect_quantize(__FILE__, line, LORA_ERR_NON_FINITE, g_ctx, data, bytes, dt, g_shape, 2, NULL, what);
    lora_last_error(msg, sizeof msg);
    if (!strstr(msg, index)) {
        fprintf(stderr, "%s:%d: %s\n    message \"%s\" does not name flat index %s\n", __FILE__, line, what, msg, index);
        ++*check_failures_();
    }
    if (not_index && strstr(msg, not_index)) {
        fprintf(stderr, "%s:%d: %s\n    message \"%s\" names index %s, which is not the first\n", __FILE__, line, what, msg, not_index);
        ++*check_failures_();
    }
}

static void test_non_finite(void) {
    static float x[N];
    static uint16_t h[N];
    size_t i;
    const float inf = HUGE_VALF;

    memcpy(x, g_x, sizeof x);
    x[1234] = nanf("");
    expect_non_finite(__LINE__, x, sizeof x, LORA_DTYPE_F32, "1234", NULL, "f32 NaN at 1234");
    x[1234] = -nanf("");
    expect_non_finite(__LINE__, x, sizeof x, LORA_DTYPE_F32, "1234", NULL, "f32 -NaN at 1234");
    x[1234] = inf;
    expect_non_finite(__LINE__, x, sizeof x, LORA_DTYPE_F32, "1234", NULL, "f32 +Inf at 1234");
    x[1234] = -inf;
    expect_non_finite(__LINE__, x, sizeof x, LORA_DTYPE_F32, "1234", NULL, "f32 -Inf at 1234");
    x[2100] = nanf(""); /* the first one is named */
    expect_non_finite(__LINE__, x, sizeof x, LORA_DTYPE_F32, "1234", "2100", "f32 -Inf at 1234, NaN at 2100");
    memcpy(x, g_x, sizeof x);
    x[N - 1] = inf;
    expect_non_finite(__LINE__, x, sizeof x, LORA_DTYPE_F32, "2559", NULL, "f32 +Inf at the last index");
    memcpy(x, g_x, sizeof x);
    x[0] = nanf("");
    expect_non_finite(__LINE__, x, sizeof x, LORA_DTYPE_F32, "0", NULL, "f32 NaN at 0");
    /* Unaligned input takes another path inside the library. */
    {
        unsigned char *u = malloc(sizeof x + 1);
        REQUIRE(u);
        memcpy(x, g_x, sizeof x);
        x[1234] = nanf("");
        memcpy(u + 1, x, sizeof x);
        expect_non_finite(__LINE__, u + 1, sizeof x, LORA_DTYPE_F32, "1234", NULL, "unaligned f32 NaN at 1234");
        free(u);
    }

    /* fp16: 0x7E00 NaN, 0x7C00 +Inf, 0xFC00 -Inf; the rest small finite. */
    for (i = 0; i < N; i++) h[i] = (uint16_t)(0x3000u + (i % 0x400u));
    h[1234] = 0x7E00;
    expect_non_finite(__LINE__, h, sizeof h, LORA_DTYPE_F16, "1234", NULL, "f16 NaN at 1234");
    h[1234] = 0x7C00;
    expect_non_finite(__LINE__, h, sizeof h, LORA_DTYPE_F16, "1234", NULL, "f16 +Inf at 1234");
    h[1234] = 0xFC00;
    expect_non_finite(__LINE__, h, sizeof h, LORA_DTYPE_F16, "1234", NULL, "f16 -Inf at 1234");
    h[1234] = 0x7BFF; /* 65504: the largest finite, accepted */
    {
        lora_nf4 *t = NULL;
        CHECK_OK(lora_quantize_nf4(g_ctx, h, sizeof h, LORA_DTYPE_F16, g_shape, 2, NULL, &t));
        lora_nf4_free(t);
    }
    /* bf16: 0x7FC0 NaN, 0x7F80 +Inf, 0xFF80 -Inf. */
    for (i = 0; i < N; i++) h[i] = (uint16_t)(0x3F00u + (i % 0x80u));
    h[1234] = 0x7FC0;
    expect_non_finite(__LINE__, h, sizeof h, LORA_DTYPE_BF16, "1234", NULL, "bf16 NaN at 1234");
    h[1234] = 0x7F80;
    expect_non_finite(__LINE__, h, sizeof h, LORA_DTYPE_BF16, "1234", NULL, "bf16 +Inf at 1234");
    h[1234] = 0xFF80;
    expect_non_finite(__LINE__, h, sizeof h, LORA_DTYPE_BF16, "1234", NULL, "bf16 -Inf at 1234");
}

/* ---- dequantize and accessors ----------------------------------------- */

static int all_bytes(const void *p, size_t n, unsigned char v) {
    const unsigned char *c = p;
    size_t i;
    for (i = 0; i < n; i++)
        if (c[i] != v) return 0;
    return 1;
}

static void test_dequantize_and_accessors(void) {
    lora_nf4 *t = NULL, *nodq = NULL;
    lora_nf4_params p = lora_nf4_default_params();
    static unsigned char out[N * 4 + 8];
    float amax[N / 64 + 2];
    const size_t nb = N / 64;

    REQUIRE_OK(lora_quantize_nf4(g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, g_shape, 2, NULL, &t));
    p.double_quant = 0;
    REQUIRE_OK(lora_quantize_nf4(g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, g_shape, 2, &p, &nodq));

    /* Wrong sizes, unknown dtype, NULLs: nothing written. */
    memset(out, 0xA5, sizeof out);
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_nf4_dequantize(g_ctx, t, LORA_DTYPE_F32, out, N * 4 - 1));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_nf4_dequantize(g_ctx, t, LORA_DTYPE_F32, out, N * 4 - 4));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_nf4_dequantize(g_ctx, t, LORA_DTYPE_F32, out, N * 4 + 4));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_nf4_dequantize(g_ctx, t, LORA_DTYPE_F32, out, N * 2));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_nf4_dequantize(g_ctx, t, LORA_DTYPE_F16, out, N * 4));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_nf4_dequantize(g_ctx, t, LORA_DTYPE_BF16, out, N * 2 - 2));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_nf4_dequantize(g_ctx, t, LORA_DTYPE_F32, out, 0));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_nf4_dequantize(g_ctx, t, LORA_DTYPE_F32, out + 1, N * 4 - 1)); /* unaligned too */
    EXPECT_ERR(LORA_ERR_UNKNOWN_DTYPE, lora_nf4_dequantize(g_ctx, t, 3, out, N * 4));
    EXPECT_ERR(LORA_ERR_UNKNOWN_DTYPE, lora_nf4_dequantize(g_ctx, t, 0xFFFFFFFFu, out, N * 4));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_dequantize(g_ctx, t, LORA_DTYPE_F32, NULL, N * 4));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_dequantize(g_ctx, NULL, LORA_DTYPE_F32, out, N * 4));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_dequantize(NULL, t, LORA_DTYPE_F32, out, N * 4));
    CHECKF(all_bytes(out, sizeof out, 0xA5), "a failed lora_nf4_dequantize wrote into the caller's buffer");
    CHECK_OK(lora_nf4_dequantize(g_ctx, t, LORA_DTYPE_F32, out, N * 4));

    /* lora_nf4_get_info */
    {
        lora_nf4_info info;
        memset(&info, 0xA5, sizeof info);
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_get_info(NULL, &info));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_get_info(t, NULL));
        CHECK(all_bytes(&info, sizeof info, 0xA5));
    }
    /* lora_nf4_packed */
    {
        const uint8_t *data = (const uint8_t *)SENT;
        size_t len = 777;
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_packed(NULL, &data, &len));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_packed(t, NULL, &len));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_packed(t, &data, NULL));
        CHECK(data == (const uint8_t *)SENT && len == 777);
    }
    /* lora_nf4_absmax: count must be num_blocks exactly. */
    memset(amax, 0xA5, sizeof amax);
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_nf4_absmax(t, amax, nb - 1));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_nf4_absmax(t, amax, nb + 1));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_nf4_absmax(t, amax, 0));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_nf4_absmax(nodq, amax, nb - 1));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_nf4_absmax(t, amax, SIZE_MAX));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_absmax(t, NULL, nb));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_absmax(NULL, amax, nb));
    CHECKF(all_bytes(amax, sizeof amax, 0xA5), "a failed lora_nf4_absmax wrote into the caller's buffer");
    CHECK_OK(lora_nf4_absmax(t, amax, nb));
    /* lora_nf4_double_quant: every output required; INVALID_STATE without DQ. */
    {
        const uint8_t *codes = (const uint8_t *)SENT;
        const float *nested = (const float *)SENT;
        size_t ncodes = 777, nnested = 777;
        float offset = -7.0f;
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_double_quant(NULL, &codes, &ncodes, &nested, &nnested, &offset));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_double_quant(t, NULL, &ncodes, &nested, &nnested, &offset));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_double_quant(t, &codes, NULL, &nested, &nnested, &offset));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_double_quant(t, &codes, &ncodes, NULL, &nnested, &offset));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_double_quant(t, &codes, &ncodes, &nested, NULL, &offset));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_double_quant(t, &codes, &ncodes, &nested, &nnested, NULL));
        EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_nf4_double_quant(nodq, &codes, &ncodes, &nested, &nnested, &offset));
        CHECK(codes == (const uint8_t *)SENT && nested == (const float *)SENT && ncodes == 777 && nnested == 777 && offset == -7.0f);
    }

    lora_nf4_free(NULL);
    lora_nf4_free(t);
    lora_nf4_free(nodq);
}

/* ---- files -------------------------------------------------------------- */

static void expect_load(const char *file, int line, lora_status want, const char *path, const char *prefix, const char *what) {
    lora_nf4 *out = SENT;
    lora_status st;
    char desc[1200];
    snprintf(desc, sizeof desc, "lora_nf4_load(%s, \"%s\")", what, prefix ? prefix : "(null)");
    check_mark_();
    st = lora_nf4_load(path, prefix, &out);
    check_err_(file, line, desc, st, want);
    if (out != SENT) {
        fprintf(stderr, "%s:%d: %s\n    wrote *out on failure\n", file, line, desc);
        ++*check_failures_();
        if (st == LORA_OK) lora_nf4_free(out);
    }
}
#define EXPECT_LOAD(want, path, prefix, what) expect_load(__FILE__, __LINE__, want, path, prefix, what)

/* lora_nf4_list on a file that cannot be opened as safetensors. */
static void expect_list(const char *file, int line, lora_status want, const char *path, const char *what) {
    char buf[64];
    size_t needed = 777;
    lora_status st;
    char desc[1200];
    snprintf(desc, sizeof desc, "lora_nf4_list(%s)", what);
    memset(buf, 'X', sizeof buf);
    check_mark_();
    st = lora_nf4_list(path, buf, sizeof buf, &needed);
    check_err_(file, line, desc, st, want);
    if (needed != 777 || !all_bytes(buf, sizeof buf, 'X')) {
        fprintf(stderr, "%s:%d: %s\n    wrote its outputs on failure\n", file, line, desc);
        ++*check_failures_();
    }
}
#define EXPECT_LIST(want, path, what) expect_list(__FILE__, __LINE__, want, path, what)

/* A file made of raw bytes. */
static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    REQUIRE(f);
    REQUIRE(n == 0 || fwrite(p, 1, n, f) == n);
    REQUIRE(fclose(f) == 0);
}

/* A hostile safetensors file with the given header text and data length. */
static void write_hostile(const char *name, const char *header, size_t data_len, char *path, size_t plen) {
    unsigned char *data = calloc(data_len ? data_len : 1, 1);
    REQUIRE(data);
    path_in_dir(path, plen, name);
    REQUIRE(st_write_raw(path, strlen(header), header, strlen(header), data, data_len));
    free(data);
}

static void test_malformed_files(const char *valid) {
    char path[1200];
    unsigned char *bytes = NULL;
    size_t len = 0;
    REQUIRE(st_read_all(valid, &bytes, &len));

    /* Arguments. */
    EXPECT_LOAD(LORA_ERR_NULL_POINTER, NULL, "m", "NULL path");
    EXPECT_LOAD(LORA_ERR_INVALID_ARGUMENT, "", "m", "empty path");
    EXPECT_LOAD(LORA_ERR_NULL_POINTER, valid, NULL, "valid file, NULL prefix");
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_load(valid, "m", NULL));
    {
        size_t needed = 777;
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_list(valid, NULL, 0, NULL));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_list(NULL, NULL, 0, &needed));
        CHECK(needed == 777);
    }

    /* Cannot open / read. */
    path_in_dir(path, sizeof path, "does-not-exist.safetensors");
    EXPECT_LOAD(LORA_ERR_IO, path, "m", "nonexistent file");
    EXPECT_LIST(LORA_ERR_IO, path, "nonexistent file");
    {
        /* A directory: liblora opens it, then fails to map it (IO), or, on
         * file systems that report a directory size under 8 bytes (btrfs
         * says 0), calls it too short (FILE_FORMAT). Either way: no crash,
         * no output, a message. */
        lora_nf4 *out = SENT;
        lora_status st;
        check_mark_();
        st = lora_nf4_load(g_dir, "m", &out);
        (void)check_err_(__FILE__, __LINE__, "lora_nf4_load(a directory)", st, st == LORA_ERR_FILE_FORMAT ? st : LORA_ERR_IO);
        CHECK(out == SENT);
    }

    /* Too short. */
    path_in_dir(path, sizeof path, "empty.safetensors");
    write_bytes(path, "", 0);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "empty file");
    EXPECT_LIST(LORA_ERR_FILE_FORMAT, path, "empty file");
    path_in_dir(path, sizeof path, "seven.safetensors");
    write_bytes(path, bytes, 7);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "7-byte file");
    path_in_dir(path, sizeof path, "eight.safetensors");
    write_bytes(path, "\0\0\0\0\0\0\0\0", 8);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "header length 0");

    /* Header length field patched. */
    {
        static const uint64_t bad[] = {0, 1, 0, (uint64_t)1 << 63, UINT64_MAX, (uint64_t)1 << 32};
        unsigned char *copy = malloc(len);
        size_t i;
        int k;
        REQUIRE(copy);
        for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            uint64_t v = bad[i];
            char what[128];
            if (i == 1) v = len - 8 + 1; /* one past the end */
            if (i == 2) v = len;         /* the whole file */
            memcpy(copy, bytes, len);
            for (k = 0; k < 8; k++) copy[k] = (unsigned char)(v >> (8 * k));
            snprintf(what, sizeof what, "header length %llu in a %zu-byte file", (unsigned long long)v, len);
            path_in_dir(path, sizeof path, "hlen.safetensors");
            write_bytes(path, copy, len);
            EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", what);
            EXPECT_LIST(LORA_ERR_FILE_FORMAT, path, what);
        }
        /* Truncated by one byte; one byte too many. */
        path_in_dir(path, sizeof path, "truncated.safetensors");
        write_bytes(path, bytes, len - 1);
        EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "valid file minus its last byte");
        {
            unsigned char *longer = malloc(len + 1);
            REQUIRE(longer);
            memcpy(longer, bytes, len);
            longer[len] = 0;
            path_in_dir(path, sizeof path, "trailing.safetensors");
            write_bytes(path, longer, len + 1);
            EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "valid file plus a byte");
            free(longer);
        }
        free(copy);
    }

    /* Headers that are not (valid) safetensors JSON. */
    write_hostile("notjson.safetensors", "this is not JSON at all!", 0, path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "header not JSON");
    EXPECT_LIST(LORA_ERR_FILE_FORMAT, path, "header not JSON");
    write_hostile("notutf8.safetensors", "{\"\xff\xfe\":{}}  ", 0, path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "header not UTF-8");
    write_hostile("array.safetensors", "[1, 2, 3]", 0, path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "header a JSON array");
    write_hostile("cut.safetensors", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}", 4, path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "header JSON cut short");
    write_hostile("baddtype.safetensors", "{\"a\":{\"dtype\":\"Q7\",\"shape\":[4],\"data_offsets\":[0,4]}}", 4, path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "unknown dtype in header");
    write_hostile("past.safetensors", "{\"a\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]}}", 8, path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "data_offsets past the end");
    EXPECT_LIST(LORA_ERR_FILE_FORMAT, path, "data_offsets past the end");
    write_hostile("huge_off.safetensors",
                  "{\"a\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[18446744073709551600,18446744073709551615]}}", 16,
                  path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "data_offsets near 2^64");
    write_hostile("overlap.safetensors",
                  "{\"a\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]},"
                  "\"b\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[8,24]}}",
                  24, path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "overlapping data_offsets");
    write_hostile("gap.safetensors",
                  "{\"a\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]},"
                  "\"b\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[16,24]}}",
                  24, path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "non-contiguous data_offsets");
    write_hostile("reversed.safetensors", "{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[8,0]}}", 8, path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "end offset before start");
    write_hostile("size.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,8]}}", 8, path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "tensor bytes not shape x dtype size");
    write_hostile("shape_overflow.safetensors",
                  "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,8]}}", 8, path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "shape product overflows");
    {
        /* Nesting 100000 deep in an unknown field of a tensor entry: a
         * recursive parser must refuse, not overflow its stack. */
        const size_t depth = 100000;
        char *deep = malloc(2 * depth + 128);
        size_t k, l = 0;
        REQUIRE(deep);
        l += (size_t)sprintf(deep, "{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0],\"x\":");
        for (k = 0; k < depth; k++) deep[l++] = '[';
        for (k = 0; k < depth; k++) deep[l++] = ']';
        deep[l++] = '}';
        deep[l++] = '}';
        deep[l] = '\0';
        write_hostile("deep.safetensors", deep, 0, path, sizeof path);
        EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "JSON header nested 100000 deep");
        free(deep);
    }
    free(bytes);
}

/* Rewrites the valid file with tensor entries changed by the caller. */
typedef struct {
    st_file f;
    st_out out[32];
    size_t n;
} editable;

static void edit_open(editable *e, const char *valid) {
    size_t i;
    const char *err = st_open(valid, &e->f);
    if (err) {
        fprintf(stderr, "cannot read %s with the test reader: %s\n", valid, err);
        exit(1);
    }
    REQUIRE(e->f.n <= 32);
    for (i = 0; i < e->f.n; i++) e->out[i] = st_out_of(&e->f.tensors[i]);
    e->n = e->f.n;
}

static st_out *edit_get(editable *e, const char *name) {
    size_t i;
    for (i = 0; i < e->n; i++)
        if (strcmp(e->out[i].name, name) == 0) return &e->out[i];
    fprintf(stderr, "test bug: no tensor %s\n", name);
    exit(1);
}

static void edit_remove(editable *e, const char *name) {
    st_out *o = edit_get(e, name);
    size_t i = (size_t)(o - e->out);
    memmove(&e->out[i], &e->out[i + 1], (e->n - i - 1) * sizeof e->out[0]);
    e->n--;
}

static void edit_write(editable *e, const char *name, char *path, size_t plen) {
    path_in_dir(path, plen, name);
    REQUIRE(st_write(path, e->out, e->n));
}

/* The quant-state JSON of tensor "m" (no DQ) with other values. */
static void set_qs(editable *e, const char *key, const char *json) {
    st_out *o = edit_get(e, key);
    o->data = json;
    o->nbytes = strlen(json);
    o->ndim = 1;
    o->shape[0] = o->nbytes;
}

static void test_semantic_files(const char *valid) {
    char path[1200];
    editable e;
    const size_t nb = N / 64;
    const char *QS = "m.weight.quant_state.bitsandbytes__nf4";
    const char *QS_D = "d.weight.quant_state.bitsandbytes__nf4";

    /* The test writer itself: an unchanged copy loads. */
    edit_open(&e, valid);
    edit_write(&e, "copy.safetensors", path, sizeof path);
    {
        lora_nf4 *t = NULL;
        CHECK_OK(lora_nf4_load(path, "m", &t));
        lora_nf4_free(t);
        t = NULL;
        CHECK_OK(lora_nf4_load(path, "d", &t));
        lora_nf4_free(t);
    }
    /* A valid file without the prefix. */
    EXPECT_LOAD(LORA_ERR_TENSOR_NOT_FOUND, valid, "nope", "valid file, missing prefix");
    EXPECT_LOAD(LORA_ERR_INVALID_ARGUMENT, valid, "", "valid file, empty prefix");
    EXPECT_LOAD(LORA_ERR_TENSOR_NOT_FOUND, valid, "m.weight", "valid file, prefix with .weight");
    EXPECT_LOAD(LORA_ERR_TENSOR_NOT_FOUND, valid, "M", "valid file, prefix in the wrong case");
    st_close(&e.f);

    /* A key the quant state needs is missing. */
    edit_open(&e, valid);
    edit_remove(&e, "m.weight.absmax");
    edit_write(&e, "no_absmax.safetensors", path, sizeof path);
    EXPECT_LOAD(LORA_ERR_TENSOR_NOT_FOUND, path, "m", "P.weight.absmax missing");
    st_close(&e.f);
    edit_open(&e, valid);
    edit_remove(&e, "m.weight");
    edit_write(&e, "no_weight.safetensors", path, sizeof path);
    EXPECT_LOAD(LORA_ERR_TENSOR_NOT_FOUND, path, "m", "P.weight missing");
    st_close(&e.f);

    /* Wrong dtypes. */
    edit_open(&e, valid);
    {
        st_out *a = edit_get(&e, "m.weight.absmax");
        a->dtype = "F16";
        a->shape[0] = 2 * nb; /* same bytes, so the file itself is well-formed */
    }
    edit_write(&e, "absmax_f16.safetensors", path, sizeof path);
    EXPECT_LOAD(LORA_ERR_DTYPE_MISMATCH, path, "m", "P.weight.absmax stored as F16");
    st_close(&e.f);
    edit_open(&e, valid);
    {
        st_out *a = edit_get(&e, "m.weight.absmax");
        a->dtype = "I32";
    }
    edit_write(&e, "absmax_i32.safetensors", path, sizeof path);
    EXPECT_LOAD(LORA_ERR_DTYPE_MISMATCH, path, "m", "P.weight.absmax stored as I32");
    st_close(&e.f);
    edit_open(&e, valid);
    /* Packed codes may be stored as any dtype transformers allows for
       bnb_4bit_quant_storage (uint8, int8, float16, bfloat16, float32,
       float64: the same bytes); I32 is none of them. */
    {
        st_out *w = edit_get(&e, "m.weight");
        w->dtype = "I32";
        w->shape[0] /= 4; /* same bytes, so the file itself is well-formed */
    }
    edit_write(&e, "weight_i32.safetensors", path, sizeof path);
    EXPECT_LOAD(LORA_ERR_DTYPE_MISMATCH, path, "m", "P.weight stored as I32");
    st_close(&e.f);
    edit_open(&e, valid);
    {
        st_out *a = edit_get(&e, "d.weight.absmax"); /* DQ codes must be U8 */
        a->dtype = "I8";
    }
    edit_write(&e, "dq_codes_i8.safetensors", path, sizeof path);
    EXPECT_LOAD(LORA_ERR_DTYPE_MISMATCH, path, "d", "DQ P.weight.absmax stored as I8");
    st_close(&e.f);

    /* Quant-state JSON. */
    {
        static const struct {
            lora_status want;
            const char *json, *what;
        } cases[] = {
            {LORA_OK, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [40, 64]}", "the original"},
            {LORA_OK, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2560]}", "same numel, 1-D"},
            {LORA_ERR_SHAPE_MISMATCH, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [40, 66]}",
             "shape larger than the packed codes"},
            {LORA_ERR_SHAPE_MISMATCH, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [39, 64]}",
             "shape smaller than the packed codes"},
            {LORA_ERR_SHAPE_MISMATCH, "{\"quant_type\": \"nf4\", \"blocksize\": 128, \"dtype\": \"float32\", \"shape\": [40, 64]}",
             "blocksize disagreeing with the absmax count"},
            {LORA_ERR_INVALID_BLOCKSIZE, "{\"quant_type\": \"nf4\", \"blocksize\": 48, \"dtype\": \"float32\", \"shape\": [40, 64]}",
             "blocksize 48"},
            {LORA_ERR_INVALID_BLOCKSIZE, "{\"quant_type\": \"nf4\", \"blocksize\": 0, \"dtype\": \"float32\", \"shape\": [40, 64]}",
             "blocksize 0"},
            {LORA_ERR_UNSUPPORTED, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"int8\", \"shape\": [40, 64]}",
             "dtype int8"},
            {LORA_ERR_FILE_FORMAT, "not JSON {", "not JSON"},
            {LORA_ERR_FILE_FORMAT, "", "empty"},
            {LORA_ERR_FILE_FORMAT, "{\"quant_type\": \"nf4\", \"dtype\": \"float32\", \"shape\": [40, 64]}", "no blocksize"},
            {LORA_ERR_FILE_FORMAT, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\"}", "no shape"},
            {LORA_ERR_FILE_FORMAT, "{\"quant_type\": \"nf4\", \"blocksize\": \"64\", \"dtype\": \"float32\", \"shape\": [40, 64]}",
             "blocksize a string"},
            {LORA_ERR_FILE_FORMAT, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [40, -64]}",
             "negative dimension"},
        };
        size_t i;
        for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            char what[256];
            edit_open(&e, valid);
            set_qs(&e, QS, cases[i].json);
            edit_write(&e, "qs.safetensors", path, sizeof path);
            snprintf(what, sizeof what, "quant state %s", cases[i].what);
            if (cases[i].want == LORA_OK) {
                lora_nf4 *t = NULL;
                check_status_(__FILE__, __LINE__, what, lora_nf4_load(path, "m", &t), LORA_OK);
                lora_nf4_free(t);
            } else {
                EXPECT_LOAD(cases[i].want, path, "m", what);
            }
            st_close(&e.f);
        }
    }
    /* A quant state nested 100000 deep. */
    {
        const size_t depth = 100000;
        char *deep = malloc(2 * depth + 1);
        size_t k;
        REQUIRE(deep);
        for (k = 0; k < depth; k++) deep[k] = '[';
        for (k = 0; k < depth; k++) deep[depth + k] = ']';
        deep[2 * depth] = '\0';
        edit_open(&e, valid);
        set_qs(&e, QS, deep);
        edit_write(&e, "qs_deep.safetensors", path, sizeof path);
        EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "quant state nested 100000 deep");
        st_close(&e.f);
        free(deep);
    }
    /* Zero dimension in the quant state. */
    edit_open(&e, valid);
    set_qs(&e, QS, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [0, 64]}");
    edit_write(&e, "qs_zero.safetensors", path, sizeof path);
    {
        lora_nf4 *out = SENT;
        lora_status st;
        check_mark_();
        st = lora_nf4_load(path, "m", &out);
        if (getenv("LORA_TEST_VERBOSE")) printf("zero-dim quant state -> %s: %s\n", lora_status_str(st), check_last_error_());
        CHECKF(st == LORA_ERR_SHAPE_MISMATCH, "quant state with a zero dimension: %s", lora_status_str(st));
        CHECK(out == SENT);
    }
    st_close(&e.f);

    /* FP4 instead of NF4. */
    edit_open(&e, valid);
    edit_get(&e, QS)->name = "m.weight.quant_state.bitsandbytes__fp4";
    edit_write(&e, "fp4.safetensors", path, sizeof path);
    EXPECT_LOAD(LORA_ERR_UNSUPPORTED, path, "m", "FP4 quant state key");
    {
        char buf[64];
        size_t needed = 0;
        CHECK_OK(lora_nf4_list(path, buf, sizeof buf, &needed));
        CHECKF(strcmp(buf, "d\n") == 0, "list of a file with one FP4 and one NF4 weight: \"%s\"", buf);
    }
    st_close(&e.f);

    /* Scales inconsistent with the shape, or not finite. */
    edit_open(&e, valid);
    {
        st_out *a = edit_get(&e, "m.weight.absmax");
        a->shape[0] = nb - 1;
        a->nbytes = 4 * (nb - 1);
    }
    edit_write(&e, "absmax_short.safetensors", path, sizeof path);
    EXPECT_LOAD(LORA_ERR_SHAPE_MISMATCH, path, "m", "one absmax value short");
    st_close(&e.f);
    edit_open(&e, valid);
    {
        st_out *w = edit_get(&e, "m.weight");
        w->shape[0] -= 1;
        w->nbytes -= 1;
    }
    edit_write(&e, "packed_short.safetensors", path, sizeof path);
    EXPECT_LOAD(LORA_ERR_SHAPE_MISMATCH, path, "m", "one packed byte short");
    st_close(&e.f);
    edit_open(&e, valid);
    {
        static float bad_absmax[N / 64];
        st_out *a = edit_get(&e, "m.weight.absmax");
        memcpy(bad_absmax, a->data, sizeof bad_absmax);
        bad_absmax[3] = nanf("");
        a->data = bad_absmax;
    }
    edit_write(&e, "absmax_nan.safetensors", path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "NaN absmax");
    st_close(&e.f);
    edit_open(&e, valid);
    {
        static float bad_map[16];
        st_out *q = edit_get(&e, "m.weight.quant_map");
        memcpy(bad_map, q->data, sizeof bad_map);
        bad_map[5] = 0.5f;
        q->data = bad_map;
    }
    edit_write(&e, "quant_map.safetensors", path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "m", "quant_map not the NF4 table");
    st_close(&e.f);

    /* Double quantization: nested scales, nested map, offset. */
    edit_open(&e, valid);
    {
        st_out *a = edit_get(&e, "d.weight.nested_absmax");
        static float two[2];
        memcpy(two, a->data, 4);
        two[1] = two[0];
        a->data = two;
        a->shape[0] = 2;
        a->nbytes = 8;
    }
    edit_write(&e, "nested_long.safetensors", path, sizeof path);
    EXPECT_LOAD(LORA_ERR_SHAPE_MISMATCH, path, "d", "one nested absmax too many");
    st_close(&e.f);
    edit_open(&e, valid);
    {
        st_out *a = edit_get(&e, "d.weight.nested_quant_map");
        a->shape[0] = 255;
        a->nbytes = 4 * 255;
    }
    edit_write(&e, "nested_map_short.safetensors", path, sizeof path);
    EXPECT_LOAD(LORA_ERR_SHAPE_MISMATCH, path, "d", "nested_quant_map with 255 entries");
    st_close(&e.f);
    edit_open(&e, valid);
    {
        const char *json = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [40, 64], "
                           "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\"}";
        set_qs(&e, QS_D, json);
    }
    edit_write(&e, "no_offset.safetensors", path, sizeof path);
    EXPECT_LOAD(LORA_ERR_FILE_FORMAT, path, "d", "DQ quant state without nested_offset");
    st_close(&e.f);
    edit_open(&e, valid);
    {
        const char *json = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [40, 64], "
                           "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 1e999}";
        set_qs(&e, QS_D, json);
    }
    edit_write(&e, "inf_offset.safetensors", path, sizeof path);
    {
        /* 1e999 overflows a double: a JSON parser may reject it (FILE_FORMAT) or read +Inf (not a finite offset: FILE_FORMAT). */
        lora_nf4 *out = SENT;
        lora_status st;
        check_mark_();
        st = lora_nf4_load(path, "d", &out);
        if (getenv("LORA_TEST_VERBOSE")) printf("offset 1e999 -> %s: %s\n", lora_status_str(st), check_last_error_());
        CHECKF(st == LORA_ERR_FILE_FORMAT, "DQ offset 1e999: %s", lora_status_str(st));
        CHECK(out == SENT);
    }
    st_close(&e.f);
}

/* ---- lora_nf4_save ------------------------------------------------------ */

static int dir_has_only(const char *keep) {
    DIR *d = opendir(g_dir);
    struct dirent *ent;
    int ok = 1;
    if (!d) return 0;
    while ((ent = readdir(d)) != NULL) {
        if (strcmp(ent->d_name, ".") == 0 || strcmp(ent->d_name, "..") == 0) continue;
        if (keep && strcmp(ent->d_name, keep) == 0) continue;
        fprintf(stderr, "    unexpected file left in the scratch dir: %s\n", ent->d_name);
        ok = 0;
    }
    closedir(d);
    return ok;
}

static void remove_all(void) {
    DIR *d = opendir(g_dir);
    struct dirent *ent;
    char path[1200];
    if (!d) return;
    while ((ent = readdir(d)) != NULL) {
        if (strcmp(ent->d_name, ".") == 0 || strcmp(ent->d_name, "..") == 0) continue;
        path_in_dir(path, sizeof path, ent->d_name);
        unlink(path);
    }
    closedir(d);
}

static void test_save(lora_nf4 *m, lora_nf4 *d) {
    char path[1200], missing[1200];
    const char *prefixes[2] = {"m", "d"};
    const lora_nf4 *tensors[2];
    const char *null_prefix[2] = {"m", NULL};
    const lora_nf4 *null_tensor[2];
    const char *empty_prefix[2] = {"m", ""};
    const char *dup_prefix[2] = {"m", "m"};
    unsigned char *before = NULL, *after = NULL;
    size_t nbefore = 0, nafter = 0;

    tensors[0] = m;
    tensors[1] = d;
    null_tensor[0] = m;
    null_tensor[1] = NULL;
    remove_all();
    path_in_dir(path, sizeof path, "out.safetensors");

    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_nf4_save(path, prefixes, tensors, 0));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_save(path, NULL, tensors, 2));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_save(path, prefixes, NULL, 2));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_save(path, null_prefix, tensors, 2));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_save(path, prefixes, null_tensor, 2));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_nf4_save(path, empty_prefix, tensors, 2));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_nf4_save(path, dup_prefix, tensors, 2));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_save(NULL, prefixes, tensors, 2));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_nf4_save("", prefixes, tensors, 2));
    snprintf(missing, sizeof missing, "%s/no/such/dir/out.safetensors", g_dir);
    EXPECT_ERR(LORA_ERR_IO, lora_nf4_save(missing, prefixes, tensors, 2));
    CHECKF(dir_has_only(NULL), "a failed lora_nf4_save left files behind");

    /* A failed save leaves an existing file as it was. */
    REQUIRE_OK(lora_nf4_save(path, prefixes, tensors, 2));
    REQUIRE(st_read_all(path, &before, &nbefore));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_nf4_save(path, empty_prefix, tensors, 2));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_nf4_save(path, prefixes, null_tensor, 2));
    REQUIRE(st_read_all(path, &after, &nafter));
    CHECKF(nbefore == nafter && memcmp(before, after, nbefore) == 0, "a failed lora_nf4_save changed the existing file");
    CHECKF(dir_has_only("out.safetensors"), "a failed lora_nf4_save left files behind");
    /* Saving onto a directory fails with IO and leaves nothing behind. */
    {
        char sub[1200];
        snprintf(sub, sizeof sub, "%s/subdir", g_dir);
        REQUIRE(mkdir(sub, 0700) == 0);
        EXPECT_ERR(LORA_ERR_IO, lora_nf4_save(sub, prefixes, tensors, 2));
        rmdir(sub);
        CHECKF(dir_has_only("out.safetensors"), "a failed lora_nf4_save onto a directory left files behind");
    }
    free(before);
    free(after);
}

int main(int argc, char **argv) {
    lora_context_params cp = lora_context_default_params();
    lora_nf4 *m = NULL, *d = NULL;
    lora_nf4_params p = lora_nf4_default_params();
    char valid[1200];
    const char *prefixes[2] = {"m", "d"};
    const lora_nf4 *tensors[2];

    snprintf(g_dir, sizeof g_dir, "%s/lora-bad-input-XXXXXX", argc > 1 ? argv[1] : "/tmp");
    REQUIRE(mkdtemp(g_dir) != NULL);
    cp.backend = LORA_BACKEND_CPU;
    cp.n_threads = 1;
    REQUIRE_OK(lora_context_new(&cp, &g_ctx));
    fill();

    test_quantize_args();
    test_non_finite();
    test_dequantize_and_accessors();

    /* A valid file to start from: "m" (no DQ) and "d" (DQ), both 40x64 f32. */
    p.double_quant = 0;
    REQUIRE_OK(lora_quantize_nf4(g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, g_shape, 2, &p, &m));
    REQUIRE_OK(lora_quantize_nf4(g_ctx, g_x, sizeof g_x, LORA_DTYPE_F32, g_shape, 2, NULL, &d));
    tensors[0] = m;
    tensors[1] = d;
    path_in_dir(valid, sizeof valid, "valid.safetensors");
    REQUIRE_OK(lora_nf4_save(valid, prefixes, tensors, 2));

    test_malformed_files(valid);
    test_semantic_files(valid);
    test_save(m, d);

    lora_nf4_free(m);
    lora_nf4_free(d);
    lora_context_free(g_ctx);
    remove_all();
    rmdir(g_dir);
    return check_exit_code();
}
