// include/lora.hpp under AddressSanitizer + UBSan (driven by tests/bindings.rs):
// every owner frees its handle exactly once through moves, move-assignment
// over a live handle, self-move, release/adopt, and exceptions thrown
// mid-way; errors carry status and detail. The model, trainer and
// tokenizer owners run a short QLoRA fine-tune of models/default.
//
// Handle ledger: liblora's own objects are made by uninstrumented Rust
// code, and its `_free` ignores a second free of a handle whose memory is
// not reused yet (ASan's quarantine guarantees that), so ASan alone would
// not see a wrapper freeing twice. The program is therefore linked with
// `-Wl,--wrap=<fn>` for every function that makes or frees a handle
// (WRAPPED below; the driver passes the same list): the wrappers keep the
// set of live handles, a free of a handle that is not live fails at once
// with "handle ledger: double free", and handles still live at the end of
// the checks fail with "handle ledger: leak". LeakSanitizer catches leaks
// independently.
//
//   lora_hpp [TMPDIR [REPO]]       the checks (must pass with no report); REPO holds
//                                  models/default and data/finetune.txt (default ".")
//   lora_hpp --canary-leak         releases a handle and drops it: LSan and the ledger must report
//   lora_hpp --canary-double-free  two owners of one handle: the ledger must report
#include "lora.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <vector>

// WRAPPED: lora_context_new lora_context_free lora_quantize_nf4 lora_nf4_load
//          lora_nf4_free lora_layer_new lora_layer_new_nf4 lora_layer_free
//          lora_model_load lora_model_free lora_trainer_new lora_trainer_resume
//          lora_trainer_free lora_tokenizer_load lora_tokenizer_free
static std::set<const void *> &live() {
    static std::set<const void *> s;
    return s;
}
static void ledger_add(lora_status st, const void *h) {
    if (st == LORA_OK) live().insert(h);
}
static void ledger_remove(const void *h, const char *fn) {
    if (h == nullptr) return;  // free(NULL) is a documented no-op
    if (live().erase(h) == 0) {
        std::fprintf(stderr, "handle ledger: double free (or a free of a foreign handle) %p in %s\n", h, fn);
        std::fflush(stderr);
        std::_Exit(3);
    }
}
extern "C" {
lora_status __real_lora_context_new(const lora_context_params *, lora_context **);
void __real_lora_context_free(lora_context *);
lora_status __real_lora_quantize_nf4(const lora_context *, const void *, size_t, lora_dtype, const size_t *, size_t,
                                     const lora_nf4_params *, lora_nf4 **);
lora_status __real_lora_nf4_load(const char *, const char *, lora_nf4 **);
void __real_lora_nf4_free(lora_nf4 *);
lora_status __real_lora_layer_new(const lora_context *, const void *, size_t, lora_dtype, size_t, size_t, uint32_t,
                                  const float *, lora_layer **);
lora_status __real_lora_layer_new_nf4(const lora_context *, const lora_nf4 *, const float *, lora_layer **);
void __real_lora_layer_free(lora_layer *);
lora_status __real_lora_model_load(const lora_context *, const char *, const lora_model_params *, lora_model **);
void __real_lora_model_free(lora_model *);
lora_status __real_lora_trainer_new(lora_model *, const char *, const lora_trainer_params *, lora_trainer **);
lora_status __real_lora_trainer_resume(lora_model *, const char *, const lora_trainer_params *, lora_trainer **);
void __real_lora_trainer_free(lora_trainer *);
lora_status __real_lora_tokenizer_load(const char *, lora_tokenizer **);
void __real_lora_tokenizer_free(lora_tokenizer *);

lora_status __wrap_lora_context_new(const lora_context_params *p, lora_context **out) {
    lora_status st = __real_lora_context_new(p, out);
    ledger_add(st, *out);
    return st;
}
void __wrap_lora_context_free(lora_context *c) {
    ledger_remove(c, "lora_context_free");
    __real_lora_context_free(c);
}
lora_status __wrap_lora_quantize_nf4(const lora_context *c, const void *d, size_t n, lora_dtype dt, const size_t *sh,
                                     size_t nd, const lora_nf4_params *p, lora_nf4 **out) {
    lora_status st = __real_lora_quantize_nf4(c, d, n, dt, sh, nd, p, out);
    ledger_add(st, *out);
    return st;
}
lora_status __wrap_lora_nf4_load(const char *path, const char *prefix, lora_nf4 **out) {
    lora_status st = __real_lora_nf4_load(path, prefix, out);
    ledger_add(st, *out);
    return st;
}
void __wrap_lora_nf4_free(lora_nf4 *t) {
    ledger_remove(t, "lora_nf4_free");
    __real_lora_nf4_free(t);
}
lora_status __wrap_lora_layer_new(const lora_context *c, const void *w, size_t wb, lora_dtype dt, size_t in,
                                  size_t out_f, uint32_t fifo, const float *bias, lora_layer **out) {
    lora_status st = __real_lora_layer_new(c, w, wb, dt, in, out_f, fifo, bias, out);
    ledger_add(st, *out);
    return st;
}
lora_status __wrap_lora_layer_new_nf4(const lora_context *c, const lora_nf4 *w, const float *bias, lora_layer **out) {
    lora_status st = __real_lora_layer_new_nf4(c, w, bias, out);
    ledger_add(st, *out);
    return st;
}
void __wrap_lora_layer_free(lora_layer *l) {
    ledger_remove(l, "lora_layer_free");
    __real_lora_layer_free(l);
}
lora_status __wrap_lora_model_load(const lora_context *c, const char *dir, const lora_model_params *p, lora_model **out) {
    lora_status st = __real_lora_model_load(c, dir, p, out);
    ledger_add(st, *out);
    return st;
}
void __wrap_lora_model_free(lora_model *m) {
    ledger_remove(m, "lora_model_free");
    __real_lora_model_free(m);
}
lora_status __wrap_lora_trainer_new(lora_model *m, const char *a, const lora_trainer_params *p, lora_trainer **out) {
    lora_status st = __real_lora_trainer_new(m, a, p, out);
    ledger_add(st, *out);
    return st;
}
lora_status __wrap_lora_trainer_resume(lora_model *m, const char *d, const lora_trainer_params *p, lora_trainer **out) {
    lora_status st = __real_lora_trainer_resume(m, d, p, out);
    ledger_add(st, *out);
    return st;
}
void __wrap_lora_trainer_free(lora_trainer *t) {
    ledger_remove(t, "lora_trainer_free");
    __real_lora_trainer_free(t);
}
lora_status __wrap_lora_tokenizer_load(const char *path, lora_tokenizer **out) {
    lora_status st = __real_lora_tokenizer_load(path, out);
    ledger_add(st, *out);
    return st;
}
void __wrap_lora_tokenizer_free(lora_tokenizer *t) {
    ledger_remove(t, "lora_tokenizer_free");
    __real_lora_tokenizer_free(t);
}
}

