/*
 * liblora — header-only C++17 wrapper of the C API in lora.h.
 *
 * - Every handle has one RAII owner (lora::context, lora::nf4, lora::layer,
 *   lora::model, lora::trainer, lora::tokenizer): move-only, freed in its
 *   destructor, `get()` for the raw handle, `release()` to take it back,
 *   `T::adopt(raw)` to take one over.
 * - Every failing call throws lora::error, which carries the lora_status
 *   (`status()`), its static name and the detail lora_last_error() gave on
 *   the calling thread right after the failure (`detail()`).
 * - Buffers are lora::span<T> (pointer + element count), made implicitly
 *   from std::vector, std::array, C arrays or (pointer, count). The element
 *   type picks the lora_dtype: float (F32), lora::f16, lora::bf16.
 *
 * - Parameter structs are the C ones (`lora_model_params`, ...), from each
 *   owner's `default_params()`; a progress callback may be set in them as
 *   in C (it must not throw).
 *
 * Thread safety is that of the C objects (see lora.h); the wrappers add no
 * state of their own. Adding a wrapper for a new handle type is mechanical:
 * derive from detail::owner<T, free_fn>, call detail::check() on each status.
 */
#ifndef LORA_HPP
#define LORA_HPP

#include "lora.h"

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora {

/* ---- errors ------------------------------------------------------------ */

/// The calling thread's last error message (lora_last_error), or "".
inline std::string last_error() {
    const std::size_t n = lora_last_error(nullptr, 0);
    if (n == 0) return std::string();
    std::vector<char> buf(n + 1);
    const std::size_t m = lora_last_error(buf.data(), buf.size());
    return std::string(buf.data(), m < n ? m : n);
}

/// A failed liblora call: its status, the call's name, and the library's
/// explanation of the failure.
class error : public std::runtime_error {
public:
    error(lora_status status, const char *call, std::string detail)
        : std::runtime_error(std::string(call) + ": " + lora_status_str(status) +
                             (detail.empty() ? std::string() : ": " + detail)),
          status_(status), detail_(std::move(detail)) {}
    lora_status status() const noexcept { return status_; }
    /// lora_status_str(status()): a static name.
    const char *status_str() const noexcept { return lora_status_str(status_); }
    /// The lora_last_error() text fetched right after the failure.
    const std::string &detail() const noexcept { return detail_; }

private:
    lora_status status_;
    std::string detail_;
};

namespace detail {

/// The one error path: throws lora::error for anything but LORA_OK, with
/// the thread-local detail read before anything else can call liblora.
inline void check(lora_status status, const char *call) {
    if (status != LORA_OK) throw error(status, call, last_error());
}

/// Unique ownership of a C handle freed by `Free` (which accepts NULL).
template <typename T, void (*Free)(T *)>
class owner {
public:
    using handle_type = T;
    owner() noexcept = default;
    explicit owner(T *p) noexcept : p_(p) {}
    owner(const owner &) = delete;
    owner &operator=(const owner &) = delete;
    owner(owner &&o) noexcept : p_(o.p_) { o.p_ = nullptr; }
    owner &operator=(owner &&o) noexcept {
        if (this != &o) reset(o.release());
        return *this;
    }
    ~owner() { reset(); }

    T *get() const noexcept { return p_; }
    explicit operator bool() const noexcept { return p_ != nullptr; }
    /// Gives up ownership without freeing.
    T *release() noexcept {
        T *p = p_;
        p_ = nullptr;
        return p;
    }
    /// Frees the current handle (if any) and owns `p`.
    void reset(T *p = nullptr) noexcept {
        T *old = p_;
        p_ = p;
        if (old) Free(old);
    }

protected:
    /// The handle for a call that needs one; a moved-from owner passes NULL,
    /// which every liblora call reports as LORA_ERR_NULL_POINTER.
    T *raw() const noexcept { return p_; }

private:
    T *p_ = nullptr;
};

template <typename C, typename T>
using data_convertible =
    std::is_convertible<decltype(std::data(std::declval<C &>())), T *>;

}  // namespace detail

/* ---- buffers ----------------------------------------------------------- */

/// A pointer and an element count (C++20's std::span, reduced).
template <typename T>
class span {
public:
    using element_type = T;
    constexpr span() noexcept = default;
    constexpr span(T *data, std::size_t size) noexcept : data_(data), size_(size) {}
    template <std::size_t N>
    constexpr span(T (&a)[N]) noexcept : data_(a), size_(N) {}
    /// From any contiguous container (std::vector, std::array, std::string,
    /// another span): anything with std::data and std::size.
    template <typename C,
              typename = std::enable_if_t<!std::is_same<std::decay_t<C>, span>::value &&
                                          !std::is_array<std::remove_reference_t<C>>::value &&
                                          detail::data_convertible<C, T>::value>>
    constexpr span(C &&c) noexcept : data_(std::data(c)), size_(std::size(c)) {}
    constexpr T *data() const noexcept { return data_; }
    constexpr std::size_t size() const noexcept { return size_; }
    constexpr std::size_t size_bytes() const noexcept { return size_ * sizeof(T); }
    constexpr bool empty() const noexcept { return size_ == 0; }
    constexpr T *begin() const noexcept { return data_; }
    constexpr T *end() const noexcept { return data_ + size_; }
    constexpr T &operator[](std::size_t i) const noexcept { return data_[i]; }

private:
    T *data_ = nullptr;
    std::size_t size_ = 0;
};

/// IEEE binary16 bits (LORA_DTYPE_F16).
struct f16 {
    std::uint16_t bits;
};
/// bfloat16 bits, the upper half of a binary32 (LORA_DTYPE_BF16).
struct bf16 {
    std::uint16_t bits;
};

/// The lora_dtype of a buffer element type.
template <typename T>
struct dtype_of;
template <>
struct dtype_of<float> : std::integral_constant<lora_dtype, LORA_DTYPE_F32> {};
template <>
struct dtype_of<f16> : std::integral_constant<lora_dtype, LORA_DTYPE_F16> {};
template <>
struct dtype_of<bf16> : std::integral_constant<lora_dtype, LORA_DTYPE_BF16> {};

namespace detail {
/// A span over any contiguous container or span (element constness kept).
template <typename C>
auto view(C &&c) noexcept -> span<std::remove_pointer_t<decltype(std::data(c))>> {
    return {std::data(c), std::size(c)};
}
template <typename C>
using elem_t = std::remove_const_t<std::remove_pointer_t<decltype(std::data(std::declval<C &>()))>>;
template <typename C>
constexpr lora_dtype dtype_v = dtype_of<elem_t<C>>::value;
}  // namespace detail

/* ---- library ----------------------------------------------------------- */

/// lora_version(): (major << 16) | (minor << 8) | patch.
inline std::uint32_t version() noexcept { return lora_version(); }
inline const char *version_string() noexcept { return lora_version_string(); }
/// Whether the loaded library has this header's ABI major.
inline bool abi_compatible() noexcept { return (lora_version() >> 16) == LORA_VERSION_MAJOR; }

/* ---- context ----------------------------------------------------------- */

/// lora_context: backend, CPU threads, seed.
class context : public detail::owner<lora_context, lora_context_free> {
public:
    static lora_context_params default_params() noexcept { return lora_context_default_params(); }
    /// An empty owner (no context).
    context() noexcept = default;
    /// A new context with `params`, e.g. `lora::context ctx(lora::context::default_params())`.
    explicit context(const lora_context_params &params) {
        lora_context *c = nullptr;
        detail::check(lora_context_new(&params, &c), "lora_context_new");
        reset(c);
    }
    /// Owns an existing handle (may be NULL).
    static context adopt(lora_context *c) noexcept { return context(c, 0); }

    /// LORA_BACKEND_CPU or LORA_BACKEND_CUDA.
    lora_backend backend() const {
        lora_backend b = 0;
        detail::check(lora_context_backend(raw(), &b), "lora_context_backend");
        return b;
    }
    /// E.g. "cpu (2 CPU threads)".
    std::string describe() const {
        std::size_t needed = 0;
        detail::check(lora_context_describe(raw(), nullptr, 0, &needed), "lora_context_describe");
        std::vector<char> buf(needed + 1);
        detail::check(lora_context_describe(raw(), buf.data(), buf.size(), &needed), "lora_context_describe");
        return std::string(buf.data(), needed);
    }
    static lora_paging_params default_paging_params() noexcept { return lora_paging_default_params(); }
    /// Budget and directory of the context's paged memory (a QLoRA
    /// trainer's AdamW state lives there by default).
    void set_paging(const lora_paging_params &params) {
        detail::check(lora_context_set_paging(raw(), &params), "lora_context_set_paging");
    }
    /// Counters over the context's paged buffers.
    lora_paged_stats paged_stats() const {
        lora_paged_stats st{};
        st.struct_size = sizeof st;
        detail::check(lora_context_paged_stats(raw(), &st), "lora_context_paged_stats");
        return st;
    }

private:
    context(lora_context *c, int) noexcept : owner(c) {}
};

/* ---- NF4 tensors ------------------------------------------------------- */

/// lora_nf4: an immutable NF4-quantized tensor.
class nf4 : public detail::owner<lora_nf4, lora_nf4_free> {
public:
    static lora_nf4_params default_params() noexcept { return lora_nf4_default_params(); }
    /// An empty owner; tensors come from quantize() and load().
    nf4() noexcept = default;
    static nf4 adopt(lora_nf4 *t) noexcept { return nf4(t); }

    /// Quantizes `data` (a contiguous container or span of float, f16 or
    /// bf16; row-major, `shape`) like bitsandbytes quantize_4bit(quant_type="nf4").
    template <typename C>
    static nf4 quantize(const context &ctx, const C &data, span<const std::size_t> shape,
                        const lora_nf4_params &params = lora_nf4_default_params()) {
        const auto d = detail::view(data);
        return quantize(ctx, d.data(), d.size_bytes(), detail::dtype_v<C>, shape, params);
    }
    /// With a braced shape, e.g. `nf4::quantize(ctx, w, {rows, cols})`.
    template <typename C>
    static nf4 quantize(const context &ctx, const C &data, std::initializer_list<std::size_t> shape,
                        const lora_nf4_params &params = lora_nf4_default_params()) {
        return quantize(ctx, data, span<const std::size_t>(shape.begin(), shape.size()), params);
    }
    /// Overload for untyped buffers: `bytes` bytes of `dtype`.
    static nf4 quantize(const context &ctx, const void *data, std::size_t bytes, lora_dtype dtype,
                        span<const std::size_t> shape,
                        const lora_nf4_params &params = lora_nf4_default_params()) {
        lora_nf4 *t = nullptr;
        detail::check(lora_quantize_nf4(ctx.get(), data, bytes, dtype, shape.data(), shape.size(), &params, &t),
                      "lora_quantize_nf4");
        return nf4(t);
    }
    /// Loads the NF4 weight under module prefix `prefix` of a safetensors file.
    static nf4 load(const std::string &path, const std::string &prefix) {
        lora_nf4 *t = nullptr;
        detail::check(lora_nf4_load(path.c_str(), prefix.c_str(), &t), "lora_nf4_load");
        return nf4(t);
    }
    /// The module prefixes of the NF4 weights in a safetensors file, sorted.
    static std::vector<std::string> list(const std::string &path) {
        std::size_t needed = 0;
        detail::check(lora_nf4_list(path.c_str(), nullptr, 0, &needed), "lora_nf4_list");
        std::vector<char> buf(needed + 1);
        detail::check(lora_nf4_list(path.c_str(), buf.data(), buf.size(), &needed), "lora_nf4_list");
        std::vector<std::string> out;
        std::string cur;
        for (std::size_t i = 0; i < needed; i++) {
            if (buf[i] == '\n') {
                out.push_back(cur);
                cur.clear();
            } else {
                cur.push_back(buf[i]);
            }
        }
        if (!cur.empty()) out.push_back(cur);
        return out;
    }
    /// Saves tensors to one safetensors file (transformers' 4-bit layout),
    /// each under its module prefix; atomic.
    static void save(const std::string &path, const std::vector<std::pair<std::string, const nf4 *>> &tensors) {
        std::vector<const char *> prefixes;
        std::vector<const lora_nf4 *> ts;
        prefixes.reserve(tensors.size());
        ts.reserve(tensors.size());
        for (const auto &p : tensors) {
            prefixes.push_back(p.first.c_str());
            ts.push_back(p.second ? p.second->get() : nullptr);
        }
        detail::check(lora_nf4_save(path.c_str(), prefixes.data(), ts.data(), ts.size()), "lora_nf4_save");
    }
    /// Saves this tensor alone under `prefix`.
    void save(const std::string &path, const std::string &prefix) const { save(path, {{prefix, this}}); }

    lora_nf4_info info() const {
        lora_nf4_info i{};
        detail::check(lora_nf4_get_info(raw(), &i), "lora_nf4_get_info");
        return i;
    }
    std::vector<std::size_t> shape() const {
        const lora_nf4_info i = info();
        return std::vector<std::size_t>(i.shape, i.shape + i.ndim);
    }
    std::size_t numel() const { return info().numel; }

    /// Dequantizes into `out` (a contiguous container or span of exactly
    /// numel() float, f16 or bf16 elements).
    template <typename C>
    void dequantize(const context &ctx, C &&out) const {
        const auto o = detail::view(out);
        detail::check(lora_nf4_dequantize(ctx.get(), raw(), detail::dtype_v<C>, o.data(), o.size_bytes()),
                      "lora_nf4_dequantize");
    }
    /// Dequantizes to a new fp32 vector.
    std::vector<float> dequantize(const context &ctx) const {
        std::vector<float> out(numel());
        dequantize(ctx, out);
        return out;
    }
    /// The packed 4-bit codes, viewed in place (valid while this tensor lives).
    span<const std::uint8_t> packed() const {
        const std::uint8_t *d = nullptr;
        std::size_t n = 0;
        detail::check(lora_nf4_packed(raw(), &d, &n), "lora_nf4_packed");
        return span<const std::uint8_t>(d, n);
    }
    /// The fp32 block scales (decoded when double-quantized).
    std::vector<float> absmax() const {
        std::vector<float> out(info().num_blocks);
        detail::check(lora_nf4_absmax(raw(), out.data(), out.size()), "lora_nf4_absmax");
        return out;
    }
    /// Double-quantization state, viewed in place (valid while this tensor lives).
    struct double_quant_state {
        span<const std::uint8_t> codes;
        span<const float> nested_absmax;
        float offset;
    };
    double_quant_state double_quant() const {
        const std::uint8_t *codes = nullptr;
        const float *nested = nullptr;
        std::size_t nb = 0, nn = 0;
        float offset = 0;
        detail::check(lora_nf4_double_quant(raw(), &codes, &nb, &nested, &nn, &offset), "lora_nf4_double_quant");
        return {span<const std::uint8_t>(codes, nb), span<const float>(nested, nn), offset};
    }

private:
    explicit nf4(lora_nf4 *t) noexcept : owner(t) {}
};

/* ---- LoRA layers ------------------------------------------------------- */

/// lora_layer: a linear layer with named LoRA adapters.
class layer : public detail::owner<lora_layer, lora_layer_free> {
public:
    static lora_adapter_config default_adapter_config() noexcept { return lora_adapter_default_config(); }
    /// An empty owner; layers come from dense() and from_nf4().
    layer() noexcept = default;
    static layer adopt(lora_layer *l) noexcept { return layer(l); }

    /// A layer over a dense weight `[out,in]` (or `[in,out]` with
    /// `fan_in_fan_out`) of float, f16 or bf16, copied; `bias` empty or `out` floats.
    template <typename C>
    static layer dense(const context &ctx, const C &weight, std::size_t in_features, std::size_t out_features,
                       span<const float> bias = {}, bool fan_in_fan_out = false) {
        lora_layer *l = nullptr;
        const auto w = detail::view(weight);
        detail::check(lora_layer_new(ctx.get(), w.data(), w.size_bytes(), detail::dtype_v<C>, in_features,
                                     out_features, fan_in_fan_out ? 1u : 0u, bias_ptr(bias, out_features), &l),
                      "lora_layer_new");
        return layer(l);
    }
    /// A layer over an NF4 weight `[out,in]` (copied; `weight` stays yours).
    static layer from_nf4(const context &ctx, const nf4 &weight, span<const float> bias = {}) {
        lora_layer *l = nullptr;
        const std::size_t out_features = weight ? weight.info().shape[0] : 0;
        detail::check(lora_layer_new_nf4(ctx.get(), weight.get(), bias_ptr(bias, out_features), &l),
                      "lora_layer_new_nf4");
        return layer(l);
    }

    void add_adapter(const std::string &name, const lora_adapter_config &config = lora_adapter_default_config()) {
        detail::check(lora_layer_add_adapter(raw(), name.c_str(), &config), "lora_layer_add_adapter");
    }
    void set_bias_trainable(bool trainable) {
        detail::check(lora_layer_set_bias_trainable(raw(), trainable ? 1u : 0u), "lora_layer_set_bias_trainable");
    }
    struct param_counts_t {
        std::size_t trainable, total;
    };
    param_counts_t param_counts() const {
        param_counts_t c{0, 0};
        detail::check(lora_layer_param_counts(raw(), &c.trainable, &c.total), "lora_layer_param_counts");
        return c;
    }
    /// For `row_adapter` of forward(); -1 means the base only.
    std::int32_t adapter_index(const std::string &name) const {
        std::int32_t i = -1;
        detail::check(lora_layer_adapter_index(raw(), name.c_str(), &i), "lora_layer_adapter_index");
        return i;
    }
    struct shape_t {
        std::size_t in_features, out_features, n_adapters;
        bool merged;
    };
    shape_t shape() const {
        shape_t s{0, 0, 0, false};
        std::uint32_t merged = 0;
        detail::check(lora_layer_get_shape(raw(), &s.in_features, &s.out_features, &s.n_adapters, &merged),
                      "lora_layer_get_shape");
        s.merged = merged != 0;
        return s;
    }

    /// y = forward(x) for `n` rows (x: n·in, y: n·out elements of float,
    /// f16 or bf16); `row_adapter` empty (the active adapters) or `n` adapter
    /// indices; `train` applies dropout and records what backward needs.
    template <typename X, typename Y>
    void forward(const X &x, std::size_t n, Y &&y, bool train = false, span<const std::int32_t> row_adapter = {}) {
        const auto xs = detail::view(x);
        const auto ys = detail::view(y);
        detail::check(lora_layer_forward(raw(), xs.data(), xs.size_bytes(), detail::dtype_v<X>, n,
                                         row_adapter.empty() ? nullptr : row_adapter.data(), ys.data(),
                                         ys.size_bytes(), detail::dtype_v<Y>, train ? 1u : 0u),
                      "lora_layer_forward");
    }
    /// Backward of the latest forward (same x and n): writes dx and
    /// accumulates the adapters' gradients.
    template <typename X, typename DY, typename DX>
    void backward(const X &x, const DY &dy, std::size_t n, DX &&dx) {
        const auto xs = detail::view(x);
        const auto dys = detail::view(dy);
        const auto dxs = detail::view(dx);
        detail::check(lora_layer_backward(raw(), xs.data(), xs.size_bytes(), detail::dtype_v<X>, dys.data(),
                                          dys.size_bytes(), detail::dtype_v<DY>, n, dxs.data(), dxs.size_bytes(),
                                          detail::dtype_v<DX>),
                      "lora_layer_backward");
    }
    /// Backward without dx (only the adapters' gradients).
    template <typename X, typename DY>
    void backward(const X &x, const DY &dy, std::size_t n) {
        const auto xs = detail::view(x);
        const auto dys = detail::view(dy);
        detail::check(lora_layer_backward(raw(), xs.data(), xs.size_bytes(), detail::dtype_v<X>, dys.data(),
                                          dys.size_bytes(), detail::dtype_v<DY>, n, nullptr, 0, LORA_DTYPE_F32),
                      "lora_layer_backward");
    }
    void zero_grad() { detail::check(lora_layer_zero_grad(raw()), "lora_layer_zero_grad"); }

    /// Copies adapter `name`'s A `[r,in]` and B `[out,r]` (or dA, dB with `grads`).
    void get_adapter(const std::string &name, span<float> a, span<float> b, bool grads = false) const {
        detail::check(lora_layer_get_adapter(raw(), name.c_str(), grads ? 1u : 0u, a.data(), a.size(), b.data(),
                                             b.size()),
                      "lora_layer_get_adapter");
    }
    void set_adapter(const std::string &name, span<const float> a, span<const float> b) {
        detail::check(lora_layer_set_adapter(raw(), name.c_str(), a.data(), a.size(), b.data(), b.size()),
                      "lora_layer_set_adapter");
    }

    void merge() { detail::check(lora_layer_merge(raw()), "lora_layer_merge"); }
    void unmerge() { detail::check(lora_layer_unmerge(raw()), "lora_layer_unmerge"); }
    /// Makes `names` the active adapters, scaled by `multipliers` (empty: all 1).
    void swap_adapter(const std::vector<std::string> &names, const std::vector<float> &multipliers = {}) {
        const std::vector<const char *> p = c_strs(names);
        if (!multipliers.empty() && multipliers.size() != names.size())
            throw error(LORA_ERR_INVALID_ARGUMENT, "lora_layer_swap_adapter", "one multiplier per adapter name");
        detail::check(lora_layer_swap_adapter(raw(), p.data(), multipliers.empty() ? nullptr : multipliers.data(),
                                              p.size()),
                      "lora_layer_swap_adapter");
    }
    struct requantize_error {
        double rel_rms;
        float max_abs;
    };
    /// Requantizes the merged weight to NF4 as the new base; returns the error it added.
    requantize_error requantize(const lora_nf4_params &params = lora_nf4_default_params()) {
        requantize_error e{0, 0};
        detail::check(lora_layer_requantize(raw(), &params, &e.rel_rms, &e.max_abs), "lora_layer_requantize");
        return e;
    }
    /// The weight the layer computes with, in the base's layout, into `out`
    /// (in·out elements of float, f16 or bf16).
    template <typename C>
    void weight(C &&out) const {
        const auto o = detail::view(out);
        detail::check(lora_layer_weight(raw(), detail::dtype_v<C>, o.data(), o.size_bytes()), "lora_layer_weight");
    }
    std::vector<float> weight() const {
        const shape_t s = shape();
        std::vector<float> w(s.in_features * s.out_features);
        weight(w);
        return w;
    }
    /// PEFT add_weighted_adapter: LORA_COMBINE_LINEAR or LORA_COMBINE_CAT.
    void add_weighted(const std::string &name, const std::vector<std::string> &names,
                      const std::vector<float> &weights, lora_combine how) {
        if (weights.size() != names.size())
            throw error(LORA_ERR_INVALID_ARGUMENT, "lora_layer_add_weighted", "one weight per adapter name");
        const std::vector<const char *> p = c_strs(names);
        detail::check(lora_layer_add_weighted(raw(), name.c_str(), p.data(), weights.data(), p.size(), how),
                      "lora_layer_add_weighted");
    }

private:
    explicit layer(lora_layer *l) noexcept : owner(l) {}
    static const float *bias_ptr(span<const float> bias, std::size_t out_features) {
        if (bias.empty()) return nullptr;
        // The C API reads exactly `out` floats: refuse a short buffer here.
        if (bias.size() != out_features)
            throw error(LORA_ERR_BUFFER_SIZE, "lora_layer_new", "bias must hold out_features floats");
        return bias.data();
    }
    static std::vector<const char *> c_strs(const std::vector<std::string> &names) {
        std::vector<const char *> p;
        p.reserve(names.size());
        for (const auto &n : names) p.push_back(n.c_str());
        return p;
    }
};

/* ---- tokenizers -------------------------------------------------------- */

/// lora_tokenizer: a Hugging Face tokenizer.json (byte-level or
/// SentencePiece-style BPE). Immutable: const calls may run concurrently.
class tokenizer : public detail::owner<lora_tokenizer, lora_tokenizer_free> {
public:
    tokenizer() noexcept = default;
    static tokenizer adopt(lora_tokenizer *t) noexcept { return tokenizer(t); }

    /// Loads `path`: a tokenizer.json or a model directory holding one.
    static tokenizer load(const std::string &path) {
        lora_tokenizer *t = nullptr;
        detail::check(lora_tokenizer_load(path.c_str(), &t), "lora_tokenizer_load");
        return tokenizer(t);
    }

    /// Token ids of UTF-8 `text`; `add_special` adds the post-processor's
    /// tokens (Llama's BOS).
    std::vector<std::int32_t> encode(std::string_view text, bool add_special = false) const {
        std::size_t n = 0;
        const lora_status st = lora_tokenizer_encode(raw(), text.data(), text.size(), add_special ? 1u : 0u,
                                                     nullptr, 0, &n);
        if (st != LORA_ERR_BUFFER_SIZE) detail::check(st, "lora_tokenizer_encode");
        std::vector<std::int32_t> ids(n);
        detail::check(lora_tokenizer_encode(raw(), text.data(), text.size(), add_special ? 1u : 0u, ids.data(),
                                            ids.size(), &n),
                      "lora_tokenizer_encode");
        ids.resize(n);
        return ids;
    }
    /// The text of `ids` (special tokens left out with `skip_special`).
    std::string decode(span<const std::int32_t> ids, bool skip_special = true) const {
        std::size_t n = 0;
        const lora_status st =
            lora_tokenizer_decode(raw(), ids.data(), ids.size(), skip_special ? 1u : 0u, nullptr, 0, &n);
        if (st != LORA_ERR_BUFFER_SIZE) detail::check(st, "lora_tokenizer_decode");
        std::vector<char> buf(n + 1);
        detail::check(
            lora_tokenizer_decode(raw(), ids.data(), ids.size(), skip_special ? 1u : 0u, buf.data(), buf.size(), &n),
            "lora_tokenizer_decode");
        return std::string(buf.data(), n);
    }
    struct info_t {
        std::size_t vocab_size;
        std::int32_t bos_id, eos_id;  // -1 when unknown
    };
    info_t info() const {
        info_t i{0, -1, -1};
        detail::check(lora_tokenizer_info(raw(), &i.vocab_size, &i.bos_id, &i.eos_id), "lora_tokenizer_info");
        return i;
    }
    /// The id of a vocabulary string ("<|im_end|>", "Ġthe"), or -1.
    std::int32_t token_to_id(const std::string &token) const {
        std::int32_t id = -1;
        detail::check(lora_tokenizer_token_to_id(raw(), token.c_str(), &id), "lora_tokenizer_token_to_id");
        return id;
    }
    /// The vocabulary string of `id` (not decoded).
    std::string id_to_token(std::int32_t id) const {
        std::size_t n = 0;
        const lora_status st = lora_tokenizer_id_to_token(raw(), id, nullptr, 0, &n);
        if (st != LORA_ERR_BUFFER_SIZE) detail::check(st, "lora_tokenizer_id_to_token");
        std::vector<char> buf(n + 1);
        detail::check(lora_tokenizer_id_to_token(raw(), id, buf.data(), buf.size(), &n), "lora_tokenizer_id_to_token");
        return std::string(buf.data(), n);
    }
    bool is_special(std::int32_t id) const {
        std::uint32_t s = 0;
        detail::check(lora_tokenizer_is_special(raw(), id, &s), "lora_tokenizer_is_special");
        return s != 0;
    }

private:
    explicit tokenizer(lora_tokenizer *t) noexcept : owner(t) {}
};

/* ---- models ------------------------------------------------------------ */

class trainer;

/// lora_model: a Llama/Mistral/Qwen2 checkpoint (fp32 or NF4 base) with
/// named LoRA adapters. Calls on one model serialize inside liblora.
class model : public detail::owner<lora_model, lora_model_free> {
public:
    static lora_model_params default_params() noexcept { return lora_model_default_params(); }
    static lora_create_params default_create_params() noexcept { return lora_create_default_params(); }
    static lora_generate_params default_generate_params() noexcept { return lora_generate_default_params(); }
    model() noexcept = default;
    static model adopt(lora_model *m) noexcept { return model(m); }

    /// Loads a Hugging Face checkpoint directory; `params.quantize =
    /// LORA_QUANT_NF4` quantizes the linear layers as they are read (QLoRA).
    static model load(const context &ctx, const std::string &dir, const lora_model_params &params = default_params()) {
        lora_model *m = nullptr;
        detail::check(lora_model_load(ctx.get(), dir.c_str(), &params, &m), "lora_model_load");
        return model(m);
    }

    lora_model_info info() const {
        lora_model_info i{};
        detail::check(lora_model_get_info(raw(), &i), "lora_model_get_info");
        return i;
    }
    /// Adds adapter `name` on the target modules (PEFT get_peft_model).
    void create_adapter(const std::string &name, const lora_create_params &params = default_create_params()) {
        detail::check(lora_create(raw(), name.c_str(), &params), "lora_create");
    }
    struct param_counts_t {
        std::uint64_t trainable, total;
    };
    param_counts_t param_counts() const {
        param_counts_t c{0, 0};
        detail::check(lora_model_param_counts(raw(), &c.trainable, &c.total), "lora_model_param_counts");
        return c;
    }
    /// PEFT's print_trainable_parameters line.
    std::string trainable_summary() const {
        std::size_t n = 0;
        detail::check(lora_model_trainable_summary(raw(), nullptr, 0, &n), "lora_model_trainable_summary");
        std::vector<char> buf(n + 1);
        detail::check(lora_model_trainable_summary(raw(), buf.data(), buf.size(), &n), "lora_model_trainable_summary");
        return std::string(buf.data(), n);
    }

    void merge() { detail::check(lora_merge(raw()), "lora_merge"); }
    void unmerge() { detail::check(lora_unmerge(raw()), "lora_unmerge"); }
    /// Puts the model on CUDA device `device` (-1: back to the CPU) with
    /// `compute` precision; logits, generation, merge and swaps then run
    /// there (see `lora_model_use_device`). Throws `lora::error` with
    /// `LORA_ERR_CUDA_UNAVAILABLE` without a GPU.
    void use_device(int device, lora_compute compute = LORA_COMPUTE_BF16) {
        detail::check(lora_model_use_device(raw(), device, compute), "lora_model_use_device");
    }
    /// Device memory of the model on a device: {copy, pool in use, pool
    /// peak} bytes (see `lora_model_device_memory`).
    std::array<std::uint64_t, 3> device_memory() const {
        std::array<std::uint64_t, 3> v{};
        detail::check(lora_model_device_memory(raw(), &v[0], &v[1], &v[2]), "lora_model_device_memory");
        return v;
    }
    /// Turns switch `option` (`LORA_DEVICE_*`) of the device copy on or
    /// off (see `lora_model_set_device_option`); the model must be on a
    /// device.
    void set_device_option(lora_device_option option, bool on) {
        detail::check(lora_model_set_device_option(raw(), option, on ? 1 : 0), "lora_model_set_device_option");
    }
    /// Whether switch `option` of the device copy is on (see
    /// `lora_model_device_option`).
    bool device_option(lora_device_option option) const {
        std::int32_t v = 0;
        detail::check(lora_model_device_option(raw(), option, &v), "lora_model_device_option");
        return v != 0;
    }
    /// Makes `names` the active adapters, scaled by `multipliers` (empty:
    /// all 1); no names leaves the base alone. Works merged or not.
    void swap_adapter(const std::vector<std::string> &names, const std::vector<float> &multipliers = {}) {
        if (!multipliers.empty() && multipliers.size() != names.size())
            throw error(LORA_ERR_INVALID_ARGUMENT, "lora_swap_adapter", "one multiplier per adapter name");
        const std::vector<const char *> p = c_strs(names);
        detail::check(lora_swap_adapter(raw(), p.empty() ? nullptr : p.data(),
                                        multipliers.empty() ? nullptr : multipliers.data(), p.size()),
                      "lora_swap_adapter");
    }

    /// Logits [batch, seq, vocab] of `ids` [batch, seq] into `out`, with the
    /// active adapters, or with `adapters` (one name per sequence; "" is the
    /// base alone; the model must be unmerged).
    void logits(span<const std::int32_t> ids, std::size_t batch, std::size_t seq, span<float> out,
                const std::vector<std::string> &adapters = {}) {
        if (!adapters.empty() && adapters.size() != batch)
            throw error(LORA_ERR_INVALID_ARGUMENT, "lora_model_logits", "one adapter name per sequence");
        if (ids.size() != batch * seq)
            throw error(LORA_ERR_BUFFER_SIZE, "lora_model_logits", "ids must hold batch*seq tokens");
        const std::vector<const char *> a = c_strs_or_null(adapters);
        detail::check(lora_model_logits(raw(), ids.data(), batch, seq, a.empty() ? nullptr : a.data(), out.data(),
                                        out.size()),
                      "lora_model_logits");
    }
    std::vector<float> logits(span<const std::int32_t> ids, std::size_t batch, std::size_t seq,
                              const std::vector<std::string> &adapters = {}) {
        std::vector<float> out(batch * seq * info().vocab_size);
        logits(ids, batch, seq, out, adapters);
        return out;
    }
    /// Mean causal-LM cross-entropy of `ids` [batch, seq] (labels empty:
    /// the ids; -100 ignored), without gradients.
    float loss(span<const std::int32_t> ids, std::size_t batch, std::size_t seq,
               span<const std::int32_t> labels = {}) {
        if (ids.size() != batch * seq || (!labels.empty() && labels.size() != batch * seq))
            throw error(LORA_ERR_BUFFER_SIZE, "lora_model_loss", "ids (and labels) must hold batch*seq tokens");
        float l = 0;
        detail::check(lora_model_loss(raw(), ids.data(), labels.empty() ? nullptr : labels.data(), batch, seq, &l),
                      "lora_model_loss");
        return l;
    }

    /// Adapter `name` to directory `dir` in PEFT's format.
    void save_adapter(const std::string &name, const std::string &dir) const {
        detail::check(lora_adapter_save(raw(), name.c_str(), dir.c_str()), "lora_adapter_save");
    }
    /// A PEFT adapter directory as adapter `name`.
    void load_adapter(const std::string &dir, const std::string &name) {
        detail::check(lora_adapter_load(raw(), dir.c_str(), name.c_str()), "lora_adapter_load");
    }
    void remove_adapter(const std::string &name) {
        detail::check(lora_adapter_remove(raw(), name.c_str()), "lora_adapter_remove");
    }
    /// The model with its active adapters merged, as a Hugging Face checkpoint.
    void export_merged(const std::string &dir) const {
        detail::check(lora_model_export_merged(raw(), dir.c_str()), "lora_model_export_merged");
    }

    /// Generates for several prompts at once; returns the new tokens of
    /// each. `adapters` empty: the active adapters; else one name per
    /// prompt ("" for the base alone), a mixed-adapter batch.
    std::vector<std::vector<std::int32_t>> generate(const std::vector<std::vector<std::int32_t>> &prompts,
                                                    const lora_generate_params &params = default_generate_params(),
                                                    const std::vector<std::string> &adapters = {}) {
        if (!adapters.empty() && adapters.size() != prompts.size())
            throw error(LORA_ERR_INVALID_ARGUMENT, "lora_generate", "one adapter name per prompt");
        std::vector<const std::int32_t *> p;
        std::vector<std::size_t> lens;
        for (const auto &v : prompts) {
            p.push_back(v.data());
            lens.push_back(v.size());
        }
        const std::vector<const char *> a = c_strs_or_null(adapters);
        const std::size_t max_new = params.max_new_tokens;
        std::vector<std::int32_t> out(prompts.size() * max_new);
        std::vector<std::size_t> out_lens(prompts.size());
        detail::check(lora_generate(raw(), p.data(), lens.data(), a.empty() ? nullptr : a.data(), prompts.size(),
                                    &params, out.data(), out.size(), out_lens.data()),
                      "lora_generate");
        std::vector<std::vector<std::int32_t>> res(prompts.size());
        for (std::size_t i = 0; i < prompts.size(); i++)
            res[i].assign(out.begin() + (std::ptrdiff_t)(i * max_new),
                          out.begin() + (std::ptrdiff_t)(i * max_new + out_lens[i]));
        return res;
    }
    /// One prompt with the active adapters.
    std::vector<std::int32_t> generate(span<const std::int32_t> prompt,
                                       const lora_generate_params &params = default_generate_params()) {
        std::vector<std::int32_t> out(params.max_new_tokens);
        const std::int32_t *p = prompt.data();
        const std::size_t len = prompt.size();
        std::size_t n = 0;
        detail::check(lora_generate(raw(), &p, &len, nullptr, 1, &params, out.data(), out.size(), &n),
                      "lora_generate");
        out.resize(n);
        return out;
    }

    /// Memory by category (with `tr`'s optimizer state when given).
    inline lora_memory_stats memory(const trainer *tr = nullptr) const;

private:
    explicit model(lora_model *m) noexcept : owner(m) {}
    static std::vector<const char *> c_strs(const std::vector<std::string> &names) {
        std::vector<const char *> p;
        p.reserve(names.size());
        for (const auto &n : names) p.push_back(n.c_str());
        return p;
    }
    static std::vector<const char *> c_strs_or_null(const std::vector<std::string> &names) {
        std::vector<const char *> p;
        p.reserve(names.size());
        for (const auto &n : names) p.push_back(n.empty() ? nullptr : n.c_str());
        return p;
    }
};

/* ---- training ---------------------------------------------------------- */

/// lora_trainer: optimizer, schedule and step count of one adapter's
/// training. Keeps the model's data alive (the model owner may go first).
/// One thread at a time.
class trainer : public detail::owner<lora_trainer, lora_trainer_free> {
public:
    static lora_trainer_params default_params() noexcept { return lora_trainer_default_params(); }
    trainer() noexcept = default;
    static trainer adopt(lora_trainer *t) noexcept { return trainer(t); }

    /// A trainer for adapter `adapter` of `m` (made the only active one).
    static trainer create(model &m, const std::string &adapter, const lora_trainer_params &params = default_params()) {
        lora_trainer *t = nullptr;
        detail::check(lora_trainer_new(m.get(), adapter.c_str(), &params, &t), "lora_trainer_new");
        return trainer(t);
    }
    /// Resumes a checkpoint of save() on a fresh copy of the same base
    /// model (only `params`' progress callback is used).
    static trainer resume(model &m, const std::string &dir, const lora_trainer_params &params = default_params()) {
        lora_trainer *t = nullptr;
        detail::check(lora_trainer_resume(m.get(), dir.c_str(), &params, &t), "lora_trainer_resume");
        return trainer(t);
    }

    /// One optimizer step on `ids` [batch, seq] (labels empty: the ids).
    lora_step_result step(span<const std::int32_t> ids, std::size_t batch, std::size_t seq,
                          span<const std::int32_t> labels = {}) {
        if (ids.size() != batch * seq || (!labels.empty() && labels.size() != batch * seq))
            throw error(LORA_ERR_BUFFER_SIZE, "lora_train_step", "ids (and labels) must hold batch*seq tokens");
        lora_step_result r{};
        detail::check(lora_train_step(raw(), ids.data(), labels.empty() ? nullptr : labels.data(), batch, seq, &r),
                      "lora_train_step");
        return r;
    }
    /// A checkpoint (adapter, optimizer state, counters) in directory `dir`.
    void save(const std::string &dir) const {
        detail::check(lora_trainer_save(raw(), dir.c_str()), "lora_trainer_save");
    }
    /// Moves the steps to CUDA device `device` (-1: back to the CPU) with
    /// `compute` precision (`LORA_COMPUTE_*`); see `lora_trainer_use_device`.
    /// Throws `lora::error` with `LORA_ERR_CUDA_UNAVAILABLE` without a GPU.
    void use_device(int device, lora_compute compute = LORA_COMPUTE_BF16) {
        detail::check(lora_trainer_use_device(raw(), device, compute), "lora_trainer_use_device");
    }

private:
    explicit trainer(lora_trainer *t) noexcept : owner(t) {}
};

inline lora_memory_stats model::memory(const trainer *tr) const {
    lora_memory_stats st{};
    detail::check(lora_model_memory(raw(), tr ? tr->get() : nullptr, &st), "lora_model_memory");
    return st;
}

}  // namespace lora

#endif  // LORA_HPP
