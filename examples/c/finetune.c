/*
 * liblora's main demo: QLoRA fine-tuning from C, on the CPU.
 *
 *   finetune [MODEL_DIR [TEXT [OUT_DIR]]]
 *
 * Defaults: the embedded byte-level model models/default (a small LLaMA
 * pretrained on Jane Austen, see models/default/README.md), the verse in
 * data/finetune.txt (Shakespeare's sonnets), output in build/demo. Any
 * supported Hugging Face model directory (Llama, Mistral, Qwen2 with a
 * tokenizer.json) works in place of the default.
 *
 * It loads the model, quantizes every linear layer to NF4 with double
 * quantization, attaches a LoRA adapter to all linear layers, prints a
 * generation, fine-tunes on the text with a progress line per step,
 * saves the adapter in PEFT's format, prints the generation again, checks
 * that merged and unmerged outputs agree, then trains a second adapter on
 * another style (dialogue lines of the pretraining text) and hot-swaps
 * between the two, merged and in one mixed batch.
 *
 * Environment: LORA_DEMO_STEPS (default 200), LORA_DEMO_THREADS (default:
 * all cores), LORA_DEMO_DEVICE (a CUDA device index: the model goes to
 * that GPU with lora_model_use_device, bf16 compute, so generation, merges,
 * swaps and the mixed batch run there, and each trainer trains there with
 * lora_trainer_use_device; without a usable GPU the demo says so and runs
 * on the CPU).
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lora.h"

#define SEQ 128
#define BATCH 8
#define GEN_TOKENS 160

static lora_context *ctx;
static lora_model *model;
static lora_tokenizer *tok;

static void die(const char *what, lora_status st) {
    char msg[1024];
    lora_last_error(msg, sizeof msg);
    fprintf(stderr, "error: %s: %s (%s)\n", what, lora_status_str(st), msg);
    exit(1);
}

#define TRY(call)                          \
    do {                                   \
        lora_status st_ = (call);          \
        if (st_ != LORA_OK) die(#call, st_); \
    } while (0)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "error: cannot open %s\n", path);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "error: cannot read %s\n", path);
        exit(1);
    }
    buf[n] = 0;
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* Token ids of a text (no BOS: windows are cut from running text). */
static int32_t *encode(const char *text, size_t len, size_t *n) {
    size_t need = 0;
    lora_status st = lora_tokenizer_encode(tok, text, len, 0, NULL, 0, &need);
    if (st != LORA_OK && st != LORA_ERR_BUFFER_SIZE) die("lora_tokenizer_encode", st);
    int32_t *ids = malloc((need + 1) * sizeof *ids);
    TRY(lora_tokenizer_encode(tok, text, len, 0, ids, need, n));
    return ids;
}

static void print_text(const char *label, const int32_t *ids, size_t n) {
    size_t need = 0;
    lora_tokenizer_decode(tok, ids, n, 1, NULL, 0, &need);
    char *s = malloc(need + 1);
    TRY(lora_tokenizer_decode(tok, ids, n, 1, s, need + 1, &need));
    printf("  %s\n    | ", label);
    for (const char *p = s; *p; p++) {
        putchar(*p);
        if (*p == '\n') printf("    | ");
    }
    printf("\n");
    free(s);
}

/* Generates from `prompt` with the model's current adapters and prints it. */
static void show(const char *label, const char *prompt, float temperature, uint64_t seed) {
    size_t n = 0;
    int32_t *p = encode(prompt, strlen(prompt), &n);
    lora_generate_params gp = lora_generate_default_params();
    gp.max_new_tokens = GEN_TOKENS;
    gp.temperature = temperature;
    gp.top_p = 0.95f;
    gp.seed = seed;
    int32_t out[GEN_TOKENS + 512];
    size_t out_len = 0;
    const int32_t *prompts[1] = {p};
    TRY(lora_generate(model, prompts, &n, NULL, 1, &gp, out, GEN_TOKENS, &out_len));
    int32_t *all = malloc((n + out_len) * sizeof *all);
    memcpy(all, p, n * sizeof *all);
    memcpy(all + n, out, out_len * sizeof *all);
    print_text(label, all, n + out_len);
    free(all);
    free(p);
}

/* xorshift64*: the demo's own data sampling, seeded. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

/* The CUDA device the model is on (LORA_DEMO_DEVICE), or -1. */
static int gpu = -1;

