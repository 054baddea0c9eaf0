//! liblora from Zig: quantize a weight to NF4, put a LoRA adapter on it,
//! run one forward/backward step, merge; then a short QLoRA fine-tune of a
//! model (NF4 at load, LoRA on all linear layers) and a generation.
//!
//!   main [MODEL_DIR [TEXT]]   (defaults: models/default, data/finetune.txt)
const std = @import("std");
const lora = @import("lora");

fn finetune(init: std.process.Init, ctx: lora.Context, model_dir: [:0]const u8, text_path: []const u8) !void {
    var mp = lora.Model.defaultParams();
    mp.quantize = lora.c.LORA_QUANT_NF4;
    var model = try lora.Model.load(ctx, model_dir, mp);
    defer model.deinit();
    var tok = try lora.Tokenizer.load(model_dir);
    defer tok.deinit();
    try model.createAdapter("verse", null); // r 8, alpha 16, all linear layers
    var sbuf: [256]u8 = undefined;
    std.debug.print("{s}\n", .{try model.trainableSummary(&sbuf)});

    const text = try std.Io.Dir.cwd().readFileAlloc(init.io, text_path, init.gpa, .limited(64 << 20));
    defer init.gpa.free(text);
    const ids = try tok.encodeAlloc(init.gpa, text, false);
    defer init.gpa.free(ids);
    const batch = 4;
    const seq = 64;
    const steps = 8;
    if (ids.len < batch * seq * steps) return error.TextTooShort;

    var tp = lora.Trainer.defaultParams();
    tp.lr = 3e-3;
    var tr = try lora.Trainer.init(model, "verse", tp);
    defer tr.deinit();
    for (0..steps) |s| {
        const r = try tr.step(ids[s * batch * seq ..][0 .. batch * seq], null, batch, seq);
        std.debug.print("step {d}: loss {d:.4}\n", .{ s + 1, r.loss });
    }

    var all: [64]i32 = undefined;
    const prompt = try tok.encode("When I consider", false, &all);
    var gp = lora.Model.defaultGenerateParams();
    gp.max_new_tokens = 48;
    const gen = try model.generate(prompt, gp, all[prompt.len..]);
    var out: [1024]u8 = undefined;
    std.debug.print("generated: {s}\n", .{try tok.decode(all[0 .. prompt.len + gen.len], true, &out)});
}

pub fn main(init: std.process.Init) !void {
    var params = lora.Context.defaultParams();
    params.backend = lora.c.LORA_BACKEND_CPU;
    var ctx = try lora.Context.init(params);
    defer ctx.deinit();

    const in = 256;
    const out = 128;
    const n = 4;
    const r = 8;
    var w: [in * out]f32 = undefined;
    var x: [n * in]f32 = undefined;
    var dy: [n * out]f32 = @splat(0.01);
    for (&w, 0..) |*v, i| v.* = 0.02 * @as(f32, @floatFromInt(@as(i64, @intCast(i * 7919 % 201)) - 100)) / 100;
    for (&x, 0..) |*v, i| v.* = @as(f32, @floatFromInt(@as(i64, @intCast(i % 17)) - 8)) / 8;

    var q = try lora.Nf4.quantize(ctx, &w, &.{ out, in }, null);
    defer q.deinit();
    const info = try q.info();
    std.debug.print("NF4: {d} weights, {d:.3} bits each\n", .{ info.numel, info.bits_per_weight });

    var layer = try lora.Layer.initNf4(ctx, q, null);
    defer layer.deinit();
    var cfg = lora.Layer.defaultAdapterConfig();
    cfg.r = r;
    cfg.alpha = 16;
    try layer.addAdapter("style", cfg);

    var y: [n * out]f32 = undefined;
    var da: [r * in]f32 = undefined;
    var db: [out * r]f32 = undefined;
    try layer.forward(&x, n, &y, true, null);
    try layer.backward(&x, &dy, n, null);
    try layer.getAdapter("style", true, &da, &db);
    std.debug.print("y[0] = {d:.5}, dB[0] = {d:.5}\n", .{ y[0], db[0] });
    try layer.zeroGrad();
    try layer.merge();
    std.debug.print("merged: {}\n", .{(try layer.shape()).merged});

    // Already merged: an error union, with the detail on this thread.
    if (layer.merge()) |_| {
        return error.MergeTwiceSucceeded;
    } else |err| {
        var buf: [256]u8 = undefined;
        std.debug.print("expected error: {s}: {s}\n", .{ @errorName(err), lora.lastError(&buf) });
    }

    const args = try init.minimal.args.toSlice(init.arena.allocator());
    const model_dir: [:0]const u8 = if (args.len > 1) args[1] else "models/default";
    const text_path: []const u8 = if (args.len > 2) args[2] else "data/finetune.txt";
    try finetune(init, ctx, model_dir, text_path);
}