static int g_failures = 0;
#define CHECK(cond)                                                           \
    do {                                                                      \
        if (!(cond)) {                                                        \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            g_failures++;                                                     \
        }                                                                     \
    } while (0)

// Runs `f`, which must throw lora::error with `status` and a non-empty detail.
template <typename F>
static void expect_error(lora_status status, F &&f, const char *what) {
    try {
        f();
        std::fprintf(stderr, "%s: no exception (wanted %s)\n", what, lora_status_str(status));
        g_failures++;
    } catch (const lora::error &e) {
        if (e.status() != status || e.detail().empty() || std::strstr(e.what(), e.status_str()) == nullptr) {
            std::fprintf(stderr, "%s: got status %d (%s), detail \"%s\"; wanted %s\n", what, (int)e.status(),
                         e.what(), e.detail().c_str(), lora_status_str(status));
            g_failures++;
        }
    }
}

static std::vector<float> ramp(std::size_t n, float scale) {
    std::vector<float> v(n);
    std::uint32_t s = 12345;
    for (auto &x : v) {
        s = s * 1664525u + 1013904223u;
        x = scale * ((float)(s >> 8) / 16777216.0f - 0.5f);
    }
    return v;
}

static lora::context cpu() {
    auto p = lora::context::default_params();
    p.backend = LORA_BACKEND_CPU;
    p.n_threads = 2;
    return lora::context(p);
}

