/*
 * liblora demo: hot-swapping LoRA adapters on one base model, from C.
 *
 *   swap [MODEL_DIR [TEXT_A TEXT_B [OUT_DIR]]]
 *
 * Defaults: models/default, data/finetune.txt (verse), data/pretrain.txt
 * (prose), build/swap. Trains two small adapters on the two texts (a few
 * steps each), saves them in PEFT's format, then does what a server does:
 * loads the base once (NF4), loads both adapters from disk and switches
 * between them per request -- by swapping the active adapter, merged or
 * not, and with one adapter per sequence in a single batch.
 *
 * Environment: LORA_SWAP_STEPS (default 30).
 */
#define _POSIX_C_SOURCE 199309L
#include "lora.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SEQ 64
#define BATCH 4
#define NEW 48

static void check(lora_status st, const char *what) {
    if (st != LORA_OK) {
        char msg[512];
        lora_last_error(msg, sizeof msg);
        fprintf(stderr, "%s failed: %s (%s)\n", what, lora_status_str(st), msg);
        exit(1);
    }
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The token ids of a text file (exits on error). */
static int32_t *encode_file(const lora_tokenizer *tok, const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    size_t len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc(len + 1);
    if (!text || fread(text, 1, len, f) != len) exit(1);
    fclose(f);
    lora_status st = lora_tokenizer_encode(tok, text, len, 0, NULL, 0, n);
    if (st != LORA_ERR_BUFFER_SIZE) check(st, "lora_tokenizer_encode");
    int32_t *ids = malloc(*n * sizeof *ids);
    check(lora_tokenizer_encode(tok, text, len, 0, ids, *n, n), "lora_tokenizer_encode");
    free(text);
    if (*n < (size_t)BATCH * SEQ * 2) {
        fprintf(stderr, "%s is too short\n", path);
        exit(1);
    }
    return ids;
}

static void print_tokens(const lora_tokenizer *tok, const char *label, const int32_t *ids, size_t n) {
    char buf[8 * (16 + NEW)];
    size_t need = 0;
    check(lora_tokenizer_decode(tok, ids, n, 1, buf, sizeof buf, &need), "lora_tokenizer_decode");
    for (char *p = buf; *p; p++)
        if (*p == '\n') *p = ' ';
    printf("  %-9s| %s\n", label, buf);
}

/* Trains adapter `name` for `steps` steps on consecutive windows of `ids`. */
static void train(lora_model *m, const char *name, const int32_t *ids, size_t n, int steps) {
    lora_trainer_params tp = lora_trainer_default_params();
    tp.lr = 3e-3;
    lora_trainer *tr = NULL;
    check(lora_trainer_new(m, name, &tp, &tr), "lora_trainer_new");
    lora_step_result r = {0};
    double first = 0;
    for (int s = 0; s < steps; s++) {
        size_t at = ((size_t)s * BATCH * SEQ) % (n - (size_t)BATCH * SEQ);
        check(lora_train_step(tr, ids + at, NULL, BATCH, SEQ, &r), "lora_train_step");
        if (s == 0) first = r.loss;
    }
    printf("trained '%s': %d steps, loss %.3f -> %.3f\n", name, steps, first, r.loss);
    lora_trainer_free(tr);
}

int main(int argc, char **argv) {
    const char *model_dir = argc > 1 ? argv[1] : "models/default";
    const char *text_a = argc > 3 ? argv[2] : "data/finetune.txt";
    const char *text_b = argc > 3 ? argv[3] : "data/pretrain.txt";
    const char *out_dir = argc > 4 ? argv[4] : "build/swap";
    int steps = getenv("LORA_SWAP_STEPS") ? atoi(getenv("LORA_SWAP_STEPS")) : 30;
    if (steps < 1) steps = 1;

    lora_context_params cp = lora_context_default_params();
    cp.backend = LORA_BACKEND_CPU;
    cp.seed = 1;
    lora_context *ctx = NULL;
    check(lora_context_new(&cp, &ctx), "lora_context_new");
    lora_model_params mp = lora_model_default_params();
    mp.quantize = LORA_QUANT_NF4;
    lora_tokenizer *tok = NULL;
    check(lora_tokenizer_load(model_dir, &tok), "lora_tokenizer_load");
    size_t na = 0, nb = 0;
    int32_t *a = encode_file(tok, text_a, &na), *b = encode_file(tok, text_b, &nb);

    /* 1. Make two adapters and save them (PEFT format). */
    char dir_a[4096], dir_b[4096];
    snprintf(dir_a, sizeof dir_a, "%s/verse", out_dir);
    snprintf(dir_b, sizeof dir_b, "%s/prose", out_dir);
    {
        lora_model *m = NULL;
        check(lora_model_load(ctx, model_dir, &mp, &m), "lora_model_load");
        check(lora_create(m, "verse", NULL), "lora_create");
        check(lora_create(m, "prose", NULL), "lora_create");
        train(m, "verse", a, na, steps);
        train(m, "prose", b, nb, steps);
        check(lora_adapter_save(m, "verse", dir_a), "lora_adapter_save");
        check(lora_adapter_save(m, "prose", dir_b), "lora_adapter_save");
        lora_model_free(m);
    }

    /* 2. A server: one NF4 base, both adapters loaded from disk. */
    lora_model *m = NULL;
    check(lora_model_load(ctx, model_dir, &mp, &m), "lora_model_load");
    check(lora_adapter_load(m, dir_a, "verse"), "lora_adapter_load");
    check(lora_adapter_load(m, dir_b, "prose"), "lora_adapter_load");
    printf("\nloaded %s and %s onto one base\n", dir_a, dir_b);

    /* Held-out windows of each text (past what training saw). */
    const int32_t *held_a = a + na - SEQ, *held_b = b + nb - SEQ;
    const char *prompt = "The ";
    int32_t pids[16];
    size_t plen = 0;
    check(lora_tokenizer_encode(tok, prompt, strlen(prompt), 0, pids, 16, &plen), "lora_tokenizer_encode");
    lora_generate_params gp = lora_generate_default_params();
    gp.max_new_tokens = NEW;
    const int32_t *prompts[3] = {pids, pids, pids};
    size_t plens[3] = {plen, plen, plen}, olens[3];
    int32_t out[3 * NEW], seq[16 + NEW];

    printf("\nswap the active adapter (unmerged): held-out loss on verse / prose, greedy text\n");
    const char *names[3] = {"verse", "prose", NULL};
    for (int i = 0; i < 3; i++) {
        double t = now();
        check(lora_swap_adapter(m, &names[i], NULL, names[i] ? 1 : 0), "lora_swap_adapter");
        double t_swap = now() - t;
        float la, lb;
        check(lora_model_loss(m, held_a, NULL, 1, SEQ, &la), "lora_model_loss");
        check(lora_model_loss(m, held_b, NULL, 1, SEQ, &lb), "lora_model_loss");
        check(lora_generate(m, prompts, plens, NULL, 1, &gp, out, NEW, olens), "lora_generate");
        printf("  %-5s  loss %.3f / %.3f  (swap %.3f ms)\n", names[i] ? names[i] : "base", la, lb, 1e3 * t_swap);
        memcpy(seq, pids, plen * sizeof *seq);
        memcpy(seq + plen, out, olens[0] * sizeof *seq);
        print_tokens(tok, names[i] ? names[i] : "base", seq, plen + olens[0]);
    }

    printf("\nmerged: each swap re-derives W0 + s*B*A, then inference runs at base speed\n");
    check(lora_swap_adapter(m, &names[0], NULL, 1), "lora_swap_adapter");
    check(lora_merge(m), "lora_merge");
    for (int i = 1; i >= 0; i--) {
        double t = now();
        check(lora_swap_adapter(m, &names[i], NULL, 1), "lora_swap_adapter");
        printf("  swapped to '%s' merged in %.2f ms\n", names[i], 1e3 * (now() - t));
    }
    check(lora_unmerge(m), "lora_unmerge");

    printf("\none batch, one adapter per sequence (verse, prose, base)\n");
    check(lora_generate(m, prompts, plens, names, 3, &gp, out, 3 * NEW, olens), "lora_generate");
    for (int i = 0; i < 3; i++) {
        memcpy(seq, pids, plen * sizeof *seq);
        memcpy(seq + plen, out + i * NEW, olens[i] * sizeof *seq);
        print_tokens(tok, names[i] ? names[i] : "base", seq, plen + olens[i]);
    }
    printf("swap demo done\n");

    lora_model_free(m);
    lora_tokenizer_free(tok);
    lora_context_free(ctx);
    free(a);
    free(b);
    return 0;
}
