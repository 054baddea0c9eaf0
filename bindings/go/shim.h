/*
 * C shims for the Go bindings, included by the cgo preamble of each file.
 *
 * lora_last_error() is thread-local, and a goroutine may run on another OS
 * thread at its next cgo call, so fetching the message in a second cgo call
 * could read another call's error (or none). Each shim therefore makes the
 * liblora call and, when it fails, copies the message within the same C
 * call, on the same thread: *err receives a malloc'd NUL-terminated copy
 * (freed by the Go side) or NULL.
 *
 * Adding a function to the bindings: one line here, `go_<name>` returning
 * LORA_GO(<name>(args)) with `char **err` as the last parameter.
 */
#ifndef LORA_GO_SHIM_H
#define LORA_GO_SHIM_H

#include <stdlib.h>
#include <lora.h>

static inline lora_status lora_go_err(lora_status st, char **err) {
    *err = NULL;
    if (st != LORA_OK) {
        size_t n = lora_last_error(NULL, 0);
        char *m = (char *)malloc(n + 1);
        if (m) lora_last_error(m, n + 1);
        *err = m;
    }
    return st;
}
#define LORA_GO(call) return lora_go_err((call), err)

/* context */
static inline lora_status go_lora_context_new(const lora_context_params *p, lora_context **out, char **err) { LORA_GO(lora_context_new(p, out)); }
static inline lora_status go_lora_context_backend(const lora_context *c, lora_backend *out, char **err) { LORA_GO(lora_context_backend(c, out)); }
static inline lora_status go_lora_context_describe(const lora_context *c, char *buf, size_t len, size_t *needed, char **err) { LORA_GO(lora_context_describe(c, buf, len, needed)); }

/* NF4 */
static inline lora_status go_lora_quantize_nf4(const lora_context *c, const void *data, size_t bytes, lora_dtype dtype, const size_t *shape, size_t ndim, const lora_nf4_params *p, lora_nf4 **out, char **err) { LORA_GO(lora_quantize_nf4(c, data, bytes, dtype, shape, ndim, p, out)); }
static inline lora_status go_lora_nf4_dequantize(const lora_context *c, const lora_nf4 *t, lora_dtype dtype, void *out, size_t bytes, char **err) { LORA_GO(lora_nf4_dequantize(c, t, dtype, out, bytes)); }
static inline lora_status go_lora_nf4_get_info(const lora_nf4 *t, lora_nf4_info *info, char **err) { LORA_GO(lora_nf4_get_info(t, info)); }
static inline lora_status go_lora_nf4_packed(const lora_nf4 *t, const uint8_t **data, size_t *len, char **err) { LORA_GO(lora_nf4_packed(t, data, len)); }
static inline lora_status go_lora_nf4_absmax(const lora_nf4 *t, float *out, size_t count, char **err) { LORA_GO(lora_nf4_absmax(t, out, count)); }
static inline lora_status go_lora_nf4_double_quant(const lora_nf4 *t, const uint8_t **codes, size_t *nb, const float **nested, size_t *nn, float *offset, char **err) { LORA_GO(lora_nf4_double_quant(t, codes, nb, nested, nn, offset)); }
static inline lora_status go_lora_nf4_save(const char *path, const char *const *prefixes, const lora_nf4 *const *ts, size_t n, char **err) { LORA_GO(lora_nf4_save(path, prefixes, ts, n)); }
static inline lora_status go_lora_nf4_load(const char *path, const char *prefix, lora_nf4 **out, char **err) { LORA_GO(lora_nf4_load(path, prefix, out)); }
static inline lora_status go_lora_nf4_list(const char *path, char *buf, size_t len, size_t *needed, char **err) { LORA_GO(lora_nf4_list(path, buf, len, needed)); }