static void test_nf4(const std::string &dir) {
    lora::context ctx = cpu();
    CHECK(ctx.backend() == LORA_BACKEND_CPU);
    CHECK(ctx.describe().find("cpu") != std::string::npos);

    const std::size_t rows = 64, cols = 96;
    const std::vector<float> w = ramp(rows * cols, 2.0f);
    lora::nf4 q = lora::nf4::quantize(ctx, w, {rows, cols});
    const lora_nf4_info info = q.info();
    CHECK(info.ndim == 2 && info.numel == rows * cols && info.double_quant == 1);
    CHECK(q.shape() == (std::vector<std::size_t>{rows, cols}));
    CHECK(q.packed().size() == rows * cols / 2);
    CHECK(q.absmax().size() == info.num_blocks);
    CHECK(q.double_quant().codes.size() == info.num_blocks);

    std::vector<float> back = q.dequantize(ctx);
    double err = 0, ref = 0;
    for (std::size_t i = 0; i < w.size(); i++) {
        err += (back[i] - w[i]) * (back[i] - w[i]);
        ref += w[i] * w[i];
    }
    CHECK(std::sqrt(err / ref) < 0.15);  // NF4's typical relative error is ~0.1

    std::vector<lora::bf16> back16(w.size());
    q.dequantize(ctx, back16);
    std::uint32_t bits;
    std::memcpy(&bits, &back[1], 4);
    CHECK(back16[1].bits == (std::uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16));

    // Without double quantization, asking for its state is an error.
    lora_nf4_params plain = lora::nf4::default_params();
    plain.double_quant = 0;
    lora::nf4 q2 = lora::nf4::quantize(ctx, w, {rows * cols}, plain);
    expect_error(LORA_ERR_INVALID_STATE, [&] { q2.double_quant(); }, "double_quant on plain");

    // Save both, list, load back bit for bit.
    const std::string path = dir + "/cpp.safetensors";
    lora::nf4::save(path, {{"model.a", &q}, {"model.b", &q2}});
    CHECK(lora::nf4::list(path) == (std::vector<std::string>{"model.a", "model.b"}));
    lora::nf4 loaded = lora::nf4::load(path, "model.a");
    CHECK(loaded.packed().size() == q.packed().size() &&
          std::memcmp(loaded.packed().data(), q.packed().data(), q.packed().size()) == 0);
    q.save(path, "only");
    CHECK(lora::nf4::list(path) == std::vector<std::string>{"only"});

    // Errors: status and the thread's detail.
    lora_nf4_params bad = lora::nf4::default_params();
    bad.blocksize = 48;
    expect_error(LORA_ERR_INVALID_BLOCKSIZE, [&] { lora::nf4::quantize(ctx, w, {rows, cols}, bad); }, "blocksize 48");
    expect_error(LORA_ERR_BUFFER_SIZE, [&] { lora::nf4::quantize(ctx, w, {rows, cols + 1}); }, "wrong shape");
    expect_error(LORA_ERR_TENSOR_NOT_FOUND, [&] { lora::nf4::load(path, "nope"); }, "missing prefix");
    expect_error(LORA_ERR_IO, [&] { lora::nf4::load(dir + "/missing.safetensors", "x"); }, "missing file");
    std::vector<float> short_out(3);
    expect_error(LORA_ERR_BUFFER_SIZE, [&] { q.dequantize(ctx, short_out); }, "short output");

    // Ownership: move construct, move assign over a live handle (frees it),
    // self-move, release + adopt. ASan/LSan check every path.
    lora::nf4 moved(std::move(q2));
    CHECK(!q2 && moved);
    moved = std::move(loaded);  // frees the old `moved` handle
    CHECK(!loaded && moved);
    lora::nf4 &alias = moved;
    moved = std::move(alias);  // self-move keeps it
    CHECK(moved);
    lora::nf4 adopted = lora::nf4::adopt(moved.release());
    CHECK(!moved && adopted);
    moved.reset();  // no-op on empty
    // A moved-from owner is NULL to the C API: a clean error, no crash.
    expect_error(LORA_ERR_NULL_POINTER, [&] { moved.info(); }, "moved-from handle");

    // A handle created inside a throwing scope is still freed.
    try {
        lora::nf4 tmp = lora::nf4::quantize(ctx, w, {rows, cols});
        lora::nf4::load(path, "nope");
    } catch (const lora::error &) {
    }
}

