//! A model on a CUDA device ([`Model::use_device`],
//! `lora_model_use_device`): the same functions as the host model — the
//! training step ([`Model::forward_backward`] plus clipping and AdamW),
//! logits, generation, merging and swapping — run with the crate's kernels
//! (`cuda/*.cu`) around cuBLAS matrix products, with the base weights,
//! activations, adapters, their gradients and AdamW moments all in device
//! memory.
//!
//! Architectures: every one the host loads, with `head_dim` ≤ 256 (the
//! fp32 attention kernels' `_d256` instantiations above 128). The layer
//! code covers the families' differences: soft caps (Gemma 2's, on the
//! attention scores in the attention kernels and on the logits in the
//! fused cross-entropy and the logits returned), fused projections (Phi-3: uploaded as their parts, the
//! NF4 weight split by rows bit for bit, the adapter's B by rows and its A
//! shared, so the parts' A gradients add up in its one span), per-layer
//! RoPE tables (SmolLM3's
//! unrotated layers, Gemma 3's local rope for its sliding layers), the
//! gate's activation (the SwiGLU kernels take it: GeGLU for Gemma),
//! optional input norms and output norms (OLMo 2; Gemma 3's sandwich),
//! q/k norms per head or over the whole projection, scaled embeddings
//! (Gemma), and Granite's multipliers held in the residual stream's scale
//! (see `embed_mult`). Gemma's `1 + w` norms are the host's weights as held.
//!
//! [`DeviceModel::upload`] copies a [`Model`]'s frozen weights (NF4 bases
//! stay NF4 on the device, 4.127 bits per weight with double
//! quantization) and its adapters (fp32) to the device. A training step
//! (ids and labels in, loss and gradient norm out) then runs without host
//! round trips except one: after the gradients are clipped the host reads
//! the loss and the norm (24 bytes) to refuse a non-finite step before
//! AdamW touches the weights, as the CPU trainer does.
//!
//! Precision ([`Compute`]):
//! - [`Compute::F32`]: every product in fp32 (NF4 dequantized to fp32,
//!   `CUBLAS_COMPUTE_32F`): the CPU backend's numbers up to summation
//!   order — the mode the GPU check compares losses in.
//! - [`Compute::BF16`]: the frozen products (base weights, head) take bf16
//!   operands (NF4 dequantized to bf16, activations rounded to bf16 as the
//!   operand is formed) on tensor cores with fp32 accumulation and fp32
//!   results, as bitsandbytes' `compute_dtype=bfloat16`; the embedding
//!   table is held in bf16 too (a tied head shares it), widened to fp32 as
//!   rows are gathered; the adapter products, norms, attention,
//!   softmax/loss and AdamW stay fp32. The adapter products can take bf16
//!   operands too ([`LoraPath::BlasBf16`], `LORA_CUDA_LORA=bf16`: what
//!   PyTorch + PEFT compute under bf16 autocast; opt-in until a GPU has run
//!   it), and the training step is then *lean* ([`DeviceModel::lean`]):
//!   more of it in bf16, as autocast has it.
//!   Attention can run on tensor cores instead (`cuda/attention_tc.cu`:
//!   bf16 q, k, v, P, dO, dS, fp32 accumulation and softmax; head_dim 64,
//!   128 or 256): [`DeviceModel::set_tensor_core_attention`] or
//!   `LORA_CUDA_ATTENTION=tc` at upload. It is off by default because those
//!   kernels have compiled (CI, NVRTC for sm_80/sm_90) but not yet run on a
//!   GPU; `tests/cuda_attention.rs` and `tests/cuda_train.rs` check them
//!   against the CPU when one is there. The fp32 kernels ran on an H100
//!   (bench/gpu/2026-11-28-h100-gpu-check.log) and dominate the step time.
//!
//! The bf16 operands are written by the kernels that compute the values
//! (RMSNorm and SwiGLU write their bf16 roundings in the same pass), and
//! with bf16 adapter products the step is lean ([`DeviceModel::lean`]):
//! the normalized inputs, the SwiGLU product and the gradients of gate and
//! up exist only in bf16, since no consumer reads them in fp32; a lean
//! training step also rounds as PyTorch autocast does (gate/up outputs, the
//! SwiGLU product's gradient, logits and their gradient, the attention
//! output in bf16), and with tensor-core attention keeps q, k and v in bf16
//! too. A lean training step also folds each adapter on an NF4 module that
//! reads a normed input (q, k, v; gate, up) or the SwiGLU product (down)
//! into its base product: the input is written wide, `[x | x·Aᵀ …]`, the weight dequantized into the
//! rows of `[W | s·B]`, and one product gives `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` without
//! the adapter's expand, which read and wrote the whole output again; and
//! its backward makes q, k and v's input gradient as one product over
//! `[dq | dk | dv | g…]` and `[W_q; W_k; W_v; s·A…]` (gate and up's one
//! per module, o_proj's with its adapter's term)
//! ([`DeviceModel::set_fold`]; not with LoRA dropout).
//!
//! Memory: per layer a training step keeps the layer input, the attention
//! output and its log-sum-exp, gate and up (in bf16 in BF16 mode), the two
//! RMS scales and the adapters' `x·Aᵀ`. The backward recomputes the rest
//! from those: the normalized inputs and the SwiGLU product (elementwise
//! passes), and q, k, v and the mid-layer residual (the four smallest
//! products of the layer, about 6% of the 1B step's matrix work), on the
//! forward's code path, so with the same bits
//! ([`DeviceModel::set_recompute`] keeps q, k, v and the residual
//! instead). Each linear's backward frees its input before the input
//! gradient is allocated where it can (the SwiGLU product under the down
//! projection).
//! With checkpointing only each layer's input is kept and the
//! layer is recomputed. The head and the loss run over row chunks of at
//! most [`HEAD_CHUNK_ELEMS`] logits, so the `[tokens, vocab]` matrix never
//! exists whole.
//!
//! Adapters: every adapter of the model is on the device (one buffer of
//! weights each), kept in step with the host by [`DeviceModel::sync`]
//! (the host model counts its adapter changes,
//! [`Model::adapters_version`]); swaps mirror the host's active set (O(1):
//! the forward reads the active list), merging derives `W0 + Σ m·s·B·A`
//! per module on the device (NF4 dequantized, one GEMM per adapter,
//! stored in the compute dtype; `W0` is kept, so unmerging is exact and a
//! swap while merged re-derives from `W0`), and a mixed-adapter batch
//! (one adapter per sequence) runs the BGMV kernels. An adapter being
//! trained ([`DeviceModel::train_begin`]) also has its gradients and AdamW
//! moments here.
//!
//! Generation ([`DeviceModel::generate`], `lora_generate` and
//! `lora_trainer_generate` on a model on a device) runs on the device too:
//! prefill through the same forward kernels, a KV cache per layer in
//! device memory, decode attention, logits copied to the host once per
//! step for sampling; [`DeviceModel::logits`] serves `lora_model_logits`
//! and [`DeviceModel::loss`] `lora_model_loss` (only the loss sums come
//! back, never the logits).
//!
//! LoRA dropout trains on the device with the CPU's masks (counter-based:
//! the adapter's seed, the micro-batch number, the element), so a run
//! moved between the CPU and a GPU continues alike. Not yet on the device:
//! 8-bit AdamW (refused). The host model is kept current after each step, so
//! saving reads it.

use super::generate::{push_step, sample_loop, Sampling};
use super::{check_labels, check_token_ids, shifted_targets, Model, DOWN, GATE, K, O, Q, UP, V};
use crate::backend::cpu::attention::AttnShape;
use crate::backend::cuda::blas::{gemm, gemm_ld, Blas, GemmOut, MatRef};
use crate::backend::cuda::nf4::CudaNf4;
use crate::backend::cuda::paged::ManagedAlloc;
use crate::backend::cuda::rope::CudaRopeTable;
use crate::backend::cuda::{self as cu, attention as catt, elementwise as ew, lora as glora, loss as closs, norm as cnorm, rope as crope, swiglu as cswiglu, CudaDevice, DevElemsMut};
use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::optim::{AdamWConfig, AdamWScalars};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use half::bf16;
use std::sync::Arc;
use std::ops::Range;
use rayon::prelude::*;

/// Rows up to which a decode step's NF4 products run as the fused GEMV (one
/// launch reading the weight once for all rows) rather than
/// dequantize-then-GEMM.
pub const DECODE_GEMV_ROWS: usize = cu::nf4::GEMV_MAX_BATCH;

/// Most logits the head materializes at once (128 MiB of fp32, plus their
/// 64 MiB bf16 copy in BF16 mode): for a 128k vocabulary, 261 rows per
/// chunk, products still large enough for full tensor-core tiles.
pub const HEAD_CHUNK_ELEMS: usize = 1 << 25;

/// The switches of a device copy that a C program sets
/// (`lora_model_set_device_option`; [`DeviceModel::set_option`]), each on
/// or off. Each also has an environment variable read at upload, which
/// sets its starting value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceOption {
    /// Attention on tensor cores where the shape allows
    /// ([`DeviceModel::set_tensor_core_attention`]; BF16 mode only; off by
    /// default, `LORA_CUDA_ATTENTION=tc`).
    TensorCoreAttention,
    /// Adapter products on bf16 operands, which makes the step lean
    /// ([`LoraPath::BlasBf16`], [`DeviceModel::lean`]; BF16 mode only; off
    /// by default, `LORA_CUDA_LORA=bf16`). Off goes back to fp32 cuBLAS
    /// products (from the crate's LoRA kernels it stays there).
    Bf16AdapterProducts,
    /// The backward recomputes q, k, v and the mid-layer residual
    /// ([`DeviceModel::set_recompute`]; on by default,
    /// `LORA_CUDA_RECOMPUTE=0`).
    Recompute,
    /// The lean step folds adapters into their base products
    /// ([`DeviceModel::set_fold`]; on by default, `LORA_CUDA_FOLD=0`).
    FoldAdapters,
}

/// How the adapter products run ([`DeviceModel::set_lora_path`];
/// `LORA_CUDA_LORA=kernels|bf16` at upload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraPath {
    /// cuBLAS, fp32 operands (the default).
    Blas,
    /// The crate's LoRA kernels (`cuda/lora.cu`: one block per row, no
    /// split of the long dimension), fp32.
    Kernels,
    /// cuBLAS with bf16 operands and fp32 accumulation (BF16 mode only):
    /// activations, `x·Aᵀ`, the output gradient and bf16 copies of the
    /// adapter weights (refreshed after every update) — what PyTorch +
    /// PEFT compute under bf16 autocast. `x·Aᵀ` and `dy·B` are written in
    /// bf16 by their products (the fp32 accumulation rounded once, as
    /// autocast's outputs are), the next products' operands as they are.
    /// The masters, gradients and AdamW stay fp32.
    BlasBf16,
}

/// Operand precision of the frozen products (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compute {
    F32,
    BF16,
}

/// A frozen weight `[out, in]` on the device.
enum Weight {
    Nf4(CudaNf4),
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// A weight ready for a product: borrowed, or dequantized into scratch.
enum WView<'a> {
    F32(CudaView<'a, f32>),
    Bf16(CudaView<'a, u16>),
    OwnF32(CudaSlice<f32>),
    OwnBf16(CudaSlice<u16>),
}

impl WView<'_> {
    fn mat(&self, dev: &CudaDevice, rows: usize, cols: usize) -> Result<MatRef<'_>> {
        match self {
            WView::F32(v) => MatRef::f32(dev, v, rows, cols),
            WView::Bf16(v) => MatRef::bf16(dev, v, rows, cols),
            WView::OwnF32(s) => MatRef::f32(dev, &s.as_view(), rows, cols),
            WView::OwnBf16(s) => MatRef::bf16(dev, &s.as_view(), rows, cols),
        }
    }
}

/// One module's share of an adapter: where its A `[r, in]` and B `[out, r]`
/// sit in the adapter's flat buffers (params, and grads, m, v when trained).
#[derive(Clone, Debug, PartialEq)]
struct DevAdapter {
    r: usize,
    scale: f32,
    a: Range<usize>,
    b: Range<usize>,
    /// LoRA dropout on the adapter input when training, and the seed of
    /// its masks in this module.
    dropout: f32,
    seed: u64,
}

/// The adapter a training step trains (its set) and the step's micro-batch
/// number, which names the dropout masks (as on the CPU).
#[derive(Clone, Copy, Debug)]
struct Train {
    set: usize,
    call: u64,
}

struct DevLinear {
    in_f: usize,
    out_f: usize,
    w: Weight,
    bias: Option<CudaSlice<f32>>,
    /// This module's share of each adapter (indexed like
    /// [`DeviceModel::sets`], which is the model's adapter order).
    ads: Vec<Option<DevAdapter>>,
    /// `W0 + Σ_active m·s·B·A` in the compute dtype while the model is
    /// merged and an active adapter touches this module.
    merged: Option<Weight>,
}

/// One of the model's adapters on the device: every tensor (A then B of
/// each module that carries it, in model order: [`Model::adapter_params`]'s
/// order) in one buffer.
struct DevSet {
    name: String,
    params: CudaSlice<f32>,
    /// `params` in bf16 for [`LoraPath::BlasBf16`] (else `None`).
    params_b: Option<CudaSlice<u16>>,
    /// Page-locked host memory the trained weights come back through.
    staging: Option<cudarc::driver::PinnedHostSlice<f32>>,
    spans: Vec<Range<usize>>,
    /// Gradients, AdamW moments and step count while a trainer trains this
    /// adapter on the device: one buffer each (one AdamW launch, one memset
    /// per step).
    train: Option<TrainState>,
}

struct TrainState {
    grads: CudaSlice<f32>,
    m: MomentBuf,
    v: MomentBuf,
    steps: u64,
}

/// An AdamW moment: device memory, or CUDA managed memory (paged
/// optimizer state, as bitsandbytes' paged AdamW: the driver may evict its
/// pages to the host under memory pressure; it is prefetched to the device
/// before each update).
enum MomentBuf {
    Dev(CudaSlice<f32>),
    Paged(ManagedAlloc),
}

impl MomentBuf {
    fn new(dev: &Arc<CudaDevice>, host: &[f32], paged: bool) -> Result<MomentBuf> {
        if !paged || host.is_empty() {
            return Ok(MomentBuf::Dev(dev.upload(host)?));
        }
        let a = ManagedAlloc::new(dev, host.len() * 4, 0, true)?;
        a.synchronize()?;
        // SAFETY: a fresh managed allocation of host.len() f32s, which the
        // host may write while the device is idle (synchronized above).
        unsafe { std::slice::from_raw_parts_mut(a.ptr() as *mut f32, host.len()) }.copy_from_slice(host);
        a.prefetch_to_device(0, a.len())?;
        Ok(MomentBuf::Paged(a))
    }

    fn download(&self, dev: &CudaDevice) -> Result<Vec<f32>> {
        match self {
            MomentBuf::Dev(s) => dev.download(s),
            MomentBuf::Paged(a) => {
                a.synchronize()?;
                // SAFETY: len/4 f32s of our allocation, read while the
                // device is idle (synchronized above).
                Ok(unsafe { std::slice::from_raw_parts(a.ptr() as *const f32, a.len() / 4) }.to_vec())
            }
        }
    }

    /// Bytes of device memory (managed pages are counted where they are
    /// not: they migrate on demand).
    fn device_bytes(&self) -> usize {
        match self {
            MomentBuf::Dev(s) => s.len() * 4,
            MomentBuf::Paged(_) => 0,
        }
    }
}

/// Which adapters a forward applies to which rows.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// The model's active adapters with their multipliers (through the
    /// merged weights when merged).
    Active,
    /// Adapter `s` at multiplier 1 on every row (training; one prompt of a
    /// mixed batch), or none (the base alone).
    One(Option<usize>),
    /// Per row an adapter index or −1 (a mixed-adapter batch: BGMV).
    PerRow(&'a [i32]),
    /// A training step's adapter at multiplier 1 on every row, with its
    /// LoRA dropout.
    Train(Train),
}

/// Adapter `name` of the host model flattened for the device: its weights
/// (A then B per module, in model order), their spans, and each module's
/// share (`[layer][linear]`).
struct Flat {
    data: Vec<f32>,
    spans: Vec<Range<usize>>,
    per: Vec<Vec<Option<DevAdapter>>>,
}

fn flatten(model: &Model, name: &str) -> Result<Flat> {
    let mut f = Flat { data: Vec::new(), spans: Vec::new(), per: Vec::with_capacity(model.blocks.len()) };
    for blk in &model.blocks {
        let mut row = Vec::with_capacity(blk.lin.len());
        for l in &blk.lin {
            row.push(match l.adapter_index(name) {
                Ok(i) => {
                    let a = &l.adapters()[i];
                    let mut span = |x: &[f32]| {
                        let r = f.data.len()..f.data.len() + x.len();
                        f.data.extend_from_slice(x);
                        f.spans.push(r.clone());
                        r
                    };
                    let (ra, rb) = (span(&a.a), span(&a.b));
                    Some(DevAdapter { r: a.r, scale: a.scale, a: ra, b: rb, dropout: a.dropout, seed: a.dropout_seed() })
                }
                Err(_) => None,
            });
        }
        // The device's seven modules: a fused projection's parts share its
        // adapter's A (their gradients add up in its one span) and each
        // takes its rows of B; the same dropout seed gives them the one
        // mask the fused module draws.
        let dev_row = (0..7)
            .map(|j| {
                let (hj, rows) = host_part(&model.cfg, j);
                row[hj].clone().map(|mut ad| {
                    if let Some(rows) = rows {
                        ad.b = ad.b.start + rows.start * ad.r..ad.b.start + rows.end * ad.r;
                    }
                    ad
                })
            })
            .collect();
        f.per.push(dev_row);
    }
    Ok(f)
}

/// Which host linear device module `j` (`Q`…`DOWN`) is, and which of its
/// output rows: itself, or with fused projections (Phi-3) a part of
/// `qkv_proj` or `gate_up_proj`.
fn host_part(cfg: &ModelConfig, j: usize) -> (usize, Option<Range<usize>>) {
    if !cfg.arch.fused() {
        return (j, None);
    }
    let (qd, kvd, it) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    match j {
        Q => (0, Some(0..qd)),
        K => (0, Some(qd..qd + kvd)),
        V => (0, Some(qd + kvd..qd + 2 * kvd)),
        O => (1, None),
        GATE => (2, Some(0..it)),
        UP => (2, Some(it..2 * it)),
        _ => (3, None),
    }
}


struct DevLayer {
    /// The input norms of attention and the MLP (`None`: the branch reads
    /// the residual stream as it is, OLMo 2).
    attn_norm: Option<CudaSlice<f32>>,
    mlp_norm: Option<CudaSlice<f32>>,
    /// The norms on the attention and MLP outputs before each residual add
    /// (OLMo 2): `x += w·rmsnorm(y)`.
    post: Option<[CudaSlice<f32>; 2]>,
    lin: Vec<DevLinear>,
    /// The q/k RMSNorm weights: per head (Qwen3, `[head_dim]` each) or over
    /// the whole projection (OLMo 2, `[q_dim]`, `[kv_dim]`).
    qk_norm: Option<[CudaSlice<f32>; 2]>,
}

/// A branch output `y` before its output norm and the norm's rstd (the
/// norm's backward).
struct PostSaved {
    y: CudaSlice<f32>,
    rstd: CudaSlice<f32>,
}

/// What the backward of the per-head q/k RMSNorm needs: q and k as their
/// products wrote them (fp32) and each head row's rstd.
struct QkSaved {
    q_raw: CudaSlice<f32>,
    k_raw: CudaSlice<f32>,
    rq: CudaSlice<f32>,
    rk: CudaSlice<f32>,
}

/// What one layer's backward needs (module docs).
struct Acts {
    rstd1: CudaSlice<f32>,
    /// q, k (rotated) and v: fp32, or bf16 in the lean training step with
    /// tensor-core attention; `None` when the training step recomputes them
    /// in the backward from the layer's input ([`DeviceModel::qkv`]: the
    /// same products, the same bits).
    qkv: Option<[Saved; 3]>,
    /// With per-head q/k norms, their inputs and rstds, kept and recomputed
    /// as `qkv` is.
    qkn: Option<QkSaved>,
    /// The attention output: fp32, or bf16 as q, k and v.
    att: Saved,
    lse: CudaSlice<f32>,
    /// The residual after attention, `x_in + o_proj(att)`; `None` when the
    /// training step recomputes it in the backward from the layer's input
    /// and `att` (the same product: the same bits), and outside training.
    x_mid: Option<CudaSlice<f32>>,
    rstd2: CudaSlice<f32>,
    /// With output norms, the attention and MLP outputs and their rstds:
    /// the attention one kept and recomputed as `x_mid` is.
    post: [Option<PostSaved>; 2],
    /// Gate and up projections (the MLP's two widest activations): fp32,
    /// or bf16 in BF16 mode (half the bytes; the backward widens them as
    /// its kernels read them); `None` outside training.
    gu: Option<GateUp>,
    /// Each linear's `x·Aᵀ` (empty where the linear has no adapter): bf16
    /// with bf16 adapter products (which write it so), else fp32.
    hs: Vec<Option<Saved>>,
}

/// Gate and up as a training step keeps them for the backward.
enum GateUp {
    /// Apart: fp32, or bf16 in BF16 mode.
    Pair(Saved, Saved),
    /// bf16, side by side in one wide buffer (the lean step when its MLP
    /// input gradient is stacked, [`DxStack`], split layout): gate, room
    /// for its adapter's gradient block, up, room for its.
    Wide(CudaSlice<u16>, DxStack),
}

/// The gradients of gate and up in a layer's backward: apart (fp32 and/or
/// bf16: `dg`, `du`, `dg_b`, `du_b`), or in place in the wide buffer of the
/// stacked input gradient.
enum MlpGrads {
    Apart(Option<CudaSlice<f32>>, Option<CudaSlice<f32>>, Option<CudaSlice<u16>>, Option<CudaSlice<u16>>),
    Stacked(CudaSlice<u16>, DxStack),
}

/// An adapter's `g = dy·B` from [`DeviceModel::lin_grads`] (bf16 with
/// bf16 adapter products, else fp32), for its term of the input gradient.
struct LoraG {
    ad: DevAdapter,
    g: Saved,
}

