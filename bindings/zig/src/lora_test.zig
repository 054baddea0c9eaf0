//! The Zig binding's checks, the same as the Go binding's: a real NF4
//! round trip (quantize, info, dequantize, save, list, load), errors with
//! their status and message, the LoRA layer API, the tokenizer, and a
//! short QLoRA fine-tune of models/default (build.zig runs the tests in
//! the repository root, where models/ and data/ are).
const std = @import("std");
const lora = @import("lora");
const testing = std.testing;

fn ramp(buf: []f32, scale: f32) []f32 {
    var s: u32 = 12345;
    for (buf) |*x| {
        s = s *% 1664525 +% 1013904223;
        x.* = scale * (@as(f32, @floatFromInt(s >> 8)) / 16777216.0 - 0.5);
    }
    return buf;
}

fn cpu() !lora.Context {
    var p = lora.Context.defaultParams();
    p.backend = lora.c.LORA_BACKEND_CPU;
    p.n_threads = 2;
    return lora.Context.init(p);
}

/// `err` is `want`, and the thread's last error explains it.
fn expectFailure(want: lora.Error, result: anytype) !void {
    try testing.expectError(want, result);
    var buf: [512]u8 = undefined;
    const msg = lora.lastError(&buf);
    if (msg.len == 0) return error.NoErrorMessage;
}

test "version" {
    try testing.expect(lora.abiCompatible());
    try testing.expect(std.mem.indexOfScalar(u8, lora.versionString(), '.') != null);
}

test "quantize round trip" {
    var ctx = try cpu();
    defer ctx.deinit();
    try testing.expectEqual(@as(lora.c.lora_backend, lora.c.LORA_BACKEND_CPU), try ctx.backend());
    var dbuf: [128]u8 = undefined;
    try testing.expect(std.mem.indexOf(u8, try ctx.describe(&dbuf), "cpu") != null);

    const rows = 64;
    const cols = 96;
    var w: [rows * cols]f32 = undefined;
    _ = ramp(&w, 2);
    var q = try lora.Nf4.quantize(ctx, &w, &.{ rows, cols }, null);
    defer q.deinit();
    const info = try q.info();
    try testing.expectEqual(@as(usize, rows * cols), info.numel);
    try testing.expectEqual(@as(u32, 2), info.ndim);
    try testing.expectEqual(@as(u32, 1), info.double_quant);
    try testing.expect(@abs(info.bits_per_weight - 4.127) < 0.01);

    var back: [rows * cols]f32 = undefined;
    try q.dequantize(ctx, &back);
    var e2: f64 = 0;
    var r2: f64 = 0;
    for (w, back) |a, b| {
        e2 += (b - a) * (b - a);
        r2 += a * a;
    }
    try testing.expect(@sqrt(e2 / r2) < 0.15);

    // f16 and bf16 outputs: fp32's value rounded once.
    var h: [rows * cols]f16 = undefined;
    try q.dequantize(ctx, &h);
    try testing.expectEqual(@as(f16, @floatCast(back[1])), h[1]);
    var b16: [rows * cols]lora.BF16 = undefined;
    try q.dequantize(ctx, &b16);
    const bits: u32 = @bitCast(back[1]);
    try testing.expectEqual(@as(u16, @intCast((bits + 0x7fff + ((bits >> 16) & 1)) >> 16)), b16[1].bits);

    const pk = try q.packedCodes();
    try testing.expectEqual(@as(usize, rows * cols / 2), pk.len);
    var am: [rows * cols / 64]f32 = undefined;
    try q.absmax(&am);
    const dq = try q.doubleQuant();
    try testing.expectEqual(info.num_blocks, dq.codes.len);
    try testing.expectEqual(info.num_nested, dq.nested_absmax.len);

    // A plain (no double quantization) tensor from f16 input.
    var wh: [rows * cols]f16 = undefined;
    for (w, &wh) |a, *o| o.* = @floatCast(a);
    var plain = lora.Nf4.defaultParams();
    plain.double_quant = 0;
    var q2 = try lora.Nf4.quantize(ctx, &wh, &.{rows * cols}, plain);
    defer q2.deinit();
    try testing.expectEqual(@as(lora.c.lora_dtype, lora.c.LORA_DTYPE_F16), (try q2.info()).dtype);
    try expectFailure(error.InvalidState, q2.doubleQuant());

    // Save both, list, load back bit for bit.
    var tmp = testing.tmpDir(.{});
    defer tmp.cleanup();
    var dir_buf: [std.fs.max_path_bytes]u8 = undefined;
    const dir_len = try tmp.dir.realPath(testing.io, &dir_buf);
    var path_buf: [std.fs.max_path_bytes + 32]u8 = undefined;
    const path = try std.mem.printSentinel(&path_buf, "{s}/zig.safetensors", .{dir_buf[0..dir_len]}, 0);
    try lora.Nf4.saveMany(path, &.{ "model.a", "model.b" }, &.{ q, q2 });
    var list_buf: [256]u8 = undefined;
    try testing.expectEqualStrings("model.a\nmodel.b\n", try lora.Nf4.list(path, &list_buf));
    var loaded = try lora.Nf4.load(path, "model.a");
    defer loaded.deinit();
    try testing.expectEqualSlices(u8, pk, try loaded.packedCodes());
    var am2: [rows * cols / 64]f32 = undefined;
    try loaded.absmax(&am2);
    try testing.expectEqualSlices(f32, &am, &am2);
    try q.save(path, "only");
    try testing.expectEqualStrings("only\n", try lora.Nf4.list(path, &list_buf));
}

