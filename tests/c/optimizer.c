/*
 * The standalone optimizer API against bitsandbytes 0.50.2's AdamW8bit
 * (tests/fixtures/optim/adamw8bit.safetensors, scripts/fixtures/gen_optim.py):
 * three steps on a 4,100-element tensor (8-bit blockwise state) and a
 * 250-element one (fp32 state) must reproduce the fixture's parameters bit
 * for bit. Then 32-bit AdamW with moments in paged memory under a budget
 * far below the state gives the same bits as resident moments, and the
 * context's paging statistics show pages moving.
 *
 * Usage: optimizer FIXTURE.safetensors SCRATCH_DIR
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "st_reader.h"

static float *f32s(const st_file *f, const char *name, size_t *n) {
    const st_tensor *t = st_get(f, name);
    REQUIRE(t != NULL && strcmp(t->dtype, "F32") == 0);
    *n = (size_t)st_numel(t);
    float *v = malloc(*n * sizeof *v);
    REQUIRE(v);
    memcpy(v, t->data, *n * sizeof *v);
    return v;
}

int main(int argc, char **argv) {
    REQUIRE(argc == 3);
    st_file f;
    REQUIRE(st_open(argv[1], &f) == NULL);
    lora_context_params cp = lora_context_default_params();
    cp.backend = LORA_BACKEND_CPU;
    lora_context *ctx = NULL;
    REQUIRE_OK(lora_context_new(&cp, &ctx));

    const st_tensor *hyper = st_get(&f, "hyper");
    REQUIRE(hyper && strcmp(hyper->dtype, "F64") == 0);
    double h[5];
    memcpy(h, hyper->data, sizeof h);
    lora_optimizer_params op = lora_optimizer_default_params();
    op.optimizer = LORA_OPTIM_ADAMW_8BIT;
    op.lr = h[0];
    op.beta1 = h[1];
    op.beta2 = h[2];
    op.eps = h[3];
    op.weight_decay = h[4];
    size_t n0, n1, k;
    float *p0 = f32s(&f, "param0.init", &n0), *p1 = f32s(&f, "param1.init", &n1);
    size_t sizes[2] = {n0, n1};
    lora_optimizer *o = NULL;
    REQUIRE_OK(lora_optimizer_new(ctx, &op, sizes, 2, &o));
    uint64_t bytes = 0;
    CHECK_OK(lora_optimizer_state_bytes(o, &bytes));
    CHECKF(bytes == 2 * n0 + 8 * ((n0 + 255) / 256) + 8 * n1, "state bytes %llu", (unsigned long long)bytes);
    for (int s = 1; s <= 3; s++) {
        char name[64];
        snprintf(name, sizeof name, "grad0.step%d", s);
        float *g0 = f32s(&f, name, &k);
        snprintf(name, sizeof name, "grad1.step%d", s);
        float *g1 = f32s(&f, name, &k);
        float *ps[2] = {p0, p1};
        const float *gs[2] = {g0, g1};
        CHECK_OK(lora_optimizer_step(o, ps, gs, 2));
        for (int i = 0; i < 2; i++) {
            snprintf(name, sizeof name, "exact.param%d.step%d", i, s);
            float *want = f32s(&f, name, &k);
            CHECKF(memcmp(ps[i], want, k * sizeof(float)) == 0, "step %d param %d differs from bitsandbytes", s, i);
            free(want);
        }
        free(g0);
        free(g1);
    }
    /* Bad input leaves the parameters alone. */
    {
        float *ps[2] = {p0, p1};
        float *bad = calloc(n0, sizeof *bad);
        bad[7] = 1.0f / 0.0f;
        const float *gs[2] = {bad, p1};
        float keep = p0[7];
        EXPECT_ERR(LORA_ERR_NON_FINITE, lora_optimizer_step(o, ps, gs, 2));
        CHECK(p0[7] == keep);
        EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_optimizer_step(o, ps, gs, 1));
        free(bad);
    }
    lora_optimizer_free(o);

    /* Paged 32-bit AdamW under a 1-byte budget == resident, bit for bit. */
    lora_paging_params pp = lora_paging_default_params();
    pp.budget_bytes = 1;
    pp.dir = argv[2];
    CHECK_OK(lora_context_set_paging(ctx, &pp));
    size_t big = (size_t)3 << 20; /* 12 MiB per moment */
    float *pa = malloc(big * sizeof *pa), *pb = malloc(big * sizeof *pb), *g = malloc(big * sizeof *g);
    REQUIRE(pa && pb && g);
    for (size_t i = 0; i < big; i++) {
        pa[i] = pb[i] = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
        g[i] = (float)((i * 40503u) % 997) / 997.0f - 0.5f;
    }
    lora_optimizer *ra = NULL, *rb = NULL;
    op = lora_optimizer_default_params();
    REQUIRE_OK(lora_optimizer_new(ctx, &op, &big, 1, &ra));
    op.paged = 1;
    REQUIRE_OK(lora_optimizer_new(ctx, &op, &big, 1, &rb));
    for (int s = 0; s < 3; s++) {
        const float *gs[1] = {g};
        CHECK_OK(lora_optimizer_step(ra, &pa, gs, 1));
        CHECK_OK(lora_optimizer_step(rb, &pb, gs, 1));
    }
    CHECK(memcmp(pa, pb, big * sizeof *pa) == 0);
    lora_paged_stats ps;
    memset(&ps, 0, sizeof ps);
    ps.struct_size = sizeof ps;
    CHECK_OK(lora_context_paged_stats(ctx, &ps));
    CHECKF(ps.page_outs > 0 && ps.page_ins > 0, "page-outs %llu page-ins %llu", (unsigned long long)ps.page_outs, (unsigned long long)ps.page_ins);
    lora_optimizer_free(ra);
    lora_optimizer_free(rb);
    op = lora_optimizer_default_params();
    op.optimizer = LORA_OPTIM_ADAMW_8BIT;
    op.paged = 1;
    EXPECT_ERR(LORA_ERR_UNSUPPORTED, lora_optimizer_new(ctx, &op, &big, 1, &ra));
    size_t zero = 0;
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_optimizer_new(ctx, NULL, &zero, 1, &ra));
    free(pa);
    free(pb);
    free(g);
    free(p0);
    free(p1);
    st_close(&f);
    lora_context_free(ctx);
    return check_exit_code();
}