static void test_layer() {
    lora::context ctx = cpu();
    const std::size_t in = 32, out = 24, n = 5, r = 4;
    const std::vector<float> w = ramp(in * out, 0.5f), x = ramp(n * in, 1.0f), dy = ramp(n * out, 1.0f);
    const std::vector<float> bias = ramp(out, 0.1f);
    lora::layer base = lora::layer::dense(ctx, w, in, out, bias);
    std::vector<float> y0(n * out), y(n * out), dx(n * in);
    base.forward(x, n, y0);

    lora_adapter_config ac = lora::layer::default_adapter_config();
    ac.r = r;
    ac.alpha = 8;
    base.add_adapter("style", ac);
    base.add_adapter("other", ac);
    CHECK(base.shape().n_adapters == 2 && base.shape().in_features == in && !base.shape().merged);
    CHECK(base.adapter_index("other") == 1);
    const auto pc = base.param_counts();
    CHECK(pc.trainable == 2 * r * (in + out) && pc.total == pc.trainable + in * out + out);

    base.forward(x, n, y);  // fresh adapter: B = 0, no change
    CHECK(y == y0);

    std::vector<float> a(r * in), b(out * r, 0.01f);
    base.get_adapter("style", a, b);
    std::fill(b.begin(), b.end(), 0.01f);
    base.set_adapter("style", a, b);
    base.forward(x, n, y, true);
    CHECK(y != y0);
    base.backward(x, dy, n, dx);
    std::vector<float> da(r * in), db(out * r);
    base.get_adapter("style", da, db, true);
    double g = 0;
    for (float v : db) g += std::fabs(v);
    CHECK(g > 0);
    expect_error(LORA_ERR_INVALID_STATE, [&] { base.merge(); }, "merge with pending grads");
    base.zero_grad();

    base.merge();
    std::vector<float> ym(n * out);
    base.forward(x, n, ym);
    for (std::size_t i = 0; i < y.size(); i++) CHECK(std::fabs(ym[i] - y[i]) <= 1e-5f * (1 + std::fabs(y[i])));
    expect_error(LORA_ERR_INVALID_STATE, [&] { base.merge(); }, "merge twice");
    base.unmerge();
    base.swap_adapter({"other"});
    base.forward(x, n, y);
    CHECK(y == y0);  // "other" is fresh
    base.swap_adapter({"style", "other"}, {0.5f, 1.0f});
    base.swap_adapter({});
    base.forward(x, n, y);
    CHECK(y == y0);
    base.add_weighted("mix", {"style", "other"}, {1.0f, 1.0f}, LORA_COMBINE_CAT);
    CHECK(base.weight().size() == in * out);
    expect_error(LORA_ERR_INVALID_ARGUMENT, [&] { base.add_adapter("style", ac); }, "duplicate adapter");
    expect_error(LORA_ERR_INVALID_ARGUMENT, [&] { base.swap_adapter({"style"}, {1.0f, 2.0f}); }, "multipliers");

    // NF4 base; the NF4 tensor may die before the layer.
    lora::layer qlayer;
    {
        lora::nf4 q = lora::nf4::quantize(ctx, w, {out, in});
        qlayer = lora::layer::from_nf4(ctx, q);
    }
    qlayer.add_adapter("a", ac);
    std::vector<lora::bf16> y16(n * out);
    qlayer.forward(x, n, y16);
    qlayer.merge();
    const auto e = qlayer.requantize();
    CHECK(e.rel_rms >= 0 && e.rel_rms < 0.2);
    lora::layer moved = std::move(qlayer);
    moved = std::move(base);  // frees the NF4 layer
    CHECK(moved && !base && !qlayer);
}


static std::string read_text(const std::string &path) {
    std::FILE *f = std::fopen(path.c_str(), "rb");
    if (!f) throw lora::error(LORA_ERR_IO, "fopen", path);
    std::string s;
    char buf[4096];
    std::size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
    std::fclose(f);
    return s;
}

static float max_abs_diff(const std::vector<float> &a, const std::vector<float> &b) {
    float m = a.size() == b.size() ? 0.0f : INFINITY;
    for (std::size_t i = 0; i < a.size() && i < b.size(); i++) m = std::fmax(m, std::fabs(a[i] - b[i]));
    return m;
}

