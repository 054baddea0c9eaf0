/*
 * LoRA layers through the C API: parity with PEFT 0.21 on the fixtures in
 * tests/fixtures/lora (scripts/fixtures/gen_lora.py) — forward, dx, dA, dB,
 * merged weight, merged forward — then hot swap without drift, a
 * mixed-adapter batch, and every bad input with its status.
 *
 * Usage: lora_layer FIXTURE.safetensors...
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "st_reader.h"

/* Same bound as tests/lora_layer.rs: PyTorch's and our fp32 GEMMs sum in
 * different orders; over k <= 128 terms that difference grows like
 * sqrt(k)·eps of the terms' magnitude (measured at most 2.1e-7 of the
 * output's scale here). */
#define FP32_REORDER_TOL 1e-6f

static lora_context *g_ctx;

static float *f32_of(const st_tensor *t) {
    size_t n = (size_t)st_numel(t), i;
    float *v = malloc(n * sizeof *v);
    REQUIRE(v != NULL);
    for (i = 0; i < n; i++) v[i] = st_f32_at(t->data, i);
    return v;
}

static const st_tensor *need(const st_file *f, const char *name) {
    const st_tensor *t = st_get(f, name);
    if (!t) {
        fprintf(stderr, "fixture lacks tensor %s\n", name);
        exit(2);
    }
    return t;
}

static void close_to(const char *fx, const char *what, const float *ours, const st_tensor *ref) {
    size_t n = (size_t)st_numel(ref), i;
    float scale = 1.0f, err = 0.0f;
    for (i = 0; i < n; i++) {
        float r = st_f32_at(ref->data, i);
        if (fabsf(r) > scale) scale = fabsf(r);
    }
    for (i = 0; i < n; i++) {
        float d = fabsf(ours[i] - st_f32_at(ref->data, i));
        if (d > err) err = d;
    }
    CHECKF(err / scale <= FP32_REORDER_TOL, "%s %s: relative error %g", fx, what, (double)(err / scale));
}