test "errors carry status and message" {
    var ctx = try cpu();
    defer ctx.deinit();
    var w: [256]f32 = undefined;
    _ = ramp(&w, 1);
    var bad = lora.Nf4.defaultParams();
    bad.blocksize = 48;
    try expectFailure(error.InvalidBlocksize, lora.Nf4.quantize(ctx, &w, &.{256}, bad));
    try expectFailure(error.BufferSize, lora.Nf4.quantize(ctx, &w, &.{257}, null));
    w[3] = std.math.nan(f32);
    try expectFailure(error.NonFinite, lora.Nf4.quantize(ctx, &w, &.{256}, null));
    try expectFailure(error.Io, lora.Nf4.load("/nonexistent/dir/missing.safetensors", "x"));
    var msg: [512]u8 = undefined;
    try testing.expect(std.mem.indexOf(u8, lora.lastError(&msg), "missing.safetensors") != null);
    try testing.expectEqual(@as(lora.c.lora_status, lora.c.LORA_ERR_IO), lora.statusOf(error.Io));
    try testing.expectEqualStrings(std.mem.span(lora.c.lora_status_str(lora.c.LORA_ERR_IO)), lora.statusStr(lora.c.LORA_ERR_IO));
}

test "layer" {
    var ctx = try cpu();
    defer ctx.deinit();
    const in = 32;
    const out = 24;
    const n = 5;
    const r = 4;
    var w: [in * out]f32 = undefined;
    var x: [n * in]f32 = undefined;
    var dy: [n * out]f32 = undefined;
    var bias: [out]f32 = undefined;
    _ = ramp(&w, 0.5);
    _ = ramp(&x, 1);
    _ = ramp(&dy, 1);
    _ = ramp(&bias, 0.1);
    var l = try lora.Layer.initDense(ctx, &w, in, out, false, &bias);
    defer l.deinit();
    var y0: [n * out]f32 = undefined;
    try l.forward(&x, n, &y0, false, null);

    var cfg = lora.Layer.defaultAdapterConfig();
    cfg.r = r;
    cfg.alpha = 8;
    try l.addAdapter("style", cfg);
    try l.addAdapter("other", cfg);
    try expectFailure(error.InvalidArgument, l.addAdapter("style", cfg));
    const s = try l.shape();
    try testing.expectEqual(lora.Layer.Shape{ .in_features = in, .out_features = out, .n_adapters = 2, .merged = false }, s);
    try testing.expectEqual(@as(i32, 1), try l.adapterIndex("other"));
    const pc = try l.paramCounts();
    try testing.expectEqual(@as(usize, 2 * r * (in + out)), pc.trainable);
    try testing.expectEqual(pc.trainable + in * out + out, pc.total);

    var y: [n * out]f32 = undefined;
    try l.forward(&x, n, &y, false, null);
    try testing.expectEqualSlices(f32, &y0, &y); // B = 0: no change

    var a: [r * in]f32 = undefined;
    var b: [out * r]f32 = undefined;
    try l.getAdapter("style", false, &a, &b);
    @memset(&b, 0.01);
    try l.setAdapter("style", &a, &b);
    try l.forward(&x, n, &y, true, null);
    var dx: [n * in]f32 = undefined;
    try l.backward(&x, &dy, n, &dx);
    try l.backward(&x, &dy, n, null);
    var da: [r * in]f32 = undefined;
    var db: [out * r]f32 = undefined;
    try l.getAdapter("style", true, &da, &db);
    var g: f32 = 0;
    for (db) |v| g += @abs(v);
    try testing.expect(g > 0);
    try expectFailure(error.InvalidState, l.merge());
    try l.zeroGrad();
    try l.merge();
    var ym: [n * out]f32 = undefined;
    try l.forward(&x, n, &ym, false, null);
    for (y, ym) |u, v| try testing.expect(@abs(u - v) <= 1e-5 * (1 + @abs(u)));
    try l.unmerge();
    try l.swapAdapter(&.{ "style", "other" }, &.{ 0.5, 1 });
    try l.swapAdapter(&.{}, null);
    try l.forward(&x, n, &y, false, null);
    try testing.expectEqualSlices(f32, &y0, &y);
    try l.addWeighted("mix", &.{ "style", "other" }, &.{ 1, 1 }, lora.c.LORA_COMBINE_CAT);
    var wt: [in * out]f32 = undefined;
    try l.weight(&wt);
    // A mixed-adapter batch into bf16.
    var y16: [n * out]lora.BF16 = undefined;
    try l.forward(&x, n, &y16, false, &.{ 0, -1, 1, 0, -1 });

    // NF4 base; the tensor may go before the layer.
    var q = try lora.Nf4.quantize(ctx, &w, &.{ out, in }, null);
    var ql = try lora.Layer.initNf4(ctx, q, null);
    defer ql.deinit();
    q.deinit();
    try ql.addAdapter("a", cfg);
    try ql.merge();
    const e = try ql.requantize(null);
    try testing.expect(e.rel_rms > 0 and e.rel_rms < 0.2 and e.max_abs > 0);
}

