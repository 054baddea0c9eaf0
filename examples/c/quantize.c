/*
 * liblora demo: quantize a weight matrix to NF4 with double quantization
 * (QLoRA's storage format), measure the error, save it in the
 * bitsandbytes/transformers checkpoint layout and load it back.
 *
 *   make demo            (builds liblora and runs this program)
 *   ./build/quantize [rows cols blocksize]
 */
#define _POSIX_C_SOURCE 199309L
#include "lora.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Fails loudly with the library's own explanation. */
static void check(lora_status st, const char *what) {
    if (st != LORA_OK) {
        char msg[512];
        lora_last_error(msg, sizeof msg);
        fprintf(stderr, "%s failed: %s (%s)\n", what, lora_status_str(st), msg);
        exit(1);
    }
}

/* Deterministic Gaussian-ish weights (sum of uniforms), like a trained
 * linear layer's, with a few outliers. */
static void fill_weights(float *w, size_t n) {
    uint64_t s = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < n; i++) {
        double acc = 0.0;
        for (int k = 0; k < 4; k++) {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            acc += (double)(s >> 11) / 9007199254740992.0 - 0.5;
        }
        w[i] = (float)(acc * 0.035);
        if (i % 9973 == 0) w[i] *= 12.0f; /* outliers */
    }
}

int main(int argc, char **argv) {
    size_t rows = argc > 1 ? (size_t)strtoull(argv[1], NULL, 10) : 4096;
    size_t cols = argc > 2 ? (size_t)strtoull(argv[2], NULL, 10) : 4096;
    unsigned bs = argc > 3 ? (unsigned)strtoul(argv[3], NULL, 10) : 64;

    if ((lora_version() >> 16) != LORA_VERSION_MAJOR) {
        fprintf(stderr, "liblora ABI %u does not match this header's %u\n", lora_version() >> 16, LORA_VERSION_MAJOR);
        return 1;
    }
    printf("liblora %s\n", lora_version_string());

    lora_context_params cp = lora_context_default_params();
    cp.backend = LORA_BACKEND_CPU;
    lora_context *ctx = NULL;
    check(lora_context_new(&cp, &ctx), "lora_context_new");
    char dev[128];
    check(lora_context_describe(ctx, dev, sizeof dev, NULL), "lora_context_describe");
    printf("device: %s\n", dev);

    size_t n = rows * cols;
    float *w = malloc(n * sizeof *w), *back = malloc(n * sizeof *back);
    if (!w || !back) { fprintf(stderr, "out of memory\n"); return 1; }
    fill_weights(w, n);
    size_t shape[2] = {rows, cols};

    for (int dq = 0; dq <= 1; dq++) {
        lora_nf4_params qp = lora_nf4_default_params();
        qp.blocksize = bs;
        qp.double_quant = (uint32_t)dq;
        lora_nf4 *q = NULL;
        double t0 = now();
        check(lora_quantize_nf4(ctx, w, n * sizeof *w, LORA_DTYPE_F32, shape, 2, &qp, &q), "lora_quantize_nf4");
        double t1 = now();
        check(lora_nf4_dequantize(ctx, q, LORA_DTYPE_F32, back, n * sizeof *back), "lora_nf4_dequantize");
        double t2 = now();

        double err2 = 0, ref2 = 0, maxerr = 0;
        for (size_t i = 0; i < n; i++) {
            double d = (double)back[i] - (double)w[i];
            err2 += d * d;
            ref2 += (double)w[i] * w[i];
            if (fabs(d) > maxerr) maxerr = fabs(d);
        }
        lora_nf4_info info;
        check(lora_nf4_get_info(q, &info), "lora_nf4_get_info");
        printf("\n%zux%zu fp32, NF4 blocksize %u, double quantization %s\n", rows, cols, bs, dq ? "on" : "off");
        printf("  quantize   %8.1f ms  (%.2f G elements/s)\n", 1e3 * (t1 - t0), (double)n / (t1 - t0) / 1e9);
        printf("  dequantize %8.1f ms  (%.2f G elements/s)\n", 1e3 * (t2 - t1), (double)n / (t2 - t1) / 1e9);
        printf("  relative RMS error %.4f, max abs error %.5f\n", sqrt(err2 / ref2), maxerr);
        printf("  %zu bytes for %zu weights: %.3f bits per weight (fp32: 32, bf16: 16)\n", info.footprint_bytes, info.numel, info.bits_per_weight);

        if (dq) {
            const char *path = "build/demo_nf4.safetensors";
            const char *prefix = "model.layers.0.mlp.up_proj";
            const lora_nf4 *ts[1] = {q};
            check(lora_nf4_save(path, &prefix, ts, 1), "lora_nf4_save");
            lora_nf4 *r = NULL;
            check(lora_nf4_load(path, prefix, &r), "lora_nf4_load");
            const uint8_t *a, *b;
            size_t la, lb;
            check(lora_nf4_packed(q, &a, &la), "lora_nf4_packed");
            check(lora_nf4_packed(r, &b, &lb), "lora_nf4_packed");
            int same = la == lb && memcmp(a, b, la) == 0;
            printf("  saved as %s.weight{,.absmax,.quant_map,.nested_absmax,.nested_quant_map,.quant_state.bitsandbytes__nf4}\n", prefix);
            printf("  in %s (bitsandbytes layout); reloaded: %s\n", path, same ? "identical" : "DIFFERENT");
            lora_nf4_free(r);
            if (!same) return 1;
        }
        lora_nf4_free(q);
    }
    free(w);
    free(back);
    lora_context_free(ctx);
    return 0;
}