// QLoRA through the owners: NF4 at load, all-linear r 8, five steps on one
// batch of 2 x 64 tokens of data/finetune.txt, generation, save/load,
// merge/unmerge, swaps, a trainer checkpoint resumed on a fresh model.
static void test_model(const std::string &dir, const std::string &repo) {
    lora::context ctx = cpu();
    const std::string model_dir = repo + "/models/default";
    lora_model_params mp = lora::model::default_params();
    mp.quantize = LORA_QUANT_NF4;
    lora::model m = lora::model::load(ctx, model_dir, mp);
    const lora_model_info info = m.info();
    CHECK(info.quantized == 1 && info.vocab_size == 256 && info.n_adapters == 0);

    lora::tokenizer tok = lora::tokenizer::load(model_dir);
    CHECK(tok.info().vocab_size == 256);
    CHECK(tok.decode(tok.encode("Shall I compare thee")) == "Shall I compare thee");
    CHECK(tok.id_to_token(tok.encode("A")[0]).size() > 0);
    const std::vector<std::int32_t> text = tok.encode(read_text(repo + "/data/finetune.txt"));
    const std::size_t batch = 2, seq = 64;
    CHECK(text.size() > batch * seq);
    const std::vector<std::int32_t> ids(text.begin(), text.begin() + (std::ptrdiff_t)(batch * seq));

    const std::vector<float> base = m.logits(ids, batch, seq);
    lora_create_params cp = lora::model::default_create_params();
    cp.r = 8;
    cp.alpha = 16;
    cp.target_modules = "all-linear";
    m.create_adapter("verse", cp);
    CHECK(m.trainable_summary().find("trainable params") != std::string::npos);
    CHECK(m.param_counts().trainable > 0);
    expect_error(LORA_ERR_INVALID_ARGUMENT, [&] { m.create_adapter("verse", cp); }, "duplicate adapter");

    const float before = m.loss(ids, batch, seq);
    lora_trainer_params tp = lora::trainer::default_params();
    tp.lr = 3e-3;
    double first = 0, last = 0;
    {
        lora::trainer tr = lora::trainer::create(m, "verse", tp);
        for (int s = 0; s < 5; s++) {
            const lora_step_result r = tr.step(ids, batch, seq);
            CHECK(std::isfinite(r.loss) && r.step == (std::uint64_t)s + 1 && r.tokens == batch * seq);
            if (s == 0) first = r.loss;
            last = r.loss;
        }
        CHECK(m.memory(&tr).optimizer > 0);
        tr.save(dir + "/ckpt");
        try {
            tr.use_device(0);  // a GPU, or its absence stated
        } catch (const lora::error &e) {
            CHECK(e.status() == LORA_ERR_CUDA_UNAVAILABLE);
        }
        tr.use_device(-1);
        expect_error(LORA_ERR_INVALID_ARGUMENT, [&] { tr.use_device(0, 9); }, "unknown compute");
        try {
            m.use_device(0, LORA_COMPUTE_F32);  // the model itself: a GPU, or its absence stated
            m.use_device(-1);
        } catch (const lora::error &e) {
            CHECK(e.status() == LORA_ERR_CUDA_UNAVAILABLE);
        }
        expect_error(LORA_ERR_INVALID_ARGUMENT, [&] { m.use_device(0, 9); }, "unknown compute (model)");
        expect_error(LORA_ERR_INVALID_STATE, [&] { (void)m.device_memory(); }, "device memory of a host model");
        expect_error(LORA_ERR_INVALID_STATE, [&] { m.set_device_option(LORA_DEVICE_RECOMPUTE, false); }, "a device switch of a host model");
        expect_error(LORA_ERR_INVALID_STATE, [&] { (void)m.device_option(LORA_DEVICE_RECOMPUTE); }, "a device switch of a host model (read)");
        expect_error(LORA_ERR_BUFFER_SIZE, [&] { tr.step(ids, batch, seq + 1); }, "short batch");
    }
    const float after = m.loss(ids, batch, seq);
    std::printf("  fine-tune: loss %.4f -> %.4f (steps %.4f -> %.4f)\n", before, after, first, last);
    CHECK(std::isfinite(after) && after < before && last < first);

    lora_generate_params gp = lora::model::default_generate_params();
    gp.max_new_tokens = 16;
    const std::vector<std::int32_t> prompt = tok.encode("When I consider");
    const std::vector<std::int32_t> gen = m.generate(prompt, gp);
    CHECK(!gen.empty() && gen.size() <= 16);
    CHECK(!tok.decode(gen).empty());
    const auto both = m.generate({prompt, prompt}, gp, {"verse", ""});
    CHECK(both.size() == 2 && both[0] == gen);

    // Save, load back as a second adapter: the same function.
    const std::vector<float> trained = m.logits(ids, batch, seq);
    CHECK(max_abs_diff(trained, base) > 1e-3f);
    m.save_adapter("verse", dir + "/verse");
    m.load_adapter(dir + "/verse", "loaded");
    CHECK(m.info().n_adapters == 2);
    CHECK(max_abs_diff(m.logits(ids, batch, seq, {"loaded", "loaded"}), trained) < 1e-5f);
    CHECK(max_abs_diff(m.logits(ids, batch, seq, {"", ""}), base) < 1e-5f);

    // Swaps: base alone, the loaded copy, back.
    m.swap_adapter({});
    CHECK(max_abs_diff(m.logits(ids, batch, seq), base) < 1e-5f);
    m.swap_adapter({"loaded"});
    CHECK(max_abs_diff(m.logits(ids, batch, seq), trained) < 1e-5f);
    expect_error(LORA_ERR_INVALID_ARGUMENT, [&] { m.swap_adapter({"nope"}); }, "unknown adapter");

    // Merge and unmerge; a merged swap re-derives the weights.
    m.merge();
    CHECK(m.info().merged == 1);
    CHECK(max_abs_diff(m.logits(ids, batch, seq), trained) < 1e-3f);
    expect_error(LORA_ERR_INVALID_STATE, [&] { m.merge(); }, "merge twice");
    m.swap_adapter({});
    CHECK(max_abs_diff(m.logits(ids, batch, seq), base) < 1e-3f);
    m.swap_adapter({"verse"});
    m.unmerge();
    CHECK(max_abs_diff(m.logits(ids, batch, seq), trained) < 1e-5f);
    m.remove_adapter("loaded");
    CHECK(m.info().n_adapters == 1);
    m.export_merged(dir + "/merged");
    CHECK(read_text(dir + "/merged/config.json").find("vocab_size") != std::string::npos);

    // The trainer's checkpoint on a fresh copy: resumes at step 5.
    {
        lora::model fresh = lora::model::load(ctx, model_dir, mp);
        lora::trainer tr = lora::trainer::resume(fresh, dir + "/ckpt");
        lora::model gone = std::move(fresh);
        gone.reset();  // the trainer keeps the model's data alive
        CHECK(tr.step(ids, batch, seq).step == 6);
    }
    expect_error(LORA_ERR_IO, [&] { lora::model::load(ctx, dir + "/no-such-model"); }, "missing model");
    expect_error(LORA_ERR_IO, [&] { lora::tokenizer::load(dir + "/no-such-tokenizer.json"); }, "missing tokenizer");
    lora::model empty;
    expect_error(LORA_ERR_NULL_POINTER, [&] { empty.info(); }, "empty model owner");
    lora::trainer t2 = lora::trainer::create(m, "verse", tp);
    lora::trainer t3 = std::move(t2);
    t3 = std::move(t2);  // frees t3's trainer, owns nothing
    CHECK(!t3 && !t2);
}

