// liblora from C++ (include/lora.hpp): quantize a weight to NF4, put a LoRA
// adapter on it, run one forward/backward step, merge. Every handle is an
// RAII owner; every failure throws lora::error with status and detail.
//
//   cmake -S examples/cpp -B build/cpp -DCMAKE_PREFIX_PATH=<install prefix>
//   cmake --build build/cpp && ./build/cpp/quantize_lora
#include <lora.hpp>

#include <cstdio>
#include <vector>

int main() try {
    auto params = lora::context::default_params();
    params.backend = LORA_BACKEND_CPU;
    lora::context ctx(params);

    const std::size_t in = 256, out = 128, n = 4;
    std::vector<float> w(in * out), x(n * in), dy(n * out, 0.01f);
    for (std::size_t i = 0; i < w.size(); i++) w[i] = 0.02f * float(int(i * 7919 % 201) - 100) / 100.0f;
    for (std::size_t i = 0; i < x.size(); i++) x[i] = float(int(i % 17) - 8) / 8.0f;

    lora::nf4 q = lora::nf4::quantize(ctx, w, {out, in});
    std::printf("NF4: %zu weights, %.3f bits each\n", q.info().numel, q.info().bits_per_weight);

    lora::layer layer = lora::layer::from_nf4(ctx, q);
    auto ac = lora::layer::default_adapter_config();
    ac.r = 8;
    ac.alpha = 16;
    layer.add_adapter("style", ac);

    std::vector<float> y(n * out), da(ac.r * in), db(out * ac.r);
    layer.forward(x, n, y, /*train=*/true);
    layer.backward(x, dy, n);
    layer.get_adapter("style", da, db, /*grads=*/true);
    std::printf("y[0] = %.5f, dB[0] = %.5f\n", y[0], db[0]);
    layer.zero_grad();
    layer.merge();
    std::printf("merged: %s\n", layer.shape().merged ? "yes" : "no");

    try {
        layer.merge();  // already merged
    } catch (const lora::error &e) {
        std::printf("expected error: %s\n", e.what());
    }
    return 0;
} catch (const lora::error &e) {
    std::fprintf(stderr, "liblora: %s\n", e.what());
    return 1;
}
