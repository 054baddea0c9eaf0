//! liblora for Zig: the C API of lora.h wrapped in error unions and slices.
//!
//! - Every handle type (Context, Nf4, Layer, Model, Trainer, Tokenizer)
//!   owns its C object; `deinit` frees it. Views (`Nf4.packedCodes`, `Nf4.doubleQuant`) point into the
//!   tensor and live until its `deinit`.
//! - Every failing call returns a `lora.Error`; the detail is the calling
//!   thread's `lastError` (thread-local in liblora; a Zig thread never
//!   migrates, so read it on the same thread before the next liblora call).
//! - Buffers are slices of f32, f16 or `BF16`: the element type picks the
//!   dtype. A slice is passed to C without copying.
//! - Parameter structs are the C ones (`Model.Params` is
//!   lora_model_params, ...), from each type's `default*Params()`; a
//!   progress callback may be set in them as in C.
//! - Adding a wrapper for a new handle type is mechanical: a struct holding
//!   the pointer, `deinit` calling its `_free`, every status through `check`.
const std = @import("std");

/// The translated header, for what the wrapper does not cover.
pub const c = @import("c");

/// One error per lora_status (`Unknown` for a status this binding predates).
pub const Error = error{
    NullPointer,
    InvalidArgument,
    InvalidShape,
    InvalidBlocksize,
    BufferSize,
    UnknownDtype,
    NonFinite,
    Io,
    FileFormat,
    TensorNotFound,
    DtypeMismatch,
    ShapeMismatch,
    CudaUnavailable,
    Cuda,
    OutOfMemory,
    Unsupported,
    StructSize,
    Panic,
    Internal,
    InvalidState,
    Cancelled,
    DeviceMemoryExceeded,
    Unknown,
};

const status_errors = [_]struct { c_int, Error }{
    .{ c.LORA_ERR_NULL_POINTER, error.NullPointer },
    .{ c.LORA_ERR_INVALID_ARGUMENT, error.InvalidArgument },
    .{ c.LORA_ERR_INVALID_SHAPE, error.InvalidShape },
    .{ c.LORA_ERR_INVALID_BLOCKSIZE, error.InvalidBlocksize },
    .{ c.LORA_ERR_BUFFER_SIZE, error.BufferSize },
    .{ c.LORA_ERR_UNKNOWN_DTYPE, error.UnknownDtype },
    .{ c.LORA_ERR_NON_FINITE, error.NonFinite },
    .{ c.LORA_ERR_IO, error.Io },
    .{ c.LORA_ERR_FILE_FORMAT, error.FileFormat },
    .{ c.LORA_ERR_TENSOR_NOT_FOUND, error.TensorNotFound },
    .{ c.LORA_ERR_DTYPE_MISMATCH, error.DtypeMismatch },
    .{ c.LORA_ERR_SHAPE_MISMATCH, error.ShapeMismatch },
    .{ c.LORA_ERR_CUDA_UNAVAILABLE, error.CudaUnavailable },
    .{ c.LORA_ERR_CUDA, error.Cuda },
    .{ c.LORA_ERR_OUT_OF_MEMORY, error.OutOfMemory },
    .{ c.LORA_ERR_UNSUPPORTED, error.Unsupported },
    .{ c.LORA_ERR_STRUCT_SIZE, error.StructSize },
    .{ c.LORA_ERR_PANIC, error.Panic },
    .{ c.LORA_ERR_INTERNAL, error.Internal },
    .{ c.LORA_ERR_INVALID_STATE, error.InvalidState },
    .{ c.LORA_ERR_CANCELLED, error.Cancelled },
    .{ c.LORA_ERR_DEVICE_MEMORY_EXCEEDED, error.DeviceMemoryExceeded },
};

/// The one error path: LORA_OK or the matching error.
pub fn check(status: c.lora_status) Error!void {
    if (status == c.LORA_OK) return;
    inline for (status_errors) |se| {
        if (status == se[0]) return se[1];
    }
    return error.Unknown;
}

/// The lora_status of an error (LORA_ERR_INTERNAL for Unknown).
pub fn statusOf(err: Error) c.lora_status {
    inline for (status_errors) |se| {
        if (err == se[1]) return se[0];
    }
    return c.LORA_ERR_INTERNAL;
}

/// lora_status_str: a static name of the status.
pub fn statusStr(status: c.lora_status) [:0]const u8 {
    return std.mem.span(c.lora_status_str(status));
}

/// The calling thread's last error message, copied into `buf` (truncated
/// to fit); empty when there is none.
pub fn lastError(buf: []u8) []const u8 {
    if (buf.len == 0) return buf[0..0];
    _ = c.lora_last_error(buf.ptr, buf.len);
    return cString(buf);
}