/// The sizes a layer's forward and backward use.
struct Dims {
    h: usize,
    it: usize,
    qd: usize,
    kvd: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
}

impl Dims {
    fn of(c: &ModelConfig) -> Dims {
        Dims { h: c.hidden_size, it: c.intermediate_size, qd: c.q_dim(), kvd: c.kv_dim(), nh: c.num_heads, nkv: c.num_kv_heads, hd: c.head_dim }
    }
}

/// An activation kept for the backward: fp32, or rounded to bf16.
enum Saved {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl Saved {
    /// As a product's input (with `xb`, a bf16 copy of an fp32 one).
    fn act<'a>(&'a self, xb: Option<&'a CudaSlice<u16>>) -> Act<'a> {
        match self {
            Saved::F32(x) => Act::new(x, xb),
            Saved::Bf16(b) => Act::Bf16(b),
        }
    }

    /// The fp32 form (for a consumer that reads only fp32).
    fn f32(&self) -> Result<&CudaSlice<f32>> {
        match self {
            Saved::F32(x) => Ok(x),
            Saved::Bf16(_) => bail!(Internal, "an fp32 read of an activation kept in bf16"),
        }
    }
}

/// A matrix product's input as the step holds it: fp32, its bf16 rounding
/// (the bf16 step's operand), or both. Each consumer takes the form it
/// needs ([`Act::f32`], [`Act::bf16`]); a missing form is made on demand.
/// Widening a bf16-only input is exact but is not the fp32 value it was
/// rounded from, so the step holds bf16 alone only where no consumer
/// needs fp32 ([`DeviceModel::lean`]).
#[derive(Clone, Copy)]
enum Act<'a> {
    F32(&'a CudaSlice<f32>),
    Bf16(&'a CudaSlice<u16>),
    Both(&'a CudaSlice<f32>, &'a CudaSlice<u16>),
    /// bf16 in the first columns of a wide buffer ([`Wide`]): only matrix
    /// products read it (no fp32 form, no contiguous bf16 form).
    Wide(&'a Wide),
    /// bf16 in a block of columns of a wide buffer ([`Cols`]), as `Wide`.
    Cols(Cols<'a>),
}

/// Columns `off..off + cols` of a bf16 buffer of rows `ld` apart.
#[derive(Clone, Copy)]
struct Cols<'a> {
    buf: &'a CudaSlice<u16>,
    off: usize,
    cols: usize,
    ld: usize,
}

/// How a lean training step folds adapters into the base products of the
/// modules that read one input (q, k, v and gate, up: a normed input; down:
/// the SwiGLU product): the input is held wide, `[x | x·A₁ᵀ | x·A₂ᵀ …]` (each block padded to a multiple of
/// 8 columns, the padding zero), and a folded module's one product takes
/// it against `[W | 0 … s·B …]`, whose K runs up to the end of its own
/// block: `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` without the adapter's expand product, which
/// read and wrote the whole output again.
#[derive(Clone, Debug)]
struct Fold {
    /// The adapter set trained.
    set: usize,
    /// Row stride of the wide input: the input's columns, then the tail.
    ld: usize,
    /// Per module (Q..=DOWN): its block's offset in the tail and its rank.
    slots: [Option<(usize, usize)>; 7],
}

/// An input `[n, cols]` held wide for folded products ([`Fold`]).
struct Wide {
    buf: CudaSlice<u16>,
    cols: usize,
    fold: Fold,
}

/// A normed input as a forward makes it: its forms, or wide.
enum Normed {
    Forms(Forms),
    Wide(Wide),
}

impl Normed {
    fn act(&self) -> Result<Act<'_>> {
        match self {
            Normed::Forms((f, b)) => act_of(f, b),
            Normed::Wide(w) => Ok(Act::Wide(w)),
        }
    }
}

/// The lean step's input gradient of modules that read one input (q, k,
/// v; gate, up) as one product ([`DeviceModel::stacked_dx`]): the bf16
/// operand `[dy₁ | dy₂ … | g₁ | g₂ …]` of rows `ld` apart (each adapter's
/// block padded to a multiple of 8 columns) against the rows
/// `[W₁; W₂ …; s·A₁; s·A₂ …]`.
struct DxStack {
    /// The adapter set trained.
    set: usize,
    ld: usize,
    /// Per module: its index, its output gradient's first column and width,
    /// and its adapter block's first column (`None`: no adapter).
    blocks: Vec<(usize, usize, usize, Option<usize>)>,
    /// The products, each over a range of columns (one for all, or one per
    /// module when each module's block is followed by its adapter's: the
    /// split layout, whose weight scratch is one module's at a time).
    groups: Vec<Range<usize>>,
}

/// The folded modules' `x·Aᵀ` from [`DeviceModel::normed_for`], by module.
type Folded = [Option<Saved>; 7];

/// An activation as [`DeviceModel::normed`] makes it: fp32 and/or bf16.
type Forms = (Option<CudaSlice<f32>>, Option<CudaSlice<u16>>);

/// A product's output as fp32, for the steps that write only fp32 (bias,
/// BGMV, the LoRA kernels); a bf16 output there is a caller's mistake.
fn f32_out<'a, C: 'static>(y: &'a mut CudaSlice<C>, what: &str) -> Result<&'a mut CudaSlice<f32>> {
    (y as &mut dyn std::any::Any).downcast_mut::<CudaSlice<f32>>().ok_or_else(|| err!(Internal, "{what} needs an fp32 output"))
}

/// The [`Act`] of what [`DeviceModel::normed`] made.
fn act_of<'a>(f: &'a Option<CudaSlice<f32>>, b: &'a Option<CudaSlice<u16>>) -> Result<Act<'a>> {
    match (f, b) {
        (Some(f), Some(b)) => Ok(Act::Both(f, b)),
        (Some(f), None) => Ok(Act::F32(f)),
        (None, Some(b)) => Ok(Act::Bf16(b)),
        (None, None) => bail!(Internal, "an activation held in neither form"),
    }
}

/// A borrowed buffer, or one made for the occasion.
enum Held<'a, T> {
    Ref(&'a CudaSlice<T>),
    Own(CudaSlice<T>),
}

impl<T> std::ops::Deref for Held<'_, T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        match self {
            Held::Ref(r) => r,
            Held::Own(o) => o,
        }
    }
}

impl<'a> Act<'a> {
    /// fp32 `x` with its bf16 copy when there is one.
    fn new(x: &'a CudaSlice<f32>, xb: Option<&'a CudaSlice<u16>>) -> Act<'a> {
        match xb {
            Some(b) => Act::Both(x, b),
            None => Act::F32(x),
        }
    }

    /// The fp32 form (widened from bf16 into new scratch if that is all).
    fn f32(self, d: &CudaDevice) -> Result<Held<'a, f32>> {
        match self {
            Act::F32(x) | Act::Both(x, _) => Ok(Held::Ref(x)),
            Act::Bf16(b) => {
                let mut x = out_buf::<f32>(d, b.len())?;
                ew::from_bf16(d, &b.as_view(), &mut x.as_view_mut(), false)?;
                Ok(Held::Own(x))
            }
            Act::Wide(_) | Act::Cols(_) => bail!(Internal, "an fp32 read of a wide operand"),
        }
    }

    /// The bf16 form when there is one (contiguous).
    fn given_bf16(self) -> Option<&'a CudaSlice<u16>> {
        match self {
            Act::Bf16(b) | Act::Both(_, b) => Some(b),
            Act::F32(_) | Act::Wide(_) | Act::Cols(_) => None,
        }
    }

    /// The operand of a frozen product: bf16 when held, else fp32.
    fn operand(&self, d: &CudaDevice, rows: usize, cols: usize) -> Result<MatRef<'_>> {
        match self {
            Act::Bf16(b) | Act::Both(_, b) => MatRef::bf16(d, &b.as_view(), rows, cols),
            Act::F32(x) => MatRef::f32(d, &x.as_view(), rows, cols),
            Act::Wide(w) => w.operand(d, rows, cols),
            Act::Cols(c) => {
                if cols != c.cols {
                    bail!(Internal, "a block of {} wide columns read as {cols}", c.cols);
                }
                MatRef::bf16_ld(d, &c.buf.slice(c.off..), rows, cols, c.ld)
            }
        }
    }

    /// The bf16 operand `[rows, cols]`: the one held, or a rounding made
    /// into `keep` when only fp32 is held.
    fn bf16_operand<'s>(&'s self, d: &CudaDevice, rows: usize, cols: usize, keep: &'s mut Option<CudaSlice<u16>>) -> Result<MatRef<'s>> {
        match self {
            Act::F32(x) => MatRef::bf16(d, &keep.insert(bf16_copy(d, x)?).as_view(), rows, cols),
            other => other.operand(d, rows, cols),
        }
    }
}

impl Wide {
    /// The input itself (its first `cols` columns) as a product's operand.
    fn operand(&self, d: &CudaDevice, rows: usize, cols: usize) -> Result<MatRef<'_>> {
        if cols != self.cols {
            bail!(Internal, "a wide operand of {} columns read as {cols}", self.cols);
        }
        MatRef::bf16_ld(d, &self.buf.as_view(), rows, cols, self.fold.ld)
    }
}

/// AdamW moments, one `(m, v)` per adapter tensor.
pub type Moments = Vec<(Vec<f32>, Vec<f32>)>;

/// One step's outcome on the device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceStep {
    pub loss_sum: f64,
    pub count: usize,
    pub grad_norm: f32,
}

/// A model's frozen weights and its adapters in device memory (see the
/// module docs); the host [`Model`] owns it ([`Model::use_device`]).
pub struct DeviceModel {
    dev: Arc<CudaDevice>,
    ordinal: usize,
    blas: Blas,
    compute: Compute,
    cfg: ModelConfig,
    freqs: crate::backend::cpu::rope::RopeFreqs,
    /// The sliding layers' own rope (Gemma 3), and its table.
    local_freqs: Option<crate::backend::cpu::rope::RopeFreqs>,
    local_rope: Option<CudaRopeTable>,
    /// The embedding `[vocab, hidden]` in the compute dtype (fp32 or bf16).
    embed: Weight,
    /// The head `[vocab, hidden]` in the compute dtype; `None` when tied
    /// (the embedding table is the head).
    head: Option<Weight>,
    /// The final norm's weight, divided by Granite's `logits_scaling`
    /// (the logits' divisor, folded in).
    norm: CudaSlice<f32>,
    /// The residual stream is held as `x / r` for Granite's
    /// `residual_multiplier` `r` (1 elsewhere): each branch output is then
    /// added as it is (`x/r + o` is `(x + r·o)/r`), and every RMSNorm of the
    /// stream computes the same values with `eps/r²`
    /// (`rmsnorm(x) = rmsnorm_{eps/r²}(x/r)`), so no product, fold or
    /// residual kernel needs the multiplier. The embeddings are scaled by
    /// `embedding_multiplier / r` as they are gathered (`embed_mult`), the
    /// stream's norms use `norm_eps`.
    embed_mult: Option<f32>,
    norm_eps: f32,
    layers: Vec<DevLayer>,
    /// The model's adapters, in its order (so a model adapter index is a
    /// set index).
    sets: Vec<DevSet>,
    /// The active adapters (set index, multiplier), as the host's.
    active: Vec<(usize, f32)>,
    /// The active set the merged weights were derived for (`None`:
    /// unmerged).
    merged_for: Option<Vec<(usize, f32)>>,
    /// The host's adapter version ([`Model::adapters_version`]) the sets
    /// were last copied from.
    synced: Option<u64>,
    /// A trainer put the model here ([`crate::session::trainer::Trainer::use_device`]):
    /// the last trainer to leave takes it off again. False once the owner
    /// asks for the device itself ([`Model::use_device`]).
    pub(crate) by_trainer: bool,
    rope: Option<CudaRopeTable>,
    /// Whether `rope` (and `local_rope`) hold LongRoPE's long frequencies
    /// (a table made for more positions than the pretraining length).
    rope_long: bool,
    /// Attention on tensor cores (`cuda/attention_tc.cu`) where the shape
    /// allows ([`DeviceModel::set_tensor_core_attention`]; off by default
    /// until the kernels have run on a GPU, see the module docs).
    attn_tc: bool,
    /// How the adapter products run ([`LoraPath`]; cuBLAS fp32 until a
    /// benchmark says another is faster).
    lora_path: LoraPath,
    /// Whether bf16 adapter products make the step lean
    /// ([`DeviceModel::lean`]; on unless `set_lean(false)` or
    /// `LORA_CUDA_LEAN=0` at upload).
    lean_on: bool,
    /// Whether a training step without checkpointing recomputes q, k, v and
    /// the mid-layer residual in the backward instead of keeping them
    /// ([`DeviceModel::set_recompute`]).
    recompute: bool,
    /// Whether the lean step folds adapters into their base products
    /// ([`DeviceModel::set_fold`]).
    fold_on: bool,
    /// Most logits materialized at once ([`HEAD_CHUNK_ELEMS`] unless set).
    head_chunk: usize,
    /// Per-category time when profiling ([`DeviceModel::set_profiling`]).
    prof: parking_lot::Mutex<Option<Vec<(&'static str, f64, u64)>>>,
    /// The last mixed batch's per-row adapter slots, on the host and the
    /// device ([`DeviceModel::lora_per_row`]).
    bgmv_rows: parking_lot::Mutex<Option<(Vec<i32>, CudaSlice<i32>)>>,
}

/// A host model's device copy ([`Model::use_device`]). A clone of the
/// model is a host model: the copy is not cloned with it.
#[derive(Default)]
pub struct DeviceCopy(pub(crate) Option<Box<DeviceModel>>);

impl DeviceCopy {
    /// Frees the copy and hands its memory back to the driver (the pool
    /// keeps freed memory otherwise: [`CudaDevice::keep_freed_memory`]).
    pub(crate) fn clear(&mut self) {
        if let Some(old) = self.0.take() {
            let dev = old.dev.clone();
            drop(old);
            if let Err(e) = dev.trim_pool() {
                crate::log!(Warn, "returning a device copy's memory to the driver: {}", e.message);
            }
        }
    }
}

impl Drop for DeviceCopy {
    fn drop(&mut self) {
        self.clear();
    }
}

impl Clone for DeviceCopy {
    fn clone(&self) -> Self {
        DeviceCopy(None)
    }
}

impl std::fmt::Debug for DeviceCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(g) => write!(f, "DeviceCopy(cuda:{}, {:?})", g.ordinal, g.compute),
            None => write!(f, "DeviceCopy(None)"),
        }
    }
}

fn alloc(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    dev.alloc_filled::<f32>(n, 0)
}

/// Uninitialized device memory for outputs a kernel or product writes in
/// full before any read.
fn out_buf<T: cudarc::driver::DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    cu::scratch::<T>(dev, n)
}

/// `x` rounded to bf16 in a new buffer.
fn bf16_copy(dev: &CudaDevice, x: &CudaSlice<f32>) -> Result<CudaSlice<u16>> {
    let mut b = out_buf::<u16>(dev, x.len())?;
    ew::to_bf16(dev, &x.as_view(), &mut b.as_view_mut())?;
    Ok(b)
}