fn tmpPath(buf: []u8, tmp: *testing.TmpDir, name: []const u8) ![:0]const u8 {
    var dir_buf: [std.fs.max_path_bytes]u8 = undefined;
    const dir_len = try tmp.dir.realPath(testing.io, &dir_buf);
    return std.mem.printSentinel(buf, "{s}/{s}", .{ dir_buf[0..dir_len], name }, 0);
}

fn maxAbsDiff(a: []const f32, b: []const f32) f32 {
    var m: f32 = 0;
    for (a, b) |x, y| m = @max(m, @abs(x - y));
    return m;
}

const model_dir = "models/default";

test "tokenizer" {
    var tok = try lora.Tokenizer.load(model_dir);
    defer tok.deinit();
    try testing.expectEqual(@as(usize, 256), (try tok.info()).vocab_size);
    const s = "Shall I compare thee to a summer's day?";
    const ids = try tok.encodeAlloc(testing.allocator, s, false);
    defer testing.allocator.free(ids);
    try testing.expectEqual(ids.len, try tok.count(s, false));
    const back = try tok.decodeAlloc(testing.allocator, ids, true);
    defer testing.allocator.free(back);
    try testing.expectEqualStrings(s, back);
    var piece_buf: [32]u8 = undefined;
    const piece = try tok.idToToken(ids[0], &piece_buf);
    var z: [33]u8 = undefined;
    try testing.expectEqual(ids[0], try tok.tokenToId(try std.mem.printSentinel(&z, "{s}", .{piece}, 0)));
    try testing.expect(!try tok.isSpecial(ids[0]));
    var small: [2]i32 = undefined;
    try expectFailure(error.BufferSize, tok.encode(s, false, &small));
    try expectFailure(error.InvalidArgument, tok.encode("\xff\xfe", false, &small));
    var text_buf: [8]u8 = undefined;
    try expectFailure(error.InvalidArgument, tok.decode(&.{-1}, true, &text_buf));
    try expectFailure(error.Io, lora.Tokenizer.load("/nonexistent/tokenizer.json"));
}