/// The NUL-terminated text liblora wrote into `buf` (it truncates at a
/// character boundary, so the text may end before buf.len - 1).
fn cString(buf: []const u8) []const u8 {
    return buf[0 .. std.mem.indexOfScalar(u8, buf, 0) orelse buf.len];
}

/// lora_version(): (major << 16) | (minor << 8) | patch.
pub fn version() u32 {
    return c.lora_version();
}

pub fn versionString() [:0]const u8 {
    return std.mem.span(c.lora_version_string());
}

/// Whether the loaded library has the header's ABI major.
pub fn abiCompatible() bool {
    return (c.lora_version() >> 16) == c.LORA_VERSION_MAJOR;
}

/// bfloat16 bits (the upper half of an f32): LORA_DTYPE_BF16. Zig's f16
/// is LORA_DTYPE_F16 and f32 LORA_DTYPE_F32.
pub const BF16 = extern struct { bits: u16 };

fn dtypeOf(comptime T: type) c.lora_dtype {
    return switch (T) {
        f32 => c.LORA_DTYPE_F32,
        f16 => c.LORA_DTYPE_F16,
        BF16 => c.LORA_DTYPE_BF16,
        else => @compileError("liblora buffers hold f32, f16 or lora.BF16, not " ++ @typeName(T)),
    };
}

/// A buffer argument: a slice (or pointer to an array) of f32, f16 or BF16.
fn Elem(comptime S: type) type {
    const info = @typeInfo(S).pointer;
    return switch (info.size) {
        .slice, .many, .c => info.child,
        .one => @typeInfo(info.child).array.child,
    };
}

fn bytesConst(data: anytype) struct { ptr: ?*const anyopaque, len: usize, dtype: c.lora_dtype } {
    const T = Elem(@TypeOf(data));
    const s: []const T = data;
    return .{ .ptr = if (s.len == 0) null else @ptrCast(s.ptr), .len = s.len * @sizeOf(T), .dtype = dtypeOf(T) };
}

fn bytesMut(data: anytype) struct { ptr: ?*anyopaque, len: usize, dtype: c.lora_dtype } {
    const T = Elem(@TypeOf(data));
    const s: []T = data;
    return .{ .ptr = if (s.len == 0) null else @ptrCast(s.ptr), .len = s.len * @sizeOf(T), .dtype = dtypeOf(T) };
}

fn optPtr(comptime T: type, s: ?[]const T) ?[*]const T {
    const v = s orelse return null;
    return if (v.len == 0) null else v.ptr;
}

/// lora_context: backend, CPU threads, seed.
pub const Context = struct {
    handle: *c.lora_context,

    pub const Params = c.lora_context_params;

    pub fn defaultParams() Params {
        return c.lora_context_default_params();
    }

    /// A context; null params means the defaults.
    pub fn init(params: ?Params) Error!Context {
        var out: ?*c.lora_context = null;
        const p: ?*const Params = if (params) |*v| v else null;
        try check(c.lora_context_new(p, &out));
        return .{ .handle = out.? };
    }

    pub fn deinit(self: *Context) void {
        c.lora_context_free(self.handle);
        self.* = undefined;
    }

    /// LORA_BACKEND_CPU or LORA_BACKEND_CUDA.
    pub fn backend(self: Context) Error!c.lora_backend {
        var b: c.lora_backend = 0;
        try check(c.lora_context_backend(self.handle, &b));
        return b;
    }

    /// The device's description, e.g. "cpu (2 CPU threads)", in `buf`
    /// (truncated to fit).
    pub fn describe(self: Context, buf: []u8) Error![]const u8 {
        if (buf.len == 0) return error.BufferSize;
        try check(c.lora_context_describe(self.handle, buf.ptr, buf.len, null));
        return cString(buf);
    }

    pub const PagingParams = c.lora_paging_params;
    pub const PagedStats = c.lora_paged_stats;

    pub fn defaultPagingParams() PagingParams {
        return c.lora_paging_default_params();
    }

    /// Budget and directory of the context's paged memory (where a QLoRA
    /// trainer keeps AdamW's moments by default); null: the defaults.
    pub fn setPaging(self: Context, params: ?PagingParams) Error!void {
        const p: ?*const PagingParams = if (params) |*v| v else null;
        try check(c.lora_context_set_paging(self.handle, p));
    }

    /// Counters over the context's paged buffers.
    pub fn pagedStats(self: Context) Error!PagedStats {
        var st = std.mem.zeroes(PagedStats);
        st.struct_size = @sizeOf(PagedStats);
        try check(c.lora_context_paged_stats(self.handle, &st));
        return st;
    }
};

