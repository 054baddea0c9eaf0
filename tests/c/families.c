/*
 * Model families beyond Llama (Gemma 1/2/3, Granite, Phi-3, OLMo 2,
 * SmolLM3) through the C API, against the transformers
 * + PEFT fixtures of tests/fixtures/model (scripts/fixtures/gen_model.py):
 * for each case directory, the PEFT adapter's logits and loss, five AdamW
 * steps' losses, a checkpoint resumed on a fresh model (the next step
 * identical), and the merged export reloaded (the same logits).
 *
 * Usage: families SCRATCH_DIR CASE_DIR...
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "model_fixture.h"
#include "st_reader.h"

static double rel_err_f(const float *a, const float *b, size_t n) {
    double e = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        e += d * d;
        r += (double)b[i] * b[i];
    }
    return sqrt(e / (r > 0 ? r : 1));
}

static void one_case(lora_context *ctx, const char *dir, const char *scratch) {
    char path[4096], path2[4096];
    st_file data, exp;
    snprintf(path, sizeof path, "%s/data.safetensors", dir);
    REQUIRE(st_open(path, &data) == NULL);
    snprintf(path, sizeof path, "%s/expected.safetensors", dir);
    REQUIRE(st_open(path, &exp) == NULL);
    int32_t ids[B * T], labels[B * T];
    fixture_batch(&data, ids, labels, B * T);
    float *logits = malloc(sizeof(float) * B * T * V), *logits2 = malloc(sizeof(float) * B * T * V);
    REQUIRE(logits && logits2);

    lora_model *m = NULL;
    snprintf(path, sizeof path, "%s/model", dir);
    REQUIRE_OK(lora_model_load(ctx, path, NULL, &m));
    lora_model_info info;
    CHECK_OK(lora_model_get_info(m, &info));
    CHECK(info.n_layers == 2 && info.vocab_size == V && info.quantized == 0);
    snprintf(path, sizeof path, "%s/adapter", dir);
    REQUIRE_OK(lora_adapter_load(m, path, "default"));
    CHECK_OK(lora_model_logits(m, ids, B, T, NULL, logits, B * T * V));
    double e = fixture_rel_err(logits, st_get(&exp, "logits"), B * T * V);
    CHECKF(e <= FWD_REL, "%s: logits rel err %.3e", dir, e);
    float loss = 0;
    CHECK_OK(lora_model_loss(m, ids, labels, B, T, &loss));
    double wloss = st_f32_at(st_get(&exp, "loss")->data, 0);
    CHECKF(fabs(loss - wloss) <= 1e-5 * fabs(wloss), "%s: loss %f vs %f", dir, loss, wloss);

    lora_step_result steps[5];
    lora_trainer *tr = fixture_five_steps(m, &exp, ids, labels, dir, steps);

    /* Checkpoint, resume on a fresh model: the next step is the same. */
    snprintf(path2, sizeof path2, "%s/ckpt", scratch);
    CHECK_OK(lora_trainer_save(tr, path2));
    lora_model *m2 = NULL;
    snprintf(path, sizeof path, "%s/model", dir);
    REQUIRE_OK(lora_model_load(ctx, path, NULL, &m2));
    lora_trainer *tr2 = NULL;
    REQUIRE_OK(lora_trainer_resume(m2, path2, NULL, &tr2));
    lora_step_result r1, r2;
    CHECK_OK(lora_train_step(tr, ids, labels, B, T, &r1));
    CHECK_OK(lora_train_step(tr2, ids, labels, B, T, &r2));
    CHECKF(r1.loss == r2.loss && r1.grad_norm == r2.grad_norm, "%s: resumed step differs", dir);

    /* The merged export reloads to the same logits. */
    CHECK_OK(lora_model_logits(m, ids, B, T, NULL, logits, B * T * V));
    snprintf(path2, sizeof path2, "%s/merged", scratch);
    CHECK_OK(lora_model_export_merged(m, path2));
    lora_model *m3 = NULL;
    REQUIRE_OK(lora_model_load(ctx, path2, NULL, &m3));
    CHECK_OK(lora_model_logits(m3, ids, B, T, NULL, logits2, B * T * V));
    e = rel_err_f(logits2, logits, B * T * V);
    CHECKF(e <= FWD_REL, "%s: merged export reloaded: rel err %.3e", dir, e);

    lora_trainer_free(tr);
    lora_trainer_free(tr2);
    lora_model_free(m);
    lora_model_free(m2);
    lora_model_free(m3);
    free(logits);
    free(logits2);
    st_close(&data);
    st_close(&exp);
    printf("%s: ok\n", dir);
}

int main(int argc, char **argv) {
    REQUIRE(argc >= 3);
    lora_context_params cp = lora_context_default_params();
    cp.backend = LORA_BACKEND_CPU;
    cp.n_threads = 2;
    lora_context *ctx = NULL;
    REQUIRE_OK(lora_context_new(&cp, &ctx));
    for (int i = 2; i < argc; i++) one_case(ctx, argv[i], argv[1]);
    lora_context_free(ctx);
    return check_exit_code();
}
