/*
 * The model, adapter and trainer API from C, against the transformers +
 * PEFT + bitsandbytes fixture tests/fixtures/model/llama_nf4
 * (scripts/fixtures/gen_model.py): NF4 quantization at load, the PEFT
 * adapter's logits, five AdamW steps' losses, adapter save/load, a second
 * adapter with lora_create, swap/merge/unmerge, mixed-adapter generation,
 * checkpoint save/resume, memory statistics, and bad input.
 *
 * Usage: model CASE_DIR SCRATCH_DIR
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "model_fixture.h"
#include "st_reader.h"

static int cancel_after_first(void *user, uint64_t done, uint64_t total) {
    (void)total;
    (*(int *)user)++;
    return done >= 1;
}

int main(int argc, char **argv) {
    REQUIRE(argc == 3);
    char path[4096], path2[4096];
    st_file data, exp;
    snprintf(path, sizeof path, "%s/data.safetensors", argv[1]);
    REQUIRE(st_open(path, &data) == NULL);
    snprintf(path, sizeof path, "%s/expected.safetensors", argv[1]);
    REQUIRE(st_open(path, &exp) == NULL);
    int32_t ids[B * T], labels[B * T];
    fixture_batch(&data, ids, labels, B * T);

    lora_context_params cp = lora_context_default_params();
    cp.backend = LORA_BACKEND_CPU;
    cp.n_threads = 2;
    lora_context *ctx = NULL;
    REQUIRE_OK(lora_context_new(&cp, &ctx));

    /* Load with NF4 quantization at load time (QLoRA). */
    lora_model_params mp = lora_model_default_params();
    mp.quantize = LORA_QUANT_NF4;
    lora_model *m = NULL;
    snprintf(path, sizeof path, "%s/model", argv[1]);
    REQUIRE_OK(lora_model_load(ctx, path, &mp, &m));
    lora_model_info info;
    CHECK_OK(lora_model_get_info(m, &info));
    CHECK(info.n_layers == 2 && info.vocab_size == V && info.quantized == 1 && info.blocksize == 64 && info.n_kv_heads == 2);

    /* The PEFT adapter: logits as PEFT computes them. */
    snprintf(path, sizeof path, "%s/adapter", argv[1]);
    REQUIRE_OK(lora_adapter_load(m, path, "default"));
    float *logits = malloc(sizeof(float) * B * T * V);
    REQUIRE(logits);
    CHECK_OK(lora_model_logits(m, ids, B, T, NULL, logits, B * T * V));
    double e = fixture_rel_err(logits, st_get(&exp, "logits"), B * T * V);
    CHECKF(e <= FWD_REL, "logits rel err %.3e", e);
    float loss = 0;
    CHECK_OK(lora_model_loss(m, ids, labels, B, T, &loss));
    CHECKF(fabs(loss - st_f32_at(st_get(&exp, "loss")->data, 0)) <= 1e-5 * fabs(loss), "loss %f", loss);

    char summary[256];
    size_t need = 0;
    CHECK_OK(lora_model_trainable_summary(m, summary, sizeof summary, &need));
    CHECKF(strncmp(summary, "trainable params: 16,384 || all params: ", 40) == 0, "summary '%s'", summary);

    /* Save and reload the adapter under another name: same logits. */
    snprintf(path2, sizeof path2, "%s/adapter_copy", argv[2]);
    CHECK_OK(lora_adapter_save(m, "default", path2));
    CHECK_OK(lora_adapter_load(m, path2, "copy"));
    const char *copy = "copy";
    float *logits2 = malloc(sizeof(float) * B * T * V);
    REQUIRE(logits2);
    CHECK_OK(lora_swap_adapter(m, &copy, NULL, 1));
    CHECK_OK(lora_model_logits(m, ids, B, T, NULL, logits2, B * T * V));
    CHECK(memcmp(logits, logits2, sizeof(float) * B * T * V) == 0);
    CHECK_OK(lora_adapter_remove(m, "copy"));

    /* Five AdamW steps with clipping: the fixture's losses. */
    lora_step_result steps[5];
    lora_trainer *tr = fixture_five_steps(m, &exp, ids, labels, argv[1], steps);
    for (int i = 0; i < 5; i++) {
        const lora_step_result *r = &steps[i];
        CHECK(r->step == (uint64_t)i + 1 && r->tokens == B * T && r->counted_tokens == 25 && r->lr == 1e-2 && r->grad_norm > 0);
    }

    /* Checkpoint, resume on a fresh model, one more step each: identical. */
    snprintf(path2, sizeof path2, "%s/ckpt", argv[2]);
    CHECK_OK(lora_trainer_save(tr, path2));
    lora_model *m2 = NULL;
    snprintf(path, sizeof path, "%s/model", argv[1]);
    REQUIRE_OK(lora_model_load(ctx, path, &mp, &m2));
    lora_trainer *tr2 = NULL;
    REQUIRE_OK(lora_trainer_resume(m2, path2, NULL, &tr2));
    lora_step_result r1, r2;
    CHECK_OK(lora_train_step(tr, ids, labels, B, T, &r1));
    CHECK_OK(lora_train_step(tr2, ids, labels, B, T, &r2));
    CHECK(r1.loss == r2.loss && r1.grad_norm == r2.grad_norm && r2.step == 6);
    CHECK_OK(lora_model_logits(m, ids, B, T, NULL, logits, B * T * V));
    CHECK_OK(lora_model_logits(m2, ids, B, T, NULL, logits2, B * T * V));
    CHECK(memcmp(logits, logits2, sizeof(float) * B * T * V) == 0);

    /* Micro-batches of one sequence with checkpointing from here on (what a
       step refused for device memory is retried with): the same mean, so
       the loss of the same batch moves as before; both trainers alike. */
    CHECK_OK(lora_trainer_set_batching(tr, 1, 1));
    CHECK_OK(lora_trainer_set_batching(tr2, 1, 1));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_trainer_set_batching(NULL, 1, 0));
    CHECK_OK(lora_train_step(tr, ids, labels, B, T, &r1));
    CHECK_OK(lora_train_step(tr2, ids, labels, B, T, &r2));
    CHECK(r1.loss == r2.loss && r1.grad_norm == r2.grad_norm && r2.step == 7);
    const double step5 = st_f32_at(st_get(&exp, "train_losses")->data, 4);
    CHECKF(r1.loss < step5, "micro-batched step loss %f after five steps at %f", r1.loss, step5);

    /* Memory: NF4 base at ≈4.13–4.2 bits per weight at these tiny sizes. */
    lora_memory_stats ms;
    CHECK_OK(lora_model_memory(m, tr, &ms));
    double bits = 8.0 * (double)ms.base_quantized / (double)ms.quantized_weights;
    CHECKF(bits > 4.12 && bits < 4.2, "bits per weight %f", bits);
    CHECK(ms.optimizer == 16384u * 8 && ms.adapters == 16384u * 8 && ms.activations > 0 && ms.peak > ms.base_weights);

    /* A second adapter by lora_create; swap, merge, mixed batch. */
    lora_create_params cr = lora_create_default_params();
    cr.r = 4;
    cr.alpha = 8;
    cr.target_modules = "q_proj,v_proj";
    int32_t layer1 = 1;
    cr.layers_to_transform = &layer1;
    cr.n_layers_to_transform = 1;
    CHECK_OK(lora_create(m, "style", &cr));
    uint64_t trainable = 0, total = 0;
    CHECK_OK(lora_model_param_counts(m, &trainable, &total));
    CHECK(trainable == 16384u + 4u * (64 + 64) + 4u * (64 + 32));
    lora_trainer *tr3 = NULL;
    lora_trainer_free(tr);
    tr = NULL;
    REQUIRE_OK(lora_trainer_new(m, "style", NULL, &tr3));
    /* Devices: -1 (the CPU) is always there; device 0 is a GPU or
       LORA_ERR_CUDA_UNAVAILABLE; bad arguments are refused by status. */
    CHECK_OK(lora_trainer_use_device(tr3, -1, LORA_COMPUTE_BF16));
    {
        lora_status s0 = lora_trainer_use_device(tr3, 0, LORA_COMPUTE_F32);
        CHECK(s0 == LORA_OK || s0 == LORA_ERR_CUDA_UNAVAILABLE);
        if (s0 == LORA_OK) CHECK_OK(lora_trainer_use_device(tr3, -1, LORA_COMPUTE_F32));
    }
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_trainer_use_device(tr3, 0, 7));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_trainer_use_device(tr3, -2, LORA_COMPUTE_BF16));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_trainer_use_device(NULL, -1, LORA_COMPUTE_BF16));
    /* The model itself on a device (or the CPU, where there is none). */
    CHECK_OK(lora_model_use_device(m, -1, LORA_COMPUTE_BF16));
    {
        lora_status s1 = lora_model_use_device(m, 0, LORA_COMPUTE_F32);
        CHECK(s1 == LORA_OK || s1 == LORA_ERR_CUDA_UNAVAILABLE);
        if (s1 == LORA_OK) CHECK_OK(lora_model_use_device(m, -1, LORA_COMPUTE_F32));
    }
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_model_use_device(m, 0, 7));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_model_use_device(m, -5, LORA_COMPUTE_BF16));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_model_use_device(NULL, -1, LORA_COMPUTE_BF16));
    {
        uint64_t copy = 0, in_use = 0, peak = 0;
        EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_model_device_memory(m, &copy, &in_use, &peak));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_model_device_memory(NULL, &copy, NULL, NULL));
        if (lora_model_use_device(m, 0, LORA_COMPUTE_BF16) == LORA_OK) {
            CHECK_OK(lora_model_device_memory(m, &copy, &in_use, &peak));
            CHECK(copy > 0 && in_use > 0 && peak >= in_use);
            CHECK_OK(lora_model_use_device(m, -1, LORA_COMPUTE_BF16));
        }
    }
    {
        /* The device copy's switches: refused off a device; on one, they
           round-trip (tests/cuda_train.rs covers them on a device). */
        int32_t v = -7;
        EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_model_set_device_option(m, LORA_DEVICE_RECOMPUTE, 0));
        EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_model_set_device_option(m, LORA_DEVICE_FOLD_ADAPTERS, 0));
        EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_model_device_option(m, LORA_DEVICE_TENSOR_CORE_ATTENTION, &v));
        CHECK(v == -7);
        EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_model_set_device_option(m, 99, 1));
        EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_model_set_device_option(m, LORA_DEVICE_BF16_ADAPTER_PRODUCTS, 2));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_model_device_option(NULL, LORA_DEVICE_RECOMPUTE, &v));
        if (lora_model_use_device(m, 0, LORA_COMPUTE_BF16) == LORA_OK) {
            CHECK_OK(lora_model_set_device_option(m, LORA_DEVICE_RECOMPUTE, 0));
            CHECK_OK(lora_model_device_option(m, LORA_DEVICE_RECOMPUTE, &v));
            CHECK(v == 0);
            CHECK_OK(lora_model_use_device(m, -1, LORA_COMPUTE_BF16));
        }
    }
    lora_step_result r3;
    CHECK_OK(lora_train_step(tr3, ids, NULL, B, T, &r3));
    {
        /* The trainer's generation (its adapter for every sequence) is
           lora_generate with that adapter named per sequence. */
        lora_generate_params tg = lora_generate_default_params();
        tg.max_new_tokens = 5;
        tg.stop_at_eos = 0;
        const int32_t *tp_[2] = {ids, ids + T};
        size_t tl[2] = {4, 7};
        const char *style2[2] = {"style", "style"};
        int32_t ot[10], og[10];
        size_t lt[2], lg[2];
        CHECK_OK(lora_trainer_generate(tr3, tp_, tl, 2, &tg, ot, 10, lt));
        CHECK_OK(lora_generate(m, tp_, tl, style2, 2, &tg, og, 10, lg));
        CHECK(lt[0] == 5 && lt[1] == 5 && lg[0] == 5 && lg[1] == 5);
        CHECK(memcmp(ot, og, sizeof ot) == 0);
        EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_trainer_generate(tr3, tp_, tl, 0, &tg, ot, 10, lt));
        EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_trainer_generate(tr3, tp_, tl, 2, &tg, ot, 9, lt));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_trainer_generate(tr3, tp_, tl, 2, &tg, NULL, 10, lt));
        EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_trainer_generate(NULL, tp_, tl, 2, &tg, ot, 10, lt));
        size_t zero[2] = {0, 3};
        EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_trainer_generate(tr3, tp_, zero, 2, &tg, ot, 10, lt));
    }
    lora_trainer_free(tr3);

    const char *both[2] = {"default", "style"};
    float mult[2] = {1.0f, 0.5f};
    CHECK_OK(lora_swap_adapter(m, both, mult, 2));
    CHECK_OK(lora_model_logits(m, ids, B, T, NULL, logits, B * T * V));
    CHECK_OK(lora_merge(m));
    EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_merge(m));
    CHECK_OK(lora_model_logits(m, ids, B, T, NULL, logits2, B * T * V));
    float maxd = 0;
    for (size_t i = 0; i < B * T * V; i++) {
        float d = fabsf(logits[i] - logits2[i]);
        maxd = d > maxd ? d : maxd;
    }
    CHECKF(maxd < 1e-4f, "merged vs unmerged max |Δ| %g", maxd);
    lora_generate_params gp = lora_generate_default_params();
    gp.max_new_tokens = 6;
    gp.stop_at_eos = 0;
    const int32_t *prompts[2] = {ids, ids + T};
    size_t plen[2] = {5, 9};
    int32_t out_m[12], out_u[12], out_x[12];
    size_t lens_m[2], lens_u[2], lens_x[2];
    CHECK_OK(lora_generate(m, prompts, plen, NULL, 2, &gp, out_m, 12, lens_m));
    const char *per_seq[2] = {"default", NULL};
    EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_generate(m, prompts, plen, per_seq, 2, &gp, out_x, 12, lens_x));
    CHECK_OK(lora_unmerge(m));
    CHECK_OK(lora_generate(m, prompts, plen, NULL, 2, &gp, out_u, 12, lens_u));
    CHECK(lens_m[0] == 6 && lens_u[1] == 6 && memcmp(out_m, out_u, sizeof out_m) == 0);
    /* Mixed batch: sequence 0 with "default", sequence 1 base only. */
    CHECK_OK(lora_generate(m, prompts, plen, per_seq, 2, &gp, out_x, 12, lens_x));
    const char *dflt = "default";
    CHECK_OK(lora_swap_adapter(m, &dflt, NULL, 1));
    CHECK_OK(lora_generate(m, prompts, plen, NULL, 1, &gp, out_u, 12, lens_u));
    CHECK(memcmp(out_x, out_u, 6 * sizeof(int32_t)) == 0);
    CHECK_OK(lora_swap_adapter(m, NULL, NULL, 0));
    CHECK_OK(lora_generate(m, prompts + 1, plen + 1, NULL, 1, &gp, out_u, 12, lens_u));
    CHECK(memcmp(out_x + 6, out_u, 6 * sizeof(int32_t)) == 0);

    /* Export merged, reload as a plain model: same logits as merged. */
    CHECK_OK(lora_swap_adapter(m, &dflt, NULL, 1));
    snprintf(path2, sizeof path2, "%s/merged", argv[2]);
    CHECK_OK(lora_model_export_merged(m, path2));
    lora_model *m3 = NULL;
    REQUIRE_OK(lora_model_load(ctx, path2, NULL, &m3));
    CHECK_OK(lora_model_logits(m, ids, B, T, NULL, logits, B * T * V));
    CHECK_OK(lora_model_logits(m3, ids, B, T, NULL, logits2, B * T * V));
    maxd = 0;
    for (size_t i = 0; i < B * T * V; i++) {
        float d = fabsf(logits[i] - logits2[i]);
        maxd = d > maxd ? d : maxd;
    }
    CHECKF(maxd < 1e-4f, "exported merged model max |Δ| %g", maxd);
    lora_model_free(m3);

    /* Bad input. */
    int32_t bad[B * T];
    memcpy(bad, ids, sizeof bad);
    bad[3] = V;
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_model_logits(m, bad, B, T, NULL, logits, B * T * V));
    EXPECT_ERR(LORA_ERR_BUFFER_SIZE, lora_model_logits(m, ids, B, T, NULL, logits, B * T * V - 1));
    EXPECT_ERR(LORA_ERR_NULL_POINTER, lora_model_logits(m, NULL, B, T, NULL, logits, B * T * V));
    EXPECT_ERR(LORA_ERR_INVALID_SHAPE, lora_model_logits(m, ids, 0, T, NULL, logits, 0));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_create(m, "default", NULL));
    cr = lora_create_default_params();
    cr.target_modules = "lm_head";
    EXPECT_ERR(LORA_ERR_UNSUPPORTED, lora_create(m, "head", &cr));
    cr.target_modules = "no_such_proj";
    EXPECT_ERR(LORA_ERR_UNSUPPORTED, lora_create(m, "none", &cr));
    cr = lora_create_default_params();
    cr.r = 0;
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_create(m, "r0", &cr));
    cr.struct_size = 3;
    EXPECT_ERR(LORA_ERR_STRUCT_SIZE, lora_create(m, "s", &cr));
    const char *ghost = "ghost";
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_swap_adapter(m, &ghost, NULL, 1));
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_trainer_new(m, "ghost", NULL, &tr));
    snprintf(path2, sizeof path2, "%s/nowhere", argv[2]);
    EXPECT_ERR(LORA_ERR_IO, lora_model_load(ctx, path2, NULL, &m3));
    EXPECT_ERR(LORA_ERR_IO, lora_adapter_load(m, path2, "x"));
    REQUIRE_OK(lora_trainer_new(m, "default", NULL, &tr));
    int32_t none[B * T];
    for (size_t i = 0; i < B * T; i++) none[i] = -100;
    EXPECT_ERR(LORA_ERR_INVALID_ARGUMENT, lora_train_step(tr, ids, none, B, T, NULL));
    EXPECT_ERR(LORA_ERR_INVALID_SHAPE, lora_train_step(tr, ids, NULL, B, 1, NULL));
    /* Cancel from the progress callback: weights unchanged. */
    lora_trainer_free(tr);
    int calls = 0;
    lora_trainer_params tp = lora_trainer_default_params();
    tp.micro_batch = 1;
    tp.progress = cancel_after_first;
    tp.progress_user = &calls;
    REQUIRE_OK(lora_trainer_new(m, "default", &tp, &tr));
    CHECK_OK(lora_model_logits(m, ids, B, T, NULL, logits, B * T * V));
    EXPECT_ERR(LORA_ERR_CANCELLED, lora_train_step(tr, ids, NULL, B, T, NULL));
    CHECK(calls == 1);
    CHECK_OK(lora_model_logits(m, ids, B, T, NULL, logits2, B * T * V));
    CHECK(memcmp(logits, logits2, sizeof(float) * B * T * V) == 0);
    CHECK_OK(lora_swap_adapter(m, NULL, NULL, 0));
    EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_train_step(tr, ids, NULL, B, T, NULL));
    CHECK_OK(lora_swap_adapter(m, &dflt, NULL, 1));
    CHECK_OK(lora_merge(m));
    EXPECT_ERR(LORA_ERR_INVALID_STATE, lora_train_step(tr, ids, NULL, B, T, NULL));
    lora_trainer_free(tr);

    /* Paged optimizer state under a budget far below the state's size:
     * the same adapter as with resident state, bit for bit, and the
     * context's paging statistics show pages moving out and in. */
    {
        lora_paging_params pp = lora_paging_default_params();
        pp.budget_bytes = 1;
        pp.dir = argv[2];
        CHECK_OK(lora_context_set_paging(ctx, &pp));
        float *la = malloc(sizeof(float) * B * T * V), *lb = malloc(sizeof(float) * B * T * V);
        REQUIRE(la && lb);
        for (int paged = 0; paged < 2; paged++) {
            lora_model *pm = NULL;
            snprintf(path, sizeof path, "%s/model", argv[1]);
            REQUIRE_OK(lora_model_load(ctx, path, &mp, &pm));
            snprintf(path, sizeof path, "%s/adapter", argv[1]);
            REQUIRE_OK(lora_adapter_load(pm, path, "default"));
            lora_trainer_params pt = lora_trainer_default_params();
            pt.lr = 1e-2;
            pt.paged_state = paged ? LORA_PAGED_STATE_ON : LORA_PAGED_STATE_OFF;
            lora_trainer *pt_tr = NULL;
            REQUIRE_OK(lora_trainer_new(pm, "default", &pt, &pt_tr));
            for (int i = 0; i < 3; i++) CHECK_OK(lora_train_step(pt_tr, ids, labels, B, T, NULL));
            CHECK_OK(lora_model_logits(pm, ids, B, T, NULL, paged ? lb : la, B * T * V));
            if (paged) {
                lora_paged_stats ps;
                memset(&ps, 0, sizeof ps);
                ps.struct_size = sizeof ps;
                CHECK_OK(lora_context_paged_stats(ctx, &ps));
                CHECKF(ps.page_outs > 0 && ps.page_ins > 0, "page-outs %llu, page-ins %llu", (unsigned long long)ps.page_outs, (unsigned long long)ps.page_ins);
            }
            lora_trainer_free(pt_tr);
            lora_model_free(pm);
        }
        CHECK(memcmp(la, lb, sizeof(float) * B * T * V) == 0);
        free(la);
        free(lb);
        pp = lora_paging_default_params();
        CHECK_OK(lora_context_set_paging(ctx, &pp));
    }

    /* The model may be freed before its trainer. */
    lora_model_free(m);
    lora_model_free(m2);
    lora_step_result r4;
    CHECK_OK(lora_train_step(tr2, ids, labels, B, T, &r4));
    CHECK(r4.step == 8); /* resumed after 5: one step, one micro-batched, this one */
    lora_trainer_free(tr2);
    free(logits);
    free(logits2);
    st_close(&data);
    st_close(&exp);
    lora_context_free(ctx);
    return check_exit_code();
}