/// lora_nf4: an immutable NF4-quantized tensor.
pub const Nf4 = struct {
    handle: *c.lora_nf4,

    pub const Params = c.lora_nf4_params;
    pub const Info = c.lora_nf4_info;

    pub fn defaultParams() Params {
        return c.lora_nf4_default_params();
    }

    /// Quantizes `data` (row-major, `shape`; f32, f16 or BF16) like
    /// bitsandbytes quantize_4bit(quant_type="nf4"); null params: defaults.
    pub fn quantize(ctx: Context, data: anytype, shape: []const usize, params: ?Params) Error!Nf4 {
        const d = bytesConst(data);
        var out: ?*c.lora_nf4 = null;
        const p: ?*const Params = if (params) |*v| v else null;
        try check(c.lora_quantize_nf4(ctx.handle, d.ptr, d.len, d.dtype, shape.ptr, shape.len, p, &out));
        return .{ .handle = out.? };
    }

    /// Loads the NF4 weight under module prefix `prefix` of a safetensors file.
    pub fn load(path: [:0]const u8, prefix: [:0]const u8) Error!Nf4 {
        var out: ?*c.lora_nf4 = null;
        try check(c.lora_nf4_load(path.ptr, prefix.ptr, &out));
        return .{ .handle = out.? };
    }

    /// Saves tensors to one safetensors file (transformers' 4-bit layout),
    /// tensors[i] under prefixes[i]; atomic.
    pub fn saveMany(path: [:0]const u8, prefixes: []const [*:0]const u8, tensors: []const Nf4) Error!void {
        if (prefixes.len != tensors.len) return error.InvalidArgument;
        // Nf4 is exactly one pointer: the slice is the C array of handles.
        comptime std.debug.assert(@sizeOf(Nf4) == @sizeOf(*c.lora_nf4));
        try check(c.lora_nf4_save(path.ptr, @ptrCast(prefixes.ptr), @ptrCast(tensors.ptr), tensors.len));
    }

    /// Saves this tensor alone under `prefix`.
    pub fn save(self: Nf4, path: [:0]const u8, prefix: [:0]const u8) Error!void {
        const prefixes = [_][*:0]const u8{prefix.ptr};
        return saveMany(path, &prefixes, &[_]Nf4{self});
    }

    /// The module prefixes in a safetensors file, each followed by '\n',
    /// into `buf`; error.BufferSize if they do not fit.
    pub fn list(path: [:0]const u8, buf: []u8) Error![]const u8 {
        var needed: usize = 0;
        try check(c.lora_nf4_list(path.ptr, buf.ptr, buf.len, &needed));
        if (needed >= buf.len) return error.BufferSize;
        return buf[0..needed];
    }

    pub fn deinit(self: *Nf4) void {
        c.lora_nf4_free(self.handle);
        self.* = undefined;
    }

    pub fn info(self: Nf4) Error!Info {
        var i: Info = undefined;
        try check(c.lora_nf4_get_info(self.handle, &i));
        return i;
    }

    /// Dequantizes into `out` (numel elements of f32, f16 or BF16).
    pub fn dequantize(self: Nf4, ctx: Context, out: anytype) Error!void {
        const o = bytesMut(out);
        try check(c.lora_nf4_dequantize(ctx.handle, self.handle, o.dtype, o.ptr, o.len));
    }

    /// The packed 4-bit codes, viewed in place (valid until deinit).
    pub fn packedCodes(self: Nf4) Error![]const u8 {
        var p: [*c]const u8 = null;
        var n: usize = 0;
        try check(c.lora_nf4_packed(self.handle, &p, &n));
        return p[0..n];
    }

    /// Copies the fp32 block scales into `out` (num_blocks floats).
    pub fn absmax(self: Nf4, out: []f32) Error!void {
        try check(c.lora_nf4_absmax(self.handle, out.ptr, out.len));
    }

    pub const DoubleQuant = struct {
        codes: []const u8,
        nested_absmax: []const f32,
        offset: f32,
    };

    /// The double-quantization state, viewed in place (valid until deinit);
    /// error.InvalidState without double quantization.
    pub fn doubleQuant(self: Nf4) Error!DoubleQuant {
        var codes: [*c]const u8 = null;
        var nested: [*c]const f32 = null;
        var nb: usize = 0;
        var nn: usize = 0;
        var offset: f32 = 0;
        try check(c.lora_nf4_double_quant(self.handle, &codes, &nb, &nested, &nn, &offset));
        return .{ .codes = codes[0..nb], .nested_absmax = nested[0..nn], .offset = offset };
    }
};

