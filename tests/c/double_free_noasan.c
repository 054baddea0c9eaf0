/*
 * The header documents a second `_free` of the same handle as a no-op
 * "where it can be detected" (and LORA_ERR_INVALID_STATE for a handle used
 * after it was freed). Detection reads the freed handle's tag, which
 * AddressSanitizer rightly reports as a heap-use-after-free, so this
 * program is built WITHOUT sanitizers (the driver builds it separately).
 *
 * What is checked here is the practical promise with glibc's allocator: a
 * double free right after the first one, with no allocation in between, does
 * not crash or abort (glibc would abort on a real double free()), and a
 * handle used right after its free is refused. This is best-effort by
 * design: callers must never rely on it.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "check.h"

int main(void) {
    lora_context_params cp = lora_context_default_params();
    lora_context *ctx = NULL, *ctx2 = NULL;
    lora_nf4 *t = NULL, *t2 = NULL;
    float x[256];
    const size_t shape[1] = {256};
    lora_nf4_info info;
    size_t i;

    for (i = 0; i < 256; i++) x[i] = (float)i / 256.0f - 0.5f;
    cp.backend = LORA_BACKEND_CPU;
    cp.n_threads = 1;
    REQUIRE_OK(lora_context_new(&cp, &ctx));

    /* NULL frees. */
    lora_nf4_free(NULL);
    lora_context_free(NULL);

    /* An NF4 tensor freed twice. */
    REQUIRE_OK(lora_quantize_nf4(ctx, x, sizeof x, LORA_DTYPE_F32, shape, 1, NULL, &t));
    lora_nf4_free(t);
    lora_nf4_free(t); /* detectable: must be a no-op */

    /* Use after free is refused (the tag was cleared before the memory was
     * released, and nothing has been allocated since). */
    memset(&info, 0xA5, sizeof info);
    EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_nf4_get_info(t, &info));
    {
        const unsigned char *c = (const unsigned char *)&info;
        int untouched = 1;
        for (i = 0; i < sizeof info; i++)
            if (c[i] != 0xA5) untouched = 0;
        CHECK(untouched);
    }

    /* The library still works, and a new tensor is fine. */
    REQUIRE_OK(lora_quantize_nf4(ctx, x, sizeof x, LORA_DTYPE_F32, shape, 1, NULL, &t2));
    CHECK_OK(lora_nf4_get_info(t2, &info));
    CHECK(info.numel == 256);
    lora_nf4_free(t2);

    /* A context freed twice; a freed context refused. */
    REQUIRE_OK(lora_context_new(&cp, &ctx2));
    lora_context_free(ctx2);
    lora_context_free(ctx2);
    {
        lora_backend b = 0xdead;
        EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_context_backend(ctx2, &b));
        CHECK(b == 0xdead);
    }

    /* A paged buffer freed twice; a freed buffer refused by every call. */
    {
        lora_paged *pb = NULL, *pb2 = NULL;
        size_t size = 4242;
        void *ptr = NULL;
        lora_paged_stats st;
        REQUIRE_OK(lora_paged_alloc(ctx, 3 << 20, &pb));
        lora_paged_free(pb);
        lora_paged_free(pb); /* detectable: must be a no-op */
        EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_paged_size(pb, &size));
        CHECK(size == 4242);
        EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_paged_ptr(pb, &ptr));
        CHECK(ptr == NULL);
        EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_paged_prefetch(pb, 0, 1));
        EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_paged_evict(pb, 0, 1));
        memset(&st, 0, sizeof st);
        st.struct_size = sizeof st;
        EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_paged_get_stats(pb, &st));
        /* The context no longer counts it; a new buffer works. */
        CHECK_OK(lora_context_paged_stats(ctx, &st));
        CHECK(st.buffers == 0 && st.bytes_total == 0);
        REQUIRE_OK(lora_paged_alloc(ctx, 4096, &pb2));
        CHECK_OK(lora_paged_size(pb2, &size));
        CHECK(size == 4096);
        lora_paged_free(pb2);
    }

    lora_context_free(ctx);
    lora_context_free(ctx);
    return check_exit_code();
}