int main(int argc, char **argv) {
    CHECK(lora::abi_compatible());
    {
        lora::context probe = cpu();
        if (live().count(probe.get()) != 1) {
            std::fprintf(stderr, "the handle ledger is not wired: link with -Wl,--wrap=<fn> for each WRAPPED function\n");
            return 5;
        }
    }
    if (argc > 1 && std::strcmp(argv[1], "--canary-leak") == 0) {
        lora::context ctx = cpu();
        lora::nf4 q = lora::nf4::quantize(ctx, ramp(256, 1.0f), {256});
        lora_nf4 *leaked = q.release();  // never freed: LeakSanitizer must say so
        std::printf("leaked handle %p\n", (void *)leaked);
        if (live().count(leaked) != 1) return 4;  // the ledger sees it too
        std::fprintf(stderr, "handle ledger: leak of %p\n", (void *)leaked);
        leaked = nullptr;
        return 0;  // exit status 0: LeakSanitizer must turn it into a failure
    }
    if (argc > 1 && std::strcmp(argv[1], "--canary-double-free") == 0) {
        lora::context ctx = cpu();
        lora::nf4 q = lora::nf4::quantize(ctx, ramp(256, 1.0f), {256});
        lora::nf4 second = lora::nf4::adopt(q.get());  // two owners: the second free must be reported
        return 0;
    }
    const std::string dir = argc > 1 ? argv[1] : ".";
    const std::string repo = argc > 2 ? argv[2] : ".";
    try {
        test_nf4(dir);
        test_layer();
        test_model(dir, repo);
    } catch (const lora::error &e) {
        std::fprintf(stderr, "unexpected lora::error: %s\n", e.what());
        return 1;
    }
    if (!live().empty()) {
        std::fprintf(stderr, "handle ledger: leak: %zu handle(s) still live after the checks\n", live().size());
        return 1;
    }
    if (g_failures) {
        std::fprintf(stderr, "%d check(s) failed\n", g_failures);
        return 1;
    }
    std::printf("lora.hpp: all checks passed\n");
    return 0;
}