/// lora_layer: a linear layer with named LoRA adapters (one thread at a time).
pub const Layer = struct {
    handle: *c.lora_layer,

    pub const AdapterConfig = c.lora_adapter_config;

    pub fn defaultAdapterConfig() AdapterConfig {
        return c.lora_adapter_default_config();
    }

    /// A layer over a dense weight [out,in] (or [in,out] with
    /// fan_in_fan_out) of f32, f16 or BF16, copied; bias null or out floats.
    pub fn initDense(ctx: Context, base: anytype, in_features: usize, out_features: usize, fan_in_fan_out: bool, bias: ?[]const f32) Error!Layer {
        if (bias) |v| if (v.len != out_features) return error.BufferSize;
        const w = bytesConst(base);
        var out: ?*c.lora_layer = null;
        try check(c.lora_layer_new(ctx.handle, w.ptr, w.len, w.dtype, in_features, out_features, @intFromBool(fan_in_fan_out), optPtr(f32, bias), &out));
        return .{ .handle = out.? };
    }

    /// A layer over an NF4 weight [out,in] (copied); bias null or out floats.
    pub fn initNf4(ctx: Context, base: Nf4, bias: ?[]const f32) Error!Layer {
        if (bias) |v| if (v.len != (try base.info()).shape[0]) return error.BufferSize;
        var out: ?*c.lora_layer = null;
        try check(c.lora_layer_new_nf4(ctx.handle, base.handle, optPtr(f32, bias), &out));
        return .{ .handle = out.? };
    }

    pub fn deinit(self: *Layer) void {
        c.lora_layer_free(self.handle);
        self.* = undefined;
    }

    pub fn addAdapter(self: Layer, name: [:0]const u8, config: AdapterConfig) Error!void {
        try check(c.lora_layer_add_adapter(self.handle, name.ptr, &config));
    }

    pub fn setBiasTrainable(self: Layer, trainable: bool) Error!void {
        try check(c.lora_layer_set_bias_trainable(self.handle, @intFromBool(trainable)));
    }

    pub fn paramCounts(self: Layer) Error!struct { trainable: usize, total: usize } {
        var t: usize = 0;
        var all: usize = 0;
        try check(c.lora_layer_param_counts(self.handle, &t, &all));
        return .{ .trainable = t, .total = all };
    }

    /// The index of adapter `name`, for forward's row_adapter.
    pub fn adapterIndex(self: Layer, name: [:0]const u8) Error!i32 {
        var i: i32 = -1;
        try check(c.lora_layer_adapter_index(self.handle, name.ptr, &i));
        return i;
    }

    pub const Shape = struct { in_features: usize, out_features: usize, n_adapters: usize, merged: bool };

    pub fn shape(self: Layer) Error!Shape {
        var s: Shape = .{ .in_features = 0, .out_features = 0, .n_adapters = 0, .merged = false };
        var merged: u32 = 0;
        try check(c.lora_layer_get_shape(self.handle, &s.in_features, &s.out_features, &s.n_adapters, &merged));
        s.merged = merged != 0;
        return s;
    }

    /// y (n·out) = forward(x (n·in)); row_adapter null (the active
    /// adapters) or n adapter indices (-1: base only); `train` applies
    /// dropout and records what backward needs.
    pub fn forward(self: Layer, x: anytype, n: usize, y: anytype, train: bool, row_adapter: ?[]const i32) Error!void {
        const xs = bytesConst(x);
        const ys = bytesMut(y);
        try check(c.lora_layer_forward(self.handle, xs.ptr, xs.len, xs.dtype, n, optPtr(i32, row_adapter), ys.ptr, ys.len, ys.dtype, @intFromBool(train)));
    }

    /// Backward of the latest forward (same x, n): writes dx (pass null
    /// when not needed) and accumulates the adapters' gradients.
    pub fn backward(self: Layer, x: anytype, dy: anytype, n: usize, dx: anytype) Error!void {
        const xs = bytesConst(x);
        const dys = bytesConst(dy);
        if (@TypeOf(dx) == @TypeOf(null)) {
            try check(c.lora_layer_backward(self.handle, xs.ptr, xs.len, xs.dtype, dys.ptr, dys.len, dys.dtype, n, null, 0, c.LORA_DTYPE_F32));
        } else {
            const dxs = bytesMut(dx);
            try check(c.lora_layer_backward(self.handle, xs.ptr, xs.len, xs.dtype, dys.ptr, dys.len, dys.dtype, n, dxs.ptr, dxs.len, dxs.dtype));
        }
    }

    pub fn zeroGrad(self: Layer) Error!void {
        try check(c.lora_layer_zero_grad(self.handle));
    }

    /// Copies adapter `name`'s A [r,in] and B [out,r] (or dA, dB with `grads`).
    pub fn getAdapter(self: Layer, name: [:0]const u8, grads: bool, a: []f32, b: []f32) Error!void {
        try check(c.lora_layer_get_adapter(self.handle, name.ptr, @intFromBool(grads), a.ptr, a.len, b.ptr, b.len));
    }

    pub fn setAdapter(self: Layer, name: [:0]const u8, a: []const f32, b: []const f32) Error!void {
        try check(c.lora_layer_set_adapter(self.handle, name.ptr, a.ptr, a.len, b.ptr, b.len));
    }

    pub fn merge(self: Layer) Error!void {
        try check(c.lora_layer_merge(self.handle));
    }

    pub fn unmerge(self: Layer) Error!void {
        try check(c.lora_layer_unmerge(self.handle));
    }

    /// Makes `names` the active adapters, scaled by `multipliers` (null: all 1).
    pub fn swapAdapter(self: Layer, names: []const [*:0]const u8, multipliers: ?[]const f32) Error!void {
        if (multipliers) |m| if (m.len != names.len) return error.InvalidArgument;
        try check(c.lora_layer_swap_adapter(self.handle, if (names.len == 0) null else @ptrCast(names.ptr), optPtr(f32, multipliers), names.len));
    }

    /// Requantizes the merged weight as the new NF4 base; the error it added.
    pub fn requantize(self: Layer, params: ?Nf4.Params) Error!struct { rel_rms: f64, max_abs: f32 } {
        var rel: f64 = 0;
        var mx: f32 = 0;
        const p: ?*const Nf4.Params = if (params) |*v| v else null;
        try check(c.lora_layer_requantize(self.handle, p, &rel, &mx));
        return .{ .rel_rms = rel, .max_abs = mx };
    }

    /// The weight the layer computes with (base layout) into `out`.
    pub fn weight(self: Layer, out: anytype) Error!void {
        const o = bytesMut(out);
        try check(c.lora_layer_weight(self.handle, o.dtype, o.ptr, o.len));
    }

    /// PEFT add_weighted_adapter (LORA_COMBINE_LINEAR or LORA_COMBINE_CAT).
    pub fn addWeighted(self: Layer, name: [:0]const u8, names: []const [*:0]const u8, weights: []const f32, how: c.lora_combine) Error!void {
        if (weights.len != names.len) return error.InvalidArgument;
        try check(c.lora_layer_add_weighted(self.handle, name.ptr, @ptrCast(names.ptr), weights.ptr, names.len, how));
    }
};