/* layer */
static inline lora_status go_lora_layer_new(const lora_context *c, const void *w, size_t wb, lora_dtype dt, size_t in, size_t out_f, uint32_t fifo, const float *bias, lora_layer **out, char **err) { LORA_GO(lora_layer_new(c, w, wb, dt, in, out_f, fifo, bias, out)); }
static inline lora_status go_lora_layer_new_nf4(const lora_context *c, const lora_nf4 *w, const float *bias, lora_layer **out, char **err) { LORA_GO(lora_layer_new_nf4(c, w, bias, out)); }
static inline lora_status go_lora_layer_add_adapter(lora_layer *l, const char *name, const lora_adapter_config *cfg, char **err) { LORA_GO(lora_layer_add_adapter(l, name, cfg)); }
static inline lora_status go_lora_layer_set_bias_trainable(lora_layer *l, uint32_t t, char **err) { LORA_GO(lora_layer_set_bias_trainable(l, t)); }
static inline lora_status go_lora_layer_param_counts(const lora_layer *l, size_t *tr, size_t *total, char **err) { LORA_GO(lora_layer_param_counts(l, tr, total)); }
static inline lora_status go_lora_layer_adapter_index(const lora_layer *l, const char *name, int32_t *i, char **err) { LORA_GO(lora_layer_adapter_index(l, name, i)); }
static inline lora_status go_lora_layer_forward(lora_layer *l, const void *x, size_t xb, lora_dtype xd, size_t n, const int32_t *rows, void *y, size_t yb, lora_dtype yd, uint32_t train, char **err) { LORA_GO(lora_layer_forward(l, x, xb, xd, n, rows, y, yb, yd, train)); }
static inline lora_status go_lora_layer_backward(lora_layer *l, const void *x, size_t xb, lora_dtype xd, const void *dy, size_t dyb, lora_dtype dyd, size_t n, void *dx, size_t dxb, lora_dtype dxd, char **err) { LORA_GO(lora_layer_backward(l, x, xb, xd, dy, dyb, dyd, n, dx, dxb, dxd)); }
static inline lora_status go_lora_layer_zero_grad(lora_layer *l, char **err) { LORA_GO(lora_layer_zero_grad(l)); }
static inline lora_status go_lora_layer_get_adapter(const lora_layer *l, const char *name, uint32_t grads, float *a, size_t al, float *b, size_t bl, char **err) { LORA_GO(lora_layer_get_adapter(l, name, grads, a, al, b, bl)); }
static inline lora_status go_lora_layer_set_adapter(lora_layer *l, const char *name, const float *a, size_t al, const float *b, size_t bl, char **err) { LORA_GO(lora_layer_set_adapter(l, name, a, al, b, bl)); }
static inline lora_status go_lora_layer_merge(lora_layer *l, char **err) { LORA_GO(lora_layer_merge(l)); }
static inline lora_status go_lora_layer_unmerge(lora_layer *l, char **err) { LORA_GO(lora_layer_unmerge(l)); }
static inline lora_status go_lora_layer_swap_adapter(lora_layer *l, const char *const *names, const float *mult, size_t n, char **err) { LORA_GO(lora_layer_swap_adapter(l, names, mult, n)); }
static inline lora_status go_lora_layer_requantize(lora_layer *l, const lora_nf4_params *p, double *rel, float *mx, char **err) { LORA_GO(lora_layer_requantize(l, p, rel, mx)); }
static inline lora_status go_lora_layer_weight(const lora_layer *l, lora_dtype dt, void *out, size_t bytes, char **err) { LORA_GO(lora_layer_weight(l, dt, out, bytes)); }
static inline lora_status go_lora_layer_add_weighted(lora_layer *l, const char *name, const char *const *names, const float *w, size_t n, lora_combine how, char **err) { LORA_GO(lora_layer_add_weighted(l, name, names, w, n, how)); }
static inline lora_status go_lora_layer_get_shape(const lora_layer *l, size_t *in, size_t *out_f, size_t *na, uint32_t *merged, char **err) { LORA_GO(lora_layer_get_shape(l, in, out_f, na, merged)); }

/* paging */
static inline lora_status go_lora_context_set_paging(lora_context *c, const lora_paging_params *p, char **err) { LORA_GO(lora_context_set_paging(c, p)); }
static inline lora_status go_lora_context_paged_stats(const lora_context *c, lora_paged_stats *out, char **err) { LORA_GO(lora_context_paged_stats(c, out)); }

/* model */
static inline lora_status go_lora_model_load(const lora_context *c, const char *dir, const lora_model_params *p, lora_model **out, char **err) { LORA_GO(lora_model_load(c, dir, p, out)); }
static inline lora_status go_lora_model_get_info(const lora_model *m, lora_model_info *info, char **err) { LORA_GO(lora_model_get_info(m, info)); }
static inline lora_status go_lora_create(lora_model *m, const char *name, const lora_create_params *p, char **err) { LORA_GO(lora_create(m, name, p)); }
static inline lora_status go_lora_model_param_counts(const lora_model *m, uint64_t *tr, uint64_t *total, char **err) { LORA_GO(lora_model_param_counts(m, tr, total)); }
static inline lora_status go_lora_model_trainable_summary(const lora_model *m, char *buf, size_t len, size_t *needed, char **err) { LORA_GO(lora_model_trainable_summary(m, buf, len, needed)); }
static inline lora_status go_lora_merge(lora_model *m, char **err) { LORA_GO(lora_merge(m)); }
static inline lora_status go_lora_unmerge(lora_model *m, char **err) { LORA_GO(lora_unmerge(m)); }
static inline lora_status go_lora_model_use_device(lora_model *m, int32_t device, lora_compute compute, char **err) { LORA_GO(lora_model_use_device(m, device, compute)); }
static inline lora_status go_lora_model_set_device_option(lora_model *m, lora_device_option o, int32_t v, char **err) { LORA_GO(lora_model_set_device_option(m, o, v)); }
static inline lora_status go_lora_model_device_option(const lora_model *m, lora_device_option o, int32_t *v, char **err) { LORA_GO(lora_model_device_option(m, o, v)); }
static inline lora_status go_lora_swap_adapter(lora_model *m, const char *const *names, const float *mult, size_t n, char **err) { LORA_GO(lora_swap_adapter(m, names, mult, n)); }
static inline lora_status go_lora_model_logits(lora_model *m, const int32_t *ids, size_t batch, size_t seq, const char *const *adapters, float *out, size_t out_len, char **err) { LORA_GO(lora_model_logits(m, ids, batch, seq, adapters, out, out_len)); }
static inline lora_status go_lora_model_loss(lora_model *m, const int32_t *ids, const int32_t *labels, size_t batch, size_t seq, float *loss, char **err) { LORA_GO(lora_model_loss(m, ids, labels, batch, seq, loss)); }
static inline lora_status go_lora_adapter_save(const lora_model *m, const char *name, const char *dir, char **err) { LORA_GO(lora_adapter_save(m, name, dir)); }
static inline lora_status go_lora_adapter_load(lora_model *m, const char *dir, const char *name, char **err) { LORA_GO(lora_adapter_load(m, dir, name)); }
static inline lora_status go_lora_adapter_remove(lora_model *m, const char *name, char **err) { LORA_GO(lora_adapter_remove(m, name)); }
static inline lora_status go_lora_model_export_merged(const lora_model *m, const char *dir, char **err) { LORA_GO(lora_model_export_merged(m, dir)); }
static inline lora_status go_lora_model_memory(const lora_model *m, const lora_trainer *t, lora_memory_stats *out, char **err) { LORA_GO(lora_model_memory(m, t, out)); }
/* The prompts arrive as one flat array and their lengths: cgo may not pass
 * Go memory holding Go pointers, so the pointer array is built here. */