// NF4 at load, LoRA r 8 on all linear layers, five steps on one batch of
// 2 x 64 tokens of data/finetune.txt; generation, save/load, merge/unmerge,
// swaps, a trainer checkpoint resumed on a fresh copy of the model.
test "fine-tune" {
    const gpa = testing.allocator;
    var ctx = try cpu();
    defer ctx.deinit();
    var tmp = testing.tmpDir(.{});
    defer tmp.cleanup();

    var mp = lora.Model.defaultParams();
    mp.quantize = lora.c.LORA_QUANT_NF4;
    var model = try lora.Model.load(ctx, model_dir, mp);
    defer model.deinit();
    const info = try model.info();
    try testing.expect(info.quantized == 1 and info.vocab_size == 256 and info.n_adapters == 0);
    var tok = try lora.Tokenizer.load(model_dir);
    defer tok.deinit();

    const text = try std.Io.Dir.cwd().readFileAlloc(testing.io, "data/finetune.txt", gpa, .limited(1 << 20));
    defer gpa.free(text);
    const all = try tok.encodeAlloc(gpa, text, false);
    defer gpa.free(all);
    const batch = 2;
    const seq = 64;
    try testing.expect(all.len >= batch * seq);
    const ids = all[0 .. batch * seq];
    const n_logits = batch * seq * 256;

    const base = try gpa.alloc(f32, n_logits);
    defer gpa.free(base);
    try model.logits(ids, batch, seq, null, base);
    var cp = lora.Model.defaultCreateParams();
    cp.r = 8;
    cp.alpha = 16;
    cp.target_modules = "all-linear";
    try model.createAdapter("verse", cp);
    try expectFailure(error.InvalidArgument, model.createAdapter("verse", cp));
    var sbuf: [256]u8 = undefined;
    try testing.expect(std.mem.indexOf(u8, try model.trainableSummary(&sbuf), "trainable params") != null);
    try testing.expect((try model.paramCounts()).trainable > 0);

    const before = try model.loss(ids, null, batch, seq);
    var tp = lora.Trainer.defaultParams();
    tp.lr = 3e-3;
    var ckpt_buf: [std.fs.max_path_bytes]u8 = undefined;
    const ckpt = try tmpPath(&ckpt_buf, &tmp, "ckpt");
    var losses: [5]f64 = undefined;
    {
        var tr = try lora.Trainer.init(model, "verse", tp);
        defer tr.deinit();
        for (&losses, 0..) |*l, i| {
            const r = try tr.step(ids, null, batch, seq);
            try testing.expect(std.math.isFinite(r.loss) and r.step == i + 1 and r.tokens == batch * seq);
            l.* = r.loss;
        }
        try testing.expect((try model.memory(tr)).optimizer > 0);
        try tr.save(ckpt);
        // A GPU, or its absence stated; the CPU is always there.
        tr.useDevice(0, lora.c.LORA_COMPUTE_BF16) catch |e| try testing.expectEqual(error.CudaUnavailable, e);
        try tr.useDevice(-1, lora.c.LORA_COMPUTE_BF16);
        try testing.expectError(error.InvalidArgument, tr.useDevice(0, 9));
        if (model.useDevice(0, lora.c.LORA_COMPUTE_F32)) |_| {
            try model.useDevice(-1, lora.c.LORA_COMPUTE_F32);
        } else |e| try testing.expectEqual(error.CudaUnavailable, e);
        try testing.expectError(error.InvalidArgument, model.useDevice(0, 9));
        try testing.expectError(error.InvalidState, model.setDeviceOption(lora.c.LORA_DEVICE_RECOMPUTE, false));
        try testing.expectError(error.InvalidState, model.deviceOption(lora.c.LORA_DEVICE_TENSOR_CORE_ATTENTION));
        try testing.expectError(error.BufferSize, tr.step(ids, null, batch, seq + 1));
    }
    const after = try model.loss(ids, null, batch, seq);
    // One fixed batch: deterministic, the loss must fall.
    try testing.expect(after < before and losses[4] < losses[0]);

    // Generation decodes to text; a mixed batch, one prompt per adapter.
    var prompt_buf: [64]i32 = undefined;
    const prompt = try tok.encode("When I consider", false, &prompt_buf);
    var gp = lora.Model.defaultGenerateParams();
    gp.max_new_tokens = 16;
    var gen_buf: [16]i32 = undefined;
    const gen = try model.generate(prompt, gp, &gen_buf);
    try testing.expect(gen.len > 0);
    var gen_text: [256]u8 = undefined;
    try testing.expect((try tok.decode(gen, true, &gen_text)).len > 0);
    var mixed: [32]i32 = undefined;
    var mixed_lens: [2]usize = undefined;
    try model.generateBatch(gpa, &.{ prompt, prompt }, &.{ "verse", null }, gp, &mixed, &mixed_lens);
    try testing.expectEqualSlices(i32, gen, mixed[0..mixed_lens[0]]);

    // Save and load back as a second adapter: the same function.
    const trained = try gpa.alloc(f32, n_logits);
    defer gpa.free(trained);
    const got = try gpa.alloc(f32, n_logits);
    defer gpa.free(got);
    try model.logits(ids, batch, seq, null, trained);
    try testing.expect(maxAbsDiff(trained, base) > 1e-3);
    var adir_buf: [std.fs.max_path_bytes]u8 = undefined;
    const adir = try tmpPath(&adir_buf, &tmp, "verse");
    try model.saveAdapter("verse", adir);
    try model.loadAdapter(adir, "loaded");
    try model.logits(ids, batch, seq, &.{ "loaded", null }, got);
    const half = n_logits / 2;
    try testing.expect(maxAbsDiff(got[0..half], trained[0..half]) < 1e-5);
    try testing.expect(maxAbsDiff(got[half..], base[half..]) < 1e-5);

    // Swaps: the base alone, the loaded copy.
    try model.swapAdapter(&.{}, null);
    try model.logits(ids, batch, seq, null, got);
    try testing.expect(maxAbsDiff(got, base) < 1e-5);
    try model.swapAdapter(&.{"loaded"}, null);
    try model.logits(ids, batch, seq, null, got);
    try testing.expect(maxAbsDiff(got, trained) < 1e-5);
    try expectFailure(error.InvalidArgument, model.swapAdapter(&.{"nope"}, null));

    // Merge, a merged swap, unmerge.
    try model.merge();
    try model.logits(ids, batch, seq, null, got);
    try testing.expect(maxAbsDiff(got, trained) < 1e-3);
    try expectFailure(error.InvalidState, model.merge());
    try model.swapAdapter(&.{}, null);
    try model.logits(ids, batch, seq, null, got);
    try testing.expect(maxAbsDiff(got, base) < 1e-3);
    try model.swapAdapter(&.{"verse"}, &.{1});
    try model.unmerge();
    try model.logits(ids, batch, seq, null, got);
    try testing.expect(maxAbsDiff(got, trained) < 1e-5);
    try model.removeAdapter("loaded");
    var mdir_buf: [std.fs.max_path_bytes]u8 = undefined;
    try model.exportMerged(try tmpPath(&mdir_buf, &tmp, "merged"));

    // The checkpoint on a fresh copy resumes at step 5; the trainer keeps
    // the model alive after its handle is freed.
    var fresh = try lora.Model.load(ctx, model_dir, mp);
    var rt = try lora.Trainer.fromCheckpoint(fresh, ckpt, null);
    defer rt.deinit();
    fresh.deinit();
    try testing.expectEqual(@as(u64, 6), (try rt.step(ids, null, batch, seq)).step);

    try expectFailure(error.Io, lora.Model.load(ctx, "/nonexistent/model", null));
}

test "paging" {
    var ctx = try cpu();
    defer ctx.deinit();
    var p = lora.Context.defaultPagingParams();
    p.budget_bytes = 1 << 20;
    try ctx.setPaging(p);
    const st = try ctx.pagedStats();
    try testing.expectEqual(@as(u64, 1 << 20), st.budget_bytes);
    p.dir = "/nonexistent/paging";
    try expectFailure(error.Io, ctx.setPaging(p));
    try ctx.setPaging(null);
}