static void parity(const char *path) {
    st_file f;
    const char *e = st_open(path, &f);
    const char *fx = path, *names_s;
    size_t in_f, out_f, n, k, na = 0;
    char names[4][32];
    lora_layer *layer = NULL;
    float *bias = NULL, *x, *dy, *y, *dx, *w;
    int nf4;
    if (e) {
        fprintf(stderr, "%s: %s\n", path, e);
        exit(2);
    }
    in_f = (size_t)strtoull(st_meta(&f, "in_features"), NULL, 10);
    out_f = (size_t)strtoull(st_meta(&f, "out_features"), NULL, 10);
    nf4 = st_get(&f, "base.weight.quant_state.bitsandbytes__nf4") != NULL;
    if (strcmp(st_meta(&f, "bias"), "True") == 0) bias = f32_of(need(&f, "base.bias"));
    if (nf4) {
        lora_nf4 *q = NULL;
        REQUIRE_OK(lora_nf4_load(path, "base", &q));
        REQUIRE_OK(lora_layer_new_nf4(g_ctx, q, bias, &layer));
        lora_nf4_free(q);
    } else {
        const st_tensor *wt = need(&f, "base.weight");
        uint32_t fifo = strcmp(st_meta(&f, "fan_in_fan_out"), "True") == 0;
        REQUIRE_OK(lora_layer_new(g_ctx, wt->data, wt->nbytes, LORA_DTYPE_F32, in_f, out_f, fifo, bias, &layer));
    }
    /* Adapters, comma-separated in the metadata. */
    names_s = st_meta(&f, "adapters");
    while (*names_s && na < 4) {
        size_t len = strcspn(names_s, ",");
        char key[64];
        lora_adapter_config c = lora_adapter_default_config();
        float *a, *b;
        memcpy(names[na], names_s, len);
        names[na][len] = 0;
        snprintf(key, sizeof key, "r.%s", names[na]);
        c.r = (uint32_t)strtoul(st_meta(&f, key), NULL, 10);
        snprintf(key, sizeof key, "alpha.%s", names[na]);
        c.alpha = strtof(st_meta(&f, key), NULL);
        snprintf(key, sizeof key, "rslora.%s", names[na]);
        c.use_rslora = strcmp(st_meta(&f, key), "True") == 0;
        snprintf(key, sizeof key, "lora_A.%s", names[na]);
        a = f32_of(need(&f, key));
        snprintf(key, sizeof key, "lora_B.%s", names[na]);
        b = f32_of(need(&f, key));
        c.init = LORA_INIT_GIVEN;
        c.a = a;
        c.b = b;
        REQUIRE_OK(lora_layer_add_adapter(layer, names[na], &c));
        free(a);
        free(b);
        na++;
        names_s += len + (names_s[len] == ',');
    }
    {
        const char *act[4] = {names[0], names[1], names[2], names[3]};
        REQUIRE_OK(lora_layer_swap_adapter(layer, act, NULL, na));
    }
    x = f32_of(need(&f, "x"));
    dy = f32_of(need(&f, "dy"));
    n = (size_t)st_numel(need(&f, "x")) / in_f;
    y = malloc(n * out_f * sizeof *y);
    dx = malloc(n * in_f * sizeof *dx);
    w = malloc(in_f * out_f * sizeof *w);
    REQUIRE(y && dx && w);
    REQUIRE_OK(lora_layer_forward(layer, x, n * in_f * 4, LORA_DTYPE_F32, n, NULL, y, n * out_f * 4, LORA_DTYPE_F32, 1));
    close_to(fx, "y", y, need(&f, "y"));
    REQUIRE_OK(lora_layer_backward(layer, x, n * in_f * 4, LORA_DTYPE_F32, dy, n * out_f * 4, LORA_DTYPE_F32, n, dx, n * in_f * 4, LORA_DTYPE_F32));
    close_to(fx, "dx", dx, need(&f, "dx"));
    for (k = 0; k < na; k++) {
        char key[64];
        const st_tensor *ga, *gb;
        float *a, *b;
        snprintf(key, sizeof key, "dA.%s", names[k]);
        ga = need(&f, key);
        snprintf(key, sizeof key, "dB.%s", names[k]);
        gb = need(&f, key);
        a = malloc(ga->nbytes);
        b = malloc(gb->nbytes);
        REQUIRE(a && b);
        REQUIRE_OK(lora_layer_get_adapter(layer, names[k], 1, a, (size_t)st_numel(ga), b, (size_t)st_numel(gb)));
        close_to(fx, "dA", a, ga);
        close_to(fx, "dB", b, gb);
        free(a);
        free(b);
    }
    /* Merging while gradients are pending is refused; then merge. */
    EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_layer_merge(layer));
    REQUIRE_OK(lora_layer_zero_grad(layer));
    REQUIRE_OK(lora_layer_merge(layer));
    EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_layer_merge(layer));
    REQUIRE_OK(lora_layer_weight(layer, LORA_DTYPE_F32, w, in_f * out_f * 4));
    close_to(fx, "merged.weight", w, need(&f, "merged.weight"));
    {
        float *ym = malloc(n * out_f * sizeof *ym);
        float *yu = malloc(n * out_f * sizeof *yu);
        REQUIRE(ym && yu);
        REQUIRE_OK(lora_layer_forward(layer, x, n * in_f * 4, LORA_DTYPE_F32, n, NULL, ym, n * out_f * 4, LORA_DTYPE_F32, 0));
        close_to(fx, "merged forward vs PEFT's unmerged y", ym, need(&f, "y"));
        if (nf4) {
            double rel = -1;
            float mx = -1;
            REQUIRE_OK(lora_layer_requantize(layer, NULL, &rel, &mx));
            CHECKF(rel > 0 && rel < 0.2 && mx > 0, "%s requantize error %g %g", fx, rel, (double)mx);
        } else {
            REQUIRE_OK(lora_layer_unmerge(layer));
            EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_layer_unmerge(layer));
            REQUIRE_OK(lora_layer_forward(layer, x, n * in_f * 4, LORA_DTYPE_F32, n, NULL, yu, n * out_f * 4, LORA_DTYPE_F32, 0));
            CHECKF(memcmp(yu, y, n * out_f * 4) == 0, "%s: unmerge did not restore the outputs exactly", fx);
        }
        free(ym);
        free(yu);
    }
    free(x);
    free(dy);
    free(y);
    free(dx);
    free(w);
    free(bias);
    lora_layer_free(layer);
    st_close(&f);
}