/* Trains `adapter` for `steps` steps on random windows of `ids`. */
static void train(const char *adapter, const int32_t *ids, size_t n_ids, int steps, double lr) {
    lora_trainer_params tp = lora_trainer_default_params();
    tp.lr = lr;
    tp.schedule = LORA_SCHEDULE_COSINE;
    tp.warmup_steps = (uint64_t)(steps / 10);
    tp.total_steps = (uint64_t)steps;
    tp.max_grad_norm = 1.0;
    lora_trainer *tr = NULL;
    TRY(lora_trainer_new(model, adapter, &tp, &tr));
    if (gpu >= 0) {
        TRY(lora_trainer_use_device(tr, gpu, LORA_COMPUTE_BF16));
        printf("  [%s] training on CUDA device %d (bf16 compute)\n", adapter, gpu);
    }
    int32_t batch[BATCH * SEQ];
    double t0 = now(), first = 0, last = 0;
    for (int s = 0; s < steps; s++) {
        for (int b = 0; b < BATCH; b++) {
            size_t at = (size_t)(rnd() % (n_ids - SEQ));
            memcpy(batch + b * SEQ, ids + at, SEQ * sizeof *batch);
        }
        lora_step_result r;
        TRY(lora_train_step(tr, batch, NULL, BATCH, SEQ, &r));
        if (s == 0) first = r.loss;
        last = r.loss;
        double el = now() - t0, eta = el / (s + 1) * (steps - s - 1);
        printf("  [%s] step %3d/%d  loss %.4f  grad-norm %.3f  lr %.2e  %6.0f tok/s  ETA %d:%02d\n", adapter, s + 1, steps, r.loss, r.grad_norm, r.lr,
               r.tokens_per_s, (int)eta / 60, (int)eta % 60);
        fflush(stdout);
    }
    printf("  [%s] loss %.4f -> %.4f in %.1f s\n", adapter, first, last, now() - t0);
    lora_memory_stats ms;
    TRY(lora_model_memory(model, tr, &ms));
    printf("  memory: base %.2f MB (NF4 %.3f bits/weight), adapters %.2f MB, optimizer %.2f MB, activations %.2f MB, peak %.2f MB\n", ms.base_weights / 1e6,
           ms.quantized_weights ? 8.0 * (double)ms.base_quantized / (double)ms.quantized_weights : 0.0, ms.adapters / 1e6, ms.optimizer / 1e6,
           ms.activations / 1e6, ms.peak / 1e6);
    if (gpu >= 0) {
        uint64_t copy = 0, in_use = 0, peak = 0;
        TRY(lora_model_device_memory(model, &copy, &in_use, &peak));
        printf("  device memory: model copy %.2f MB, in use %.2f MB, peak %.2f MB\n", copy / 1e6, in_use / 1e6, peak / 1e6);
    }
    lora_trainer_free(tr);
}

/* The paragraphs of `text` that are dialogue (start with a quote mark). */
static char *dialogue(const char *text, size_t len, size_t *out_len) {
    char *out = malloc(len + 1);
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        size_t j = i;
        while (j < len && !(text[j] == '\n' && j + 1 < len && text[j + 1] == '\n')) j++;
        if (text[i] == '"') {
            memcpy(out + o, text + i, j - i);
            o += j - i;
            out[o++] = '\n';
            out[o++] = '\n';
        }
        i = j + 2;
    }
    out[o] = 0;
    *out_len = o;
    return out;
}

