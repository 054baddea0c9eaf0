/*
 * Shared by the C programs that read tests/fixtures/model cases
 * (scripts/fixtures/gen_model.py): the batch's token ids and labels, and
 * the fixtures' training settings.
 */
#ifndef LORA_TEST_MODEL_FIXTURE_H
#define LORA_TEST_MODEL_FIXTURE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "st_reader.h"

/* Every case: a batch of 2 × 16 tokens over a vocabulary of 256. */
#define B 2
#define T 16
#define V 256

/* Same named bound as tests/model.rs: fp32 forward with different
 * summation orders (measured ≤ 8e-7). */
#define FWD_REL 1e-5

/* Relative L2 error of `a` against the fixture tensor `t` (f32, n values). */
static inline double fixture_rel_err(const float *a, const st_tensor *t, size_t n) {
    double e = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        double y = st_f32_at(t->data, i), d = a[i] - y;
        e += d * d;
        r += y * y;
    }
    return sqrt(e / (r > 0 ? r : 1));
}

/* input_ids and labels (I64 [n]) of data.safetensors, as int32. */
static inline void fixture_batch(const st_file *data, int32_t *ids, int32_t *labels, size_t n) {
    const st_tensor *ti = st_get(data, "input_ids"), *tl = st_get(data, "labels");
    REQUIRE(ti && tl);
    for (size_t i = 0; i < n; i++) {
        int64_t a, b;
        memcpy(&a, ti->data + 8 * i, 8);
        memcpy(&b, tl->data + 8 * i, 8);
        ids[i] = (int32_t)a;
        labels[i] = (int32_t)b;
    }
}

/* The fixtures' five steps: AdamW lr 1e-2, weight decay 0.01, clipping at 1. */
static inline lora_trainer_params fixture_trainer_params(void) {
    lora_trainer_params tp = lora_trainer_default_params();
    tp.lr = 1e-2;
    tp.weight_decay = 0.01;
    tp.max_grad_norm = 1.0;
    return tp;
}

/* A trainer of adapter "default" with the fixture's settings, run for the
 * fixture's five steps; each step's loss checked against train_losses and
 * its result kept in out[5]. */
static inline lora_trainer *fixture_five_steps(lora_model *m, const st_file *exp, const int32_t *ids, const int32_t *labels, const char *what, lora_step_result out[5]) {
    lora_trainer_params tp = fixture_trainer_params();
    lora_trainer *tr = NULL;
    REQUIRE_OK(lora_trainer_new(m, "default", &tp, &tr));
    const st_tensor *tl = st_get(exp, "train_losses");
    REQUIRE(tl);
    for (int i = 0; i < 5; i++) {
        CHECK_OK(lora_train_step(tr, ids, labels, B, T, &out[i]));
        double want = st_f32_at(tl->data, (size_t)i);
        CHECKF(fabs(out[i].loss - want) <= 1e-5 * fabs(want), "%s: step %d loss %f vs %f", what, i, out[i].loss, want);
    }
    return tr;
}

#endif