static float frand(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return (float)((double)(*s >> 11) / 9007199254740992.0 - 0.5);
}

static void fill(float *v, size_t n, uint64_t *s) {
    size_t i;
    for (i = 0; i < n; i++) v[i] = frand(s);
}

static lora_layer *toy(size_t in_f, size_t out_f, uint64_t *s) {
    float *w = malloc(in_f * out_f * sizeof *w);
    lora_layer *l = NULL;
    REQUIRE(w != NULL);
    fill(w, in_f * out_f, s);
    REQUIRE_OK(lora_layer_new(g_ctx, w, in_f * out_f * 4, LORA_DTYPE_F32, in_f, out_f, 0, NULL, &l));
    free(w);
    return l;
}

static void add_given(lora_layer *l, const char *name, uint32_t r, size_t in_f, size_t out_f, uint64_t *s) {
    lora_adapter_config c = lora_adapter_default_config();
    float *a = malloc(r * in_f * 4), *b = malloc(out_f * r * 4);
    REQUIRE(a && b);
    fill(a, r * in_f, s);
    fill(b, out_f * r, s);
    c.r = r;
    c.alpha = 2.0f * (float)r;
    c.init = LORA_INIT_GIVEN;
    c.a = a;
    c.b = b;
    REQUIRE_OK(lora_layer_add_adapter(l, name, &c));
    free(a);
    free(b);
}

/* 10,000 alternating swaps of two merged adapters leave exactly
 * W0 + s·B₂·A₂, bit for bit equal to a fresh merge. */
static void swap_drift(void) {
    const size_t in_f = 48, out_f = 40;
    uint64_t s1 = 77, s2 = 77;
    lora_layer *l = toy(in_f, out_f, &s1), *fresh = toy(in_f, out_f, &s2);
    const char *one = "one", *two = "two";
    float *wa = malloc(in_f * out_f * 4), *wb = malloc(in_f * out_f * 4);
    int i;
    REQUIRE(wa && wb);
    add_given(l, "one", 4, in_f, out_f, &s1);
    add_given(l, "two", 8, in_f, out_f, &s1);
    add_given(fresh, "one", 4, in_f, out_f, &s2);
    add_given(fresh, "two", 8, in_f, out_f, &s2);
    REQUIRE_OK(lora_layer_merge(l));
    for (i = 0; i < 10000; i++) REQUIRE_OK(lora_layer_swap_adapter(l, i % 2 ? &one : &two, NULL, 1));
    REQUIRE_OK(lora_layer_swap_adapter(l, &two, NULL, 1));
    REQUIRE_OK(lora_layer_swap_adapter(fresh, &two, NULL, 1));
    REQUIRE_OK(lora_layer_merge(fresh));
    REQUIRE_OK(lora_layer_weight(l, LORA_DTYPE_F32, wa, in_f * out_f * 4));
    REQUIRE_OK(lora_layer_weight(fresh, LORA_DTYPE_F32, wb, in_f * out_f * 4));
    CHECKF(memcmp(wa, wb, in_f * out_f * 4) == 0, "merged weight drifted after 10,000 swaps");
    free(wa);
    free(wb);
    lora_layer_free(l);
    lora_layer_free(fresh);
}