int main(int argc, char **argv) {
    const char *model_dir = argc > 1 ? argv[1] : "models/default";
    const char *text_path = argc > 2 ? argv[2] : "data/finetune.txt";
    const char *out_dir = argc > 3 ? argv[3] : "build/demo";
    int steps = getenv("LORA_DEMO_STEPS") ? atoi(getenv("LORA_DEMO_STEPS")) : 200;
    if (steps < 1) steps = 1;
    double t_start = now();

    lora_context_params cp = lora_context_default_params();
    cp.backend = LORA_BACKEND_CPU;
    cp.n_threads = getenv("LORA_DEMO_THREADS") ? (uint32_t)atoi(getenv("LORA_DEMO_THREADS")) : 0;
    cp.seed = 1234;
    TRY(lora_context_new(&cp, &ctx));

    printf("== liblora %s: QLoRA fine-tuning demo\n", lora_version_string());
    lora_model_params mp = lora_model_default_params();
    mp.quantize = LORA_QUANT_NF4; /* blocksize 64, double quantization */
    double t = now();
    TRY(lora_model_load(ctx, model_dir, &mp, &model));
    TRY(lora_tokenizer_load(model_dir, &tok));
    lora_model_info info;
    TRY(lora_model_get_info(model, &info));
    lora_memory_stats ms;
    TRY(lora_model_memory(model, NULL, &ms));
    printf("model %s: %u layers, hidden %u, %u heads (%u KV), vocab %u; loaded and quantized to NF4 in %.2f s\n", model_dir, info.n_layers, info.hidden_size,
           info.n_heads, info.n_kv_heads, info.vocab_size, now() - t);
    printf("  base weights %.2f MB, of which NF4 %.2f MB for %llu weights = %.3f bits/weight\n", ms.base_weights / 1e6, ms.base_quantized / 1e6,
           (unsigned long long)ms.quantized_weights, 8.0 * (double)ms.base_quantized / (double)ms.quantized_weights);

    lora_create_params cr = lora_create_default_params();
    cr.r = 8;
    cr.alpha = 16;
    cr.target_modules = "all-linear";
    TRY(lora_create(model, "verse", &cr));
    char summary[256];
    TRY(lora_model_trainable_summary(model, summary, sizeof summary, NULL));
    printf("adapter 'verse' on all linear layers (r 8, alpha 16): %s\n", summary);
    const char *dev = getenv("LORA_DEMO_DEVICE");
    if (dev && *dev) {
        lora_status st = lora_model_use_device(model, atoi(dev), LORA_COMPUTE_BF16);
        if (st == LORA_OK) {
            gpu = atoi(dev);
            printf("model on CUDA device %d (bf16 compute): generation, training, merges and swaps run there\n", gpu);
        } else if (st == LORA_ERR_CUDA_UNAVAILABLE) {
            char why[256];
            lora_last_error(why, sizeof why);
            printf("no usable GPU (%s): everything runs on the CPU\n", why);
        } else {
            TRY(st);
        }
    }

    const char *prompt = "When I consider";
    printf("\n== before fine-tuning (sampled at T=0.8, then greedy)\n");
    show("base model, sampled:", prompt, 0.8f, 7);
    show("base model, greedy:", prompt, 0.0f, 0);

    size_t text_len = 0, n_ids = 0;
    char *text = read_file(text_path, &text_len);
    int32_t *ids = encode(text, text_len, &n_ids);
    printf("\n== fine-tuning on %s (%zu tokens), %d steps of %d x %d tokens\n", text_path, n_ids, steps, BATCH, SEQ);
    if (n_ids <= SEQ) {
        fprintf(stderr, "error: %s is too short\n", text_path);
        return 1;
    }
    train("verse", ids, n_ids, steps, 3e-3);

    char path[4096];
    snprintf(path, sizeof path, "%s/adapter-verse", out_dir);
    TRY(lora_adapter_save(model, "verse", path));
    printf("saved the adapter in PEFT's format to %s (adapter_config.json, adapter_model.safetensors)\n", path);

    printf("\n== after fine-tuning (sampled at T=0.8 with the same seed, then greedy)\n");
    show("adapter 'verse', sampled:", prompt, 0.8f, 7);
    show("adapter 'verse', greedy:", prompt, 0.0f, 0);

    /* Merged and unmerged give the same function. */
    int32_t probe[2 * SEQ];
    memcpy(probe, ids, sizeof probe);
    size_t nl = (size_t)2 * SEQ * info.vocab_size;
    float *a = malloc(nl * sizeof *a), *b = malloc(nl * sizeof *b);
    TRY(lora_model_logits(model, probe, 2, SEQ, NULL, a, nl));
    t = now();
    TRY(lora_merge(model));
    double t_merge = now() - t;
    TRY(lora_model_logits(model, probe, 2, SEQ, NULL, b, nl));
    float maxd = 0, maxa = 0;
    for (size_t i = 0; i < nl; i++) {
        float d = fabsf(a[i] - b[i]);
        maxd = d > maxd ? d : maxd;
        maxa = fabsf(a[i]) > maxa ? fabsf(a[i]) : maxa;
    }
    printf("\n== merged vs unmerged: max |logit difference| %.2e (logits up to %.1f); merge took %.1f ms\n", maxd, maxa, 1e3 * t_merge);
    show("merged, sampled with the same seed (the same text as unmerged above):", prompt, 0.8f, 7);
    TRY(lora_unmerge(model));

    /* A second adapter in another style, then hot swaps. */
    size_t pre_len = 0, dia_len = 0, n_dia = 0;
    /* The default model was pretrained on data/pretrain.txt: its dialogue
     * is the second style. With another model, the fine-tuning text again. */
    FILE *probe_f = fopen("data/pretrain.txt", "rb");
    int use_pre = strcmp(model_dir, "models/default") == 0 && probe_f != NULL;
    if (probe_f) fclose(probe_f);
    char *pre = read_file(use_pre ? "data/pretrain.txt" : text_path, &pre_len);
    char *dia = dialogue(pre, pre_len, &dia_len);
    if (!use_pre || dia_len < 4 * SEQ) {
        free(dia);
        dia = malloc(text_len + 1);
        memcpy(dia, text, text_len + 1);
        dia_len = text_len;
    }
    int32_t *dia_ids = encode(dia, dia_len, &n_dia);
    cr.r = 8;
    cr.alpha = 16;
    TRY(lora_create(model, "dialogue", &cr));
    int dsteps = steps / 4 > 0 ? steps / 4 : 1;
    printf("\n== a second adapter 'dialogue' on %s (%zu tokens), %d steps\n", use_pre ? "the pretraining text's dialogue" : "the same text (another model: no second style bundled)", n_dia, dsteps);
    train("dialogue", dia_ids, n_dia, dsteps, 3e-3);

    printf("\n== hot swap (merged: each swap re-derives W0 + s*B*A)\n");
    const char *names[2] = {"verse", "dialogue"};
    const char *dprompt = "\"I";
    TRY(lora_swap_adapter(model, &names[1], NULL, 1));
    TRY(lora_merge(model));
    show("'dialogue' (merged):", dprompt, 0.8f, 7);
    t = now();
    TRY(lora_swap_adapter(model, &names[0], NULL, 1));
    double t_swap = now() - t;
    show("'verse' (merged, swapped in):", prompt, 0.8f, 7);
    TRY(lora_unmerge(model));
    printf("  merged swap took %.1f ms\n", 1e3 * t_swap);

    printf("\n== one mixed batch: sequence 1 with 'verse', sequence 2 with 'dialogue', sequence 3 with the base\n");
    size_t n1 = 0, n2 = 0, n3 = 0;
    int32_t *p1 = encode(prompt, strlen(prompt), &n1), *p2 = encode(dprompt, strlen(dprompt), &n2), *p3 = encode(prompt, strlen(prompt), &n3);
    const int32_t *prompts[3] = {p1, p2, p3};
    size_t plens[3] = {n1, n2, n3}, olens[3];
    const char *per_seq[3] = {"verse", "dialogue", NULL};
    lora_generate_params gp = lora_generate_default_params();
    gp.max_new_tokens = 96;
    gp.temperature = 0.8f;
    gp.top_p = 0.95f;
    gp.seed = 7;
    int32_t *out = malloc(3 * 96 * sizeof *out);
    TRY(lora_generate(model, prompts, plens, per_seq, 3, &gp, out, 3 * 96, olens));
    const char *labels[3] = {"verse:", "dialogue:", "base:"};
    for (int i = 0; i < 3; i++) {
        int32_t *all = malloc((plens[i] + olens[i]) * sizeof *all);
        memcpy(all, prompts[i], plens[i] * sizeof *all);
        memcpy(all + plens[i], out + i * 96, olens[i] * sizeof *all);
        print_text(labels[i], all, plens[i] + olens[i]);
        free(all);
    }

    printf("\n== done in %.1f s\n", now() - t_start);
    free(out);
    free(p1);
    free(p2);
    free(p3);
    free(dia_ids);
    free(dia);
    free(pre);
    free(a);
    free(b);
    free(ids);
    free(text);
    lora_tokenizer_free(tok);
    lora_model_free(model);
    lora_context_free(ctx);
    return 0;
}
