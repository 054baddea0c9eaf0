//! liblora from Zig: quantize a weight to NF4, put a LoRA adapter on it,
//! run one forward/backward step, merge.
const std = @import("std");
const lora = @import("lora");

pub fn main() !void {
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
}