/// A batch of token ids is `batch * seq` long.
fn checkBatch(ids: []const i32, labels: ?[]const i32, batch: usize, seq: usize) Error!void {
    if (ids.len != batch * seq) return error.BufferSize;
    if (labels) |l| if (l.len != batch * seq) return error.BufferSize;
}

/// Per-sequence adapter names for C (null entries: the base alone).
fn adapterArray(adapters: ?[]const ?[*:0]const u8) [*c]const [*c]const u8 {
    const a = adapters orelse return null;
    return @ptrCast(a.ptr);
}

/// lora_tokenizer: a Hugging Face tokenizer.json (byte-level or
/// SentencePiece-style BPE). Immutable: usable from several threads.
pub const Tokenizer = struct {
    handle: *c.lora_tokenizer,

    /// Loads a tokenizer.json, or the one in a model directory.
    pub fn load(path: [:0]const u8) Error!Tokenizer {
        var out: ?*c.lora_tokenizer = null;
        try check(c.lora_tokenizer_load(path.ptr, &out));
        return .{ .handle = out.? };
    }

    pub fn deinit(self: *Tokenizer) void {
        c.lora_tokenizer_free(self.handle);
        self.* = undefined;
    }

    /// The token ids of UTF-8 `text` into `out`; returns the filled part
    /// (error.BufferSize when `out` is too short: see `count`).
    pub fn encode(self: Tokenizer, text: []const u8, add_special: bool, out: []i32) Error![]i32 {
        var n: usize = 0;
        try check(c.lora_tokenizer_encode(self.handle, text.ptr, text.len, @intFromBool(add_special), if (out.len == 0) null else out.ptr, out.len, &n));
        return out[0..n];
    }

    /// How many ids `text` encodes to.
    pub fn count(self: Tokenizer, text: []const u8, add_special: bool) Error!usize {
        var n: usize = 0;
        const st = c.lora_tokenizer_encode(self.handle, text.ptr, text.len, @intFromBool(add_special), null, 0, &n);
        if (st != c.LORA_ERR_BUFFER_SIZE) try check(st);
        return n;
    }

    /// The token ids of `text` in a new slice owned by the caller.
    pub fn encodeAlloc(self: Tokenizer, gpa: std.mem.Allocator, text: []const u8, add_special: bool) (Error || std.mem.Allocator.Error)![]i32 {
        const ids = try gpa.alloc(i32, try self.count(text, add_special));
        errdefer gpa.free(ids);
        return self.encode(text, add_special, ids);
    }

    /// The text of `ids` (special tokens left out with `skip_special`) in
    /// `buf`; error.BufferSize unless buf.len > the text's length.
    pub fn decode(self: Tokenizer, ids: []const i32, skip_special: bool, buf: []u8) Error![]u8 {
        var n: usize = 0;
        try check(c.lora_tokenizer_decode(self.handle, if (ids.len == 0) null else ids.ptr, ids.len, @intFromBool(skip_special), if (buf.len == 0) null else buf.ptr, buf.len, &n));
        return buf[0..n];
    }

    /// The text of `ids` in a new slice owned by the caller.
    pub fn decodeAlloc(self: Tokenizer, gpa: std.mem.Allocator, ids: []const i32, skip_special: bool) (Error || std.mem.Allocator.Error)![]u8 {
        var n: usize = 0;
        const st = c.lora_tokenizer_decode(self.handle, if (ids.len == 0) null else ids.ptr, ids.len, @intFromBool(skip_special), null, 0, &n);
        if (st != c.LORA_ERR_BUFFER_SIZE) try check(st);
        const buf = try gpa.alloc(u8, n + 1);
        defer gpa.free(buf);
        const text = try self.decode(ids, skip_special, buf);
        return gpa.dupe(u8, text);
    }

    pub const Info = struct { vocab_size: usize, bos_id: i32, eos_id: i32 };

    /// Vocabulary size, BOS and EOS ids (-1 when unknown).
    pub fn info(self: Tokenizer) Error!Info {
        var i: Info = .{ .vocab_size = 0, .bos_id = -1, .eos_id = -1 };
        try check(c.lora_tokenizer_info(self.handle, &i.vocab_size, &i.bos_id, &i.eos_id));
        return i;
    }

    /// The id of a vocabulary string ("Ġthe", "<|im_end|>"), or -1.
    pub fn tokenToId(self: Tokenizer, token: [:0]const u8) Error!i32 {
        var id: i32 = -1;
        try check(c.lora_tokenizer_token_to_id(self.handle, token.ptr, &id));
        return id;
    }

    /// The vocabulary string of `id` (not decoded) in `buf`.
    pub fn idToToken(self: Tokenizer, id: i32, buf: []u8) Error![]u8 {
        var n: usize = 0;
        try check(c.lora_tokenizer_id_to_token(self.handle, id, if (buf.len == 0) null else buf.ptr, buf.len, &n));
        return buf[0..n];
    }

    pub fn isSpecial(self: Tokenizer, id: i32) Error!bool {
        var s: u32 = 0;
        try check(c.lora_tokenizer_is_special(self.handle, id, &s));
        return s != 0;
    }
};

