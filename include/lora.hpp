/*
 * liblora — header-only C++17 wrapper of the C API in lora.h.
 *
 * - Every handle has one RAII owner (lora::context, lora::nf4, lora::layer):
 *   move-only, freed in its destructor, `get()` for the raw handle,
 *   `release()` to take it back, `T::adopt(raw)` to take one over.
 * - Every failing call throws lora::error, which carries the lora_status
 *   (`status()`), its static name and the detail lora_last_error() gave on
 *   the calling thread right after the failure (`detail()`).
 * - Buffers are lora::span<T> (pointer + element count), made implicitly
 *   from std::vector, std::array, C arrays or (pointer, count). The element
 *   type picks the lora_dtype: float (F32), lora::f16, lora::bf16.
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

}  // namespace lora

#endif  // LORA_HPP
