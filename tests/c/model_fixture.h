/*
 * Shared by the C programs that read tests/fixtures/model cases
 * (scripts/fixtures/gen_model.py): the batch's token ids and labels, and
 * the fixtures' training settings.
 */
#ifndef LORA_TEST_MODEL_FIXTURE_H
#define LORA_TEST_MODEL_FIXTURE_H

#include <stdint.h>
#include <string.h>

#include "check.h"
#include "st_reader.h"

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

#endif