/* A mixed batch (row i uses adapter row_adapter[i]) equals running each
 * row with its adapter alone. */
static void mixed_batch(void) {
    const size_t in_f = 24, out_f = 20, n = 6;
    uint64_t s = 5;
    lora_layer *l = toy(in_f, out_f, &s);
    int32_t rows[6] = {0, 1, -1, 1, 0, 2}, idx;
    float x[6 * 24], y[6 * 20], yr[6 * 20];
    const char *names[3] = {"p", "q", "z"};
    size_t i, r;
    add_given(l, "p", 2, in_f, out_f, &s);
    add_given(l, "q", 3, in_f, out_f, &s);
    add_given(l, "z", 4, in_f, out_f, &s);
    REQUIRE_OK(lora_layer_adapter_index(l, "q", &idx));
    CHECK(idx == 1);
    fill(x, n * in_f, &s);
    REQUIRE_OK(lora_layer_forward(l, x, sizeof x, LORA_DTYPE_F32, n, rows, y, sizeof y, LORA_DTYPE_F32, 0));
    for (r = 0; r < n; r++) {
        REQUIRE_OK(lora_layer_swap_adapter(l, rows[r] < 0 ? NULL : &names[rows[r]], NULL, rows[r] < 0 ? 0 : 1));
        REQUIRE_OK(lora_layer_forward(l, x + r * in_f, in_f * 4, LORA_DTYPE_F32, 1, NULL, yr + r * out_f, out_f * 4, LORA_DTYPE_F32, 0));
    }
    for (i = 0; i < n * out_f; i++) CHECKF(fabsf(y[i] - yr[i]) <= 1e-5f * (1 + fabsf(yr[i])), "mixed batch y[%zu]", i);
    /* Mixed batches need the layer unmerged. */
    REQUIRE_OK(lora_layer_merge(l));
    EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_layer_forward(l, x, sizeof x, LORA_DTYPE_F32, n, rows, y, sizeof y, LORA_DTYPE_F32, 0));
    rows[0] = 7;
    REQUIRE_OK(lora_layer_unmerge(l));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_layer_forward(l, x, sizeof x, LORA_DTYPE_F32, n, rows, y, sizeof y, LORA_DTYPE_F32, 0));
    lora_layer_free(l);
}

