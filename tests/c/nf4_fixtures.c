/*
 * Bit-exactness against bitsandbytes through the C API. Each fixture in
 * tests/fixtures/nf4 (scripts/fixtures/gen_nf4.py) holds an `input` tensor
 * and bitsandbytes 0.50's quantized state of it without (`nodq.*`) and
 * with (`dq.*`) double quantization, and the dequantized outputs. The
 * files are read with the test's own safetensors reader (st_reader.h), not
 * liblora's, then:
 *   - lora_quantize_nf4 at the fixture's blocksize must reproduce
 *     `P.weight` (packed codes), `nodq.weight.absmax` (fp32 bits),
 *     `dq.weight.absmax` (u8 codes), `dq.weight.nested_absmax`, the offset
 *     (quant-state JSON `nested_offset`, parsed as double, cast to float)
 *     and `dq.absmax_decoded`, bit for bit;
 *   - lora_nf4_dequantize into the input's dtype must reproduce
 *     `nodq.dequant` / `dq.dequant` byte for byte;
 *   - lora_nf4_load of the fixture itself must give the same tensors.
 *
 * Usage: nf4_fixtures FILE.safetensors...
 * Environment: LORA_TEST_BACKEND=cpu|auto|cuda (default cpu).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "st_reader.h"

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

static uint32_t bits_at(const unsigned char *p, size_t i) {
    return (uint32_t)p[4 * i] | (uint32_t)p[4 * i + 1] << 8 | (uint32_t)p[4 * i + 2] << 16 | (uint32_t)p[4 * i + 3] << 24;
}
static uint32_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* First differing byte, or -1. */
static long first_diff(const void *a, const void *b, size_t n) {
    const unsigned char *x = a, *y = b;
    size_t i;
    for (i = 0; i < n; i++)
        if (x[i] != y[i]) return (long)i;
    return -1;
}

static const st_tensor *need(const st_file *f, const char *name, const char *dtype, const char *fx) {
    const st_tensor *t = st_get(f, name);
    if (!t) {
        fprintf(stderr, "%s: fixture has no tensor '%s'\n", fx, name);
        exit(1);
    }
    if (dtype && strcmp(t->dtype, dtype) != 0) {
        fprintf(stderr, "%s: fixture tensor '%s' is %s, expected %s\n", fx, name, t->dtype, dtype);
        exit(1);
    }
    return t;
}

/* Parses the quant-state JSON stored as U8 tensor `key`. */
static void quant_state(const st_file *f, const char *key, const char *fx, sj_value *out) {
    const st_tensor *t = need(f, key, "U8", fx);
    const char *err = sj_parse((const char *)t->data, t->nbytes, out);
    if (err) {
        fprintf(stderr, "%s: quant state '%s' is not JSON: %s\n", fx, key, err);
        exit(1);
    }
}

static lora_dtype dtype_of(const char *st, const char *fx) {
    if (strcmp(st, "F32") == 0) return LORA_DTYPE_F32;
    if (strcmp(st, "F16") == 0) return LORA_DTYPE_F16;
    if (strcmp(st, "BF16") == 0) return LORA_DTYPE_BF16;
    fprintf(stderr, "%s: input dtype %s is not a float type\n", fx, st);
    exit(1);
}

/* Everything observable through the API must be identical. */
static void same_tensor(const lora_nf4 *a, const lora_nf4 *b, const char *what) {
    lora_nf4_info ia, ib;
    const uint8_t *pa, *pb;
    size_t la, lb;
    REQUIRE_OK(lora_nf4_get_info(a, &ia));
    REQUIRE_OK(lora_nf4_get_info(b, &ib));
    CHECKF(ia.ndim == ib.ndim && memcmp(ia.shape, ib.shape, sizeof ia.shape) == 0 && ia.numel == ib.numel &&
               ia.dtype == ib.dtype && ia.blocksize == ib.blocksize && ia.num_blocks == ib.num_blocks &&
               ia.double_quant == ib.double_quant && ia.nested_blocksize == ib.nested_blocksize &&
               ia.num_nested == ib.num_nested && fbits(ia.offset) == fbits(ib.offset) && ia.packed_bytes == ib.packed_bytes &&
               ia.footprint_bytes == ib.footprint_bytes,
           "%s: lora_nf4_info differs", what);
    REQUIRE_OK(lora_nf4_packed(a, &pa, &la));
    REQUIRE_OK(lora_nf4_packed(b, &pb, &lb));
    CHECKF(la == lb && first_diff(pa, pb, la) < 0, "%s: packed codes differ", what);
    {
        float *sa = malloc(ia.num_blocks * 4), *sb = malloc(ia.num_blocks * 4);
        REQUIRE(sa && sb);
        REQUIRE_OK(lora_nf4_absmax(a, sa, ia.num_blocks));
        REQUIRE_OK(lora_nf4_absmax(b, sb, ib.num_blocks));
        CHECKF(first_diff(sa, sb, ia.num_blocks * 4) < 0, "%s: absmax differs", what);
        free(sa);
        free(sb);
    }
    if (ia.double_quant && ib.double_quant) {
        const uint8_t *ca, *cb;
        const float *na, *nb;
        size_t nca, ncb, nna, nnb;
        float oa, ob;
        REQUIRE_OK(lora_nf4_double_quant(a, &ca, &nca, &na, &nna, &oa));
        REQUIRE_OK(lora_nf4_double_quant(b, &cb, &ncb, &nb, &nnb, &ob));
        CHECKF(nca == ncb && first_diff(ca, cb, nca) < 0, "%s: absmax codes differ", what);
        CHECKF(nna == nnb && first_diff(na, nb, nna * 4) < 0, "%s: nested absmax differs", what);
        CHECKF(fbits(oa) == fbits(ob), "%s: offset %.9g vs %.9g", what, oa, ob);
    }
}

