// liblora from C++ (include/lora.hpp): quantize a weight to NF4, put a LoRA
// adapter on it, run one forward/backward step, merge; then a short QLoRA
// fine-tune of a model (NF4 at load, LoRA on all linear layers) and a
// generation. Every handle is an RAII owner; every failure throws
// lora::error with status and detail.
//
//   cmake -S examples/cpp -B build/cpp -DCMAKE_PREFIX_PATH=<install prefix>
//   cmake --build build/cpp && ./build/cpp/quantize_lora [MODEL_DIR [TEXT]]
//
// Defaults (run from the repository root): models/default, data/finetune.txt.
#include <lora.hpp>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static void finetune(const lora::context &ctx, const std::string &model_dir, const std::string &text_path) {
    lora_model_params mp = lora::model::default_params();
    mp.quantize = LORA_QUANT_NF4;
    lora::model model = lora::model::load(ctx, model_dir, mp);
    lora::tokenizer tok = lora::tokenizer::load(model_dir);
    model.create_adapter("verse");  // r 8, alpha 16, all linear layers
    std::printf("%s\n", model.trainable_summary().c_str());

    std::ifstream in(text_path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    const std::vector<std::int32_t> ids = tok.encode(text.str());
    const std::size_t batch = 4, seq = 64, steps = 8;
    if (ids.size() < batch * seq * steps) throw lora::error(LORA_ERR_INVALID_ARGUMENT, "finetune", "text too short");

    lora_trainer_params tp = lora::trainer::default_params();
    tp.lr = 3e-3;
    lora::trainer tr = lora::trainer::create(model, "verse", tp);
    for (std::size_t s = 0; s < steps; s++) {
        const lora::span<const std::int32_t> b(ids.data() + s * batch * seq, batch * seq);
        const lora_step_result r = tr.step(b, batch, seq);
        std::printf("step %zu: loss %.4f\n", s + 1, r.loss);
    }
    lora_generate_params gp = lora::model::default_generate_params();
    gp.max_new_tokens = 48;
    std::vector<std::int32_t> out = tok.encode("When I consider");
    const std::vector<std::int32_t> gen = model.generate(out, gp);
    out.insert(out.end(), gen.begin(), gen.end());
    std::printf("generated: %s\n", tok.decode(out).c_str());
}

int main(int argc, char **argv) try {
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

    finetune(ctx, argc > 1 ? argv[1] : "models/default", argc > 2 ? argv[2] : "data/finetune.txt");
    return 0;
} catch (const lora::error &e) {
    std::fprintf(stderr, "liblora: %s\n", e.what());
    return 1;
}