fn to_bf16_host(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

fn dense_weight(dev: &CudaDevice, compute: Compute, w: &[f32]) -> Result<Weight> {
    Ok(match compute {
        Compute::F32 => Weight::F32(dev.upload(w)?),
        Compute::BF16 => Weight::Bf16(dev.upload(&to_bf16_host(w))?),
    })
}

impl DeviceModel {
    /// Copies `model`'s frozen weights and every adapter to CUDA device
    /// `ordinal` (opened here), mirroring its active set and merge state.
    pub fn upload(ordinal: usize, model: &Model, compute: Compute) -> Result<DeviceModel> {
        let cfg = model.cfg.clone();
        if cfg.head_dim > catt::MAX_HEAD_DIM {
            bail!(Unsupported, "head_dim {} exceeds the device attention kernels' {} (the model stays usable on the CPU)", cfg.head_dim, catt::MAX_HEAD_DIM);
        }
        let dev = Arc::new(cu::open(ordinal)?);
        dev.keep_freed_memory()?;
        dev.load_all_kernels()?;
        let blas = Blas::new(&dev)?;
        let d = &*dev;
        // The embedding is looked up in the compute dtype's table: fp32, or
        // bf16 (widened per element as it is gathered); a tied head in BF16
        // mode is that same bf16 table.
        let embed = dense_weight(d, compute, &model.embed)?;
        let head = match &model.lm_head {
            Some(w) => Some(dense_weight(d, compute, w)?),
            None => None,
        };
        let mut layers = Vec::with_capacity(model.blocks.len());
        for blk in &model.blocks {
            let mut lin = Vec::with_capacity(7);
            for j in 0..7 {
                // A fused projection's part: its rows of the weight (NF4
                // blocks, bit for bit) and bias.
                let (hj, rows) = host_part(&cfg, j);
                let l = &blk.lin[hj];
                let (in_f, rows) = (l.in_features(), rows.unwrap_or(0..l.out_features()));
                let whole = rows.len() == l.out_features();
                let w = match l.nf4_base() {
                    Some(t) if whole => Weight::Nf4(CudaNf4::upload(d, t)?),
                    Some(t) if t.rows_on_blocks(rows.start, rows.end) => Weight::Nf4(CudaNf4::upload(d, &t.rows(rows.start, rows.end)?)?),
                    // A part that splits an NF4 block (a small fused
                    // model: rows × in not a multiple of the blocksize):
                    // its dequantized values as a dense weight, the
                    // numbers the NF4 path's dequantize gives (and, in
                    // BF16 mode, rounds the same way).
                    Some(t) => dense_weight(d, compute, &t.dequantize_f32()[rows.start * in_f..rows.end * in_f])?,
                    None => {
                        let w = l.base_dense().ok_or_else(|| err!(Internal, "a linear layer with neither a dense nor an NF4 base"))?;
                        dense_weight(d, compute, &w[rows.start * in_f..rows.end * in_f])?
                    }
                };
                let bias = l.bias().map(|b| d.upload(&b[rows.clone()])).transpose()?;
                lin.push(DevLinear { in_f, out_f: rows.len(), w, bias, ads: Vec::new(), merged: None });
            }
            let qk_norm = match &blk.qk_norm {
                Some([qn, kn]) => Some([d.upload(qn)?, d.upload(kn)?]),
                None => None,
            };
            let up = |w: &Option<Vec<f32>>| w.as_deref().map(|w| d.upload(w)).transpose();
            let post = match &blk.post_norms {
                Some([a, m]) => Some([d.upload(a)?, d.upload(m)?]),
                None => None,
            };
            layers.push(DevLayer { attn_norm: up(&blk.attn_norm)?, mlp_norm: up(&blk.mlp_norm)?, post, lin, qk_norm });
        }
        // Granite's multipliers (see `embed_mult`); 1 elsewhere.
        let r = cfg.residual_scale.unwrap_or(1.0);
        if !(r > 0.0 && r.is_finite()) || (r != 1.0 && cfg.sandwich_norm) {
            bail!(Unsupported, "residual_multiplier {r}: the device holds the residual stream divided by it, which needs a positive finite value (and no output norms)");
        }
        let m = cfg.embed_scale.unwrap_or(1.0) / r;
        let embed_mult = (m != 1.0).then_some(m);
        let norm_eps = cfg.rms_norm_eps / (r * r);
        let norm = match cfg.logits_divisor {
            Some(s) => d.upload(&model.norm.iter().map(|w| w / s).collect::<Vec<f32>>())?,
            None => d.upload(&model.norm)?,
        };
        let freqs = cfg.rope_freqs();
        let local_freqs = cfg.local_rope_freqs();
        let mut g = DeviceModel {
            dev,
            ordinal,
            blas,
            compute,
            cfg,
            freqs,
            local_freqs,
            local_rope: None,
            embed,
            head,
            norm,
            embed_mult,
            norm_eps,
            layers,
            sets: Vec::new(),
            active: Vec::new(),
            merged_for: None,
            synced: None,
            by_trainer: false,
            rope: None,
            rope_long: false,
            attn_tc: compute == Compute::BF16 && std::env::var("LORA_CUDA_ATTENTION").is_ok_and(|v| v == "tc"),
            lean_on: std::env::var("LORA_CUDA_LEAN").map_or(true, |v| v != "0"),
            recompute: std::env::var("LORA_CUDA_RECOMPUTE").map_or(true, |v| v != "0"),
            fold_on: std::env::var("LORA_CUDA_FOLD").map_or(true, |v| v != "0"),
            lora_path: match std::env::var("LORA_CUDA_LORA").as_deref() {
                Ok("kernels") => LoraPath::Kernels,
                Ok("bf16") if compute == Compute::BF16 => LoraPath::BlasBf16,
                _ => LoraPath::Blas,
            },
            head_chunk: HEAD_CHUNK_ELEMS,
            prof: parking_lot::Mutex::new(None),
            bgmv_rows: parking_lot::Mutex::new(None),
        };
        g.sync(model)?;
        Ok(g)
    }

    /// Brings the device copy in line with the host model: adapters added,
    /// removed or changed since the last sync are copied (a trained
    /// adapter keeps its gradients and moments when its shape is
    /// unchanged), the active set is mirrored, and the merged weights are
    /// derived (on the device: `W0 + Σ m·s·B·A` per module) or dropped as
    /// the host is merged or not. Cheap when nothing changed.
    pub fn sync(&mut self, model: &Model) -> Result<()> {
        let version = model.adapters_version();
        let changed = self.synced != Some(version);
        if changed {
            self.synced = None;
            let flats = model.adapters.iter().map(|a| flatten(model, &a.name)).collect::<Result<Vec<_>>>()?;
            let dev = self.dev.clone();
            // Every copy first (an adapter of unchanged shape in place,
            // keeping its training state; others into new buffers); the
            // list is rebuilt only when all succeeded, so a failure loses
            // no trainer's gradients or moments.
            enum Src {
                Old(usize),
                New(CudaSlice<f32>),
            }
            let mut srcs = Vec::with_capacity(flats.len());
            for (info, f) in model.adapters.iter().zip(&flats) {
                srcs.push(match self.sets.iter().position(|s| s.name == info.name && s.spans == f.spans) {
                    Some(i) => {
                        dev.upload_into(&f.data, &mut self.sets[i].params)?;
                        Src::Old(i)
                    }
                    None => Src::New(dev.upload(&f.data)?),
                });
            }
            let mut old: Vec<Option<DevSet>> = std::mem::take(&mut self.sets).into_iter().map(Some).collect();
            for ((src, info), f) in srcs.into_iter().zip(&model.adapters).zip(&flats) {
                self.sets.push(match src {
                    // Names are unique: each old set is taken once.
                    Src::Old(i) => old[i].take().expect("one host adapter per device set"),
                    Src::New(params) => DevSet { name: info.name.clone(), params, params_b: None, staging: None, spans: f.spans.clone(), train: None },
                });
            }
            for s in 0..self.sets.len() {
                self.refresh_bf16(s)?;
            }
            for (l, dl) in self.layers.iter_mut().enumerate() {
                for (j, lin) in dl.lin.iter_mut().enumerate() {
                    lin.ads = flats.iter().map(|f| f.per[l][j].clone()).collect();
                }
            }
        }
        self.active = model.active().iter().map(|(n, m)| Ok((self.set_index(n)?, *m))).collect::<Result<Vec<_>>>()?;
        if !model.is_merged() {
            self.drop_merged();
        } else if changed || self.merged_for.as_ref() != Some(&self.active) {
            self.derive_merged()?;
        }
        // Only now: a failed derive is retried by the next sync.
        self.synced = Some(version);
        Ok(())
    }

    /// Drops the merged weights (the host was unmerged); cannot fail, so
    /// the host's unmerge needs no rollback. The next sync finds the
    /// device unmerged as the host.
    pub(crate) fn drop_merged(&mut self) {
        if self.merged_for.take().is_some() {
            self.layers.iter_mut().flat_map(|l| l.lin.iter_mut()).for_each(|lin| lin.merged = None);
        }
    }

    fn set_index(&self, name: &str) -> Result<usize> {
        self.sets.iter().position(|s| s.name == name).ok_or_else(|| err!(Internal, "adapter '{name}' is not on the device"))
    }

    /// Every module's merged weight for the active set, derived into new
    /// buffers first so a failure (out of memory) leaves the old ones.
    fn derive_merged(&mut self) -> Result<()> {
        let t = self.tick()?;
        let mut all = Vec::with_capacity(self.layers.len());
        for dl in &self.layers {
            all.push(dl.lin.iter().map(|lin| self.merged_weight(lin)).collect::<Result<Vec<_>>>()?);
        }
        for (dl, ws) in self.layers.iter_mut().zip(all) {
            for (lin, w) in dl.lin.iter_mut().zip(ws) {
                lin.merged = w;
            }
        }
        self.merged_for = Some(self.active.clone());
        self.tock(t, "merge")
    }

    /// `W0 + Σ_active m·s·B·A` of one module in the compute dtype (fp32
    /// sums, one GEMM per adapter), or `None` when no active adapter
    /// touches it.
    fn merged_weight(&self, lin: &DevLinear) -> Result<Option<Weight>> {
        let terms: Vec<(&DevAdapter, &DevSet, f32)> = self.active.iter().filter_map(|&(s, m)| lin.ads[s].as_ref().map(|ad| (ad, &self.sets[s], m))).collect();
        if terms.is_empty() {
            return Ok(None);
        }
        let d = &*self.dev;
        let (in_f, out_f) = (lin.in_f, lin.out_f);
        let mut w = out_buf::<f32>(d, in_f * out_f)?;
        match &lin.w {
            Weight::Nf4(t) => t.dequantize_into(d, &mut DevElemsMut::F32(w.as_view_mut()))?,
            Weight::F32(s) => d.copy(s, &mut w)?,
            Weight::Bf16(b) => ew::from_bf16(d, &b.as_view(), &mut w.as_view_mut(), false)?,
        }
        for (ad, set, m) in terms {
            let (av, bv) = (set.params.slice(ad.a.clone()), set.params.slice(ad.b.clone()));
            gemm(d, &self.blas, MatRef::f32(d, &bv, out_f, ad.r)?, false, MatRef::f32(d, &av, ad.r, in_f)?, false, &mut w.as_view_mut(), ad.scale * m, 1.0)?;
        }
        Ok(Some(match self.compute {
            Compute::F32 => Weight::F32(w),
            Compute::BF16 => {
                let mut b = out_buf::<u16>(d, w.len())?;
                ew::to_bf16(d, &w.as_view(), &mut b.as_view_mut())?;
                Weight::Bf16(b)
            }
        }))
    }

    /// The CUDA device ordinal this copy lives on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// True while the merged weights are in use.
    pub fn is_merged(&self) -> bool {
        self.merged_for.is_some()
    }

    /// Adapters being trained on the device.
    pub fn training(&self) -> Vec<&str> {
        self.sets.iter().filter(|s| s.train.is_some()).map(|s| s.name.as_str()).collect()
    }

    /// Turns the per-category profile on (cleared) or off. While on, every
    /// timed operation waits for the device before and after it, so steps
    /// run slower; the categories' shares are what it is for.
    pub fn set_profiling(&self, on: bool) {
        *self.prof.lock() = on.then(Vec::new);
    }

    /// The profile so far: (category, seconds, calls).
    pub fn profile(&self) -> Option<Vec<(&'static str, f64, u64)>> {
        self.prof.lock().clone()
    }

    /// Starts timing (waits for the device) when profiling.
    fn tick(&self) -> Result<Option<std::time::Instant>> {
        if self.prof.lock().is_none() {
            return Ok(None);
        }
        self.dev.synchronize()?;
        Ok(Some(std::time::Instant::now()))
    }

    /// Ends timing `what` (waits for the device) when profiling.
    fn tock(&self, t: Option<std::time::Instant>, what: &'static str) -> Result<()> {
        let Some(t) = t else { return Ok(()) };
        self.dev.synchronize()?;
        let dt = t.elapsed().as_secs_f64();
        if let Some(p) = self.prof.lock().as_mut() {
            match p.iter_mut().find(|e| e.0 == what) {
                Some(e) => {
                    e.1 += dt;
                    e.2 += 1;
                }
                None => p.push((what, dt, 1)),
            }
        }
        Ok(())
    }

    /// Runs attention on tensor cores (bf16 operands) where the shape
    /// allows (head_dim 64, 128 or 256), or on the fp32 kernels. BF16 mode only.
    pub fn set_tensor_core_attention(&mut self, on: bool) -> Result<()> {
        if on && self.compute != Compute::BF16 {
            bail!(InvalidArgument, "tensor-core attention rounds q, k, v to bf16: it needs the BF16 compute mode");
        }
        self.attn_tc = on;
        Ok(())
    }

    /// Runs the adapter products on the crate's LoRA kernels (`true`) or on
    /// cuBLAS (`false`, the default); both are fp32 and agree within
    /// summation order.
    pub fn set_lora_kernels(&mut self, on: bool) {
        self.lora_path = if on { LoraPath::Kernels } else { LoraPath::Blas };
    }

    /// Chooses how the adapter products run ([`LoraPath`]); `BlasBf16`
    /// needs the BF16 compute mode.
    pub fn set_lora_path(&mut self, path: LoraPath) -> Result<()> {
        if path == LoraPath::BlasBf16 && self.compute != Compute::BF16 {
            bail!(InvalidArgument, "bf16 adapter products need the BF16 compute mode");
        }
        let before = std::mem::replace(&mut self.lora_path, path);
        let made = (0..self.sets.len()).try_for_each(|s| self.refresh_bf16(s));
        if made.is_err() {
            // Out of device memory for the bf16 copies, say: back to the
            // path it was on (whose copies, if any, are still current).
            self.lora_path = before;
            if before != LoraPath::BlasBf16 {
                self.sets.iter_mut().for_each(|set| set.params_b = None);
            }
        }
        made
    }

    /// The bf16 copy of adapter set `s`'s weights, when the products take
    /// bf16 operands (after every write of the fp32 masters); dropped
    /// otherwise.
    fn refresh_bf16(&mut self, s: usize) -> Result<()> {
        let dev = self.dev.clone();
        let set = &mut self.sets[s];
        if self.lora_path != LoraPath::BlasBf16 {
            set.params_b = None;
            return Ok(());
        }
        let mut b = match set.params_b.take() {
            Some(b) if b.len() == set.params.len() => b,
            _ => out_buf::<u16>(&dev, set.params.len())?,
        };
        if !set.params.is_empty() {
            ew::to_bf16(&dev, &set.params.as_view(), &mut b.as_view_mut())?;
        }
        set.params_b = Some(b);
        Ok(())
    }

    /// Caps the logits the head and loss materialize at once (at least one
    /// row's worth is always taken): a smaller cap trades peak memory for
    /// more, smaller products.
    pub fn set_head_chunk_elems(&mut self, elems: usize) {
        self.head_chunk = elems.max(1);
    }

    /// True when attention runs on tensor cores where the shape allows.
    pub fn tensor_core_attention(&self) -> bool {
        self.attn_tc
    }

    /// How the adapter products run.
    pub fn lora_path(&self) -> LoraPath {
        self.lora_path
    }

    /// Whether the backward recomputes q, k, v and the mid-layer residual
    /// ([`set_recompute`](Self::set_recompute)).
    pub fn recompute(&self) -> bool {
        self.recompute
    }

    /// Sets one of the switches a C program reaches ([`DeviceOption`]); the
    /// next step, forward or generation uses it. `InvalidArgument` for a
    /// bf16-only switch turned on in F32 mode (nothing changes).
    pub fn set_option(&mut self, option: DeviceOption, on: bool) -> Result<()> {
        match option {
            DeviceOption::TensorCoreAttention => self.set_tensor_core_attention(on),
            DeviceOption::Bf16AdapterProducts if on => self.set_lora_path(LoraPath::BlasBf16),
            DeviceOption::Bf16AdapterProducts if self.lora_path == LoraPath::BlasBf16 => self.set_lora_path(LoraPath::Blas),
            DeviceOption::Bf16AdapterProducts => Ok(()),
            DeviceOption::Recompute => {
                self.set_recompute(on);
                Ok(())
            }
            DeviceOption::FoldAdapters => {
                self.set_fold(on);
                Ok(())
            }
        }
    }

    /// The value of a switch ([`set_option`](Self::set_option)).
    pub fn option(&self, option: DeviceOption) -> bool {
        match option {
            DeviceOption::TensorCoreAttention => self.attn_tc,
            DeviceOption::Bf16AdapterProducts => self.lora_path == LoraPath::BlasBf16,
            DeviceOption::Recompute => self.recompute,
            DeviceOption::FoldAdapters => self.fold_on,
        }
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    pub fn compute(&self) -> Compute {
        self.compute
    }

    /// Starts training adapter `adapter` here: gradients and AdamW moments
    /// in device memory, continuing from `steps` optimizer steps with
    /// these moments (one `(m, v)` pair per adapter tensor, in
    /// [`Model::adapter_params`]'s order), in device memory or, with
    /// `paged`, in CUDA managed memory (paged optimizer state). The
    /// adapter's weights are the host's (the copy is synced first by the
    /// caller).
    pub fn train_begin(&mut self, model: &Model, adapter: &str, steps: u64, moments: &[(Vec<f32>, Vec<f32>)], paged: bool) -> Result<()> {
        model.adapter_index(adapter)?;
        let s = self.set_index(adapter)?;
        let set = &self.sets[s];
        if set.train.is_some() {
            bail!(InvalidState, "adapter '{adapter}' is already being trained on the device (by another trainer): one trainer per adapter on a device");
        }
        if moments.len() != set.spans.len() {
            bail!(ShapeMismatch, "optimizer state has {} tensors, the adapter {}", moments.len(), set.spans.len());
        }
        let total = set.params.len();
        let (mut hm, mut hv) = (Vec::with_capacity(total), Vec::with_capacity(total));
        for (i, ((m, v), r)) in moments.iter().zip(&set.spans).enumerate() {
            if m.len() != r.len() || v.len() != r.len() {
                bail!(ShapeMismatch, "optimizer state tensor {i} has {} values, the adapter tensor {}", m.len(), r.len());
            }
            hm.extend_from_slice(m);
            hv.extend_from_slice(v);
        }
        let st = TrainState { grads: alloc(&self.dev, total)?, m: MomentBuf::new(&self.dev, &hm, paged)?, v: MomentBuf::new(&self.dev, &hv, paged)?, steps };
        self.sets[s].train = Some(st);
        Ok(())
    }

    /// Stops training `adapter` here: its step count and moments (as
    /// [`train_begin`](Self::train_begin) takes them); the gradients and
    /// moments are freed.
    pub fn train_end(&mut self, adapter: &str) -> Result<(u64, Moments)> {
        let r = self.moments(adapter);
        // Freed even when the copy back failed: the device never keeps a
        // trainer that has left.
        if let Some(s) = self.sets.iter_mut().find(|s| s.name == adapter) {
            s.train = None;
        }
        r
    }

    /// The set index of `adapter` and its training state.
    fn trained(&self, adapter: &str) -> Result<(usize, &TrainState)> {
        let s = self.sets.iter().position(|x| x.name == adapter).ok_or_else(|| err!(InvalidState, "adapter '{adapter}' is not on the device"))?;
        let t = self.sets[s].train.as_ref().ok_or_else(|| err!(InvalidState, "adapter '{adapter}' is not being trained on the device"))?;
        Ok((s, t))
    }

    /// `adapter`'s AdamW step count and moments, one `(m, v)` per adapter
    /// tensor (A then B of each module, in model order).
    pub fn moments(&self, adapter: &str) -> Result<(u64, Moments)> {
        let (s, t) = self.trained(adapter)?;
        let (m, v) = (t.m.download(&self.dev)?, t.v.download(&self.dev)?);
        Ok((t.steps, self.sets[s].spans.iter().map(|r| (m[r.clone()].to_vec(), v[r.clone()].to_vec())).collect()))
    }

    /// Copies the device's weights of `adapter` into the host model (one
    /// copy); the two are then in sync.
    pub fn push_adapter_to(&mut self, adapter: &str, model: &mut Model) -> Result<()> {
        let t = self.tick()?;
        let s = self.set_index(adapter)?;
        let before = model.adapters_version();
        // Through a page-locked staging buffer kept with the set (a
        // pageable copy goes through the driver's own bounce buffers at a
        // fraction of the bus's speed), then into the host tensors in
        // parallel.
        let dev = self.dev.clone();
        let set = &mut self.sets[s];
        if set.staging.as_ref().is_none_or(|p| p.len() != set.params.len()) {
            set.staging = None;
            // SAFETY: written in full by the copy below before it is read.
            // Flags 0: cached memory (the default write-combined kind is
            // slow for the host to read).
            set.staging = Some(cu::guard("cuMemHostAlloc", || unsafe { dev.ctx.alloc_pinned_with_flags::<f32>(set.params.len(), 0) }.map_err(|e| cu::cu_err("cuMemHostAlloc", e)))?);
        }
        let pin = set.staging.as_mut().expect("allocated above");
        cu::guard("cuMemcpyDtoHAsync", || dev.stream.memcpy_dtoh(&set.params, pin).map_err(|e| cu::cu_err("cuMemcpyDtoHAsync", e)))?;
        let host = cu::guard("cuEventSynchronize", || pin.as_slice().map_err(|e| cu::cu_err("cuEventSynchronize", e)))?;
        let spans = &set.spans;
        let (mut params, _) = model.adapter_params(adapter)?;
        if params.len() != spans.len() {
            bail!(Internal, "device adapter has {} tensors, the host model {}", spans.len(), params.len());
        }
        params.par_iter_mut().zip(spans.par_iter()).for_each(|(p, r)| p.copy_from_slice(&host[r.clone()]));
        drop(params);
        if self.synced == Some(before) {
            self.synced = Some(model.adapters_version());
        }
        self.tock(t, "adapter copy to the host")?;
        Ok(())
    }

    /// Makes `rope` (and `local_rope`) hold positions `0..seq` at least,
    /// with the frequencies of a call whose largest position is `last`
    /// (LongRoPE's factors follow it): a table kept from a longer call
    /// serves a shorter one unless LongRoPE picks other frequencies for
    /// the two.
    fn rope_table(&mut self, seq: usize, last: usize) -> Result<()> {
        let long = self.cfg.rope_long_at(last + 1);
        if self.rope.as_ref().is_none_or(|t| t.len < seq) || long != self.rope_long {
            self.rope = Some(CudaRopeTable::upload(&self.dev, &self.freqs.table_upto(0, seq, last))?);
            self.local_rope = self.local_freqs.as_ref().map(|f| CudaRopeTable::upload(&self.dev, &f.table_upto(0, seq, last))).transpose()?;
            self.rope_long = long;
        }
        Ok(())
    }

    /// Layer `l`'s RoPE table for this sequence length: the sliding
    /// layers' own where the model has one (Gemma 3), `None` where the
    /// layer does not rotate q and k (SmolLM3's NoPE layers).
    fn rope_at(&self, l: usize) -> Result<Option<&CudaRopeTable>> {
        if !self.cfg.rope_layers[l] {
            return Ok(None);
        }
        let t = if self.cfg.local_rope_at(l) { self.local_rope.as_ref() } else { self.rope.as_ref() };
        t.map(Some).ok_or_else(|| err!(Internal, "no RoPE table for this sequence length"))
    }

    /// Layer `l`'s RoPE table where the caller rotates back (a layer known
    /// to rotate).
    fn rope_back(&self, l: usize) -> Result<&CudaRopeTable> {
        self.rope_at(l)?.ok_or_else(|| err!(Internal, "rotating back layer {l}, which has no rotation"))
    }

    /// Queues one micro-batch's forward and backward of adapter `adapter`
    /// (being trained here, [`train_begin`](Self::train_begin); applied
    /// alone at multiplier 1, as the trainer requires of the host) —
    /// gradients accumulate into its own; the loss gradient is scaled by
    /// `grad_scale`.
    /// Returns the device buffer of per-chunk `[Σ loss, count, −1]`
    /// triples (read it after the step's sync). Labels must be checked by
    /// the caller (ids in range, labels −100 or in the vocabulary).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(&mut self, adapter: &str, ids: &[i32], labels: &[i32], batch: usize, seq: usize, grad_scale: f32, checkpointing: bool, call: u64) -> Result<CudaSlice<f64>> {
        let (set, _) = self.trained(adapter)?;
        if self.merged_for.is_some() {
            bail!(InvalidState, "training needs the model unmerged");
        }
        let tr = Train { set, call };
        let rows = Rows::Train(tr);
        let n = batch * seq;
        if ids.len() != n || labels.len() != n || n == 0 {
            bail!(ShapeMismatch, "{} ids and {} labels for a batch of {batch} × {seq}", ids.len(), labels.len());
        }
        self.rope_table(seq, seq.saturating_sub(1))?;
        let t_all = self.tick()?;
        let dev = self.dev.clone();
        let d = &*dev;
        let targets = d.upload(&shifted_targets(labels, batch, seq))?;
        let mut x = self.embed_ids(ids)?;
        let nl = self.layers.len();
        let mut inputs: Vec<CudaSlice<f32>> = Vec::with_capacity(nl);
        let mut saved: Vec<Option<Acts>> = Vec::with_capacity(nl);
        for l in 0..nl {
            let (acts, x_out) = self.layer_forward(l, &x, batch, seq, rows, false)?;
            inputs.push(x);
            saved.push(if checkpointing { None } else { Some(acts) });
            x = x_out;
        }
        let (mut dx, mut dxb, outs) = self.head_loss_backward(&x, n, &targets, grad_scale)?;
        drop(x);
        for l in (0..nl).rev() {
            let x_in = inputs.pop().expect("one input per layer");
            let acts = match saved.pop().expect("one slot per layer") {
                Some(a) => a,
                None => self.layer_forward(l, &x_in, batch, seq, rows, true)?.0,
            };
            (dx, dxb) = self.layer_backward(tr, l, &x_in, acts, dx, dxb, batch, seq, l > 0)?;
        }
        self.tock(t_all, "forward+backward (total)")?;
        Ok(outs)
    }

    /// `x = embed[ids]`, `[n, hidden]` fp32. Ids were checked on the host
    /// (the kernel's status word is not read back).
    fn embed_ids(&self, ids: &[i32]) -> Result<CudaSlice<f32>> {
        let d = &*self.dev;
        let h = self.cfg.hidden_size;
        let ids_u: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
        let ids_d = d.upload(&ids_u)?;
        let mut x = out_buf::<f32>(d, ids.len() * h)?;
        let mut status = out_buf::<u32>(d, 1)?;
        match &self.embed {
            Weight::F32(t) => cu::embed::gather_async(d, cu::embed::Table::F32(&t.as_view()), self.cfg.vocab_size, h, &ids_d.as_view(), &mut x.as_view_mut(), &mut status)?,
            Weight::Bf16(t) => cu::embed::gather_async(d, cu::embed::Table::Bf16(&t.as_view()), self.cfg.vocab_size, h, &ids_d.as_view(), &mut x.as_view_mut(), &mut status)?,
            Weight::Nf4(_) => bail!(Internal, "an NF4 embedding table"),
        }
        if let Some(m) = self.embed_mult {
            ew::scale(d, &mut x.as_view_mut(), m)?;
        }
        Ok(x)
    }

    fn shape(&self, l: usize, batch: usize, seq: usize) -> AttnShape {
        self.cfg.attn_shape(l, batch, seq)
    }

    /// The fp32 → bf16 copy of an activation in BF16 mode.
    fn operand(&self, x: &CudaSlice<f32>) -> Result<Option<CudaSlice<u16>>> {
        match self.compute {
            Compute::F32 => Ok(None),
            Compute::BF16 => bf16_copy(&self.dev, x).map(Some),
        }
    }

    /// Layer `l`'s forward: what its backward needs (for a training step)
    /// and its output. `keep` keeps q, k, v and the mid-layer residual even
    /// when the step recomputes them ([`set_recompute`](Self::set_recompute)):
    /// for a checkpointed layer's recomputation, whose activations go
    /// straight to its backward. Outside training the residual is not kept
    /// (nothing reads it) and q, k, v are (the prefill reads k and v).
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(&mut self, l: usize, x: &CudaSlice<f32>, batch: usize, seq: usize, rows: Rows<'_>, keep: bool) -> Result<(Acts, CudaSlice<f32>)> {
        let dev = self.dev.clone();
        let d = &*dev;
        let Dims { it, qd, nh, .. } = Dims::of(&self.cfg);
        let n = batch * seq;
        let shape = self.shape(l, batch, seq);
        let mut hs: Vec<Option<Saved>> = (0..7).map(|_| None).collect();
        // Attention block.
        let mut rstd1 = out_buf::<f32>(d, n)?;
        let (h1, mut folded) = self.normed_for(l, &[Q, K, V], x, self.layers[l].attn_norm.as_ref(), n, Some(&mut rstd1), rows)?;
        let (qkv, [hq, hk, hv], qkn) = self.qkv(l, rows, h1.act()?, &mut folded, batch, seq)?;
        drop(h1);
        let mut lse = out_buf::<f32>(d, n * nh)?;
        let t = self.tick()?;
        let att = match &qkv {
            // The lean training step: the tensor-core kernels' bf16 form,
            // the output kept in bf16 too (the backward's δ reads it).
            [Saved::Bf16(q), Saved::Bf16(k), Saved::Bf16(v)] => {
                let mut ob = out_buf::<u16>(d, n * qd)?;
                catt::forward_tc(d, &q.as_view(), &k.as_view(), &v.as_view(), &shape, &mut ob.as_view_mut(), &mut lse.as_view_mut())?;
                Saved::Bf16(ob)
            }
            [Saved::F32(q), Saved::F32(k), Saved::F32(v)] => {
                let mut att = out_buf::<f32>(d, n * qd)?;
                if self.attn_tc && catt::tc_supported(d, &shape) {
                    catt::forward_tc(d, &q.as_view(), &k.as_view(), &v.as_view(), &shape, &mut att.as_view_mut(), &mut lse.as_view_mut())?;
                } else {
                    catt::forward(d, &q.as_view(), &k.as_view(), &v.as_view(), &shape, &mut att.as_view_mut(), &mut lse.as_view_mut())?;
                }
                if self.lean() && matches!(rows, Rows::Train(_)) {
                    // The lean training step keeps the output in bf16 alone,
                    // as autocast's attention writes it: its one consumer
                    // here, o_proj (base and adapter), takes that operand
                    // anyway; the backward's δ reads it widened.
                    let ob = bf16_copy(d, &att)?;
                    drop(att);
                    Saved::Bf16(ob)
                } else {
                    Saved::F32(att)
                }
            }
            _ => bail!(Internal, "q, k and v in mixed dtypes"),
        };
        self.tock(t, "attention forward")?;
        // A training step recomputes q, k, v (and their x·Aᵀ) and the
        // mid-layer residual in the backward, unless told to keep them.
        let train = matches!(rows, Rows::Train(_));
        let recompute = train && self.recompute && !keep;
        // x_mid becomes the layer's output (no copy) unless the backward
        // gets it kept: (output, kept x_mid).
        let split_mid = |x_mid: CudaSlice<f32>| -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
            Ok(if train && !recompute { (d.duplicate(&x_mid)?, Some(x_mid)) } else { (x_mid, None) })
        };
        let (qkv, qkn) = if !recompute {
            (hs[Q], hs[K], hs[V]) = (hq, hk, hv);
            (Some(qkv), qkn)
        } else {
            (None, None)
        };
        let (x_mid, h_o, post_o) = self.attn_residual(l, rows, x, &att, train && !recompute)?;
        hs[O] = h_o;
        // MLP block.
        let mut rstd2 = out_buf::<f32>(d, n)?;
        let (h2, mut folded) = self.normed_for(l, &[GATE, UP], &x_mid, self.layers[l].mlp_norm.as_ref(), n, Some(&mut rstd2), rows)?;
        let h2a = h2.act()?;
        let h2fold = match &h2 {
            Normed::Wide(w) => Some(&w.fold),
            Normed::Forms(_) => None,
        };
        if let Some(plan) = self.gu_plan(l, rows, h2fold) {
            // Gate and up side by side in one wide buffer (their input
            // gradient is one product in the backward), each written by its
            // (folded) product: the lean step's bf16 gate and up.
            let mut gu = out_buf::<u16>(d, n * plan.ld)?;
            for &(j, off, _, _) in &plan.blocks {
                self.lin_forward_into(l, j, plan.set, h2a, n, &mut gu.slice_mut(off..), plan.ld)?;
                hs[j] = folded[j].take();
            }
            drop(h2);
            let (mut x_out, x_mid) = split_mid(x_mid)?;
            let (a, mut folded) = self.gated_for_down(l, &gu.slice(..), &gu.slice(plan.blocks[1].1..), plan.ld, n, rows)?;
            let (h_d, post_d) = self.down_residual(l, rows, a.act()?, n, &mut x_out, train)?;
            hs[DOWN] = h_d.or(folded[DOWN].take());
            drop(a);
            let gu = Some(GateUp::Wide(gu, plan));
            return Ok((Acts { rstd1, qkv, qkn, att, lse, x_mid, post: [post_o, post_d], rstd2, gu, hs }, x_out));
        }
        if self.lean() && matches!(rows, Rows::Train(_)) && self.layers[l].lin[GATE].bias.is_none() && self.layers[l].lin[UP].bias.is_none() {
            // The lean training step's gate and up products write bf16 (the
            // base product and the adapter's added into it, each rounded,
            // as PyTorch autocast does): the operands the gating pass and
            // the backward read, kept as they are; no fp32 gate or up.
            let (mut gb, mut ub) = (out_buf::<u16>(d, n * it)?, out_buf::<u16>(d, n * it)?);
            hs[GATE] = self.lin_forward(l, GATE, rows, h2a, n, &mut gb, 0.0)?.or(folded[GATE].take());
            hs[UP] = self.lin_forward(l, UP, rows, h2a, n, &mut ub, 0.0)?.or(folded[UP].take());
            drop(h2);
            let (mut x_out, x_mid) = split_mid(x_mid)?;
            let (a, mut folded) = self.gated_for_down(l, &gb.slice(..), &ub.slice(..), it, n, rows)?;
            let (h_d, post_d) = self.down_residual(l, rows, a.act()?, n, &mut x_out, train)?;
            hs[DOWN] = h_d.or(folded[DOWN].take());
            drop(a);
            let gu = Some(GateUp::Pair(Saved::Bf16(gb), Saved::Bf16(ub)));
            return Ok((Acts { rstd1, qkv, qkn, att, lse, x_mid, post: [post_o, post_d], rstd2, gu, hs }, x_out));
        }
        let mut g = out_buf::<f32>(d, n * it)?;
        let mut u = out_buf::<f32>(d, n * it)?;
        hs[GATE] = self.lin_forward(l, GATE, rows, h2a, n, &mut g, 0.0)?.or(folded[GATE].take());
        hs[UP] = self.lin_forward(l, UP, rows, h2a, n, &mut u, 0.0)?.or(folded[UP].take());
        drop(h2);
        let (mut x_out, x_mid) = split_mid(x_mid)?;
        // A training step keeps gate and up for the backward (in BF16 mode
        // their bf16 roundings, written by the gating pass).
        let (a, ab, gu) = self.gated(g, u, matches!(rows, Rows::Train(_)))?;
        let gu = gu.map(|(g, u)| GateUp::Pair(g, u));
        let (h_d, post_d) = self.down_residual(l, rows, act_of(&a, &ab)?, n, &mut x_out, train)?;
        hs[DOWN] = h_d;
        Ok((Acts { rstd1, qkv, qkn, att, lse, x_mid, post: [post_o, post_d], rstd2, gu, hs }, x_out))
    }

    /// Layer `l`'s q, k (rotated) and v from its normed input `h1`, with
    /// their adapters' `x·Aᵀ`: in bf16 for the lean training step with
    /// tensor-core attention (whose kernels round q, k and v to bf16
    /// anyway: q and k are rotated straight into their bf16 copies, each
    /// fp32 buffer freed as its copy is made), else fp32. The forward's,
    /// and the backward's recomputation: one code path, the same bits.
    /// With per-head q/k norms (Qwen3) q and k are normed before the
    /// rotation; a training step gets the norms' inputs and rstds back.
    #[allow(clippy::type_complexity)]
    fn qkv(&self, l: usize, rows: Rows<'_>, h1: Act<'_>, folded: &mut Folded, batch: usize, seq: usize) -> Result<([Saved; 3], [Option<Saved>; 3], Option<QkSaved>)> {
        let d = &*self.dev;
        let Dims { qd, kvd, nh, nkv, hd, .. } = Dims::of(&self.cfg);
        let n = batch * seq;
        let mut q = out_buf::<f32>(d, n * qd)?;
        let mut k = out_buf::<f32>(d, n * kvd)?;
        let mut v = out_buf::<f32>(d, n * kvd)?;
        // The folded modules' x·Aᵀ came with the wide input.
        let hq = self.lin_forward(l, Q, rows, h1, n, &mut q, 0.0)?.or(folded[Q].take());
        let hk = self.lin_forward(l, K, rows, h1, n, &mut k, 0.0)?.or(folded[K].take());
        let hv = self.lin_forward(l, V, rows, h1, n, &mut v, 0.0)?.or(folded[V].take());
        let qkn = match &self.layers[l].qk_norm {
            Some(w) => {
                let s = self.qk_normed(w, &mut q, &mut k)?;
                matches!(rows, Rows::Train(_)).then_some(s)
            }
            None => None,
        };
        let tc = self.attn_tc && catt::tc_supported(d, &self.shape(l, batch, seq));
        if tc && self.lean() && matches!(rows, Rows::Train(_)) {
            let qb = self.rotated_bf16(l, q, batch, seq, nh, false)?;
            let kb = self.rotated_bf16(l, k, batch, seq, nkv, false)?;
            let vb = bf16_copy(d, &v)?;
            drop(v);
            return Ok(([Saved::Bf16(qb), Saved::Bf16(kb), Saved::Bf16(vb)], [hq, hk, hv], qkn));
        }
        if let Some(table) = self.rope_at(l)? {
            crope::rope_forward(d, &mut q.as_view_mut(), batch, seq, nh, hd, table)?;
            crope::rope_forward(d, &mut k.as_view_mut(), batch, seq, nkv, hd, table)?;
        }
        Ok(([Saved::F32(q), Saved::F32(k), Saved::F32(v)], [hq, hk, hv], qkn))
    }

    /// The RMSNorm of `q` `[n, heads·head_dim]` and `k` (weights `w` =
    /// [q_norm, k_norm]), per head or over the whole projection as the
    /// weights' width says: each replaced by its normed values; returns
    /// their inputs and rstds (the backward's).
    fn qk_normed(&self, w: &[CudaSlice<f32>; 2], q: &mut CudaSlice<f32>, k: &mut CudaSlice<f32>) -> Result<QkSaved> {
        let d = &*self.dev;
        let eps = self.cfg.rms_norm_eps;
        // Rows of the weights' width: a head (Qwen3), or the whole
        // projection (OLMo 2).
        let (dq, dk) = (w[0].len(), w[1].len());
        let (nq, nk) = (q.len() / dq, k.len() / dk);
        let (mut qn, mut kn) = (out_buf::<f32>(d, q.len())?, out_buf::<f32>(d, k.len())?);
        let (mut rq, mut rk) = (out_buf::<f32>(d, nq)?, out_buf::<f32>(d, nk)?);
        cnorm::rmsnorm_forward(d, &q.as_view(), &w[0].as_view(), nq, dq, eps, &mut qn.as_view_mut(), Some(&mut rq.as_view_mut()))?;
        cnorm::rmsnorm_forward(d, &k.as_view(), &w[1].as_view(), nk, dk, eps, &mut kn.as_view_mut(), Some(&mut rk.as_view_mut()))?;
        let q_raw = std::mem::replace(q, qn);
        let k_raw = std::mem::replace(k, kn);
        Ok(QkSaved { q_raw, k_raw, rq, rk })
    }

    /// The gradients of q and k before the rotation and the q/k norms
    /// from those after (the attention backward's), `dq` and `dk` replaced.
    fn qk_norm_backward(&self, l: usize, s: QkSaved, dq: &mut CudaSlice<f32>, dk: &mut CudaSlice<f32>, batch: usize, seq: usize) -> Result<()> {
        let d = &*self.dev;
        let Dims { nh, nkv, hd, .. } = Dims::of(&self.cfg);
        let w = self.layers[l].qk_norm.as_ref().ok_or_else(|| err!(Internal, "q/k norm activations for a layer without q/k norms"))?;
        if let Some(table) = self.rope_at(l)? {
            crope::rope_backward(d, &mut dq.as_view_mut(), batch, seq, nh, hd, table)?;
            crope::rope_backward(d, &mut dk.as_view_mut(), batch, seq, nkv, hd, table)?;
        }
        for (raw, r, wi, g) in [(&s.q_raw, &s.rq, &w[0], &mut *dq), (&s.k_raw, &s.rk, &w[1], &mut *dk)] {
            let mut dr = out_buf::<f32>(d, raw.len())?;
            cnorm::rmsnorm_backward(d, &raw.as_view(), &wi.as_view(), &r.as_view(), &g.as_view(), r.len(), wi.len(), &mut dr.as_view_mut(), None)?;
            *g = dr;
        }
        Ok(())
    }

    /// `x_mid = x + o_proj(att)` (through the attention output norm where
    /// the layer has one), with the adapter's `att·Aᵀ` for the backward and,
    /// with `keep`, what the output norm's backward needs: the forward's,
    /// and the backward's recomputation of it, one code path so that both
    /// give the same bits.
    fn attn_residual(&self, l: usize, rows: Rows<'_>, x: &CudaSlice<f32>, att: &Saved, keep: bool) -> Result<(CudaSlice<f32>, Option<Saved>, Option<PostSaved>)> {
        let n = x.len() / self.cfg.hidden_size;
        let mut x_mid = self.dev.duplicate(x)?;
        let attb = match att {
            Saved::F32(a) => self.operand(a)?,
            Saved::Bf16(_) => None,
        };
        let att = att.act(attb.as_ref());
        let Some(post) = &self.layers[l].post else {
            let h = self.lin_forward(l, O, rows, att, n, &mut x_mid, 1.0)?;
            return Ok((x_mid, h, None));
        };
        let mut y = out_buf::<f32>(&self.dev, x.len())?;
        let h = self.lin_forward(l, O, rows, att, n, &mut y, 0.0)?;
        let saved = self.post_add(&post[0], y, &mut x_mid, n, keep)?;
        Ok((x_mid, h, saved))
    }

    /// Whether the step is lean (BF16 mode with bf16 adapter products,
    /// unless [`set_lean`](Self::set_lean) turned it off): activations are
    /// held in bf16 alone where every consumer takes bf16 — the normalized
    /// inputs, the SwiGLU product and its gradients exist only as the
    /// products' bf16 operands, each written by the kernel that computes it
    /// (no conversion passes, no fp32 copies) — and a training step goes
    /// further, as PyTorch autocast does: the gate and up products write
    /// bf16 (the base product and the adapter's added into it, each
    /// rounded), so does the down projection's input gradient (unless its
    /// adapter has dropout), the head writes bf16 logits and the
    /// cross-entropy works on them in place, the attention output is kept in
    /// bf16 (o_proj's operand, as autocast's attention writes it), and with
    /// tensor-core attention q, k and v too (the kernels' bf16 form). So a
    /// lean training step rounds more than the same mode
    /// holding both forms (gate/up, the SwiGLU product's gradient, logits,
    /// and the attention backward's `δ = rowsum(dO∘O)` from the bf16 `O`),
    /// and its LoRA dropout masks the bf16 inputs widened; inference
    /// forwards compute the same numbers, except that a mixed-adapter batch
    /// (an fp32 consumer) reads the bf16 values widened.
    pub fn lean(&self) -> bool {
        self.compute == Compute::BF16 && self.lora_path == LoraPath::BlasBf16 && self.lean_on
    }

    /// Turns the lean step ([`lean`](Self::lean)) off or back on (on by
    /// default; `LORA_CUDA_LEAN=0` at upload starts it off): off, the bf16-adapter-product mode holds both forms as the
    /// other modes do — for checks that the lean step computes what the
    /// full one does, and for benchmarks.
    pub fn set_lean(&mut self, on: bool) {
        self.lean_on = on;
    }

    /// Whether a training step recomputes each layer's q, k, v and
    /// mid-layer residual in the backward (on by default;
    /// `LORA_CUDA_RECOMPUTE=0` at upload starts it off) or keeps them from
    /// the forward: the same bits either way (the forward's code path);
    /// recomputing holds less — per layer of the 1B benchmark model 24 MiB
    /// in the lean step, 80 MiB in the default bf16 step (fp32 q, k, v and
    /// residual) — for four more products (q, k, v and o, the layer's
    /// smallest: about 6% of the step's matrix work). Without
    /// checkpointing only (a checkpointed layer's recomputation keeps them
    /// for its backward).
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    /// Turns off (or back on) folding adapters into their base products in
    /// the lean training step (on by default; `LORA_CUDA_FOLD=0` at upload
    /// starts it off): the modules reading a normed input (q, k, v; gate,
    /// up) or the SwiGLU product (down, in the lean step's bf16 MLP) with an
    /// NF4 weight take `[x | x·Aᵀ]·[W | s·B]ᵀ` as one product
    /// instead of the base product and the adapter's expand, which reads
    /// and writes the whole output a second time (see `Fold`). The sums are
    /// the same products of the same bf16 operands, except `s·B` rounded
    /// to bf16 once (for a power-of-two scale the same value as `B`'s bf16
    /// copy times `s`), accumulated in one pass: a bf16 output (gate, up)
    /// is rounded once instead of twice. The same switch makes q, k and
    /// v's input gradient one product in the backward
    /// (`qkv_backward_stacked`): `[dq | dk |
    /// dv | g…]·[W_q; W_k; W_v; s·A…]` instead of six products into one
    /// buffer (gate and up's one per module, o_proj's with its adapter's
    /// term). Off, for checks and benchmarks.
    pub fn set_fold(&mut self, on: bool) {
        self.fold_on = on;
    }

    /// Whether folding is on ([`set_fold`](Self::set_fold)).
    pub fn fold(&self) -> bool {
        self.fold_on
    }

    /// `x` `[batch, seq, heads, head_dim]` rotated by layer `l`'s RoPE
    /// table (by −θ with `backward`) straight into a new bf16 buffer (a
    /// plain copy where the layer does not rotate); `x` is freed.
    #[allow(clippy::too_many_arguments)]
    fn rotated_bf16(&self, l: usize, x: CudaSlice<f32>, batch: usize, seq: usize, heads: usize, backward: bool) -> Result<CudaSlice<u16>> {
        let d = &*self.dev;
        let Some(table) = self.rope_at(l)? else { return bf16_copy(d, &x) };
        let mut xb = out_buf::<u16>(d, x.len())?;
        crope::rope_bf16(d, &x.as_view(), None, &mut xb.as_view_mut(), batch, seq, heads, self.cfg.head_dim, table, backward)?;
        Ok(xb)
    }

    /// `silu(g)·u` in the forms the products take (as
    /// [`normed`](Self::normed)), from one pass that consumes `g` and `u`,
    /// and with `keep` (a training step) `g` and `u` for the backward: in
    /// F32 mode as they are; in BF16 mode their bf16 roundings, written by
    /// the same pass, whose fp32 `silu(g)·u` (not made when the step is
    /// lean) goes over `g` (no third fp32 buffer).
    #[allow(clippy::type_complexity)]
    fn gated(&self, g: CudaSlice<f32>, u: CudaSlice<f32>, keep: bool) -> Result<(Option<CudaSlice<f32>>, Option<CudaSlice<u16>>, Option<(Saved, Saved)>)> {
        let d = &*self.dev;
        let n = g.len();
        match self.compute {
            Compute::F32 => {
                let mut a = out_buf::<f32>(d, n)?;
                cswiglu::swiglu_forward(d, &g.as_view(), &u.as_view(), &mut a.as_view_mut(), self.cfg.act)?;
                Ok((Some(a), None, keep.then(|| (Saved::F32(g), Saved::F32(u)))))
            }
            Compute::BF16 => {
                let mut ab = out_buf::<u16>(d, n)?;
                let mut kept = if keep { Some((out_buf::<u16>(d, n)?, out_buf::<u16>(d, n)?)) } else { None };
                let (mut gv, mut uv) = match kept.as_mut() {
                    Some((gb, ub)) => (Some(gb.as_view_mut()), Some(ub.as_view_mut())),
                    None => (None, None),
                };
                let a = if self.lean() {
                    cswiglu::swiglu_forward_out(d, &g.as_view(), &u.as_view(), None, Some(&mut ab.as_view_mut()), gv.as_mut(), uv.as_mut(), self.cfg.act)?;
                    None
                } else {
                    let mut a = g;
                    cswiglu::swiglu_forward_inplace_out(d, &mut a.as_view_mut(), &u.as_view(), Some(&mut ab.as_view_mut()), gv.as_mut(), uv.as_mut(), self.cfg.act)?;
                    Some(a)
                };
                Ok((a, Some(ab), kept.map(|(gb, ub)| (Saved::Bf16(gb), Saved::Bf16(ub)))))
            }
        }
    }

    /// `w·rmsnorm(x)` of `n` rows in the forms the products take: for a
    /// forward fp32 (F32 mode, or BF16 mode unless [`lean`](Self::lean))
    /// and bf16 (BF16 mode), both from one pass; for a backward
    /// (`backward`: the adapters' input, recomputed) only the form the
    /// adapter products read, bf16 when lean, else fp32. `rstd` gets the
    /// rows' scales when given. Without a norm (`w` `None`: OLMo 2's
    /// branches) `x` itself in those forms.
    fn normed(&self, x: &CudaSlice<f32>, w: Option<&CudaSlice<f32>>, n: usize, rstd: Option<&mut CudaSlice<f32>>, backward: bool) -> Result<Forms> {
        let d = &*self.dev;
        let (h, eps) = (self.cfg.hidden_size, self.norm_eps);
        let fp32_only = self.compute == Compute::F32 || (backward && !self.lean());
        let Some(w) = w else {
            let f = if fp32_only || !self.lean() { Some(d.duplicate(x)?) } else { None };
            return Ok((f, if fp32_only { None } else { Some(bf16_copy(d, x)?) }));
        };
        let mut rv = rstd.map(|r| r.as_view_mut());
        if fp32_only {
            let mut y = out_buf::<f32>(d, n * h)?;
            cnorm::rmsnorm_forward(d, &x.as_view(), &w.as_view(), n, h, eps, &mut y.as_view_mut(), rv.as_mut())?;
            return Ok((Some(y), None));
        }
        let mut y = if self.lean() { None } else { Some(out_buf::<f32>(d, n * h)?) };
        let mut yb = out_buf::<u16>(d, n * h)?;
        let mut yv = y.as_mut().map(|y| y.as_view_mut());
        cnorm::rmsnorm_forward_bf16(d, &x.as_view(), &w.as_view(), n, h, eps, yv.as_mut(), &mut yb.as_view_mut(), rv.as_mut())?;
        Ok((y, Some(yb)))
    }

    /// The weight of linear `(l, j)` in the compute dtype.
    fn weight<'w>(&self, w: &'w Weight) -> Result<WView<'w>> {
        Ok(match w {
            Weight::F32(s) => WView::F32(s.as_view()),
            Weight::Bf16(s) => WView::Bf16(s.as_view()),
            Weight::Nf4(t) => {
                let tk = self.tick()?;
                let w = self.dequantized(t)?;
                self.tock(tk, "NF4 dequantize")?;
                w
            }
        })
    }

    /// An NF4 weight dequantized to the compute dtype, in scratch.
    fn dequantized<'w>(&self, t: &'w CudaNf4) -> Result<WView<'w>> {
        let d = &*self.dev;
        Ok(match self.compute {
            Compute::F32 => {
                let mut s = out_buf::<f32>(d, t.numel())?;
                t.dequantize_into(d, &mut DevElemsMut::F32(s.as_view_mut()))?;
                WView::OwnF32(s)
            }
            Compute::BF16 => {
                let mut s = out_buf::<u16>(d, t.numel())?;
                t.dequantize_into(d, &mut DevElemsMut::BF16(s.as_view_mut()))?;
                WView::OwnBf16(s)
            }
        })
    }

    /// `y = β·y + x·Wᵀ (+ bias) + Σ m·s·(x·Aᵀ)·Bᵀ` over the adapters `rows`
    /// names (through the merged weight instead for the active set of a
    /// merged model); returns the first adapter's `x·Aᵀ` for the backward.
    /// The product takes `x`'s bf16 form when it is held (BF16 mode).
    #[allow(clippy::too_many_arguments)]
    fn lin_forward<C: GemmOut + 'static>(&self, l: usize, j: usize, rows: Rows<'_>, x: Act<'_>, n: usize, y: &mut CudaSlice<C>, beta: f32) -> Result<Option<Saved>> {
        if let Act::Wide(w) = x {
            if let Some((off, _)) = w.fold.slots[j] {
                let lin = &self.layers[l].lin[j];
                self.lin_folded(l, j, w, off, n, &mut y.as_view_mut(), lin.out_f, beta)?;
                if let Some(b) = &lin.bias {
                    ew::add_bias(&self.dev, &mut f32_out(y, "a bias")?.as_view_mut(), &b.as_view())?;
                }
                return Ok(None);
            }
        }
        let d = &*self.dev;
        let lin = &self.layers[l].lin[j];
        let (in_f, out_f) = (lin.in_f, lin.out_f);
        let merged = lin.merged.as_ref().filter(|_| matches!(rows, Rows::Active));
        let w = self.weight(merged.unwrap_or(&lin.w))?;
        let t = self.tick()?;
        gemm(d, &self.blas, x.operand(d, n, in_f)?, false, w.mat(d, out_f, in_f)?, true, &mut y.as_view_mut(), 1.0, beta)?;
        self.tock(t, "base GEMM forward")?;
        self.lin_bias_lora(l, j, rows, x, n, y)
    }

    /// Linear `(l, j)`'s product folded with its adapter ([`Fold`]):
    /// `y = β·y + [x | … x·Aᵀ]·[W | 0 … s·B]ᵀ` (the caller adds a bias), one product over
    /// the wide input `x`, whose block at `off` of the tail holds this
    /// module's `x·Aᵀ` ([`normed_for`](Self::normed_for) wrote it); the
    /// weight dequantized straight into the wide weight's rows.
    /// `y` is `[n, out]` with rows `ldy` apart (a block of a wide output
    /// when `ldy > out`).
    #[allow(clippy::too_many_arguments)]
    fn lin_folded<C: GemmOut + 'static>(&self, l: usize, j: usize, x: &Wide, off: usize, n: usize, y: &mut CudaViewMut<'_, C>, ldy: usize, beta: f32) -> Result<()> {
        let d = &*self.dev;
        let lin = &self.layers[l].lin[j];
        let (in_f, out_f) = (lin.in_f, lin.out_f);
        let (Weight::Nf4(t), Some(ad)) = (&lin.w, lin.ads[x.fold.set].as_ref()) else {
            bail!(Internal, "linear ({l}, {j}) folded without an NF4 weight and an adapter");
        };
        // K runs to the end of this module's (padded) block.
        let kw = in_f + off + ad.r.next_multiple_of(8);
        let mut wb = out_buf::<u16>(d, out_f * kw)?;
        let tk = self.tick()?;
        t.dequantize_bf16_ld(d, &mut wb.as_view_mut(), kw)?;
        let b = self.sets[x.fold.set].params.slice(ad.b.clone());
        glora::fold_tail_bf16(d, &b, out_f, ad.r, ad.scale, in_f, off, &mut wb.as_view_mut(), kw)?;
        self.tock(tk, "NF4 dequantize")?;
        let tg = self.tick()?;
        let xm = MatRef::bf16_ld(d, &x.buf.as_view(), n, kw, x.fold.ld)?;
        gemm_ld(d, &self.blas, xm, false, MatRef::bf16(d, &wb.as_view(), out_f, kw)?, true, y, ldy, 1.0, beta)?;
        self.tock(tg, "base GEMM forward (adapter folded)")
    }

    /// Linear `(l, j)`'s forward into a block of a wide output `y` (rows
    /// `ldy` apart; [`gu_plan`](Self::gu_plan)): its folded product
    /// ([`lin_folded`](Self::lin_folded)), or for a module without adapter
    /// (and without bias) its base product alone; the trained adapter set
    /// is `set`.
    #[allow(clippy::too_many_arguments)]
    fn lin_forward_into(&self, l: usize, j: usize, set: usize, x: Act<'_>, n: usize, y: &mut CudaViewMut<'_, u16>, ldy: usize) -> Result<()> {
        let lin = &self.layers[l].lin[j];
        if lin.bias.is_some() {
            bail!(Internal, "linear ({l}, {j}): a bias into a wide output");
        }
        if let Act::Wide(w) = x {
            if let Some((off, _)) = w.fold.slots[j] {
                return self.lin_folded(l, j, w, off, n, y, ldy, 0.0);
            }
        }
        if lin.ads[set].is_some() {
            bail!(Internal, "linear ({l}, {j}): an unfolded adapter into a wide output");
        }
        let d = &*self.dev;
        let w = self.weight(&lin.w)?;
        let t = self.tick()?;
        gemm_ld(d, &self.blas, x.operand(d, n, lin.in_f)?, false, w.mat(d, lin.out_f, lin.in_f)?, true, y, ldy, 1.0, 0.0)?;
        self.tock(t, "base GEMM forward")
    }

    /// Which of the modules `js` (reading one input) fold their
    /// adapter into the base product in this forward ([`Fold`]): in a lean
    /// training step, each whose weight is NF4 with the trained adapter —
    /// unless one of `js` has LoRA dropout (its adapter input is an fp32
    /// masked copy, read apart) or the input's width is not a multiple of
    /// 32 (the strided dequantization's); `None` when none folds or when
    /// turned off ([`set_fold`](Self::set_fold)).
    fn fold_plan(&self, l: usize, js: &[usize], rows: Rows<'_>) -> Option<Fold> {
        let Rows::Train(tr) = rows else { return None };
        if !self.fold_on || !self.lean() {
            return None;
        }
        let lins = &self.layers[l].lin;
        let in_f = lins[*js.first()?].in_f;
        if !in_f.is_multiple_of(32) || js.iter().any(|&j| lins[j].ads[tr.set].as_ref().is_some_and(|a| a.dropout > 0.0)) {
            return None;
        }
        let mut slots = [None; 7];
        let mut tail = 0;
        for &j in js {
            let lin = &lins[j];
            match (&lin.w, lin.ads[tr.set].as_ref()) {
                (Weight::Nf4(t), Some(ad)) if t.shape.len() == 2 => {
                    slots[j] = Some((tail, ad.r));
                    tail += ad.r.next_multiple_of(8);
                }
                _ => {}
            }
        }
        (tail > 0).then_some(Fold { set: tr.set, ld: in_f + tail, slots })
    }

    /// The normed input of the modules `js` for their forward products:
    /// as [`normed`](Self::normed) makes it for a forward, or — when their
    /// adapters fold ([`fold_plan`](Self::fold_plan)) — wide, with each
    /// folded module's `x·Aᵀ` beside it ([`widened`](Self::widened)).
    #[allow(clippy::too_many_arguments)]
    fn normed_for(&self, l: usize, js: &[usize], x: &CudaSlice<f32>, w: Option<&CudaSlice<f32>>, n: usize, rstd: Option<&mut CudaSlice<f32>>, rows: Rows<'_>) -> Result<(Normed, Folded)> {
        let Some(fold) = self.fold_plan(l, js, rows) else {
            return Ok((Normed::Forms(self.normed(x, w, n, rstd, false)?), Default::default()));
        };
        let d = &*self.dev;
        let (h, eps) = (self.cfg.hidden_size, self.norm_eps);
        let buf = match w {
            Some(w) => {
                let mut buf = out_buf::<u16>(d, n * fold.ld)?;
                let mut rv = rstd.map(|r| r.as_view_mut());
                cnorm::rmsnorm_forward_wide_bf16(d, &x.as_view(), &w.as_view(), n, h, eps, &mut buf.as_view_mut(), fold.ld, rv.as_mut())?;
                buf
            }
            // No norm: x's bf16 values in the first columns, the rest zero
            // as the norm's wide form writes them.
            None => {
                let mut buf = d.alloc_filled::<u16>(n * fold.ld, 0)?;
                ew::to_bf16_cols(d, &x.as_view(), n, h, &mut buf.as_view_mut(), fold.ld, 0)?;
                buf
            }
        };
        self.widened(l, fold, buf, h, n)
    }

    /// The lean training step's SwiGLU product of the bf16 gate and up (rows
    /// `in_ld` apart: apart, or side by side in one wide buffer) — the down
    /// projection's input — wide when its adapter folds
    /// ([`fold_plan`](Self::fold_plan)), with its `x·Aᵀ` beside it.
    fn gated_for_down(&self, l: usize, gb: &CudaView<'_, u16>, ub: &CudaView<'_, u16>, in_ld: usize, n: usize, rows: Rows<'_>) -> Result<(Normed, Folded)> {
        let d = &*self.dev;
        let it = self.cfg.intermediate_size;
        let Some(fold) = self.fold_plan(l, &[DOWN], rows) else {
            let mut ab = out_buf::<u16>(d, n * it)?;
            cswiglu::swiglu_forward_wide_bf16(d, gb, ub, n, it, in_ld, &mut ab.as_view_mut(), it, self.cfg.act)?;
            return Ok((Normed::Forms((None, Some(ab))), Default::default()));
        };
        let mut buf = out_buf::<u16>(d, n * fold.ld)?;
        cswiglu::swiglu_forward_wide_bf16(d, gb, ub, n, it, in_ld, &mut buf.as_view_mut(), fold.ld, self.cfg.act)?;
        self.widened(l, fold, buf, it, n)
    }

    /// A wide input `buf` `[n, fold.ld]` whose first `h` columns hold the
    /// input and the rest zeros: each folded module's `x·Aᵀ` (bf16,
    /// written by its product, as the unfolded lean step writes it) placed
    /// in its block, and returned for the backward.
    fn widened(&self, l: usize, fold: Fold, mut buf: CudaSlice<u16>, h: usize, n: usize) -> Result<(Normed, Folded)> {
        let d = &*self.dev;
        let mut folded: Folded = Default::default();
        let set = &self.sets[fold.set];
        let pb = set.params_b.as_ref().ok_or_else(|| err!(Internal, "bf16 adapter products without the weights' bf16 copy"))?;
        for (j, slot) in fold.slots.iter().enumerate() {
            let (Some((off, r)), Some(ad)) = (slot, self.layers[l].lin[j].ads[fold.set].as_ref()) else { continue };
            let t = self.tick()?;
            let mut hb = out_buf::<u16>(d, n * r)?;
            gemm(d, &self.blas, MatRef::bf16_ld(d, &buf.as_view(), n, h, fold.ld)?, false, MatRef::bf16(d, &pb.slice(ad.a.clone()), *r, h)?, true, &mut hb.as_view_mut(), 1.0, 0.0)?;
            ew::copy_cols_bf16(d, &hb.as_view(), n, *r, &mut buf.as_view_mut(), fold.ld, h + off)?;
            folded[j] = Some(Saved::Bf16(hb));
            self.tock(t, "LoRA GEMMs forward")?;
        }
        Ok((Normed::Wide(Wide { buf, cols: h, fold }), folded))
    }

    /// The base product of a decode step's few rows: for an NF4 weight in
    /// BF16 mode, the fused NF4 GEMV over all rows at once (`nf4_gemv_bf16`:
    /// the weight read once as 4-bit codes for every row, never dequantized
    /// to memory), widened into
    /// `y` (`β` 0 or 1); otherwise (a merged module too) as
    /// [`lin_forward`](Self::lin_forward). Then bias and adapters as there.
    #[allow(clippy::too_many_arguments)]
    fn lin_decode(&self, l: usize, j: usize, rows: Rows<'_>, x: Act<'_>, n: usize, y: &mut CudaSlice<f32>, beta: f32) -> Result<()> {
        let d = &*self.dev;
        let lin = &self.layers[l].lin[j];
        let out_f = lin.out_f;
        let merged = lin.merged.is_some() && matches!(rows, Rows::Active);
        match (&lin.w, x.given_bf16()) {
            (Weight::Nf4(t), Some(xb)) if !merged && n <= DECODE_GEMV_ROWS && (beta == 0.0 || beta == 1.0) => {
                let mut yb = out_buf::<u16>(d, n * out_f)?;
                t.gemv_bf16(d, &xb.as_view(), &mut yb.as_view_mut())?;
                ew::from_bf16(d, &yb.as_view(), &mut y.as_view_mut(), beta == 1.0)?;
                self.lin_bias_lora(l, j, rows, x, n, y).map(|_| ())
            }
            _ => self.lin_forward(l, j, rows, x, n, y, beta).map(|_| ()),
        }
    }

    /// Adds linear `(l, j)`'s bias and the adapters `rows` names into `y`;
    /// returns the first applied adapter's `x·Aᵀ` (None without one, and
    /// for a mixed batch).
    #[allow(clippy::too_many_arguments)]
    fn lin_bias_lora<C: GemmOut + 'static>(&self, l: usize, j: usize, rows: Rows<'_>, x: Act<'_>, n: usize, y: &mut CudaSlice<C>) -> Result<Option<Saved>> {
        let d = &*self.dev;
        let lin = &self.layers[l].lin[j];
        let (in_f, out_f) = (lin.in_f, lin.out_f);
        if let Some(b) = &lin.bias {
            ew::add_bias(d, &mut f32_out(y, "a bias")?.as_view_mut(), &b.as_view())?;
        }
        // Rows that all name one adapter take the product path.
        let rows = match rows {
            Rows::PerRow(r) if r.first().is_some_and(|&r0| r.iter().all(|&x| x == r0)) => Rows::One(usize::try_from(r[0]).ok()),
            other => other,
        };
        let (terms, call): (Vec<(usize, f32)>, Option<u64>) = match rows {
            Rows::Active if lin.merged.is_some() => (Vec::new(), None),
            Rows::Active => (self.active.clone(), None),
            Rows::One(set) => (set.into_iter().map(|s| (s, 1.0)).collect(), None),
            Rows::Train(tr) => (vec![(tr.set, 1.0)], Some(tr.call)),
            Rows::PerRow(r) => {
                self.lora_per_row(lin, r, &*(x.f32(d)?), n, f32_out(y, "a mixed-adapter batch")?)?;
                return Ok(None);
            }
        };
        let mut first = None;
        for (s, mult) in terms {
            let Some(ad) = lin.ads[s].as_ref() else { continue };
            let scale = ad.scale * mult;
            let t = self.tick()?;
            // Training with LoRA dropout: the adapter sees x after the mask.
            let dropped = match call {
                Some(c) if ad.dropout > 0.0 => Some(self.dropped_input(ad, &*(x.f32(d)?), c)?),
                _ => None,
            };
            // The adapter's input: the masked x, or x itself.
            let xin = match &dropped {
                Some(m) => Act::F32(m),
                None => x,
            };
            let set = &self.sets[s];
            let (av, bv) = (set.params.slice(ad.a.clone()), set.params.slice(ad.b.clone()));
            let h = match self.lora_path {
                LoraPath::Kernels => {
                    let mut hbuf = out_buf::<f32>(d, n * ad.r)?;
                    let xf = xin.f32(d)?;
                    glora::shrink(d, &xf.as_view(), &av, n, in_f, ad.r, &mut hbuf.as_view_mut())?;
                    glora::expand(d, &hbuf.as_view(), &bv, n, ad.r, out_f, scale, &mut f32_out(y, "the LoRA kernels")?.as_view_mut())?;
                    Saved::F32(hbuf)
                }
                LoraPath::Blas => {
                    let mut hbuf = out_buf::<f32>(d, n * ad.r)?;
                    let xf = xin.f32(d)?;
                    let xv = xf.as_view();
                    gemm(d, &self.blas, MatRef::f32(d, &xv, n, in_f)?, false, MatRef::f32(d, &av, ad.r, in_f)?, true, &mut hbuf.as_view_mut(), 1.0, 0.0)?;
                    let hv = hbuf.as_view();
                    gemm(d, &self.blas, MatRef::f32(d, &hv, n, ad.r)?, false, MatRef::f32(d, &bv, out_f, ad.r)?, true, &mut y.as_view_mut(), scale, 1.0)?;
                    Saved::F32(hbuf)
                }
                LoraPath::BlasBf16 => {
                    // The activation's bf16 form made for the base product
                    // (or a wide operand's), or (dropout, or none held) one
                    // made here.
                    let mut xkeep = None;
                    let xm = xin.bf16_operand(d, n, in_f, &mut xkeep)?;
                    let pb = set.params_b.as_ref().ok_or_else(|| err!(Internal, "bf16 adapter products without the weights' bf16 copy"))?;
                    let (ab, bb) = (pb.slice(ad.a.clone()), pb.slice(ad.b.clone()));
                    // x·Aᵀ written in bf16 by the product (its fp32
                    // accumulation rounded once): the next product's
                    // operand, and the backward's.
                    let mut hb = out_buf::<u16>(d, n * ad.r)?;
                    gemm(d, &self.blas, xm, false, MatRef::bf16(d, &ab, ad.r, in_f)?, true, &mut hb.as_view_mut(), 1.0, 0.0)?;
                    let hbv = hb.as_view();
                    gemm(d, &self.blas, MatRef::bf16(d, &hbv, n, ad.r)?, false, MatRef::bf16(d, &bb, out_f, ad.r)?, true, &mut y.as_view_mut(), scale, 1.0)?;
                    Saved::Bf16(hb)
                }
            };
            self.tock(t, "LoRA GEMMs forward")?;
            if first.is_none() {
                first = Some(h);
            }
        }
        Ok(first)
    }

    /// The adapter input of a training step with LoRA dropout: `x` after
    /// the module's mask for micro-batch `call` (the CPU's mask, bit for
    /// bit), in new scratch; recomputed in the backward, never kept.
    fn dropped_input(&self, ad: &DevAdapter, x: &CudaSlice<f32>, call: u64) -> Result<CudaSlice<f32>> {
        let mut out = out_buf::<f32>(&self.dev, x.len())?;
        glora::dropout(&self.dev, &x.as_view(), ad.seed, call, ad.dropout, &mut out.as_view_mut())?;
        Ok(out)
    }

    /// A mixed-adapter batch through one module: row `i` gets adapter
    /// `rows[i]` (−1: none) at multiplier 1, two BGMV launches for all rows
    /// (`cuda/lora.cu`).
    fn lora_per_row(&self, lin: &DevLinear, rows: &[i32], x: &CudaSlice<f32>, n: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        if rows.len() != n {
            bail!(Internal, "{} row adapters for {n} rows", rows.len());
        }
        let d = &*self.dev;
        // The table holds the adapters this module carries; rows of the
        // others map to −1.
        let mut table = Vec::new();
        let mut slot = vec![-1i32; self.sets.len()];
        for (s, ad) in lin.ads.iter().enumerate() {
            if let Some(ad) = ad {
                let p = &self.sets[s].params;
                slot[s] = table.len() as i32;
                table.push(glora::BgmvAdapter { a: p.slice(ad.a.clone()), b: p.slice(ad.b.clone()), rank: ad.r, scale: ad.scale });
            }
        }
        let idx: Vec<i32> = rows.iter().map(|&r| if r >= 0 && (r as usize) < slot.len() { slot[r as usize] } else { -1 }).collect();
        if table.is_empty() || idx.iter().all(|&i| i < 0) {
            return Ok(());
        }
        let t = self.tick()?;
        // The row table is the same for every module the same adapters
        // cover, and across a generation's decode steps: uploaded when it
        // changes, not once per module.
        let mut cached = self.bgmv_rows.lock();
        if cached.as_ref().is_none_or(|(h, _)| *h != idx) {
            *cached = Some((idx.clone(), d.upload(&idx)?));
        }
        let idx_d = &cached.as_ref().expect("set above").1;
        glora::bgmv(d, &x.as_view(), &idx_d.as_view(), &table, n, lin.in_f, lin.out_f, &mut y.as_view_mut())?;
        drop(cached);
        self.tock(t, "LoRA BGMV (mixed batch)")
    }

    /// Backward of linear `(l, j)` given its input `x`, saved `h = x·Aᵀ` and
    /// the output gradient `dy` (each in the forms held, [`Act`]):
    /// accumulates `dA`, `dB` of adapter `set` (being trained); with `dx`,
    /// `dx = β·dx + dy·W + s·(dy·B)·A` — fp32, or bf16 (the lean step's: the
    /// base term rounded, the adapter's added and rounded again; only from
    /// bf16 adapter products without dropout, else an error). The two
    /// halves, [`lin_grads`](Self::lin_grads) and
    /// [`lin_dx`](Self::lin_dx), can run apart, to free `x` between them.
    #[allow(clippy::too_many_arguments)]
    fn lin_backward<C: GemmOut + 'static>(&mut self, tr: Train, l: usize, j: usize, x: Act<'_>, h: Option<&Saved>, dy: Act<'_>, n: usize, dx: Option<(&mut CudaSlice<C>, f32)>) -> Result<()> {
        let g = self.lin_grads(tr, l, j, x, h, dy, n, dx.is_some())?;
        self.lin_dx(tr, l, j, dy, g, n, dx)
    }

    /// The adapter half of [`lin_backward`](Self::lin_backward): accumulates
    /// `dA` and `dB`; with `for_dx`, returns `g = dy·B` (in the form the
    /// adapter products take) for [`lin_dx`](Self::lin_dx). `None` when the
    /// linear has no adapter in the trained set.
    #[allow(clippy::too_many_arguments)]
    fn lin_grads(&mut self, tr: Train, l: usize, j: usize, x: Act<'_>, h: Option<&Saved>, dy: Act<'_>, n: usize, for_dx: bool) -> Result<Option<LoraG>> {
        let dev = self.dev.clone();
        let d = &*dev;
        let (in_f, out_f) = (self.layers[l].lin[j].in_f, self.layers[l].lin[j].out_f);
        let t = self.tick()?;
        let Some(ad) = self.layers[l].lin[j].ads[tr.set].clone() else { return Ok(None) };
        let h = h.ok_or_else(|| err!(Internal, "linear ({l}, {j}) has an adapter but no saved x·Aᵀ"))?;
        let (r, s) = (ad.r, ad.scale);
        // With LoRA dropout the adapter saw x after the mask (regenerated
        // here, the same mask).
        let dropped = if ad.dropout > 0.0 { Some(self.dropped_input(&ad, &*(x.f32(d)?), tr.call)?) } else { None };
        let xin = match &dropped {
            Some(m) => Act::F32(m),
            None => x,
        };
        let (blas, lora_path) = (&self.blas, self.lora_path);
        let DevSet { params, params_b, train, .. } = &mut self.sets[tr.set];
        let grads = &mut train.as_mut().ok_or_else(|| err!(Internal, "the backward of an adapter not being trained"))?.grads;
        let bv = params.slice(ad.b.clone());
        let (ra, rb) = (ad.a.clone(), ad.b.clone());
        // The operands in the form the adapter products take: bf16
        // (LoraPath::BlasBf16: dy's, x·Aᵀ's and the adapter input's; g
        // written in bf16 by its product) or fp32.
        let g = match lora_path {
            LoraPath::BlasBf16 => {
                let hcopy;
                let hb = match h {
                    Saved::Bf16(b) => b,
                    Saved::F32(h) => {
                        hcopy = bf16_copy(d, h)?;
                        &hcopy
                    }
                };
                let (mut xkeep, mut dykeep) = (None, None);
                let xm = xin.bf16_operand(d, n, in_f, &mut xkeep)?;
                let dym = dy.bf16_operand(d, n, out_f, &mut dykeep)?;
                let pb = params_b.as_ref().ok_or_else(|| err!(Internal, "bf16 adapter products without the weights' bf16 copy"))?;
                let bb = pb.slice(ad.b.clone());
                let hbv = hb.as_view();
                let mut gb = out_buf::<u16>(d, n * r)?;
                gemm(d, blas, dym, false, MatRef::bf16(d, &bb, out_f, r)?, false, &mut gb.as_view_mut(), 1.0, 0.0)?;
                gemm(d, blas, dym, true, MatRef::bf16(d, &hbv, n, r)?, false, &mut grads.slice_mut(rb), s, 1.0)?;
                let gbv = gb.as_view();
                gemm(d, blas, MatRef::bf16(d, &gbv, n, r)?, true, xm, false, &mut grads.slice_mut(ra), s, 1.0)?;
                Saved::Bf16(gb)
            }
            LoraPath::Kernels => {
                let mut g = out_buf::<f32>(d, n * r)?;
                let (dyf, xf, hv) = (dy.f32(d)?, xin.f32(d)?, h.f32()?.as_view());
                let (dyv, xv) = (dyf.as_view(), xf.as_view());
                glora::bwd_g(d, &dyv, &bv, n, out_f, r, &mut g.as_view_mut())?;
                glora::grad_b(d, &dyv, &hv, n, out_f, r, s, &mut grads.slice_mut(rb))?;
                glora::grad_a(d, &g.as_view(), &xv, n, r, in_f, s, &mut grads.slice_mut(ra))?;
                Saved::F32(g)
            }
            LoraPath::Blas => {
                let mut g = out_buf::<f32>(d, n * r)?;
                let (dyf, xf, hv) = (dy.f32(d)?, xin.f32(d)?, h.f32()?.as_view());
                let (dyv, xv) = (dyf.as_view(), xf.as_view());
                gemm(d, blas, MatRef::f32(d, &dyv, n, out_f)?, false, MatRef::f32(d, &bv, out_f, r)?, false, &mut g.as_view_mut(), 1.0, 0.0)?;
                gemm(d, blas, MatRef::f32(d, &dyv, n, out_f)?, true, MatRef::f32(d, &hv, n, r)?, false, &mut grads.slice_mut(rb), s, 1.0)?;
                let gv = g.as_view();
                gemm(d, blas, MatRef::f32(d, &gv, n, r)?, true, MatRef::f32(d, &xv, n, in_f)?, false, &mut grads.slice_mut(ra), s, 1.0)?;
                Saved::F32(g)
            }
        };
        self.tock(t, "LoRA GEMMs backward")?;
        Ok(for_dx.then_some(LoraG { ad, g }))
    }

    /// The input-gradient half of [`lin_backward`](Self::lin_backward):
    /// `dx = β·dx + dy·W`, then the adapter's term from `g`
    /// ([`lin_grads`](Self::lin_grads)): `s·g·A` added, or with LoRA dropout
    /// `g·A` through the module's mask (`dropout_accum`, the CPU's order).
    #[allow(clippy::too_many_arguments)]
    fn lin_dx<C: GemmOut + 'static>(&self, tr: Train, l: usize, j: usize, dy: Act<'_>, g: Option<LoraG>, n: usize, dx: Option<(&mut CudaSlice<C>, f32)>) -> Result<()> {
        let d = &*self.dev;
        let (in_f, out_f) = (self.layers[l].lin[j].in_f, self.layers[l].lin[j].out_f);
        let Some((dxs, beta)) = dx else { return Ok(()) };
        {
            let w = self.weight(&self.layers[l].lin[j].w)?;
            let t = self.tick()?;
            gemm(d, &self.blas, dy.operand(d, n, out_f)?, false, w.mat(d, out_f, in_f)?, false, &mut dxs.as_view_mut(), 1.0, beta)?;
            self.tock(t, "base GEMM backward")?;
        }
        let Some(LoraG { ad, g }) = g else { return Ok(()) };
        let t = self.tick()?;
        let (r, s) = (ad.r, ad.scale);
        let set = &self.sets[tr.set];
        let av = set.params.slice(ad.a.clone());
        // A for a bf16 g: the weights' bf16 copy.
        let a_bf16 = || set.params_b.as_ref().map(|pb| pb.slice(ad.a.clone())).ok_or_else(|| err!(Internal, "bf16 adapter products without the weights' bf16 copy"));
        // A bf16 dx (the lean step's) takes the term from the bf16 products,
        // and only without dropout (whose mask is applied to an fp32 dx).
        if C::DTYPE != crate::dtype::DType::F32 {
            let (Saved::Bf16(gb), 0.0) = (&g, ad.dropout) else {
                bail!(Internal, "a bf16 dx needs bf16 adapter products without dropout");
            };
            gemm(d, &self.blas, MatRef::bf16(d, &gb.as_view(), n, r)?, false, MatRef::bf16(d, &a_bf16()?, r, in_f)?, false, &mut dxs.as_view_mut(), s, 1.0)?;
            self.tock(t, "LoRA GEMMs backward")?;
            return Ok(());
        }
        let dx32 = f32_out(dxs, "an fp32 dx")?;
        // The term goes to gdx (unscaled, then through the mask) or straight
        // into dx (scaled by s).
        let mut gdx = if ad.dropout > 0.0 { Some(alloc(d, n * in_f)?) } else { None };
        let (mut o, scale, beta) = match &mut gdx {
            Some(gx) => (gx.as_view_mut(), 1.0f32, 0.0f32),
            None => (dx32.as_view_mut(), s, 1.0f32),
        };
        match (&g, self.lora_path) {
            (Saved::Bf16(gb), _) => gemm(d, &self.blas, MatRef::bf16(d, &gb.as_view(), n, r)?, false, MatRef::bf16(d, &a_bf16()?, r, in_f)?, false, &mut o, scale, beta)?,
            // Accumulates: gdx starts zeroed, so scale 1 writes g·A.
            (Saved::F32(g), LoraPath::Kernels) => glora::bwd_dx(d, &g.as_view(), &av, n, r, in_f, scale, &mut o)?,
            (Saved::F32(g), _) => gemm(d, &self.blas, MatRef::f32(d, &g.as_view(), n, r)?, false, MatRef::f32(d, &av, r, in_f)?, false, &mut o, scale, beta)?,
        }
        if let Some(gx) = gdx {
            glora::dropout_accum(d, &gx.as_view(), ad.seed, tr.call, ad.dropout, s, &mut dx32.as_view_mut())?;
        }
        self.tock(t, "LoRA GEMMs backward")?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    /// The backward of layer `l` from its output's gradient `dx` (with its
    /// bf16 copy `dxb` in BF16 mode, as [`norm_backward`](Self::norm_backward)
    /// makes it): its input's gradient (and bf16 copy); without `need_dx`
    /// (the first layer) the mid-layer residual's, which nothing reads.
    #[allow(clippy::type_complexity)]
    fn layer_backward(&mut self, tr: Train, l: usize, x_in: &CudaSlice<f32>, acts: Acts, dx: CudaSlice<f32>, dxb: Option<CudaSlice<u16>>, batch: usize, seq: usize, need_dx: bool) -> Result<(CudaSlice<f32>, Option<CudaSlice<u16>>)> {
        let dev = self.dev.clone();
        let d = &*dev;
        let Dims { h, it, qd, kvd, nh, nkv, hd, .. } = Dims::of(&self.cfg);
        let n = batch * seq;
        let shape = self.shape(l, batch, seq);
        let Acts { rstd1, qkv, mut qkn, att, lse, x_mid, post: [post_o, post_d], rstd2, gu, mut hs } = acts;
        let gu = gu.ok_or_else(|| err!(Internal, "gate and up not kept for the backward"))?;
        let lean = self.lean();
        let dxb = match dxb {
            Some(b) => Some(b),
            None => self.operand(&dx)?,
        };
        // The down projection's output gradient: the stream's, or through
        // the MLP output norm (`dyd`, with its bf16 copy in BF16 mode).
        let has_post = self.layers[l].post.is_some();
        let dyd = self.post_backward(l, 1, post_d, &dx, n)?;
        let (dy_f, dy_b) = match &dyd {
            Some((f, b)) => (f, b.as_ref()),
            None => (&dx, dxb.as_ref()),
        };
        // MLP: x_out = x_mid + down(a), a = silu(g)·u, recomputed; then the
        // gradients of gate and up: apart (fp32 and/or bf16), or in place in
        // the wide buffer of the stacked input gradient.
        let grads = match gu {
            GateUp::Wide(mut gub, plan) => {
                // a (the adapter's input) from the side-by-side gate and up,
                // then their gradients in place.
                let up = plan.blocks[1].1;
                let mut ab = out_buf::<u16>(d, n * it)?;
                cswiglu::swiglu_forward_wide_bf16(d, &gub.slice(..), &gub.slice(up..), n, it, plan.ld, &mut ab.as_view_mut(), it, self.cfg.act)?;
                let da = self.down_backward_bf16(tr, l, ab, hs[DOWN].as_ref(), Act::new(dy_f, dy_b), n)?;
                let dh = match &da {
                    Saved::F32(da) => cswiglu::Dh::F32(&da.as_view()),
                    Saved::Bf16(dab) => cswiglu::Dh::Bf16(&dab.as_view()),
                };
                cswiglu::swiglu_backward_pair_inplace(d, &mut gub.as_view_mut(), n, it, plan.ld, up, dh, self.cfg.act)?;
                MlpGrads::Stacked(gub, plan)
            }
            GateUp::Pair(Saved::F32(mut g), Saved::F32(mut u)) => {
                // a (the adapter's input) is freed before its gradient is made.
                let mut a = out_buf::<f32>(d, n * it)?;
                cswiglu::swiglu_forward(d, &g.as_view(), &u.as_view(), &mut a.as_view_mut(), self.cfg.act)?;
                let dy = Act::new(dy_f, dy_b);
                let gd = self.lin_grads(tr, l, DOWN, Act::F32(&a), hs[DOWN].as_ref(), dy, n, true)?;
                drop(a);
                let mut da = out_buf::<f32>(d, n * it)?;
                self.lin_dx(tr, l, DOWN, dy, gd, n, Some((&mut da, 0.0)))?;
                cswiglu::swiglu_backward_inplace(d, &mut g.as_view_mut(), &mut u.as_view_mut(), &da.as_view(), self.cfg.act)?;
                MlpGrads::Apart(Some(g), Some(u), None, None)
            }
            GateUp::Pair(Saved::Bf16(gb), Saved::Bf16(ub)) if lean => {
                // From the bf16 gate and up, one pass each, only the bf16
                // operands: a (the adapters' input), then the gradients.
                let mut ab = out_buf::<u16>(d, n * it)?;
                cswiglu::swiglu_forward_bf16(d, &gb.as_view(), &ub.as_view(), None, Some(&mut ab.as_view_mut()), self.cfg.act)?;
                let da = self.down_backward_bf16(tr, l, ab, hs[DOWN].as_ref(), Act::new(dy_f, dy_b), n)?;
                // The gradients over gate and up themselves (not needed
                // after this pass): no second pair of buffers.
                let (mut dgb, mut dub) = (gb, ub);
                let dh = match &da {
                    Saved::F32(da) => cswiglu::Dh::F32(&da.as_view()),
                    Saved::Bf16(dab) => cswiglu::Dh::Bf16(&dab.as_view()),
                };
                cswiglu::swiglu_backward_bf16_inplace(d, &mut dgb.as_view_mut(), &mut dub.as_view_mut(), dh, self.cfg.act)?;
                MlpGrads::Apart(None, None, Some(dgb), Some(dub))
            }
            GateUp::Pair(Saved::Bf16(gb), Saved::Bf16(ub)) => {
                // From the bf16 gate and up, in fp32 (what the fp32 adapter
                // products read); the gradients' bf16 operands are made one
                // at a time below, as the products need them.
                let mut a = out_buf::<f32>(d, n * it)?;
                cswiglu::swiglu_forward_bf16(d, &gb.as_view(), &ub.as_view(), Some(&mut a.as_view_mut()), None, self.cfg.act)?;
                let dy = Act::new(dy_f, dy_b);
                let gd = self.lin_grads(tr, l, DOWN, Act::F32(&a), hs[DOWN].as_ref(), dy, n, true)?;
                drop(a);
                let mut da = out_buf::<f32>(d, n * it)?;
                self.lin_dx(tr, l, DOWN, dy, gd, n, Some((&mut da, 0.0)))?;
                // In place: da becomes the fp32 gradient of gate, gate and
                // up their bf16 gradients (the base products' operands);
                // one new buffer, the fp32 gradient of up.
                let (mut dgb, mut dub, mut dg) = (gb, ub, da);
                let mut du = out_buf::<f32>(d, n * it)?;
                cswiglu::swiglu_backward_bf16_inplace_all(d, &mut dgb.as_view_mut(), &mut dub.as_view_mut(), &mut dg.as_view_mut(), &mut du.as_view_mut(), self.cfg.act)?;
                MlpGrads::Apart(Some(dg), Some(du), Some(dgb), Some(dub))
            }
            GateUp::Pair(..) => bail!(Internal, "gate and up kept in different dtypes"),
        };
        drop((dyd, dxb));
        let (x_mid, post_o) = match x_mid {
            Some(x) => (x, post_o),
            None => {
                let (x, _, p) = self.attn_residual(l, Rows::Train(tr), x_in, &att, true)?;
                (x, p)
            }
        };
        let (h2, h2b) = self.normed(&x_mid, self.layers[l].mlp_norm.as_ref(), n, None, true)?;
        let h2a = act_of(&h2, &h2b)?;
        let dh2 = match grads {
            MlpGrads::Stacked(gub, plan) => self.stacked_dx(tr, l, h2a, &hs, gub, &plan, n)?,
            MlpGrads::Apart(dg, du, dgb, dub) => {
                let mut dh2 = out_buf::<f32>(d, n * h)?;
                self.lin_backward(tr, l, GATE, h2a, hs[GATE].as_ref(), act_of(&dg, &dgb)?, n, Some((&mut dh2, 0.0)))?;
                drop((dg, dgb));
                self.lin_backward(tr, l, UP, h2a, hs[UP].as_ref(), act_of(&du, &dub)?, n, Some((&mut dh2, 1.0)))?;
                dh2
            }
        };
        drop((h2, h2b));
        // The residual's gradient (and its bf16 copy in BF16 mode) in the
        // norm's backward pass; then attention: x_mid = x_in + o_proj(att).
        // In the lean step o_proj's input gradient is one product with its
        // adapter's term: the bf16 copy written wide, [dxm | g_o].
        // (Only for an MLP input norm and no output norms: else plainly.)
        let o_plan = self.dx_stack_plan(l, tr, &[O], false).filter(|p| p.blocks[0].3.is_some() && !has_post && self.layers[l].mlp_norm.is_some());
        let (dxm, datt) = match (o_plan, &self.layers[l].mlp_norm) {
            (Some(plan), Some(mlp_norm)) => {
                let mut dxm = out_buf::<f32>(d, n * h)?;
                let mut st = out_buf::<u16>(d, n * plan.ld)?;
                cnorm::rmsnorm_backward_residual_wide(d, &x_mid.as_view(), &mlp_norm.as_view(), &rstd2.as_view(), &dh2.as_view(), n, h, Some(&dx.as_view()), &mut dxm.as_view_mut(), &mut st.as_view_mut(), plan.ld)?;
                drop((dh2, dx, x_mid, rstd2));
                let datt = self.stacked_dx(tr, l, att.act(None), &hs, st, &plan, n)?;
                (dxm, datt)
            }
            _ => {
                let (dxm, dxmb) = self.input_norm_backward(&x_mid, self.layers[l].mlp_norm.as_ref(), &rstd2, dh2, Some(&dx), n)?;
                drop((dx, x_mid, rstd2));
                // o_proj's output gradient: x_mid's, or through the
                // attention output norm.
                let dyo = self.post_backward(l, 0, post_o, &dxm, n)?;
                let dy = match &dyo {
                    Some((f, b)) => Act::new(f, b.as_ref()),
                    None => Act::new(&dxm, dxmb.as_ref()),
                };
                let mut datt = out_buf::<f32>(d, n * qd)?;
                self.lin_backward(tr, l, O, att.act(None), hs[O].as_ref(), dy, n, Some((&mut datt, 0.0)))?;
                (dxm, datt)
            }
        };
        // q, k and v as kept, or recomputed from the layer's input as the
        // forward made them, with the normed input the adapters' backward
        // takes below.
        let mut h1f = None;
        let [q, k, v] = match qkv {
            Some(s) => s,
            None => {
                // As the forward normed it (both forms where it made both,
                // or wide).
                let (f, mut folded) = self.normed_for(l, &[Q, K, V], x_in, self.layers[l].attn_norm.as_ref(), n, None, Rows::Train(tr))?;
                let (s, [hq, hk, hv], sn) = self.qkv(l, Rows::Train(tr), f.act()?, &mut folded, batch, seq)?;
                (hs[Q], hs[K], hs[V]) = (hq, hk, hv);
                qkn = sn;
                h1f = Some(f);
                s
            }
        };
        let mut dq = out_buf::<f32>(d, n * qd)?;
        let mut dk = out_buf::<f32>(d, n * kvd)?;
        let mut dv = out_buf::<f32>(d, n * kvd)?;
        let t = self.tick()?;
        let (dqv, dkv, dvv) = (&mut dq.as_view_mut(), &mut dk.as_view_mut(), &mut dv.as_view_mut());
        match (&q, &k, &v, &att) {
            // Kept in bf16: the forward ran the tensor-core kernels' bf16 form.
            (Saved::Bf16(q), Saved::Bf16(k), Saved::Bf16(v), Saved::Bf16(o)) => {
                catt::backward_tc(d, &q.as_view(), &k.as_view(), &v.as_view(), &o.as_view(), &lse.as_view(), &datt.as_view(), &shape, dqv, dkv, dvv)?
            }
            (Saved::F32(q), Saved::F32(k), Saved::F32(v), Saved::F32(o)) => {
                if self.attn_tc && catt::tc_supported(d, &shape) {
                    catt::backward_tc(d, &q.as_view(), &k.as_view(), &v.as_view(), &o.as_view(), &lse.as_view(), &datt.as_view(), &shape, dqv, dkv, dvv)?;
                } else {
                    catt::backward(d, &q.as_view(), &k.as_view(), &v.as_view(), &o.as_view(), &lse.as_view(), &datt.as_view(), &shape, dqv, dkv, dvv)?;
                }
            }
            // The lean step with the fp32 kernels: o kept in bf16.
            (Saved::F32(q), Saved::F32(k), Saved::F32(v), Saved::Bf16(o)) => {
                catt::backward(d, &q.as_view(), &k.as_view(), &v.as_view(), &o.as_view(), &lse.as_view(), &datt.as_view(), &shape, dqv, dkv, dvv)?;
            }
            _ => bail!(Internal, "attention activations kept in mixed dtypes"),
        }
        self.tock(t, "attention backward")?;
        drop((q, k, v, att, lse, datt));
        // With per-head q/k norms, dq and dk are rotated back and taken
        // through the norms' backward here (fp32); the paths below then
        // only convert them.
        let rotated = match qkn {
            Some(s) => {
                self.qk_norm_backward(l, s, &mut dq, &mut dk, batch, seq)?;
                false
            }
            None if self.layers[l].qk_norm.is_some() => bail!(Internal, "q/k norm activations not kept for the backward"),
            None => self.cfg.rope_layers[l],
        };
        if lean && need_dx {
            if let Some(plan) = self.dx_stack_plan(l, tr, &[Q, K, V], false) {
                return self.qkv_backward_stacked(tr, l, x_in, h1f, &hs, [dq, dk, dv], rotated, &plan, (&rstd1, &dxm), batch, seq);
            }
        }
        // The gradients of q, k (rotated back) and v in the forms the
        // products take: lean, straight into bf16 (one pass each, the fp32
        // ones freed); otherwise fp32 rotated in place, and bf16 copies in
        // BF16 mode.
        let ((dq, dqb), (dk, dkb), (dv, dvb)) = if lean {
            let (dqb, dkb) = if rotated {
                (self.rotated_bf16(l, dq, batch, seq, nh, true)?, self.rotated_bf16(l, dk, batch, seq, nkv, true)?)
            } else {
                (bf16_copy(d, &dq)?, bf16_copy(d, &dk)?)
            };
            let dvb = bf16_copy(d, &dv)?;
            drop(dv);
            ((None, Some(dqb)), (None, Some(dkb)), (None, Some(dvb)))
        } else if !rotated {
            // Already rotated back (the q/k norms' backward above), or a
            // layer without rotation.
            let (dqb, dkb, dvb) = if need_dx { (self.operand(&dq)?, self.operand(&dk)?, self.operand(&dv)?) } else { (None, None, None) };
            ((Some(dq), dqb), (Some(dk), dkb), (Some(dv), dvb))
        } else if need_dx && self.compute == Compute::BF16 {
            // Rotated back in place, each with its bf16 rounding from the
            // same pass (the base products' operands).
            let table = self.rope_back(l)?;
            let (mut dqb, mut dkb) = (out_buf::<u16>(d, dq.len())?, out_buf::<u16>(d, dk.len())?);
            crope::rope_inplace_bf16(d, &mut dq.as_view_mut(), &mut dqb.as_view_mut(), batch, seq, nh, hd, table, true)?;
            crope::rope_inplace_bf16(d, &mut dk.as_view_mut(), &mut dkb.as_view_mut(), batch, seq, nkv, hd, table, true)?;
            let dvb = self.operand(&dv)?;
            ((Some(dq), Some(dqb)), (Some(dk), Some(dkb)), (Some(dv), dvb))
        } else {
            let table = self.rope_back(l)?;
            crope::rope_backward(d, &mut dq.as_view_mut(), batch, seq, nh, hd, table)?;
            crope::rope_backward(d, &mut dk.as_view_mut(), batch, seq, nkv, hd, table)?;
            // No bf16 operands: F32 mode, or no input gradient to make.
            ((Some(dq), None), (Some(dk), None), (Some(dv), None))
        };
        let (dqa, dka, dva) = (act_of(&dq, &dqb)?, act_of(&dk, &dkb)?, act_of(&dv, &dvb)?);
        let h1 = match h1f {
            Some(f) => f,
            None => Normed::Forms(self.normed(x_in, self.layers[l].attn_norm.as_ref(), n, None, true)?),
        };
        let h1a = h1.act()?;
        if need_dx {
            let mut dh1 = out_buf::<f32>(d, n * h)?;
            self.lin_backward(tr, l, Q, h1a, hs[Q].as_ref(), dqa, n, Some((&mut dh1, 0.0)))?;
            self.lin_backward(tr, l, K, h1a, hs[K].as_ref(), dka, n, Some((&mut dh1, 1.0)))?;
            self.lin_backward(tr, l, V, h1a, hs[V].as_ref(), dva, n, Some((&mut dh1, 1.0)))?;
            drop((dq, dqb, dk, dkb, dv, dvb, h1));
            self.input_norm_backward(x_in, self.layers[l].attn_norm.as_ref(), &rstd1, dh1, Some(&dxm), n)
        } else {
            self.lin_backward::<f32>(tr, l, Q, h1a, hs[Q].as_ref(), dqa, n, None)?;
            self.lin_backward::<f32>(tr, l, K, h1a, hs[K].as_ref(), dka, n, None)?;
            self.lin_backward::<f32>(tr, l, V, h1a, hs[V].as_ref(), dva, n, None)?;
            Ok((dxm, None))
        }
    }

    /// The lean step's down projection backward from its bf16 input `ab`
    /// (the adapter's; freed after its gradients, before `a`'s own gradient
    /// is made) and output gradient `dy`: accumulates the adapter's
    /// gradients and returns `da`, in bf16 as PyTorch autocast's product
    /// writes it, or fp32 when the adapter's dropout needs it so.
    fn down_backward_bf16(&mut self, tr: Train, l: usize, ab: CudaSlice<u16>, h: Option<&Saved>, dy: Act<'_>, n: usize) -> Result<Saved> {
        let it = self.cfg.intermediate_size;
        let gd = self.lin_grads(tr, l, DOWN, Act::Bf16(&ab), h, dy, n, true)?;
        drop(ab);
        Ok(if self.layers[l].lin[DOWN].ads[tr.set].as_ref().is_some_and(|a| a.dropout > 0.0) {
            let mut da = out_buf::<f32>(&self.dev, n * it)?;
            self.lin_dx(tr, l, DOWN, dy, gd, n, Some((&mut da, 0.0)))?;
            Saved::F32(da)
        } else {
            let mut dab = out_buf::<u16>(&self.dev, n * it)?;
            self.lin_dx(tr, l, DOWN, dy, gd, n, Some((&mut dab, 0.0)))?;
            Saved::Bf16(dab)
        })
    }

    /// Whether the lean step's backward makes the input gradient of layer
    /// `l`'s modules `js` (reading one input) as one product (or, `split`,
    /// one per module with fewer reads and writes of it than apart), and
    /// how ([`DxStack`]): folding on, each weight NF4 (2-D) or bf16, no LoRA
    /// dropout on them (its gradient goes through the mask in fp32), and an
    /// input width that is a multiple of 8 (each weight's rows start
    /// 16-byte aligned).
    fn dx_stack_plan(&self, l: usize, tr: Train, js: &[usize], split: bool) -> Option<DxStack> {
        let in_f = self.layers[l].lin[*js.first()?].in_f;
        if !self.fold_on || !self.lean() || !in_f.is_multiple_of(8) {
            return None;
        }
        let mut blocks = Vec::with_capacity(js.len());
        let mut groups = Vec::new();
        let mut col = 0;
        let tail = |j: usize| self.layers[l].lin[j].ads[tr.set].as_ref().map(|ad| ad.r.next_multiple_of(8));
        for &j in js {
            let lin = &self.layers[l].lin[j];
            let weight_ok = match &lin.w {
                Weight::Nf4(t) => t.shape.len() == 2,
                Weight::Bf16(_) => true,
                Weight::F32(_) => false,
            };
            if !weight_ok || lin.in_f != in_f || lin.ads[tr.set].as_ref().is_some_and(|a| a.dropout > 0.0) {
                return None;
            }
            let start = col;
            blocks.push((j, col, lin.out_f, None));
            col += lin.out_f;
            if split {
                if let Some(w) = tail(j) {
                    blocks.last_mut().expect("pushed").3 = Some(col);
                    col += w;
                }
                groups.push(start..col);
            }
        }
        if !split {
            for b in &mut blocks {
                if let Some(w) = tail(b.0) {
                    b.3 = Some(col);
                    col += w;
                }
            }
            groups.push(0..col);
        }
        Some(DxStack { set: tr.set, ld: col, blocks, groups })
    }

    /// The lean training step's gate and up written side by side into one
    /// wide buffer, whose backward then stacks their input gradient
    /// ([`DxStack`]): when [`dx_stack_plan`](Self::dx_stack_plan) allows it
    /// and every adapter on them folds into its product (`fold`, the MLP
    /// input's; a module without adapter writes its base product alone).
    fn gu_plan(&self, l: usize, rows: Rows<'_>, fold: Option<&Fold>) -> Option<DxStack> {
        let Rows::Train(tr) = rows else { return None };
        let lins = &self.layers[l].lin;
        let folds = |j: usize| lins[j].ads[tr.set].is_none() || fold.is_some_and(|f| f.slots[j].is_some());
        if lins[GATE].bias.is_some() || lins[UP].bias.is_some() || !folds(GATE) || !folds(UP) {
            return None;
        }
        // One product per module: the two weights are the layer's largest,
        // so one at a time in scratch (as apart), for one more read and
        // write of the input gradient than a single product.
        self.dx_stack_plan(l, tr, &[GATE, UP], true)
    }

    /// The lean step's backward of layer `l`'s q, k and v with their input
    /// gradient as one product ([`DxStack`]): the gradients of q and k
    /// rotated back and v's rounded straight into the wide bf16 buffer
    /// `[dq | dk | dv | g_q | g_k | g_v]`, then
    /// [`stacked_dx`](Self::stacked_dx), then the norm's backward, as the
    /// unstacked path ends.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn qkv_backward_stacked(&mut self, tr: Train, l: usize, x_in: &CudaSlice<f32>, h1f: Option<Normed>, hs: &[Option<Saved>], [dq, dk, dv]: [CudaSlice<f32>; 3], rotated: bool, plan: &DxStack, (rstd1, dxm): (&CudaSlice<f32>, &CudaSlice<f32>), batch: usize, seq: usize) -> Result<(CudaSlice<f32>, Option<CudaSlice<u16>>)> {
        let dev = self.dev.clone();
        let d = &*dev;
        let Dims { qd, kvd, nh, nkv, hd, .. } = Dims::of(&self.cfg);
        let (n, ld) = (batch * seq, plan.ld);
        let mut st = out_buf::<u16>(d, n * ld)?;
        if rotated {
            let table = self.rope_back(l)?;
            crope::rope_bf16_into(d, &dq.as_view(), None, &mut st.as_view_mut(), ld, 0, batch, seq, nh, hd, table, true)?;
            crope::rope_bf16_into(d, &dk.as_view(), None, &mut st.as_view_mut(), ld, qd, batch, seq, nkv, hd, table, true)?;
        } else {
            ew::to_bf16_cols(d, &dq.as_view(), n, qd, &mut st.as_view_mut(), ld, 0)?;
            ew::to_bf16_cols(d, &dk.as_view(), n, kvd, &mut st.as_view_mut(), ld, qd)?;
        }
        ew::to_bf16_cols(d, &dv.as_view(), n, kvd, &mut st.as_view_mut(), ld, qd + kvd)?;
        drop((dq, dk, dv));
        let h1 = match h1f {
            Some(f) => f,
            None => Normed::Forms(self.normed(x_in, self.layers[l].attn_norm.as_ref(), n, None, true)?),
        };
        let dh1 = self.stacked_dx(tr, l, h1.act()?, hs, st, plan, n)?;
        drop(h1);
        self.input_norm_backward(x_in, self.layers[l].attn_norm.as_ref(), rstd1, dh1, Some(dxm), n)
    }

    /// The input gradient `dx` `[n, in]` of the modules of `plan`
    /// (reading the input `x`) as one product, given their output gradients
    /// in the wide buffer `st` (each module's in its columns): each
    /// adapter's gradients from its block (`g = dy·B`, placed in the tail
    /// for the product; `dA`, `dB` accumulated), then
    /// `dx = [dy₁ | dy₂ … | g…]·[W₁; W₂ …; s·A…]` over the weights
    /// dequantized (or copied) into consecutive rows: one product instead of
    /// one base and one adapter product per module, all but the first of
    /// which read and wrote `dx` again.
    #[allow(clippy::too_many_arguments)]
    fn stacked_dx(&mut self, tr: Train, l: usize, x: Act<'_>, hs: &[Option<Saved>], mut st: CudaSlice<u16>, plan: &DxStack, n: usize) -> Result<CudaSlice<f32>> {
        let dev = self.dev.clone();
        let d = &*dev;
        let j0 = plan.blocks.first().ok_or_else(|| err!(Internal, "an empty stacked product"))?.0;
        // The modules' input width (the weights' rows, dx's columns).
        let (h, ld) = (self.layers[l].lin[j0].in_f, plan.ld);
        for &(j, off, cols, tail) in &plan.blocks {
            let dy = Act::Cols(Cols { buf: &st, off, cols, ld });
            match (self.lin_grads(tr, l, j, x, hs[j].as_ref(), dy, n, true)?, tail) {
                (None, None) => {}
                (Some(LoraG { ad, g: Saved::Bf16(gb) }), Some(t0)) => {
                    ew::copy_cols_bf16(d, &gb.as_view(), n, ad.r, &mut st.as_view_mut(), ld, t0)?;
                    // The block's padding: zeros (its weight rows are zero,
                    // and 0·NaN would not be).
                    let pad = ad.r.next_multiple_of(8) - ad.r;
                    if pad > 0 {
                        let z = d.alloc_filled::<u16>(n * pad, 0)?;
                        ew::copy_cols_bf16(d, &z.as_view(), n, pad, &mut st.as_view_mut(), ld, t0 + ad.r)?;
                    }
                }
                _ => bail!(Internal, "linear ({l}, {j}): its adapter's gradient does not fit the stacked product"),
            }
        }
        let mut dx = out_buf::<f32>(d, n * h)?;
        for (gi, g) in plan.groups.iter().enumerate() {
            // The group's weight rows: each module's weight, its adapter's
            // bf16(s·A) rows, at their columns' places.
            let tk = self.tick()?;
            let mut ws = out_buf::<u16>(d, g.len() * h)?;
            for &(j, r0, rows, tail) in plan.blocks.iter().filter(|b| g.contains(&b.1)) {
                let lin = &self.layers[l].lin[j];
                let r0 = r0 - g.start;
                let mut dst = ws.slice_mut(r0 * h..(r0 + rows) * h);
                match &lin.w {
                    Weight::Nf4(t) => t.dequantize_into(d, &mut DevElemsMut::BF16(dst))?,
                    Weight::Bf16(w) => d.copy(w, &mut dst)?,
                    Weight::F32(_) => bail!(Internal, "an fp32 weight in the stacked bf16 product"),
                }
                if let (Some(t0), Some(ad)) = (tail, lin.ads[tr.set].as_ref()) {
                    let (r8, t0) = (ad.r.next_multiple_of(8), t0 - g.start);
                    glora::scaled_rows_bf16(d, &self.sets[tr.set].params.slice(ad.a.clone()), ad.r, h, ad.scale, &mut ws.slice_mut(t0 * h..(t0 + r8) * h), r8)?;
                }
            }
            self.tock(tk, "NF4 dequantize")?;
            let tg = self.tick()?;
            let xm = MatRef::bf16_ld(d, &st.slice(g.start..), n, g.len(), ld)?;
            gemm(d, &self.blas, xm, false, MatRef::bf16(d, &ws.as_view(), g.len(), h)?, false, &mut dx.as_view_mut(), 1.0, if gi == 0 { 0.0 } else { 1.0 })?;
            self.tock(tg, "base GEMM backward (stacked)")?;
        }
        Ok(dx)
    }

    /// The backward of `w·rmsnorm(x)` of `n` rows given the output's
    /// gradient `dy`: `dx` (plus `res`, the residual stream's gradient, when
    /// given) and, in BF16 mode, its bf16 copy (the next products'
    /// operand), from one pass.
    fn norm_backward(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, rstd: &CudaSlice<f32>, dy: &CudaSlice<f32>, res: Option<&CudaSlice<f32>>, n: usize) -> Result<(CudaSlice<f32>, Option<CudaSlice<u16>>)> {
        let d = &*self.dev;
        let h = self.cfg.hidden_size;
        let mut dx = out_buf::<f32>(d, n * h)?;
        let mut dxb = if self.compute == Compute::BF16 { Some(out_buf::<u16>(d, n * h)?) } else { None };
        let resv = res.map(|r| r.as_view());
        let mut dxbv = dxb.as_mut().map(|b| b.as_view_mut());
        cnorm::rmsnorm_backward_residual(d, &x.as_view(), &w.as_view(), &rstd.as_view(), &dy.as_view(), n, h, resv.as_ref(), &mut dx.as_view_mut(), dxbv.as_mut())?;
        Ok((dx, dxb))
    }

    /// [`norm_backward`](Self::norm_backward) of an input norm, or without
    /// one (`w` `None`) `dy + res` (`dy` consumed) and its bf16 copy in
    /// BF16 mode.
    fn input_norm_backward(&self, x: &CudaSlice<f32>, w: Option<&CudaSlice<f32>>, rstd: &CudaSlice<f32>, dy: CudaSlice<f32>, res: Option<&CudaSlice<f32>>, n: usize) -> Result<(CudaSlice<f32>, Option<CudaSlice<u16>>)> {
        let Some(w) = w else {
            let mut dx = dy;
            if let Some(r) = res {
                ew::add(&self.dev, &mut dx.as_view_mut(), &r.as_view())?;
            }
            let dxb = self.operand(&dx)?;
            return Ok((dx, dxb));
        };
        self.norm_backward(x, w, rstd, &dy, res, n)
    }

    /// `x += w·rmsnorm(y)` over `n` rows (an output norm `w` on branch
    /// output `y`); with `keep`, `y` and its rstd for the norm's backward.
    fn post_add(&self, w: &CudaSlice<f32>, y: CudaSlice<f32>, x: &mut CudaSlice<f32>, n: usize, keep: bool) -> Result<Option<PostSaved>> {
        let d = &*self.dev;
        let h = self.cfg.hidden_size;
        let mut yn = out_buf::<f32>(d, n * h)?;
        let mut rstd = out_buf::<f32>(d, n)?;
        cnorm::rmsnorm_forward(d, &y.as_view(), &w.as_view(), n, h, self.cfg.rms_norm_eps, &mut yn.as_view_mut(), Some(&mut rstd.as_view_mut()))?;
        ew::add(d, &mut x.as_view_mut(), &yn.as_view())?;
        Ok(keep.then_some(PostSaved { y, rstd }))
    }

    /// The gradient of branch output `k` (0 attention, 1 MLP) of layer `l`
    /// from the stream's `dx`, through its output norm (with its bf16 copy
    /// in BF16 mode); `None` without output norms (it is `dx` itself).
    #[allow(clippy::type_complexity)]
    fn post_backward(&self, l: usize, k: usize, saved: Option<PostSaved>, dx: &CudaSlice<f32>, n: usize) -> Result<Option<(CudaSlice<f32>, Option<CudaSlice<u16>>)>> {
        match (&self.layers[l].post, saved) {
            (Some(w), Some(p)) => self.norm_backward(&p.y, &w[k], &p.rstd, dx, None, n).map(Some),
            (None, None) => Ok(None),
            _ => bail!(Internal, "layer {l}'s output norm {k}: activations not kept for the backward"),
        }
    }

    /// The down projection of the MLP's gated input `a` added into the
    /// residual stream `x` (through layer `l`'s MLP output norm where it
    /// has one); returns its adapter's `x·Aᵀ` and, with `keep`, what the
    /// output norm's backward needs.
    #[allow(clippy::too_many_arguments)]
    fn down_residual(&self, l: usize, rows: Rows<'_>, a: Act<'_>, n: usize, x: &mut CudaSlice<f32>, keep: bool) -> Result<(Option<Saved>, Option<PostSaved>)> {
        let Some(post) = &self.layers[l].post else {
            return Ok((self.lin_forward(l, DOWN, rows, a, n, x, 1.0)?, None));
        };
        let mut y = out_buf::<f32>(&self.dev, n * self.cfg.hidden_size)?;
        let h = self.lin_forward(l, DOWN, rows, a, n, &mut y, 0.0)?;
        Ok((h, self.post_add(&post[1], y, x, n, keep)?))
    }

    /// Final norm, then the head's logits over row chunks of at most
    /// [`HEAD_CHUNK_ELEMS`] logits (`set_head_chunk_elems`), so the `[n, V]`
    /// matrix never exists whole: `f(chunk, r0, r1, logits, head)` per
    /// chunk with its logits `[r1 − r0, V]` and the head weight. Returns the
    /// normalized rows' rstd (for the norm's backward).
    fn head_chunks<C: GemmOut>(&self, x: &CudaSlice<f32>, n: usize, mut f: impl FnMut(usize, usize, usize, &mut CudaSlice<C>, MatRef<'_>) -> Result<()>) -> Result<CudaSlice<f32>> {
        let d = &*self.dev;
        let (h, vsz) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let mut rstd = out_buf::<f32>(d, n)?;
        let (hf, hfb) = self.normed(x, Some(&self.norm), n, Some(&mut rstd), false)?;
        let hfa = act_of(&hf, &hfb)?;
        let head_w = match &self.head {
            Some(w) => self.weight(w)?,
            None => self.weight(&self.embed)?,
        };
        let wm = head_w.mat(d, vsz, h)?;
        let rows = self.head_rows(n);
        for (c, r0) in (0..n).step_by(rows).enumerate() {
            let r1 = (r0 + rows).min(n);
            let rc = r1 - r0;
            let mut logits = out_buf::<C>(d, rc * vsz)?;
            let xa = match hfa {
                Act::Bf16(b) | Act::Both(_, b) => MatRef::bf16(d, &b.slice(r0 * h..r1 * h), rc, h)?,
                Act::F32(f) => MatRef::f32(d, &f.slice(r0 * h..r1 * h), rc, h)?,
                Act::Wide(_) | Act::Cols(_) => bail!(Internal, "the head's input held wide"),
            };
            gemm(d, &self.blas, xa, false, wm, true, &mut logits.as_view_mut(), 1.0, 0.0)?;
            f(c, r0, r1, &mut logits, wm)?;
        }
        Ok(rstd)
    }

    /// Rows per head chunk.
    fn head_rows(&self, n: usize) -> usize {
        (self.head_chunk / self.cfg.vocab_size).clamp(1, n.max(1))
    }

    /// Final norm, head and fused cross-entropy over row chunks, and their
    /// backward: returns the gradient of the last layer's output and the
    /// per-chunk loss triples (and, in BF16 mode, that gradient's bf16 copy
    /// for the last layer's products). The lean step's head writes bf16 logits
    /// (PyTorch autocast's), and the cross-entropy turns them into their
    /// bf16 gradient in place: the next product's operand, no fp32 logits.
    #[allow(clippy::type_complexity)]
    fn head_loss_backward(&mut self, x: &CudaSlice<f32>, n: usize, targets: &CudaSlice<i32>, grad_scale: f32) -> Result<(CudaSlice<f32>, Option<CudaSlice<u16>>, CudaSlice<f64>)> {
        let dev = self.dev.clone();
        let d = &*dev;
        let (h, vsz, cap) = (self.cfg.hidden_size, self.cfg.vocab_size, self.cfg.final_softcap);
        let t = self.tick()?;
        let mut outs = d.alloc_filled::<f64>(3 * n.div_ceil(self.head_rows(n)), 0)?;
        let mut dhf = out_buf::<f32>(d, n * h)?;
        let rstd = if self.lean() {
            self.head_chunks::<u16>(x, n, |c, r0, r1, logits, wm| {
                let mut ov = outs.slice_mut(3 * c..3 * c + 3);
                closs::cross_entropy_fused_async(d, &mut logits.as_view_mut(), &targets.slice(r0..r1), vsz, Some(grad_scale), cap, &mut ov)?;
                let lv = logits.as_view();
                gemm(d, &self.blas, MatRef::bf16(d, &lv, r1 - r0, vsz)?, false, wm, false, &mut dhf.slice_mut(r0 * h..r1 * h), 1.0, 0.0)
            })?
        } else {
            self.head_chunks::<f32>(x, n, |c, r0, r1, logits, wm| {
                let mut ov = outs.slice_mut(3 * c..3 * c + 3);
                closs::cross_entropy_fused_async(d, &mut logits.as_view_mut(), &targets.slice(r0..r1), vsz, Some(grad_scale), cap, &mut ov)?;
                let lb = self.operand(logits)?;
                gemm(d, &self.blas, Act::new(logits, lb.as_ref()).operand(d, r1 - r0, vsz)?, false, wm, false, &mut dhf.slice_mut(r0 * h..r1 * h), 1.0, 0.0)
            })?
        };
        self.tock(t, "head GEMMs + cross-entropy")?;
        let (dx, dxb) = self.norm_backward(x, &self.norm, &rstd, &dhf, None, n)?;
        Ok((dx, dxb, outs))
    }

    /// Mean causal-LM loss of a batch on the device, as [`Model::loss`]
    /// (labels shifted as transformers does, −100 ignored; 0 when no
    /// position counts) with the active adapters: the head and fused
    /// cross-entropy over row chunks, only the sums come back (never the
    /// `[B·T, V]` logits). Labels must be −100 or in the vocabulary.
    pub fn loss(&mut self, ids: &[i32], labels: &[i32], batch: usize, seq: usize) -> Result<f32> {
        let n = batch * seq;
        if ids.len() != n || labels.len() != n || n == 0 {
            bail!(ShapeMismatch, "{} ids and {} labels for a batch of {batch} × {seq}", ids.len(), labels.len());
        }
        let vsz = self.cfg.vocab_size;
        check_token_ids(ids, vsz)?;
        check_labels(labels, vsz)?;
        let dev = self.dev.clone();
        let d = &*dev;
        let targets = d.upload(&shifted_targets(labels, batch, seq))?;
        let x = self.forward_rows(ids, batch, seq, Rows::Active)?;
        let mut outs = d.alloc_filled::<f64>(3 * n.div_ceil(self.head_rows(n)), 0)?;
        self.head_chunks::<f32>(&x, n, |c, r0, r1, logits, _| {
            let mut ov = outs.slice_mut(3 * c..3 * c + 3);
            closs::cross_entropy_fused_async(d, &mut logits.as_view_mut(), &targets.slice(r0..r1), vsz, Some(0.0), self.cfg.final_softcap, &mut ov)
        })?;
        let (mut sum, mut count) = (0f64, 0f64);
        for t in d.download(&outs)?.chunks(3) {
            sum += t[0];
            count += t[1];
        }
        Ok(if count == 0.0 { 0.0 } else { (sum / count) as f32 })
    }

    /// Zeroes the gradients of `adapter` (being trained here).
    pub fn zero_grad(&mut self, adapter: &str) -> Result<()> {
        let (s, _) = self.trained(adapter)?;
        let dev = self.dev.clone();
        let t = self.sets[s].train.as_mut().expect("checked by trained()");
        dev.fill_bytes(&mut t.grads, 0)?;
        Ok(())
    }

    /// Ends a step of `adapter`: reads the micro-batches' loss triples,
    /// clips the gradients to `max_grad_norm` (0: no clipping, norm still
    /// computed), refuses a non-finite loss or norm (gradients cleared,
    /// weights untouched: `NonFinite`), then AdamW with `lr` and zeroes the
    /// gradients.
    pub fn finish_step(&mut self, adapter: &str, outs: &[CudaSlice<f64>], max_grad_norm: f64, adamw: &AdamWConfig, lr: f64) -> Result<DeviceStep> {
        let (s, _) = self.trained(adapter)?;
        let dev = self.dev.clone();
        let t = self.tick()?;
        let mut o3 = dev.alloc_filled::<f32>(3, 0xFF)?;
        let max = (max_grad_norm > 0.0).then_some(max_grad_norm as f32);
        {
            let DevSet { spans, train, .. } = &mut self.sets[s];
            let ts = train.as_mut().expect("checked by trained()");
            closs::clip_grad_norm_flat_async(&dev, &mut ts.grads.as_view_mut(), spans, max, &mut o3.as_view_mut())?;
        }
        let (mut loss_sum, mut count) = (0f64, 0usize);
        for o in outs {
            let h = dev.download(o)?;
            for t in h.chunks(3) {
                loss_sum += t[0];
                count += t[1] as usize;
            }
        }
        let norm = dev.download(&o3)?[0];
        if !loss_sum.is_finite() || !norm.is_finite() {
            self.zero_grad(adapter)?;
            bail!(NonFinite, "the device step's loss ({loss_sum}) or gradient norm ({norm}) is not finite; the step was refused");
        }
        let mut cfg = *adamw;
        cfg.lr = lr;
        let DevSet { params, train, .. } = &mut self.sets[s];
        let ts = train.as_mut().expect("checked by trained()");
        let sc = AdamWScalars::new(&cfg, ts.steps + 1);
        let st = cu::adamw::AdamWStep::from(&sc);
        // One launch over every tensor: the update is elementwise with the
        // same constants for all of them.
        match (&mut ts.m, &mut ts.v) {
            (MomentBuf::Dev(m), MomentBuf::Dev(v)) => cu::adamw::adamw_update(&dev, &mut params.as_view_mut(), &ts.grads.as_view(), &mut m.as_view_mut(), &mut v.as_view_mut(), &st)?,
            (MomentBuf::Paged(m), MomentBuf::Paged(v)) => {
                m.prefetch_to_device(0, m.len())?;
                v.prefetch_to_device(0, v.len())?;
                cu::adamw::adamw_update_managed(&dev, &mut params.as_view_mut(), &ts.grads.as_view(), m, v, &st)?
            }
            _ => bail!(Internal, "AdamW moments split between device and managed memory"),
        }
        ts.steps += 1;
        dev.fill_bytes(&mut ts.grads, 0)?;
        self.refresh_bf16(s)?;
        self.tock(t, "clip + AdamW (+ loss readback)")?;
        Ok(DeviceStep { loss_sum, count, grad_norm: norm })
    }

    /// Bytes of device memory the model's weights (merged ones included),
    /// adapters and training state take (paged AdamW moments not counted).
    pub fn static_bytes(&self) -> usize {
        let wb = |w: &Weight| match w {
            Weight::F32(s) => s.len() * 4,
            Weight::Bf16(s) => s.len() * 2,
            Weight::Nf4(t) => {
                t.packed.len()
                    + match &t.absmax {
                        cu::nf4::CudaAbsmax::F32(a) => a.len() * 4,
                        cu::nf4::CudaAbsmax::Double(dq) => dq.codes.len() + dq.nested_absmax.len() * 4 + 1024,
                    }
            }
        };
        let mut b = wb(&self.embed) + self.norm.len() * 4 + self.head.as_ref().map_or(0, wb);
        b += self.sets.iter().map(|s| s.params.len() * 4 + s.train.as_ref().map_or(0, |t| t.grads.len() * 4 + t.m.device_bytes() + t.v.device_bytes())).sum::<usize>();
        for l in &self.layers {
            let pair = |w: &Option<[CudaSlice<f32>; 2]>| w.as_ref().map_or(0, |w| w[0].len() + w[1].len());
            b += (l.attn_norm.as_ref().map_or(0, |w| w.len()) + l.mlp_norm.as_ref().map_or(0, |w| w.len()) + pair(&l.post) + pair(&l.qk_norm)) * 4;
            for lin in &l.lin {
                b += wb(&lin.w) + lin.bias.as_ref().map_or(0, |x| x.len() * 4) + lin.merged.as_ref().map_or(0, wb);
            }
        }
        b
    }

    // ------------------------------------------------------------ generation

    /// Generates up to `max_new` tokens for each prompt on the device, as
    /// [`Model::generate`] does on the host (which routes here and checks
    /// the arguments): the active adapters (merged or not) or, with
    /// `seq_adapters`, adapter `seq_adapters[b]` (a model adapter index,
    /// −1 for the base) for sequence `b` — a mixed-adapter batch, whose
    /// decode steps apply every sequence's adapter in two BGMV launches per
    /// module. Each prompt is prefilled through the training forward's
    /// kernels, its rotated keys and values go to a KV cache `[B, cap, Hkv,
    /// D]` per layer in device memory, and every step decodes one token per
    /// sequence (rotary tables for the sequences' own positions,
    /// `attention_decode`; in BF16 mode an unmerged NF4 weight's product is
    /// the fused NF4 GEMV, one launch for up to [`DECODE_GEMV_ROWS`]
    /// sequences). Logits `[B, V]` come back to the host once per step for
    /// sampling; a sequence stops at a `stop` id (included).
    #[allow(clippy::too_many_arguments)]
    pub fn generate(&mut self, prompts: &[&[i32]], seq_adapters: Option<&[i32]>, max_new: usize, s: &Sampling, stop: &[i32], progress: &mut dyn FnMut(usize, usize) -> bool) -> Result<Vec<Vec<i32>>> {
        if prompts.is_empty() {
            bail!(InvalidArgument, "no sequences to generate");
        }
        s.check()?;
        let vsz = self.cfg.vocab_size;
        for p in prompts {
            if p.is_empty() {
                bail!(InvalidArgument, "an empty prompt (give at least one token, e.g. BOS)");
            }
            check_token_ids(p, vsz)?;
        }
        self.check_seq_adapters(seq_adapters, prompts.len())?;
        let dev = self.dev.clone();
        let d = &*dev;
        let bsz = prompts.len();
        let cap = prompts.iter().map(|p| p.len()).max().unwrap_or(0) + max_new;
        let row = self.cfg.kv_dim();
        let per = bsz.checked_mul(cap).and_then(|x| x.checked_mul(row)).ok_or_else(|| err!(InvalidArgument, "a KV cache for {bsz} sequences of {cap} positions overflows"))?;
        let mut caches: Vec<(CudaSlice<f32>, CudaSlice<f32>)> = (0..self.layers.len()).map(|_| Ok((alloc(d, per)?, alloc(d, per)?))).collect::<Result<_>>()?;
        let mut lens = vec![0usize; bsz];
        let mut last = vec![0f32; bsz * vsz];
        // Prefill, one prompt at a time (prompts may differ in length;
        // LongRoPE's factors are the batch's, chosen by its longest).
        let mut hist: Vec<Vec<i32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let longest = hist.iter().map(Vec::len).max().unwrap_or(1);
        let one = |b: usize| match seq_adapters {
            Some(sa) => Rows::One(usize::try_from(sa[b]).ok()),
            None => Rows::Active,
        };
        for b in 0..bsz {
            last[b * vsz..(b + 1) * vsz].copy_from_slice(&self.prefill(&hist[b], one(b), Some((&mut caches, b * cap * row)), longest - 1)?);
            lens[b] = hist[b].len();
        }
        let rows = match seq_adapters {
            Some(sa) => Rows::PerRow(sa),
            None => Rows::Active,
        };
        sample_loop(last, vsz, max_new, s, stop, progress, |next| {
            let Some(m) = push_step(&self.cfg, &mut hist, next, &lens) else {
                return self.decode_step(next, rows, &mut lens, &mut caches, cap);
            };
            // LongRoPE switches to its long frequencies here: every
            // sequence's cache is recomputed with them (as the host's
            // generation and transformers' Phi-3 do).
            let mut logits = vec![0f32; bsz * vsz];
            for b in 0..bsz {
                logits[b * vsz..(b + 1) * vsz].copy_from_slice(&self.prefill(&hist[b], one(b), Some((&mut caches, b * cap * row)), m)?);
                lens[b] = hist[b].len();
            }
            Ok(logits)
        })
    }

    /// Per-sequence adapters must be −1 or adapters of the model, and need
    /// it unmerged.
    fn check_seq_adapters(&self, seq_adapters: Option<&[i32]>, batch: usize) -> Result<()> {
        let Some(sa) = seq_adapters else { return Ok(()) };
        if sa.len() != batch {
            bail!(ShapeMismatch, "{} per-sequence adapters for a batch of {batch}", sa.len());
        }
        if self.merged_for.is_some() {
            bail!(InvalidState, "a mixed-adapter batch needs the model unmerged");
        }
        if let Some(&a) = sa.iter().find(|&&a| a < -1 || a >= self.sets.len() as i32) {
            bail!(InvalidArgument, "adapter index {a} is not −1 or one of the model's {} adapters", self.sets.len());
        }
        Ok(())
    }

    /// Logits `[B·T, V]` of a batch on the device (inference), as
    /// [`Model::logits`]: the active adapters, or per sequence adapters
    /// (`seq_adapters[b]` a model adapter index, −1 for none). The head
    /// runs over row chunks; the logits come to the host chunk by chunk.
    pub fn logits(&mut self, ids: &[i32], batch: usize, seq: usize, seq_adapters: Option<&[i32]>) -> Result<Vec<f32>> {
        let n = batch * seq;
        if ids.len() != n || n == 0 {
            bail!(ShapeMismatch, "{} ids for a batch of {batch} × {seq}", ids.len());
        }
        check_token_ids(ids, self.cfg.vocab_size)?;
        self.check_seq_adapters(seq_adapters, batch)?;
        let per_row: Option<Vec<i32>> = seq_adapters.map(|sa| sa.iter().flat_map(|&a| std::iter::repeat_n(a, seq)).collect());
        let rows = match &per_row {
            Some(r) => Rows::PerRow(r),
            None => Rows::Active,
        };
        let x = self.forward_rows(ids, batch, seq, rows)?;
        self.head_logits(&x, n)
    }

    /// The residual stream after the last layer for a batch (inference).
    fn forward_rows(&mut self, ids: &[i32], batch: usize, seq: usize, rows: Rows<'_>) -> Result<CudaSlice<f32>> {
        self.rope_table(seq, seq.saturating_sub(1))?;
        let mut x = self.embed_ids(ids)?;
        for l in 0..self.layers.len() {
            x = self.layer_forward(l, &x, batch, seq, rows, true)?.1;
        }
        Ok(x)
    }

    /// Forward over one prompt (checked by the caller): the last row's
    /// logits; with `cache`, each layer's rotated k and v go to the KV
    /// caches at element offset `at`. `last` is the largest position of
    /// the batch (LongRoPE's factors follow it).
    fn prefill(&mut self, p: &[i32], rows: Rows<'_>, cache: Option<(&mut [(CudaSlice<f32>, CudaSlice<f32>)], usize)>, last: usize) -> Result<Vec<f32>> {
        let dev = self.dev.clone();
        let d = &*dev;
        let (t, h, row) = (p.len(), self.cfg.hidden_size, self.cfg.kv_dim());
        self.rope_table(t, last)?;
        let mut x = self.embed_ids(p)?;
        let mut cache = cache;
        for l in 0..self.layers.len() {
            let (acts, x_out) = self.layer_forward(l, &x, 1, t, rows, true)?;
            if let Some((caches, at)) = cache.as_mut() {
                let c = &mut caches[l];
                let [_, k, v] = acts.qkv.as_ref().ok_or_else(|| err!(Internal, "an inference forward without k and v"))?;
                for (src, dst) in [(k.f32()?, &mut c.0), (v.f32()?, &mut c.1)] {
                    let mut dv = dst.slice_mut(*at..*at + t * row);
                    d.copy(&src.slice(..t * row), &mut dv)?;
                }
            }
            x = x_out;
        }
        let xl = d.duplicate(&x.slice((t - 1) * h..t * h))?;
        self.head_logits(&xl, 1)
    }

    /// Final norm and head for `n` rows of the residual stream: logits
    /// `[n, V]` on the host (computed, soft-capped where the model caps
    /// them, and copied chunk by chunk).
    fn head_logits(&self, x: &CudaSlice<f32>, n: usize) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(n * self.cfg.vocab_size);
        self.head_chunks(x, n, |_, _, _, logits: &mut CudaSlice<f32>, _| {
            if let Some(c) = self.cfg.final_softcap {
                ew::softcap(&self.dev, &mut logits.as_view_mut(), c)?;
            }
            out.extend_from_slice(&self.dev.download(logits)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// A decode step's `x += o_proj(att)` or `x += down(a)` (linear `j`),
    /// through the layer's output norm where it has one.
    fn decode_residual(&self, l: usize, j: usize, rows: Rows<'_>, a: Act<'_>, n: usize, x: &mut CudaSlice<f32>) -> Result<()> {
        let Some(post) = &self.layers[l].post else {
            return self.lin_decode(l, j, rows, a, n, x, 1.0);
        };
        let mut y = out_buf::<f32>(&self.dev, x.len())?;
        self.lin_decode(l, j, rows, a, n, &mut y, 0.0)?;
        self.post_add(&post[usize::from(j == DOWN)], y, x, n, false).map(drop)
    }

    /// One decode step: token `next[b]` at position `lens[b]` of each
    /// sequence (its k and v appended to the caches); returns logits `[B, V]`.
    fn decode_step(&mut self, next: &[i32], rows: Rows<'_>, lens: &mut [usize], caches: &mut [(CudaSlice<f32>, CudaSlice<f32>)], cap: usize) -> Result<Vec<f32>> {
        let dev = self.dev.clone();
        let d = &*dev;
        let Dims { it, qd, kvd, nh, nkv, hd, .. } = Dims::of(&self.cfg);
        let bsz = next.len();
        // One table row per sequence: rope as a [1, B, H, D] tensor.
        let table = CudaRopeTable::upload(d, &self.freqs.table_at(lens))?;
        let local = self.local_freqs.as_ref().map(|f| CudaRopeTable::upload(d, &f.table_at(lens))).transpose()?;
        let new_lens: Vec<usize> = lens.iter().map(|&n| n + 1).collect();
        let mut x = self.embed_ids(next)?;
        for (l, cache) in caches.iter_mut().enumerate() {
            let (h1, h1b) = self.normed(&x, self.layers[l].attn_norm.as_ref(), bsz, None, false)?;
            let h1a = act_of(&h1, &h1b)?;
            let (mut q, mut k, mut v) = (out_buf::<f32>(d, bsz * qd)?, out_buf::<f32>(d, bsz * kvd)?, out_buf::<f32>(d, bsz * kvd)?);
            self.lin_decode(l, Q, rows, h1a, bsz, &mut q, 0.0)?;
            self.lin_decode(l, K, rows, h1a, bsz, &mut k, 0.0)?;
            self.lin_decode(l, V, rows, h1a, bsz, &mut v, 0.0)?;
            if let Some(w) = &self.layers[l].qk_norm {
                self.qk_normed(w, &mut q, &mut k)?;
            }
            if self.cfg.rope_layers[l] {
                let table = match &local {
                    Some(t) if self.cfg.local_rope_at(l) => t,
                    _ => &table,
                };
                crope::rope_forward(d, &mut q.as_view_mut(), 1, bsz, nh, hd, table)?;
                crope::rope_forward(d, &mut k.as_view_mut(), 1, bsz, nkv, hd, table)?;
            }
            for (b, &pos) in lens.iter().enumerate() {
                let at = (b * cap + pos) * kvd;
                for (src, dst) in [(&k, &mut cache.0), (&v, &mut cache.1)] {
                    let mut dv = dst.slice_mut(at..at + kvd);
                    d.copy(&src.slice(b * kvd..(b + 1) * kvd), &mut dv)?;
                }
            }
            let shape = self.cfg.decode_shape(l, bsz, cap);
            let mut att = out_buf::<f32>(d, bsz * qd)?;
            catt::decode(d, &q.as_view(), &cache.0.as_view(), &cache.1.as_view(), &new_lens, &shape, &mut att.as_view_mut())?;
            let attb = self.operand(&att)?;
            self.decode_residual(l, O, rows, Act::new(&att, attb.as_ref()), bsz, &mut x)?;
            let (h2, h2b) = self.normed(&x, self.layers[l].mlp_norm.as_ref(), bsz, None, false)?;
            let h2a = act_of(&h2, &h2b)?;
            let (mut g, mut u) = (out_buf::<f32>(d, bsz * it)?, out_buf::<f32>(d, bsz * it)?);
            self.lin_decode(l, GATE, rows, h2a, bsz, &mut g, 0.0)?;
            self.lin_decode(l, UP, rows, h2a, bsz, &mut u, 0.0)?;
            let (a, ab, _) = self.gated(g, u, false)?;
            self.decode_residual(l, DOWN, rows, act_of(&a, &ab)?, bsz, &mut x)?;
        }
        lens.iter_mut().for_each(|n| *n += 1);
        self.head_logits(&x, bsz)
    }
}