/// lora_model: a Llama, Mistral or Qwen2 checkpoint (fp32 or NF4 base)
/// with named LoRA adapters. Calls on one model serialize inside liblora.
pub const Model = struct {
    handle: *c.lora_model,

    pub const Params = c.lora_model_params;
    pub const Info = c.lora_model_info;
    pub const CreateParams = c.lora_create_params;
    pub const GenerateParams = c.lora_generate_params;
    pub const MemoryStats = c.lora_memory_stats;

    pub fn defaultParams() Params {
        return c.lora_model_default_params();
    }
    pub fn defaultCreateParams() CreateParams {
        return c.lora_create_default_params();
    }
    pub fn defaultGenerateParams() GenerateParams {
        return c.lora_generate_default_params();
    }

    /// Loads a Hugging Face checkpoint directory; `quantize =
    /// LORA_QUANT_NF4` quantizes the linear layers as they are read
    /// (QLoRA). null params: the defaults.
    pub fn load(ctx: Context, dir: [:0]const u8, params: ?Params) Error!Model {
        var out: ?*c.lora_model = null;
        const p: ?*const Params = if (params) |*v| v else null;
        try check(c.lora_model_load(ctx.handle, dir.ptr, p, &out));
        return .{ .handle = out.? };
    }

    /// Frees the model handle (a trainer made on it keeps working).
    pub fn deinit(self: *Model) void {
        c.lora_model_free(self.handle);
        self.* = undefined;
    }

    pub fn info(self: Model) Error!Info {
        var i: Info = undefined;
        try check(c.lora_model_get_info(self.handle, &i));
        return i;
    }

    /// Adds adapter `name` on the target modules (PEFT get_peft_model).
    pub fn createAdapter(self: Model, name: [:0]const u8, params: ?CreateParams) Error!void {
        const p: ?*const CreateParams = if (params) |*v| v else null;
        try check(c.lora_create(self.handle, name.ptr, p));
    }

    pub fn paramCounts(self: Model) Error!struct { trainable: u64, total: u64 } {
        var t: u64 = 0;
        var all: u64 = 0;
        try check(c.lora_model_param_counts(self.handle, &t, &all));
        return .{ .trainable = t, .total = all };
    }

    /// PEFT's print_trainable_parameters line in `buf` (truncated to fit).
    pub fn trainableSummary(self: Model, buf: []u8) Error![]const u8 {
        if (buf.len == 0) return error.BufferSize;
        try check(c.lora_model_trainable_summary(self.handle, buf.ptr, buf.len, null));
        return cString(buf);
    }

    pub fn merge(self: Model) Error!void {
        try check(c.lora_merge(self.handle));
    }

    /// Puts the model on CUDA device `device` (-1: back to the CPU) with
    /// `compute` precision: logits, generation, merge, unmerge and swaps
    /// then run there; `error.CudaUnavailable` without a GPU.
    pub fn useDevice(self: Model, device: i32, compute: c.lora_compute) Error!void {
        try check(c.lora_model_use_device(self.handle, device, compute));
    }

    /// Turns switch `option` (`c.LORA_DEVICE_*`) of the device copy on or
    /// off (see `lora_model_set_device_option`); `error.InvalidState` off a
    /// device.
    pub fn setDeviceOption(self: Model, option: c.lora_device_option, on: bool) Error!void {
        try check(c.lora_model_set_device_option(self.handle, option, @intFromBool(on)));
    }

    /// Whether switch `option` of the device copy is on (see
    /// `lora_model_device_option`).
    pub fn deviceOption(self: Model, option: c.lora_device_option) Error!bool {
        var v: i32 = 0;
        try check(c.lora_model_device_option(self.handle, option, &v));
        return v != 0;
    }

    pub fn unmerge(self: Model) Error!void {
        try check(c.lora_unmerge(self.handle));
    }

    /// Makes `names` the active adapters, scaled by `multipliers` (null:
    /// all 1); no names leaves the base alone. Works merged or not.
    pub fn swapAdapter(self: Model, names: []const [*:0]const u8, multipliers: ?[]const f32) Error!void {
        if (multipliers) |m| if (m.len != names.len) return error.InvalidArgument;
        try check(c.lora_swap_adapter(self.handle, if (names.len == 0) null else @ptrCast(names.ptr), optPtr(f32, multipliers), names.len));
    }

    /// Logits [batch, seq, vocab] of `ids` [batch, seq] into `out`, with the
    /// active adapters, or with `adapters` (one per sequence, null for the
    /// base alone; the model must be unmerged).
    pub fn logits(self: Model, ids: []const i32, batch: usize, seq: usize, adapters: ?[]const ?[*:0]const u8, out: []f32) Error!void {
        try checkBatch(ids, null, batch, seq);
        if (adapters) |a| if (a.len != batch) return error.InvalidArgument;
        try check(c.lora_model_logits(self.handle, ids.ptr, batch, seq, adapterArray(adapters), out.ptr, out.len));
    }

    /// Mean causal-LM cross-entropy of `ids` [batch, seq] (labels null: the
    /// ids; -100 ignored), without gradients.
    pub fn loss(self: Model, ids: []const i32, labels: ?[]const i32, batch: usize, seq: usize) Error!f32 {
        try checkBatch(ids, labels, batch, seq);
        var l: f32 = 0;
        try check(c.lora_model_loss(self.handle, ids.ptr, optPtr(i32, labels), batch, seq, &l));
        return l;
    }

    /// Adapter `name` to directory `dir` in PEFT's format.
    pub fn saveAdapter(self: Model, name: [:0]const u8, dir: [:0]const u8) Error!void {
        try check(c.lora_adapter_save(self.handle, name.ptr, dir.ptr));
    }

    /// A PEFT adapter directory as adapter `name`.
    pub fn loadAdapter(self: Model, dir: [:0]const u8, name: [:0]const u8) Error!void {
        try check(c.lora_adapter_load(self.handle, dir.ptr, name.ptr));
    }

    pub fn removeAdapter(self: Model, name: [:0]const u8) Error!void {
        try check(c.lora_adapter_remove(self.handle, name.ptr));
    }

    /// The model with its active adapters merged, as a Hugging Face checkpoint.
    pub fn exportMerged(self: Model, dir: [:0]const u8) Error!void {
        try check(c.lora_model_export_merged(self.handle, dir.ptr));
    }

    /// Continues one prompt with the active adapters; the new tokens go to
    /// `out` (at least max_new_tokens long) and the filled part is returned.
    pub fn generate(self: Model, prompt: []const i32, params: ?GenerateParams, out: []i32) Error![]i32 {
        const p: ?*const GenerateParams = if (params) |*v| v else null;
        const prompts = [_][*c]const i32{prompt.ptr};
        const lens = [_]usize{prompt.len};
        var n: usize = 0;
        try check(c.lora_generate(self.handle, &prompts, &lens, null, 1, p, out.ptr, out.len, &n));
        return out[0..n];
    }

    /// Continues several prompts at once: sequence i's new tokens go to
    /// out[i * max_new_tokens ..][0..out_lens[i]]. `adapters` null: the
    /// active adapters; else one per prompt (null: the base alone).
    pub fn generateBatch(self: Model, gpa: std.mem.Allocator, prompts: []const []const i32, adapters: ?[]const ?[*:0]const u8, params: ?GenerateParams, out: []i32, out_lens: []usize) (Error || std.mem.Allocator.Error)!void {
        if (adapters) |a| if (a.len != prompts.len) return error.InvalidArgument;
        if (out_lens.len != prompts.len) return error.BufferSize;
        const ptrs = try gpa.alloc([*c]const i32, prompts.len);
        defer gpa.free(ptrs);
        const lens = try gpa.alloc(usize, prompts.len);
        defer gpa.free(lens);
        for (prompts, ptrs, lens) |pr, *ptr, *len| {
            ptr.* = pr.ptr;
            len.* = pr.len;
        }
        const p: ?*const GenerateParams = if (params) |*v| v else null;
        try check(c.lora_generate(self.handle, ptrs.ptr, lens.ptr, adapterArray(adapters), prompts.len, p, out.ptr, out.len, out_lens.ptr));
    }

    /// Memory by category (with `trainer`'s optimizer state when given).
    pub fn memory(self: Model, trainer: ?Trainer) Error!MemoryStats {
        var st: MemoryStats = undefined;
        try check(c.lora_model_memory(self.handle, if (trainer) |t| t.handle else null, &st));
        return st;
    }
};