static inline lora_status go_lora_generate(lora_model *m, const int32_t *flat, const size_t *lens, const char *const *adapters, size_t n, const lora_generate_params *p, int32_t *out, size_t out_len, size_t *out_lens, char **err) {
    const int32_t **ptrs = (const int32_t **)malloc((n ? n : 1) * sizeof *ptrs);
    size_t off = 0, i;
    lora_status st;
    *err = NULL;
    if (!ptrs) return LORA_ERR_OUT_OF_MEMORY;
    for (i = 0; i < n; i++) {
        ptrs[i] = flat ? flat + off : NULL;
        off += lens[i];
    }
    st = lora_generate(m, ptrs, lens, adapters, n, p, out, out_len, out_lens);
    free(ptrs);
    LORA_GO(st);
}

/* trainer */
static inline lora_status go_lora_trainer_new(lora_model *m, const char *adapter, const lora_trainer_params *p, lora_trainer **out, char **err) { LORA_GO(lora_trainer_new(m, adapter, p, out)); }
static inline lora_status go_lora_trainer_resume(lora_model *m, const char *dir, const lora_trainer_params *p, lora_trainer **out, char **err) { LORA_GO(lora_trainer_resume(m, dir, p, out)); }
static inline lora_status go_lora_train_step(lora_trainer *t, const int32_t *ids, const int32_t *labels, size_t batch, size_t seq, lora_step_result *r, char **err) { LORA_GO(lora_train_step(t, ids, labels, batch, seq, r)); }
static inline lora_status go_lora_trainer_save(const lora_trainer *t, const char *dir, char **err) { LORA_GO(lora_trainer_save(t, dir)); }
static inline lora_status go_lora_trainer_use_device(lora_trainer *t, int32_t device, lora_compute compute, char **err) { LORA_GO(lora_trainer_use_device(t, device, compute)); }
static inline lora_status go_lora_trainer_set_batching(lora_trainer *t, uint32_t micro_batch, uint32_t checkpointing, char **err) { LORA_GO(lora_trainer_set_batching(t, micro_batch, checkpointing)); }

/* tokenizer */
static inline lora_status go_lora_tokenizer_load(const char *path, lora_tokenizer **out, char **err) { LORA_GO(lora_tokenizer_load(path, out)); }
static inline lora_status go_lora_tokenizer_encode(const lora_tokenizer *t, const char *text, size_t len, uint32_t add_special, int32_t *ids, size_t cap, size_t *n, char **err) { LORA_GO(lora_tokenizer_encode(t, text, len, add_special, ids, cap, n)); }
static inline lora_status go_lora_tokenizer_decode(const lora_tokenizer *t, const int32_t *ids, size_t n, uint32_t skip_special, char *buf, size_t len, size_t *needed, char **err) { LORA_GO(lora_tokenizer_decode(t, ids, n, skip_special, buf, len, needed)); }
static inline lora_status go_lora_tokenizer_info(const lora_tokenizer *t, size_t *vocab, int32_t *bos, int32_t *eos, char **err) { LORA_GO(lora_tokenizer_info(t, vocab, bos, eos)); }
static inline lora_status go_lora_tokenizer_token_to_id(const lora_tokenizer *t, const char *token, int32_t *id, char **err) { LORA_GO(lora_tokenizer_token_to_id(t, token, id)); }
static inline lora_status go_lora_tokenizer_id_to_token(const lora_tokenizer *t, int32_t id, char *buf, size_t len, size_t *needed, char **err) { LORA_GO(lora_tokenizer_id_to_token(t, id, buf, len, needed)); }
static inline lora_status go_lora_tokenizer_is_special(const lora_tokenizer *t, int32_t id, uint32_t *out, char **err) { LORA_GO(lora_tokenizer_is_special(t, id, out)); }

#endif