static void bad_input(void) {
    const size_t in_f = 8, out_f = 6;
    uint64_t s = 9;
    lora_layer *l = toy(in_f, out_f, &s), *out = (lora_layer *)&s;
    lora_adapter_config c = lora_adapter_default_config();
    float x[2 * 8] = {0}, y[2 * 6] = {0};
    const char *nope = "nope", *dup[2] = {"a", "a"};
    size_t t = 0, tot = 0;
    /* Layer creation. */
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_layer_new(g_ctx, NULL, 48 * 4, LORA_DTYPE_F32, in_f, out_f, 0, NULL, &out));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_layer_new(g_ctx, x, 4, LORA_DTYPE_F32, in_f, out_f, 0, NULL, &out));
    EXPECT_ERR(LORA_ERR_INVALID_SHAPE, lora_layer_new(g_ctx, x, 0, LORA_DTYPE_F32, 0, out_f, 0, NULL, &out));
    EXPECT_ERR(LORA_ERR_UNKNOWN_DTYPE, lora_layer_new(g_ctx, x, 64, 9, in_f, out_f, 0, NULL, &out));
    CHECK(out == (lora_layer *)&s);
    /* Adapter configs. */
    c.r = 0;
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_layer_add_adapter(l, "a", &c));
    c.r = 1025; /* > max(1024, in + out) (a rank above min(in, out) is fine, as in PEFT) */
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_layer_add_adapter(l, "a", &c));
    c.r = 2;
    c.alpha = 0.0f;
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_layer_add_adapter(l, "a", &c));
    c.alpha = -1.0f;
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_layer_add_adapter(l, "a", &c));
    c.alpha = 4.0f;
    c.dropout = 1.0f;
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_layer_add_adapter(l, "a", &c));
    c.dropout = -0.5f;
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_layer_add_adapter(l, "a", &c));
    c.dropout = 0.1f;
    c.init = 17;
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_layer_add_adapter(l, "a", &c));
    c.init = LORA_INIT_GIVEN;
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_layer_add_adapter(l, "a", &c));
    c.init = LORA_INIT_GAUSSIAN;
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_layer_add_adapter(l, "", &c));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_layer_add_adapter(l, NULL, &c));
    c.struct_size = 3;
    EXPECT_ERR(LORA_ERR_STRUCT_SIZE, lora_layer_add_adapter(l, "a", &c));
    c.struct_size = (uint32_t)sizeof c;
    REQUIRE_OK(lora_layer_add_adapter(l, "a", &c));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_layer_add_adapter(l, "a", &c));
    REQUIRE_OK(lora_layer_param_counts(l, &t, &tot));
    CHECK(t == 2 * in_f + out_f * 2 && tot == in_f * out_f + t);
    /* Unknown and duplicate names in a swap. */
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_layer_swap_adapter(l, &nope, NULL, 1));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_layer_swap_adapter(l, dup, NULL, 2));
    /* Shapes: x, y and the layer must agree. */
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_layer_forward(l, x, sizeof x - 4, LORA_DTYPE_F32, 2, NULL, y, sizeof y, LORA_DTYPE_F32, 1));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_layer_forward(l, x, sizeof x, LORA_DTYPE_F32, 2, NULL, y, sizeof y + 4, LORA_DTYPE_F32, 1));
    EXPECT_ERR(LORA_ERR_INVALID_SHAPE, lora_layer_forward(l, x, sizeof x, LORA_DTYPE_F32, 0, NULL, y, sizeof y, LORA_DTYPE_F32, 1));
    EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_layer_backward(l, x, sizeof x, LORA_DTYPE_F32, y, sizeof y, LORA_DTYPE_F32, 2, NULL, 0, LORA_DTYPE_F32));
    /* Swapping while a backward pass is half accumulated. */
    REQUIRE_OK(lora_layer_forward(l, x, sizeof x, LORA_DTYPE_F32, 2, NULL, y, sizeof y, LORA_DTYPE_F32, 1));
    EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_layer_backward(l, x, sizeof x / 2, LORA_DTYPE_F32, y, sizeof y / 2, LORA_DTYPE_F32, 1, NULL, 0, LORA_DTYPE_F32));
    REQUIRE_OK(lora_layer_backward(l, x, sizeof x, LORA_DTYPE_F32, y, sizeof y, LORA_DTYPE_F32, 2, NULL, 0, LORA_DTYPE_F32));
    {
        const char *a = "a";
        EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_layer_swap_adapter(l, &a, NULL, 1));
        EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_layer_merge(l));
        REQUIRE_OK(lora_layer_zero_grad(l));
        REQUIRE_OK(lora_layer_swap_adapter(l, &a, NULL, 1));
    }
    /* Merge states. */
    EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_layer_unmerge(l));
    EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_layer_requantize(l, NULL, NULL, NULL));
    REQUIRE_OK(lora_layer_merge(l));
    EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_layer_merge(l));
    REQUIRE_OK(lora_layer_unmerge(l));
    EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_layer_set_bias_trainable(l, 1));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_layer_merge(NULL));
    lora_layer_free(l);
    lora_layer_free(NULL);
}

int main(int argc, char **argv) {
    int i;
    lora_context_params cp = lora_context_default_params();
    cp.backend = LORA_BACKEND_CPU;
    cp.n_threads = 2;
    REQUIRE_OK(lora_context_new(&cp, &g_ctx));
    REQUIRE(argc > 1);
    for (i = 1; i < argc; i++) parity(argv[i]);
    swap_drift();
    mixed_batch();
    bad_input();
    lora_context_free(g_ctx);
    return check_exit_code();
}