/// lora_trainer: optimizer, schedule and step count of one adapter's
/// training. Keeps the model's data alive (the Model may be deinit first).
/// One thread at a time.
pub const Trainer = struct {
    handle: *c.lora_trainer,

    pub const Params = c.lora_trainer_params;
    pub const StepResult = c.lora_step_result;

    pub fn defaultParams() Params {
        return c.lora_trainer_default_params();
    }

    /// A trainer for adapter `adapter` of `model` (made the only active
    /// one); null params: the defaults.
    pub fn init(model: Model, adapter: [:0]const u8, params: ?Params) Error!Trainer {
        var out: ?*c.lora_trainer = null;
        const p: ?*const Params = if (params) |*v| v else null;
        try check(c.lora_trainer_new(model.handle, adapter.ptr, p, &out));
        return .{ .handle = out.? };
    }

    /// Resumes a checkpoint written by `save` on a freshly loaded copy of
    /// the same base model (only params' progress callback is used).
    pub fn fromCheckpoint(model: Model, dir: [:0]const u8, params: ?Params) Error!Trainer {
        var out: ?*c.lora_trainer = null;
        const p: ?*const Params = if (params) |*v| v else null;
        try check(c.lora_trainer_resume(model.handle, dir.ptr, p, &out));
        return .{ .handle = out.? };
    }

    pub fn deinit(self: *Trainer) void {
        c.lora_trainer_free(self.handle);
        self.* = undefined;
    }

    /// One optimizer step on `ids` [batch, seq] (labels null: the ids).
    pub fn step(self: Trainer, ids: []const i32, labels: ?[]const i32, batch: usize, seq: usize) Error!StepResult {
        try checkBatch(ids, labels, batch, seq);
        var r: StepResult = undefined;
        try check(c.lora_train_step(self.handle, ids.ptr, optPtr(i32, labels), batch, seq, &r));
        return r;
    }

    /// A checkpoint (adapter, optimizer state, counters) in directory `dir`.
    pub fn save(self: Trainer, dir: [:0]const u8) Error!void {
        try check(c.lora_trainer_save(self.handle, dir.ptr));
    }

    /// Moves the steps to CUDA device `device` (-1: back to the CPU) with
    /// `compute` precision (`c.LORA_COMPUTE_BF16` or `c.LORA_COMPUTE_F32`);
    /// `error.CudaUnavailable` without a GPU (the trainer stays on the CPU).
    pub fn useDevice(self: Trainer, device: i32, compute: c.lora_compute) Error!void {
        try check(c.lora_trainer_use_device(self.handle, device, compute));
    }
};