static void check_fixture(const char *path) {
    st_file f;
    const char *err = st_open(path, &f), *fx = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    const st_tensor *in;
    lora_dtype dt;
    size_t shape[LORA_MAX_DIMS], ndim, numel, i;
    unsigned char *input;
    uint64_t bs = 0;
    sj_value qs_nodq, qs_dq;
    int dq;
    char list[64];
    size_t needed = 0;

    if (err) {
        fprintf(stderr, "%s: cannot read with the test reader: %s\n", path, err);
        exit(1);
    }
    in = need(&f, "input", NULL, fx);
    dt = dtype_of(in->dtype, fx);
    ndim = in->ndim;
    REQUIRE(ndim >= 1 && ndim <= LORA_MAX_DIMS);
    for (i = 0; i < ndim; i++) shape[i] = (size_t)in->shape[i];
    numel = (size_t)st_numel(in);
    /* An aligned copy (safetensors data need not be aligned). */
    input = malloc(in->nbytes);
    REQUIRE(input);
    memcpy(input, in->data, in->nbytes);

    quant_state(&f, "nodq.weight.quant_state.bitsandbytes__nf4", fx, &qs_nodq);
    quant_state(&f, "dq.weight.quant_state.bitsandbytes__nf4", fx, &qs_dq);
    REQUIRE(sj_u64(sj_get(&qs_nodq, "blocksize"), &bs));
    {
        uint64_t bs2 = 0;
        const char *m = st_meta(&f, "blocksize");
        REQUIRE(sj_u64(sj_get(&qs_dq, "blocksize"), &bs2));
        CHECKF(bs2 == bs, "%s: blocksize %llu vs %llu", fx, (unsigned long long)bs, (unsigned long long)bs2);
        CHECKF(m == NULL || strtoull(m, NULL, 10) == bs, "%s: __metadata__ blocksize %s vs %llu", fx, m, (unsigned long long)bs);
    }

    for (dq = 0; dq <= 1; dq++) {
        const char *P = dq ? "dq" : "nodq";
        char key[128], what[256];
        lora_nf4_params p = lora_nf4_default_params();
        lora_nf4 *t = NULL, *loaded = NULL;
        lora_nf4_info info;
        const uint8_t *packed;
        size_t plen;
        float *absmax;
        const st_tensor *w, *deq;

        snprintf(what, sizeof what, "%s %s", fx, P);
        p.blocksize = (uint32_t)bs;
        p.double_quant = (uint32_t)dq;
        REQUIRE_OK(lora_quantize_nf4(g_ctx, input, in->nbytes, dt, shape, ndim, &p, &t));
        REQUIRE_OK(lora_nf4_get_info(t, &info));
        CHECK(info.numel == numel && info.dtype == dt && info.blocksize == bs && info.double_quant == (uint32_t)dq);

        /* Packed codes. */
        snprintf(key, sizeof key, "%s.weight", P);
        w = need(&f, key, "U8", fx);
        REQUIRE_OK(lora_nf4_packed(t, &packed, &plen));
        CHECKF(plen == w->nbytes, "%s: %zu packed bytes, bitsandbytes %zu", what, plen, w->nbytes);
        if (plen == w->nbytes) {
            long d = first_diff(packed, w->data, plen);
            CHECKF(d < 0, "%s: packed byte %ld: ours 0x%02x, bitsandbytes 0x%02x", what, d, d < 0 ? 0 : packed[d],
                   d < 0 ? 0 : w->data[d]);
        }

        /* Scales. */
        absmax = malloc(info.num_blocks * sizeof *absmax);
        REQUIRE(absmax);
        REQUIRE_OK(lora_nf4_absmax(t, absmax, info.num_blocks));
        if (!dq) {
            const st_tensor *a = need(&f, "nodq.weight.absmax", "F32", fx);
            CHECKF(a->nbytes == 4 * info.num_blocks, "%s: %zu blocks, bitsandbytes %zu", what, info.num_blocks, a->nbytes / 4);
            for (i = 0; i < info.num_blocks && 4 * i < a->nbytes; i++)
                if (fbits(absmax[i]) != bits_at(a->data, i)) {
                    CHECKF(0, "%s: absmax[%zu] = %.9g, bitsandbytes %.9g", what, i, absmax[i], st_f32_at(a->data, i));
                    break;
                }
        } else {
            const st_tensor *codes_t = need(&f, "dq.weight.absmax", "U8", fx);
            const st_tensor *nested_t = need(&f, "dq.weight.nested_absmax", "F32", fx);
            const st_tensor *decoded_t = need(&f, "dq.absmax_decoded", "F32", fx);
            const uint8_t *codes;
            const float *nested;
            size_t ncodes, nnested;
            float offset;
            double want_offset_d;
            float want_offset;
            REQUIRE_OK(lora_nf4_double_quant(t, &codes, &ncodes, &nested, &nnested, &offset));
            CHECKF(ncodes == codes_t->nbytes, "%s: %zu absmax codes, bitsandbytes %zu", what, ncodes, codes_t->nbytes);
            if (ncodes == codes_t->nbytes) {
                long d = first_diff(codes, codes_t->data, ncodes);
                CHECKF(d < 0, "%s: absmax code %ld: ours %d, bitsandbytes %d", what, d, d < 0 ? 0 : codes[d],
                       d < 0 ? 0 : codes_t->data[d]);
            }
            CHECKF(nnested * 4 == nested_t->nbytes, "%s: %zu nested scales, bitsandbytes %zu", what, nnested, nested_t->nbytes / 4);
            for (i = 0; i < nnested && 4 * i < nested_t->nbytes; i++)
                CHECKF(fbits(nested[i]) == bits_at(nested_t->data, i), "%s: nested_absmax[%zu] = %.9g, bitsandbytes %.9g", what, i,
                       nested[i], st_f32_at(nested_t->data, i));
            REQUIRE(sj_double(sj_get(&qs_dq, "nested_offset"), &want_offset_d));
            want_offset = (float)want_offset_d;
            CHECKF(fbits(offset) == fbits(want_offset), "%s: offset %.9g, bitsandbytes %.9g", what, offset, want_offset);
            CHECK(fbits(info.offset) == fbits(offset));
            CHECKF(decoded_t->nbytes == 4 * info.num_blocks, "%s: decoded absmax count", what);
            for (i = 0; i < info.num_blocks && 4 * i < decoded_t->nbytes; i++)
                if (fbits(absmax[i]) != bits_at(decoded_t->data, i)) {
                    CHECKF(0, "%s: decoded absmax[%zu] = %.9g, bitsandbytes %.9g", what, i, absmax[i], st_f32_at(decoded_t->data, i));
                    break;
                }
        }
        free(absmax);

        /* Dequantized, in the dtype bitsandbytes produced (the input's). */
        snprintf(key, sizeof key, "%s.dequant", P);
        deq = need(&f, key, NULL, fx);
        {
            lora_dtype odt = dtype_of(deq->dtype, fx);
            unsigned char *out = malloc(deq->nbytes);
            REQUIRE(out);
            CHECK(odt == dt);
            REQUIRE_OK(lora_nf4_dequantize(g_ctx, t, odt, out, deq->nbytes));
            {
                long d = first_diff(out, deq->data, deq->nbytes);
                CHECKF(d < 0, "%s: dequantized bytes differ first at byte %ld (element %ld)", what, d,
                       d < 0 ? 0 : d / (long)(odt == LORA_DTYPE_F32 ? 4 : 2));
            }
            free(out);
        }

        /* liblora's loader on bitsandbytes' tensors: the same. */
        REQUIRE_OK(lora_nf4_load(path, P, &loaded));
        snprintf(what, sizeof what, "%s %s: lora_nf4_load vs lora_quantize_nf4", fx, P);
        same_tensor(t, loaded, what);
        lora_nf4_free(loaded);
        lora_nf4_free(t);
    }

    CHECK_OK(lora_nf4_list(path, list, sizeof list, &needed));
    CHECKF(strcmp(list, "dq\nnodq\n") == 0, "%s: lora_nf4_list = \"%s\"", fx, list);

    sj_free(&qs_nodq);
    sj_free(&qs_dq);
    free(input);
    st_close(&f);
}

int main(int argc, char **argv) {
    lora_context_params cp = lora_context_default_params();
    int i;
    if (argc < 11) {
        fprintf(stderr, "usage: nf4_fixtures FILE.safetensors... (expected at least 10 fixtures, got %d)\n", argc - 1);
        return 2;
    }
    cp.backend = test_backend();
    REQUIRE_OK(lora_context_new(&cp, &g_ctx));
    {
        char desc[256];
        REQUIRE_OK(lora_context_describe(g_ctx, desc, sizeof desc, NULL));
        printf("context: %s\n", desc);
    }
    for (i = 1; i < argc; i++) check_fixture(argv[i]);
    lora_context_free(g_ctx);
    printf("%d fixtures checked\n", argc - 1);
    return check_exit_code();
}
