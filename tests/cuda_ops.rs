//! The CUDA kernels of a training step's elementwise and reduction ops
//! against their CPU twins (the spec), on a GPU, each with its stated bound:
//! - RMSNorm forward/backward (`cuda::norm`): within `RSTD_REL_TOL`,
//!   `Y_REL_TOL`, `DX_TOL_ULPS`, `DW_TOL_ULPS` (bit-exact but for the order
//!   of f64 sums; the share of bit-exact elements is printed);
//! - RoPE forward/backward (`cuda::rope`): bit for bit;
//! - SwiGLU forward/backward, in place too (`cuda::swiglu`): within
//!   `h_tol`, `dup_tol`, `dgate_tol` (CUDA's expf, tanhf), SwiGLU and GeGLU;
//! - embedding gather (`cuda::embed`): bit for bit; a bad id is an error
//!   with the output untouched;
//! - fused cross-entropy (`cuda::loss`): loss within `CE_LOSS_TOL`, count
//!   exact, gradient within `ce_grad_tol`; ignored rows, all-ignored input,
//!   a bad label (error, logits untouched); soft-capped logits (Gemma 2)
//!   within `ce_loss_tol_softcap` and `ce_grad_tol_softcap`, saturating
//!   ones too, a bad cap refused; bf16 logits bit for bit the fp32
//!   kernel's gradient rounded;
//! - gradient norm and clipping (`cuda::loss`): within `NORM_REL_TOL`,
//!   the same clipping decision, clipped values within 4 ulp;
//! - AdamW (`cuda::adamw`): bit for bit, both lerp branches, with and
//!   without weight decay, first and late steps.
//!
//! Inputs are fresh seeded random values (never zeros), odd sizes; every
//! output buffer is poisoned (0xFF bytes: NaN) first. Without a GPU (or
//! without NVRTC) each test prints why it skips and passes, unless
//! `LORA_REQUIRE_GPU=1`, where that is a failure.

use lora::backend::cpu::{embed as cembed, loss as closs, norm as cnorm, rope as crope, swiglu as cswiglu};
use lora::backend::cuda::{adamw as gadamw, embed as gembed, loss as gloss, norm as gnorm, rope as grope, swiglu as gswiglu, CudaDevice};
use lora::model::config::Activation;
use lora::optim::adamw::adamw_update;
use lora::optim::{AdamWConfig, AdamWScalars};
use lora::ErrorKind;

// ------------------------------------------------------------------ harness

#[path = "common/gpu.rs"]
mod harness;
use harness::{gpu, Rng};

const ULP: f64 = 1.0 / (1u64 << 23) as f64;

/// Asserts `|got − want| ≤ tol(i)` for every element (NaN fails), naming
/// the first offender; returns how many were bit-exact.
fn check_close(what: &str, got: &[f32], want: &[f32], tol: impl Fn(usize) -> f64) -> usize {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut exact = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g.to_bits() == w.to_bits() {
            exact += 1;
            continue;
        }
        let d = (g as f64 - w as f64).abs();
        assert!(d <= tol(i), "{what}[{i}]: GPU {g:e} vs CPU {w:e}, |diff| {d:e} > bound {:e}", tol(i));
    }
    exact
}

fn check_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: GPU {g:e} vs CPU {w:e}");
    }
}

// ------------------------------------------------------------------ RMSNorm

#[test]
fn rmsnorm_forward_and_backward_match_the_cpu() {
    let Some(dev) = gpu("rmsnorm_forward_and_backward_match_the_cpu") else { return };
    let mut rng = Rng(11);
    for &(rows, dim) in &[(1usize, 1usize), (3, 7), (17, 1000), (64, 4096), (5, 5120), (300, 96)] {
        let scale = 10f64.powf(rng.unit() * 4.0 - 2.0);
        let x = rng.vec(rows * dim, scale);
        let w = rng.vec(dim, 1.0);
        let dy = rng.vec(rows * dim, 0.1);
        let dw0 = rng.vec(dim, 0.01);
        let eps = 1e-6f32;
        let (mut y, mut r) = (vec![0f32; rows * dim], vec![0f32; rows]);
        cnorm::rmsnorm_forward(&x, &w, rows, dim, eps, &mut y, Some(&mut r));
        let (mut dx, mut dw) = (vec![0f32; rows * dim], dw0.clone());
        cnorm::rmsnorm_backward(&x, &w, &r, &dy, rows, dim, &mut dx, Some(&mut dw));

        let (xd, wd, dyd) = (dev.upload(&x).unwrap(), dev.upload(&w).unwrap(), dev.upload(&dy).unwrap());
        let mut yd = dev.alloc_filled::<f32>(rows * dim, 0xFF).unwrap();
        let mut rd = dev.alloc_filled::<f32>(rows, 0xFF).unwrap();
        gnorm::rmsnorm_forward(dev, &xd.as_view(), &wd.as_view(), rows, dim, eps, &mut yd.as_view_mut(), Some(&mut rd.as_view_mut())).unwrap();
        let (gy, gr) = (dev.download(&yd).unwrap(), dev.download(&rd).unwrap());
        let er = check_close("rstd", &gr, &r, |i| gnorm::RSTD_REL_TOL * r[i].abs() as f64);
        let ey = check_close("y", &gy, &y, |i| gnorm::Y_REL_TOL * y[i].abs() as f64 + 1e-45);
        // Without rstd: the same y.
        let mut yd2 = dev.alloc_filled::<f32>(rows * dim, 0xFF).unwrap();
        gnorm::rmsnorm_forward(dev, &xd.as_view(), &wd.as_view(), rows, dim, eps, &mut yd2.as_view_mut(), None).unwrap();
        check_bits("y (no rstd)", &dev.download(&yd2).unwrap(), &gy);
        // The bf16 output in the same pass: y's bits, and y's rounding.
        let want_b: Vec<u16> = gy.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        for with_y in [true, false] {
            let mut yb = dev.alloc_filled::<u16>(rows * dim, 0xFF).unwrap();
            let mut y3 = dev.alloc_filled::<f32>(rows * dim, 0xFF).unwrap();
            let mut r3 = dev.alloc_filled::<f32>(rows, 0xFF).unwrap();
            gnorm::rmsnorm_forward_bf16(dev, &xd.as_view(), &wd.as_view(), rows, dim, eps, with_y.then(|| y3.as_view_mut()).as_mut(), &mut yb.as_view_mut(), Some(&mut r3.as_view_mut())).unwrap();
            assert_eq!(dev.download(&yb).unwrap(), want_b, "rmsnorm bf16 output (with y: {with_y})");
            check_bits("rstd (bf16 output)", &dev.download(&r3).unwrap(), &gr);
            if with_y {
                check_bits("y (bf16 output)", &dev.download(&y3).unwrap(), &gy);
            } else {
                assert!(dev.download(&y3).unwrap().iter().all(|v| v.to_bits() == u32::MAX), "y written though not asked for");
            }
        }

        // Backward from the CPU's rstd, so dx and dw test the backward alone.
        let rcd = dev.upload(&r).unwrap();
        let mut dxd = dev.alloc_filled::<f32>(rows * dim, 0xFF).unwrap();
        let mut dwd = dev.upload(&dw0).unwrap();
        gnorm::rmsnorm_backward(dev, &xd.as_view(), &wd.as_view(), &rcd.as_view(), &dyd.as_view(), rows, dim, &mut dxd.as_view_mut(), Some(&mut dwd.as_view_mut())).unwrap();
        let (gdx, gdw) = (dev.download(&dxd).unwrap(), dev.download(&dwd).unwrap());
        // c per row, from the CPU's formula in f64 (for the bound's scale).
        let c: Vec<f64> = (0..rows)
            .map(|i| {
                let dot: f64 = (0..dim).map(|j| (dy[i * dim + j] * w[j]) as f64 * x[i * dim + j] as f64).sum();
                (r[i] as f64).powi(3) * dot / dim as f64
            })
            .collect();
        let edx = check_close("dx", &gdx, &dx, |k| {
            let (i, j) = (k / dim, k % dim);
            gnorm::DX_TOL_ULPS * ULP * ((r[i] * dy[k] * w[j]).abs() as f64 + (c[i] * x[k] as f64).abs()) + 1e-45
        });
        let edw = check_close("dw", &gdw, &dw, |j| {
            let s: f64 = (0..rows).map(|i| (dy[i * dim + j] as f64 * (x[i * dim + j] * r[i]) as f64).abs()).sum();
            gnorm::DW_TOL_ULPS * ULP * (dw0[j].abs() as f64 + s) + 1e-45
        });
        // dx without dw: the same dx.
        let mut dxd2 = dev.alloc_filled::<f32>(rows * dim, 0xFF).unwrap();
        gnorm::rmsnorm_backward(dev, &xd.as_view(), &wd.as_view(), &rcd.as_view(), &dyd.as_view(), rows, dim, &mut dxd2.as_view_mut(), None).unwrap();
        check_bits("dx (no dw)", &dev.download(&dxd2).unwrap(), &gdx);
        // With the residual added and dx's bf16 rounding in the same pass:
        // the bits of dx + res (one f32 addition) and their rounding.
        let res = rng.vec(rows * dim, 0.1);
        let want_r: Vec<f32> = gdx.iter().zip(&res).map(|(a, b)| a + b).collect();
        let resd = dev.upload(&res).unwrap();
        for with_b in [true, false] {
            let mut dx3 = dev.alloc_filled::<f32>(rows * dim, 0xFF).unwrap();
            let mut dxb = dev.alloc_filled::<u16>(rows * dim, 0xFF).unwrap();
            gnorm::rmsnorm_backward_residual(dev, &xd.as_view(), &wd.as_view(), &rcd.as_view(), &dyd.as_view(), rows, dim, Some(&resd.as_view()), &mut dx3.as_view_mut(), with_b.then(|| dxb.as_view_mut()).as_mut()).unwrap();
            check_bits("dx + residual", &dev.download(&dx3).unwrap(), &want_r);
            // Without a residual (the head's norm): dx itself.
            let mut dx4 = dev.alloc_filled::<f32>(rows * dim, 0xFF).unwrap();
            gnorm::rmsnorm_backward_residual(dev, &xd.as_view(), &wd.as_view(), &rcd.as_view(), &dyd.as_view(), rows, dim, None, &mut dx4.as_view_mut(), None).unwrap();
            check_bits("dx (residual kernel, no residual)", &dev.download(&dx4).unwrap(), &gdx);
            let b = dev.download(&dxb).unwrap();
            if with_b {
                assert_eq!(b, want_r.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect::<Vec<u16>>(), "bf16 dx + residual");
            } else {
                assert!(b.iter().all(|&v| v == u16::MAX), "bf16 dx written unasked");
            }
        }
        eprintln!("rmsnorm [{rows}, {dim}]: bit-exact rstd {er}/{rows}, y {ey}/{n}, dx {edx}/{n}, dw {edw}/{dim}", n = rows * dim);
    }
}

// --------------------------------------------------------------------- RoPE

#[test]
fn rope_matches_the_cpu_bit_for_bit() {
    let Some(dev) = gpu("rope_matches_the_cpu_bit_for_bit") else { return };
    let mut rng = Rng(22);
    // (B, T, H, D, rotated dims): full, and partial rotations (Phi-4-mini's
    // partial_rotary_factor: the rest of each head passes through).
    for &(b, t, h, d, rot) in &[(1usize, 1usize, 1usize, 2usize, 2usize), (2, 5, 3, 8, 8), (1, 17, 4, 64, 64), (3, 33, 2, 128, 128), (2, 100, 8, 96, 96), (2, 9, 3, 16, 12), (1, 33, 2, 128, 96), (1, 5, 2, 8, 2)] {
        let inv = crope::rope_inv_freq(rot, 10000.0);
        let table = crope::RopeTable::new(&inv, 7 + rng.below(1000), t + rng.below(3));
        let gt = grope::CudaRopeTable::upload(dev, &table).unwrap();
        let x = rng.vec(b * t * h * d, 1.0);
        let mut want = x.clone();
        crope::rope_forward(&mut want, b, t, h, d, &table);
        let mut xd = dev.upload(&x).unwrap();
        grope::rope_forward(dev, &mut xd.as_view_mut(), b, t, h, d, &gt).unwrap();
        check_bits("rope forward", &dev.download(&xd).unwrap(), &want);
        let dy = rng.vec(b * t * h * d, 1.0);
        let mut want = dy.clone();
        crope::rope_backward(&mut want, b, t, h, d, &table);
        let mut dyd = dev.upload(&dy).unwrap();
        grope::rope_backward(dev, &mut dyd.as_view_mut(), b, t, h, d, &gt).unwrap();
        check_bits("rope backward", &dev.download(&dyd).unwrap(), &want);
        // Out of place with the bf16 rounding (the bf16 step): the same
        // bits, rounded; the fp32 output only when asked for; x untouched.
        for (backward, src, want) in [(false, &x, { let mut w = x.clone(); crope::rope_forward(&mut w, b, t, h, d, &table); w }), (true, &dy, want.clone())] {
            let xd = dev.upload(src).unwrap();
            for with_y in [true, false] {
                let mut y = dev.alloc_filled::<f32>(src.len(), 0xFF).unwrap();
                let mut yb = dev.alloc_filled::<u16>(src.len(), 0xFF).unwrap();
                grope::rope_bf16(dev, &xd.as_view(), with_y.then(|| y.as_view_mut()).as_mut(), &mut yb.as_view_mut(), b, t, h, d, &gt, backward).unwrap();
                assert_eq!(dev.download(&yb).unwrap(), bf16_bits(&want), "rope out of place (backward {backward}): bf16");
                if with_y {
                    check_bits("rope out of place: fp32", &dev.download(&y).unwrap(), &want);
                } else {
                    assert!(dev.download(&y).unwrap().iter().all(|v| v.to_bits() == u32::MAX), "rope wrote y unasked");
                }
                check_bits("rope out of place: x untouched", &dev.download(&xd).unwrap(), src);
            }
            // In place with the bf16 rounding too: both the same bits.
            let mut xi = dev.upload(src).unwrap();
            let mut yb = dev.alloc_filled::<u16>(src.len(), 0xFF).unwrap();
            grope::rope_inplace_bf16(dev, &mut xi.as_view_mut(), &mut yb.as_view_mut(), b, t, h, d, &gt, backward).unwrap();
            check_bits("rope in place with bf16: fp32", &dev.download(&xi).unwrap(), &want);
            assert_eq!(dev.download(&yb).unwrap(), bf16_bits(&want), "rope in place (backward {backward}): bf16");
            let mut long = dev.alloc_filled::<u16>(src.len() + 1, 0).unwrap();
            assert!(grope::rope_inplace_bf16(dev, &mut xi.as_view_mut(), &mut long.as_view_mut(), b, t, h, d, &gt, backward).is_err(), "a long bf16 y was taken");
        }
    }
    // A table shorter than the sequence is refused.
    let table = crope::RopeTable::new(&crope::rope_inv_freq(8, 10000.0), 0, 3);
    let gt = grope::CudaRopeTable::upload(dev, &table).unwrap();
    let mut xd = dev.upload(&[1f32; 4 * 8]).unwrap();
    assert_eq!(grope::rope_forward(dev, &mut xd.as_view_mut(), 1, 4, 1, 8, &gt).unwrap_err().kind, ErrorKind::ShapeMismatch);
    // So is a table that rotates more elements than a head has.
    let wide = grope::CudaRopeTable::upload(dev, &crope::RopeTable::new(&crope::rope_inv_freq(16, 10000.0), 0, 4)).unwrap();
    assert_eq!(grope::rope_forward(dev, &mut xd.as_view_mut(), 1, 4, 1, 8, &wide).unwrap_err().kind, ErrorKind::ShapeMismatch);
}

// ------------------------------------------------------------------- SwiGLU

#[test]
fn swiglu_matches_the_cpu_within_bounds() {
    let Some(dev) = gpu("swiglu_matches_the_cpu_within_bounds") else { return };
    // SwiGLU and GeGLU (Gemma's tanh-GELU gate): the same kernels.
    for act in [Activation::Silu, Activation::GeluTanh] {
        glu_matches_the_cpu(dev, act);
    }
}

fn glu_matches_the_cpu(dev: &CudaDevice, act: Activation) {
    let mut rng = Rng(33);
    for &n in &[1usize, 1000, 100_003] {
        let mut gate = rng.vec(n, 4.0);
        for _ in 0..n / 50 {
            let i = rng.below(n);
            gate[i] = (rng.gauss() * 60.0) as f32; // saturated sigmoid, both sides
        }
        let up = rng.vec(n, 1.0);
        let dh = rng.vec(n, 1.0);
        let mut h = vec![0f32; n];
        cswiglu::glu_forward(act, &gate, &up, &mut h);
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        cswiglu::glu_backward(act, &gate, &up, &dh, &mut dg, &mut du);

        let (gd, ud, dhd) = (dev.upload(&gate).unwrap(), dev.upload(&up).unwrap(), dev.upload(&dh).unwrap());
        let mut hd = dev.alloc_filled::<f32>(n, 0xFF).unwrap();
        gswiglu::swiglu_forward(dev, &gd.as_view(), &ud.as_view(), &mut hd.as_view_mut(), act).unwrap();
        let eh = check_close("h", &dev.download(&hd).unwrap(), &h, |i| gswiglu::h_tol(act, gate[i], up[i], h[i]));
        let mut dgd = dev.alloc_filled::<f32>(n, 0xFF).unwrap();
        let mut dud = dev.alloc_filled::<f32>(n, 0xFF).unwrap();
        gswiglu::swiglu_backward(dev, &gd.as_view(), &ud.as_view(), &dhd.as_view(), &mut dgd.as_view_mut(), &mut dud.as_view_mut(), act).unwrap();
        let (gdg, gdu) = (dev.download(&dgd).unwrap(), dev.download(&dud).unwrap());
        let edg = check_close("dgate", &gdg, &dg, |i| gswiglu::dgate_tol(act, gate[i], up[i], dh[i]));
        let edu = check_close("dup", &gdu, &du, |i| gswiglu::dup_tol(act, gate[i], dh[i], du[i]));
        // In place: the same bits as the out-of-place kernel.
        let (mut gi, mut ui) = (dev.upload(&gate).unwrap(), dev.upload(&up).unwrap());
        gswiglu::swiglu_backward_inplace(dev, &mut gi.as_view_mut(), &mut ui.as_view_mut(), &dhd.as_view(), act).unwrap();
        check_bits("dgate (in place)", &dev.download(&gi).unwrap(), &gdg);
        check_bits("dup (in place)", &dev.download(&ui).unwrap(), &gdu);
        eprintln!("{act:?} gate n={n}: bit-exact h {eh}, dgate {edg}, dup {edu} of {n}");
        fused_swiglu_matches_the_unfused(dev, &gate, &up, &dh, act);
    }
}

fn bf16_bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect()
}

fn widen(b: &[u16]) -> Vec<f32> {
    b.iter().map(|&v| half::bf16::from_bits(v).to_f32()).collect()
}

/// The bf16 step's fused SwiGLU kernels give the bits of the fp32 kernels
/// (on the same, bf16-rounded where the kernel takes bf16, inputs) and of
/// their conversions; an output not asked for is not written.
fn fused_swiglu_matches_the_unfused(dev: &CudaDevice, gate: &[f32], up: &[f32], dh: &[f32], act: Activation) {
    let n = gate.len();
    // The conversions' edges too (SPECIAL_F32_BITS).
    let (mut gate, mut up) = (gate.to_vec(), up.to_vec());
    for (i, &b) in SPECIAL_F32_BITS.iter().enumerate().filter(|&(i, _)| i < n) {
        gate[(i * 7) % n] = f32::from_bits(b);
        up[(i * 13 + 1) % n] = f32::from_bits(b);
    }
    let (gate, up) = (&gate[..], &up[..]);
    let f32_of = |d: &cudarc::driver::CudaSlice<f32>| dev.download(d).unwrap();
    let run_fwd = |g: &[f32], u: &[f32]| {
        let (gd, ud) = (dev.upload(g).unwrap(), dev.upload(u).unwrap());
        let mut h = dev.alloc_filled::<f32>(n, 0xFF).unwrap();
        gswiglu::swiglu_forward(dev, &gd.as_view(), &ud.as_view(), &mut h.as_view_mut(), act).unwrap();
        f32_of(&h)
    };
    // From fp32 gate and up: h, its bf16, and gate's and up's bf16.
    let h = run_fwd(gate, up);
    let (gd, ud) = (dev.upload(gate).unwrap(), dev.upload(up).unwrap());
    for all in [true, false] {
        let mut hf = dev.alloc_filled::<f32>(n, 0xFF).unwrap();
        let (mut hb, mut gb, mut ub) = (dev.alloc_filled::<u16>(n, 0xFF).unwrap(), dev.alloc_filled::<u16>(n, 0xFF).unwrap(), dev.alloc_filled::<u16>(n, 0xFF).unwrap());
        gswiglu::swiglu_forward_out(dev, &gd.as_view(), &ud.as_view(), all.then(|| hf.as_view_mut()).as_mut(), Some(&mut hb.as_view_mut()), all.then(|| gb.as_view_mut()).as_mut(), Some(&mut ub.as_view_mut()), act).unwrap();
        assert_eq!(dev.download(&hb).unwrap(), bf16_bits(&h), "fused swiglu: bf16 h");
        assert_eq!(dev.download(&ub).unwrap(), bf16_bits(up), "fused swiglu: bf16 up");
        if all {
            check_bits("fused swiglu: h", &f32_of(&hf), &h);
            assert_eq!(dev.download(&gb).unwrap(), bf16_bits(gate), "fused swiglu: bf16 gate");
        } else {
            assert!(f32_of(&hf).iter().all(|v| v.to_bits() == u32::MAX), "fused swiglu wrote h unasked");
            assert!(dev.download(&gb).unwrap().iter().all(|&v| v == u16::MAX), "fused swiglu wrote gate unasked");
        }
    }
    // In place (h over gate): the same bits for h and every bf16 output.
    {
        let mut gi = dev.upload(gate).unwrap();
        let (mut hb, mut gb, mut ub) = (dev.alloc_filled::<u16>(n, 0xFF).unwrap(), dev.alloc_filled::<u16>(n, 0xFF).unwrap(), dev.alloc_filled::<u16>(n, 0xFF).unwrap());
        gswiglu::swiglu_forward_inplace_out(dev, &mut gi.as_view_mut(), &ud.as_view(), Some(&mut hb.as_view_mut()), Some(&mut gb.as_view_mut()), Some(&mut ub.as_view_mut()), act).unwrap();
        check_bits("fused swiglu in place: h", &f32_of(&gi), &h);
        assert_eq!(dev.download(&hb).unwrap(), bf16_bits(&h), "fused swiglu in place: bf16 h");
        assert_eq!(dev.download(&gb).unwrap(), bf16_bits(gate), "fused swiglu in place: bf16 gate");
        assert_eq!(dev.download(&ub).unwrap(), bf16_bits(up), "fused swiglu in place: bf16 up");
        let mut gi = dev.upload(gate).unwrap();
        gswiglu::swiglu_forward_inplace_out(dev, &mut gi.as_view_mut(), &ud.as_view(), None, None, None, act).unwrap();
        check_bits("fused swiglu in place, h alone", &f32_of(&gi), &h);
        let mut short = dev.alloc_filled::<u16>(n + 1, 0).unwrap();
        assert!(gswiglu::swiglu_forward_inplace_out(dev, &mut gi.as_view_mut(), &ud.as_view(), None, Some(&mut short.as_view_mut()), None, act).is_err(), "a long bf16 gate was taken");
    }
    // From bf16 gate and up: the fp32 kernels on the widened values.
    let (gb, ub) = (bf16_bits(gate), bf16_bits(up));
    let (gw, uw) = (widen(&gb), widen(&ub));
    let hw = run_fwd(&gw, &uw);
    let (gbd, ubd, dhd) = (dev.upload(&gb).unwrap(), dev.upload(&ub).unwrap(), dev.upload(dh).unwrap());
    let mut hf = dev.alloc_filled::<f32>(n, 0xFF).unwrap();
    let mut hb = dev.alloc_filled::<u16>(n, 0xFF).unwrap();
    gswiglu::swiglu_forward_bf16(dev, &gbd.as_view(), &ubd.as_view(), Some(&mut hf.as_view_mut()), Some(&mut hb.as_view_mut()), act).unwrap();
    check_bits("swiglu from bf16: h", &f32_of(&hf), &hw);
    assert_eq!(dev.download(&hb).unwrap(), bf16_bits(&hw), "swiglu from bf16: bf16 h");
    let (gwd, uwd) = (dev.upload(&gw).unwrap(), dev.upload(&uw).unwrap());
    let (mut dg, mut du) = (dev.alloc_filled::<f32>(n, 0xFF).unwrap(), dev.alloc_filled::<f32>(n, 0xFF).unwrap());
    gswiglu::swiglu_backward(dev, &gwd.as_view(), &uwd.as_view(), &dhd.as_view(), &mut dg.as_view_mut(), &mut du.as_view_mut(), act).unwrap();
    let (dg, du) = (f32_of(&dg), f32_of(&du));
    let (mut dgf, mut duf) = (dev.alloc_filled::<f32>(n, 0xFF).unwrap(), dev.alloc_filled::<f32>(n, 0xFF).unwrap());
    let (mut dgb, mut dub) = (dev.alloc_filled::<u16>(n, 0xFF).unwrap(), dev.alloc_filled::<u16>(n, 0xFF).unwrap());
    let out = gswiglu::SwigluGrads { dgate: Some(&mut dgf.as_view_mut()), dup: Some(&mut duf.as_view_mut()), dgate_bf16: Some(&mut dgb.as_view_mut()), dup_bf16: Some(&mut dub.as_view_mut()) };
    gswiglu::swiglu_backward_bf16(dev, &gbd.as_view(), &ubd.as_view(), &dhd.as_view(), out, act).unwrap();
    check_bits("swiglu backward from bf16: dgate", &f32_of(&dgf), &dg);
    check_bits("swiglu backward from bf16: dup", &f32_of(&duf), &du);
    assert_eq!(dev.download(&dgb).unwrap(), bf16_bits(&dg), "swiglu backward from bf16: bf16 dgate");
    assert_eq!(dev.download(&dub).unwrap(), bf16_bits(&du), "swiglu backward from bf16: bf16 dup");
    // With dh in bf16 too: the fp32-dh kernel's bits on the widened dh.
    let dhb = bf16_bits(dh);
    let (dhbd, dhwd) = (dev.upload(&dhb).unwrap(), dev.upload(&widen(&dhb)).unwrap());
    let run_bwd = |bf_dh: bool| {
        let (mut dg, mut du) = (dev.alloc_filled::<f32>(n, 0xFF).unwrap(), dev.alloc_filled::<f32>(n, 0xFF).unwrap());
        let (mut dgb, mut dub) = (dev.alloc_filled::<u16>(n, 0xFF).unwrap(), dev.alloc_filled::<u16>(n, 0xFF).unwrap());
        let out = gswiglu::SwigluGrads { dgate: Some(&mut dg.as_view_mut()), dup: Some(&mut du.as_view_mut()), dgate_bf16: Some(&mut dgb.as_view_mut()), dup_bf16: Some(&mut dub.as_view_mut()) };
        if bf_dh {
            gswiglu::swiglu_backward_bf16_dh(dev, &gbd.as_view(), &ubd.as_view(), &dhbd.as_view(), out, act).unwrap();
        } else {
            gswiglu::swiglu_backward_bf16(dev, &gbd.as_view(), &ubd.as_view(), &dhwd.as_view(), out, act).unwrap();
        }
        (f32_of(&dg).iter().map(|v| v.to_bits()).collect::<Vec<u32>>(), f32_of(&du).iter().map(|v| v.to_bits()).collect::<Vec<u32>>(), dev.download(&dgb).unwrap(), dev.download(&dub).unwrap())
    };
    let want = run_bwd(true);
    assert_eq!(want, run_bwd(false), "swiglu backward with bf16 dh: not the fp32-dh kernel's bits on the widened dh");
    // In place over the bf16 gate and up: their bf16 outputs' bits.
    for bf_dh in [false, true] {
        let (mut g, mut u) = (dev.upload(&gb).unwrap(), dev.upload(&ub).unwrap());
        let dh = if bf_dh { gswiglu::Dh::Bf16(&dhbd.as_view()) } else { gswiglu::Dh::F32(&dhwd.as_view()) };
        gswiglu::swiglu_backward_bf16_inplace(dev, &mut g.as_view_mut(), &mut u.as_view_mut(), dh, act).unwrap();
        assert_eq!(dev.download(&g).unwrap(), want.2, "swiglu backward in place (bf16 dh: {bf_dh}): dgate");
        assert_eq!(dev.download(&u).unwrap(), want.3, "swiglu backward in place (bf16 dh: {bf_dh}): dup");
    }
    // In place with every output (dh <- fp32 dgate, a new fp32 dup, gate and
    // up <- the bf16 roundings): all four outputs' bits.
    {
        let (mut g, mut u, mut dh) = (dev.upload(&gb).unwrap(), dev.upload(&ub).unwrap(), dev.upload(&widen(&dhb)).unwrap());
        let mut du = dev.alloc_filled::<f32>(n, 0xFF).unwrap();
        gswiglu::swiglu_backward_bf16_inplace_all(dev, &mut g.as_view_mut(), &mut u.as_view_mut(), &mut dh.as_view_mut(), &mut du.as_view_mut(), act).unwrap();
        let bits = |v: Vec<f32>| v.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(f32_of(&dh)), want.0, "swiglu backward in place, all outputs: fp32 dgate");
        assert_eq!(bits(f32_of(&du)), want.1, "swiglu backward in place, all outputs: fp32 dup");
        assert_eq!(dev.download(&g).unwrap(), want.2, "swiglu backward in place, all outputs: bf16 dgate");
        assert_eq!(dev.download(&u).unwrap(), want.3, "swiglu backward in place, all outputs: bf16 dup");
        let mut short = dev.alloc_filled::<f32>(n + 1, 0).unwrap();
        assert!(gswiglu::swiglu_backward_bf16_inplace_all(dev, &mut g.as_view_mut(), &mut u.as_view_mut(), &mut dh.as_view_mut(), &mut short.as_view_mut(), act).is_err(), "a short dup was taken");
    }
    let (mut g, mut u) = (dev.upload(&gb).unwrap(), dev.upload(&ub[1..]).unwrap());
    assert!(gswiglu::swiglu_backward_bf16_inplace(dev, &mut g.as_view_mut(), &mut u.as_view_mut(), gswiglu::Dh::Bf16(&dhbd.as_view()), act).is_err(), "a short up was taken");
}

// ---------------------------------------------------------------- embedding

#[test]
fn embedding_gather_matches_the_cpu_and_refuses_bad_ids() {
    let Some(dev) = gpu("embedding_gather_matches_the_cpu_and_refuses_bad_ids") else { return };
    let mut rng = Rng(44);
    for &(vocab, dim, n) in &[(1usize, 1usize, 1usize), (1000, 67, 300), (32000, 256, 2049)] {
        let table = rng.vec(vocab * dim, 1.0);
        let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
        let mut want = vec![0f32; n * dim];
        cembed::embedding_forward(&table, vocab, dim, &ids, &mut want).unwrap();
        let (td, idd) = (dev.upload(&table).unwrap(), dev.upload(&ids).unwrap());
        let mut od = dev.alloc_filled::<f32>(n * dim, 0xFF).unwrap();
        gembed::embedding_forward(dev, &td.as_view(), vocab, dim, &idd.as_view(), &mut od.as_view_mut()).unwrap();
        check_bits("embedding", &dev.download(&od).unwrap(), &want);
    }
    // A bf16 table: each element widened exactly (the CPU op on the widened table).
    for &(vocab, dim, n) in &[(7usize, 3usize, 5usize), (1000, 64, 300)] {
        let bits: Vec<u16> = rng.vec(vocab * dim, 1.0).iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
        let wide: Vec<f32> = bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
        let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
        let mut want = vec![0f32; n * dim];
        cembed::embedding_forward(&wide, vocab, dim, &ids, &mut want).unwrap();
        let (td, idd) = (dev.upload(&bits).unwrap(), dev.upload(&ids).unwrap());
        let mut od = dev.alloc_filled::<f32>(n * dim, 0xFF).unwrap();
        let mut st = dev.alloc_filled::<u32>(1, 0xFF).unwrap();
        gembed::gather_async(dev, gembed::Table::Bf16(&td.as_view()), vocab, dim, &idd.as_view(), &mut od.as_view_mut(), &mut st).unwrap();
        assert_eq!(dev.download(&st).unwrap()[0], gembed::ALL_IDS_VALID);
        check_bits("embedding (bf16 table)", &dev.download(&od).unwrap(), &want);
    }
    // Bad ids: an error naming the first one, output untouched.
    let (vocab, dim) = (50, 8);
    let table = rng.vec(vocab * dim, 1.0);
    let ids: Vec<u32> = vec![3, 49, 50, 7, 1000];
    let (td, idd) = (dev.upload(&table).unwrap(), dev.upload(&ids).unwrap());
    let mut od = dev.alloc_filled::<f32>(ids.len() * dim, 0xFF).unwrap();
    let e = gembed::embedding_forward(dev, &td.as_view(), vocab, dim, &idd.as_view(), &mut od.as_view_mut()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("token id 50 at position 2"), "{}", e.message);
    assert!(dev.download(&od).unwrap().iter().all(|v| v.to_bits() == u32::MAX), "output written despite a bad id");
}

// ------------------------------------------------------------ cross-entropy

/// Each gradient element's bound, `ce_grad_tol` (with `softcap`,
/// `ce_grad_tol_softcap`) at the softmax probabilities of the (capped)
/// logits in f64; 0 on ignored rows.
fn ce_grad_tols(logits: &[f32], labels: &[i32], vocab: usize, grad_scale: Option<f32>, softcap: Option<f32>) -> Vec<f64> {
    let count = closs::count_labels(labels);
    let c = grad_scale.unwrap_or(if count == 0 { 0.0 } else { (1.0 / count as f64) as f32 });
    let t: Vec<f64> = logits.iter().map(|&v| softcap.map_or(0.0, |cap| (v as f64 / cap as f64).tanh())).collect();
    let z: Vec<f64> = logits.iter().zip(&t).map(|(&v, &t)| softcap.map_or(v as f64, |cap| cap as f64 * t)).collect();
    let mut tols = vec![0f64; logits.len()];
    for (i, row) in z.chunks_exact(vocab).enumerate() {
        if labels[i] == closs::IGNORE_INDEX {
            continue;
        }
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let s: f64 = row.iter().map(|&v| (v - m).exp()).sum();
        for (j, &v) in row.iter().enumerate() {
            let (k, p, is_label) = (i * vocab + j, (v - m).exp() / s, labels[i] as usize == j);
            tols[k] = softcap.map_or_else(|| gloss::ce_grad_tol(c, p, is_label), |cap| gloss::ce_grad_tol_softcap(c, p, is_label, t[k], cap));
        }
    }
    tols
}

/// Runs the fused cross-entropy on both sides and compares (with
/// `softcap`, `cross_entropy_fused_softcap` and the capped bounds); returns
/// the largest |diff|/bound of the loss (and sum) and of the gradient.
fn check_ce(dev: &CudaDevice, logits: &[f32], labels: &[i32], vocab: usize, grad_scale: Option<f32>, softcap: Option<f32>, what: &str) -> (f64, f64) {
    let mut want = logits.to_vec();
    let ce = match softcap {
        None => closs::cross_entropy_fused(&mut want, labels, vocab, grad_scale).unwrap(),
        Some(cap) => closs::cross_entropy_fused_softcap(&mut want, labels, vocab, grad_scale, cap).unwrap(),
    };
    let mut ld = dev.upload(logits).unwrap();
    let yd = dev.upload(labels).unwrap();
    let got = gloss::cross_entropy_fused(dev, &mut ld.as_view_mut(), &yd.as_view(), vocab, grad_scale, softcap).unwrap();
    let grad = dev.download(&ld).unwrap();
    assert_eq!(got.count, ce.count, "{what}: count");
    let loss_tol = softcap.map_or(gloss::CE_LOSS_TOL, gloss::ce_loss_tol_softcap);
    let dl = (got.loss as f64 - ce.loss as f64).abs();
    let bl = loss_tol * (1.0 + ce.loss.abs() as f64);
    assert!(dl <= bl, "{what}: loss GPU {} vs CPU {} (|diff| {dl:e} > bound {bl:e})", got.loss, ce.loss);
    let ds = (got.sum - ce.sum).abs();
    let bs = loss_tol * (ce.count as f64 + ce.sum.abs());
    assert!(ds <= bs, "{what}: sum GPU {} vs CPU {} (|diff| {ds:e} > bound {bs:e})", got.sum, ce.sum);
    let tols = ce_grad_tols(logits, labels, vocab, grad_scale, softcap);
    let tol = |k: usize| tols[k];
    let exact = check_close(&format!("{what}: dlogits"), &grad, &want, tol);
    let worst = grad.iter().zip(&want).enumerate().filter(|&(_, (g, w))| g.to_bits() != w.to_bits()).map(|(k, (&g, &w))| (g as f64 - w as f64).abs() / tol(k)).fold(0f64, f64::max);
    let worst_loss = if ce.count == 0 { 0.0 } else { (dl / bl).max(ds / bs) };
    eprintln!(
        "{what}: loss GPU {} CPU {}, count {}, gradient bit-exact {exact}/{}, worst |diff|/bound: loss {worst_loss:.3e}, gradient {worst:.3e}",
        got.loss,
        ce.loss,
        ce.count,
        grad.len()
    );
    (worst_loss, worst)
}

#[test]
fn cross_entropy_fused_matches_the_cpu() {
    let Some(dev) = gpu("cross_entropy_fused_matches_the_cpu") else { return };
    let mut rng = Rng(55);
    for &(rows, vocab, scale) in &[(1usize, 1usize, 1.0f64), (37, 1000, 3.0), (8, 32000, 2.0), (5, 151_936, 4.0), (64, 517, 20.0)] {
        let logits = rng.vec(rows * vocab, scale);
        let labels: Vec<i32> = (0..rows).map(|_| if rng.below(5) == 0 { closs::IGNORE_INDEX } else { rng.below(vocab) as i32 }).collect();
        check_ce(dev, &logits, &labels, vocab, None, None, &format!("ce [{rows}, {vocab}] mean"));
        check_ce(dev, &logits, &labels, vocab, Some(0.37), None, &format!("ce [{rows}, {vocab}] scale 0.37"));
        // bf16 logits in place: the fp32 kernel's bits on the widened
        // logits, each gradient rounded.
        for scale in [None, Some(0.37f32)] {
            let lb = bf16_bits(&logits);
            let yd = dev.upload(&labels).unwrap();
            let (mut l32, mut lbd) = (dev.upload(&widen(&lb)).unwrap(), dev.upload(&lb).unwrap());
            let (mut o32, mut ob) = (dev.alloc_filled::<f64>(3, 0xFF).unwrap(), dev.alloc_filled::<f64>(3, 0xFF).unwrap());
            gloss::cross_entropy_fused_async(dev, &mut l32.as_view_mut(), &yd.as_view(), vocab, scale, None, &mut o32.as_view_mut()).unwrap();
            gloss::cross_entropy_fused_async(dev, &mut lbd.as_view_mut(), &yd.as_view(), vocab, scale, None, &mut ob.as_view_mut()).unwrap();
            assert_eq!(dev.download(&lbd).unwrap(), bf16_bits(&dev.download(&l32).unwrap()), "ce [{rows}, {vocab}] bf16: gradient");
            let bitsf = |v: Vec<f64>| v.iter().map(|x| x.to_bits()).collect::<Vec<u64>>();
            assert_eq!(bitsf(dev.download(&ob).unwrap()), bitsf(dev.download(&o32).unwrap()), "ce [{rows}, {vocab}] bf16: loss sums");
        }
    }
    // Every row ignored: loss 0, count 0, gradient all zeros.
    let logits = rng.vec(3 * 100, 1.0);
    check_ce(dev, &logits, &[-100, -100, -100], 100, None, None, "ce all ignored");
    // A bad label: an error, logits untouched.
    let mut ld = dev.upload(&logits).unwrap();
    let yd = dev.upload(&[5i32, 100, -100]).unwrap();
    let e = gloss::cross_entropy_fused(dev, &mut ld.as_view_mut(), &yd.as_view(), 100, None, None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("label 100 at row 1"), "{}", e.message);
    check_bits("logits after a bad label", &dev.download(&ld).unwrap(), &logits);
}

/// Logits for the soft cap: gaussian times `scale`, with planted values
/// where `tanh(z/cap)` saturates (|z/cap| ≥ 9: t = ±1 in fp32, the
/// gradient 0), is about to (|z/cap| from 4 to 9: 1 − t² a few ulp to 1e-3),
/// and huge or tiny ones.
fn softcap_logits(rng: &mut Rng, n: usize, scale: f64, cap: f32) -> Vec<f32> {
    let mut x = rng.vec(n, scale);
    let planted = [1e6f32, -3e38, 3e38, 9.5, -12.0, 4.0, -5.5, 7.25, 8.5, 1e-30, -2e-3];
    for (k, &q) in planted.iter().enumerate() {
        if n > 7 * k {
            let i = (k * 7919 + 3) % n;
            x[i] = if q.abs() >= 1e6 || q.abs() <= 1e-2 { q } else { q * cap };
        }
    }
    x
}

#[test]
fn cross_entropy_fused_softcap_matches_the_cpu() {
    let Some(dev) = gpu("cross_entropy_fused_softcap_matches_the_cpu") else { return };
    let mut rng = Rng(56);
    let (mut worst_loss, mut worst_grad) = (0f64, 0f64);
    let mut check = |x: &[f32], y: &[i32], vocab: usize, grad_scale: Option<f32>, cap: f32, what: &str| {
        let (l, g) = check_ce(dev, x, y, vocab, grad_scale, Some(cap), what);
        worst_loss = worst_loss.max(l);
        worst_grad = worst_grad.max(g);
    };
    for &(rows, vocab, scale, cap) in &[(1usize, 1usize, 100.0f64, 30.0f32), (37, 1000, 40.0, 30.0), (8, 32000, 60.0, 30.0), (64, 517, 20.0, 5.0), (5, 151_936, 12.0, 5.0), (9, 2049, 3.0, 5.0)] {
        let logits = softcap_logits(&mut rng, rows * vocab, scale, cap);
        let labels: Vec<i32> = (0..rows).map(|i| if i % 5 == 3 || rng.below(6) == 0 { closs::IGNORE_INDEX } else { rng.below(vocab) as i32 }).collect();
        for grad_scale in [None, Some(0.37f32), Some(-1.5)] {
            let what = format!("ce softcap {cap} [{rows}, {vocab}] x{scale} scale {grad_scale:?}");
            check(&logits, &labels, vocab, grad_scale, cap, &what);
        }
        // A saturated label (t = 1: its gradient 0) and one near the cap.
        if vocab > 2 && rows > 1 {
            let mut x = logits.clone();
            let mut y = labels.clone();
            y[0] = 1;
            x[1] = 20.0 * cap;
            y[1] = 2;
            x[vocab + 2] = 4.5 * cap;
            check(&x, &y, vocab, None, cap, &format!("ce softcap {cap} [{rows}, {vocab}] saturated labels"));
        }
        // bf16 logits in place: the fp32 kernel's bits on the widened
        // logits, each gradient (1 − t² applied in fp32) rounded once.
        for grad_scale in [None, Some(0.37f32)] {
            let lb = bf16_bits(&logits);
            let yd = dev.upload(&labels).unwrap();
            let (mut l32, mut lbd) = (dev.upload(&widen(&lb)).unwrap(), dev.upload(&lb).unwrap());
            let (mut o32, mut ob) = (dev.alloc_filled::<f64>(3, 0xFF).unwrap(), dev.alloc_filled::<f64>(3, 0xFF).unwrap());
            gloss::cross_entropy_fused_async(dev, &mut l32.as_view_mut(), &yd.as_view(), vocab, grad_scale, Some(cap), &mut o32.as_view_mut()).unwrap();
            gloss::cross_entropy_fused_async(dev, &mut lbd.as_view_mut(), &yd.as_view(), vocab, grad_scale, Some(cap), &mut ob.as_view_mut()).unwrap();
            let g32 = dev.download(&l32).unwrap();
            assert_eq!(dev.download(&lbd).unwrap(), bf16_bits(&g32), "ce softcap {cap} [{rows}, {vocab}] bf16: gradient");
            let bitsf = |v: Vec<f64>| v.iter().map(|x| x.to_bits()).collect::<Vec<u64>>();
            assert_eq!(bitsf(dev.download(&ob).unwrap()), bitsf(dev.download(&o32).unwrap()), "ce softcap {cap} [{rows}, {vocab}] bf16: loss sums");
            // And the fp32 kernel on the widened logits is the CPU's
            // within the bounds (so the bf16 form is too, before rounding).
            check(&widen(&lb), &labels, vocab, grad_scale, cap, &format!("ce softcap {cap} [{rows}, {vocab}] widened bf16 scale {grad_scale:?}"));
        }
    }
    eprintln!("ce softcap: worst |diff|/bound over the cases: loss {worst_loss:.3e}, gradient {worst_grad:.3e}");
    // A cap that is not finite and positive: refused, logits untouched.
    let logits = rng.vec(2 * 10, 1.0);
    let yd = dev.upload(&[3i32, -100]).unwrap();
    for cap in [0.0f32, -30.0, f32::NAN, f32::INFINITY] {
        let mut ld = dev.upload(&logits).unwrap();
        let e = gloss::cross_entropy_fused(dev, &mut ld.as_view_mut(), &yd.as_view(), 10, None, Some(cap)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "cap {cap}: {e}");
        check_bits(&format!("logits after cap {cap}"), &dev.download(&ld).unwrap(), &logits);
    }
}

// ------------------------------------------------------ gradient norm, clip

#[test]
fn grad_norm_and_clipping_match_the_cpu() {
    let Some(dev) = gpu("grad_norm_and_clipping_match_the_cpu") else { return };
    let mut rng = Rng(66);
    let sizes = [1usize, 1000, 300_001, 4096, 0, 77];
    let host: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| {
            let scale = 10f64.powf(rng.unit() * 4.0 - 3.0);
            rng.vec(n, scale)
        })
        .collect();
    let views: Vec<&[f32]> = host.iter().map(|v| v.as_slice()).collect();
    let want = closs::grad_norm_l2(&views);
    let dbufs: Vec<_> = host.iter().map(|v| dev.upload(v).unwrap()).collect();
    let dviews: Vec<_> = dbufs.iter().map(|b| b.as_view()).collect();
    let got = gloss::grad_norm_l2(dev, &dviews).unwrap();
    assert!((got as f64 - want as f64).abs() <= gloss::NORM_REL_TOL * want as f64, "norm GPU {got} vs CPU {want}");
    assert_eq!(gloss::grad_norm_l2(dev, &[]).unwrap(), 0.0, "empty list");
    for max_norm in [want * 0.5, want * 2.0] {
        let mut ch = host.clone();
        let mut cm: Vec<&mut [f32]> = ch.iter_mut().map(|v| v.as_mut_slice()).collect();
        let cres = closs::clip_grad_norm(&mut cm, max_norm);
        let mut gb: Vec<_> = host.iter().map(|v| dev.upload(v).unwrap()).collect();
        let mut gv: Vec<_> = gb.iter_mut().map(|b| b.as_view_mut()).collect();
        let gres = gloss::clip_grad_norm(dev, &mut gv, max_norm).unwrap();
        drop(gv);
        assert_eq!(gres.clipped, cres.clipped, "max_norm {max_norm}: clipping decision");
        assert!((gres.clip_coef as f64 - cres.clip_coef as f64).abs() <= 2.0 * gloss::NORM_REL_TOL * cres.clip_coef as f64, "clip_coef GPU {} vs CPU {}", gres.clip_coef, cres.clip_coef);
        for (k, (b, w)) in gb.iter().zip(&ch).enumerate() {
            let g = dev.download(b).unwrap();
            check_close(&format!("clipped tensor {k}"), &g, w, |i| 4.0 * ULP * w[i].abs() as f64 + 1e-45);
        }
    }
    // Tensors that sit in one buffer (a gap between them, outside every
    // span): the one-launch partial sums over the spans give the bits of
    // the per-tensor path, norm, decision and scaled values alike.
    let mut flat_host = Vec::new();
    let mut spans = Vec::new();
    for v in &host {
        flat_host.extend(rng.vec(3, 1.0));
        spans.push(flat_host.len()..flat_host.len() + v.len());
        flat_host.extend_from_slice(v);
    }
    for max_norm in [None, Some(want * 0.5)] {
        let mut flat = dev.upload(&flat_host).unwrap();
        let mut out = dev.alloc_filled::<f32>(3, 0xFF).unwrap();
        gloss::clip_grad_norm_flat_async(dev, &mut flat.as_view_mut(), &spans, max_norm, &mut out.as_view_mut()).unwrap();
        let out = dev.download(&out).unwrap();
        assert_eq!(out[0].to_bits(), got.to_bits(), "flat spans: norm {} vs the per-tensor path's {got}", out[0]);
        if let Some(m) = max_norm {
            let mut gb: Vec<_> = host.iter().map(|v| dev.upload(v).unwrap()).collect();
            let mut gv: Vec<_> = gb.iter_mut().map(|b| b.as_view_mut()).collect();
            let gres = gloss::clip_grad_norm(dev, &mut gv, m).unwrap();
            drop(gv);
            assert_eq!((out[1].to_bits(), out[2] != 0.0), (gres.clip_coef.to_bits(), gres.clipped), "flat spans: clip decision");
            let fl = dev.download(&flat).unwrap();
            for (k, (r, b)) in spans.iter().zip(&gb).enumerate() {
                check_bits(&format!("flat spans: clipped tensor {k}"), &fl[r.clone()], &dev.download(b).unwrap());
            }
        }
    }
    // A non-finite norm: nothing scaled.
    let mut bad = host.clone();
    bad[1][3] = f32::INFINITY;
    let mut gb: Vec<_> = bad.iter().map(|v| dev.upload(v).unwrap()).collect();
    let mut gv: Vec<_> = gb.iter_mut().map(|b| b.as_view_mut()).collect();
    let gres = gloss::clip_grad_norm(dev, &mut gv, 1e-3).unwrap();
    drop(gv);
    assert!(!gres.total_norm.is_finite() && !gres.clipped, "{gres:?}");
    check_bits("unclipped tensor 2", &dev.download(&gb[2]).unwrap(), &bad[2]);
}

// -------------------------------------------------------------------- AdamW

#[test]
fn adamw_matches_the_cpu_bit_for_bit() {
    let Some(dev) = gpu("adamw_matches_the_cpu_bit_for_bit") else { return };
    let mut rng = Rng(77);
    let configs = [
        AdamWConfig::default(),
        AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() },
        AdamWConfig { lr: 3e-4, beta1: 0.3, beta2: 0.95, eps: 1e-6, weight_decay: 0.1 }, // lerp weight 0.7: the other branch
    ];
    for cfg in &configs {
        for &step in &[1u64, 2, 1000] {
            for &n in &[1usize, 1000, 100_003] {
                let p = rng.vec(n, 0.1);
                let g = rng.vec(n, 0.01);
                let m = rng.vec(n, 0.001);
                let v: Vec<f32> = rng.vec(n, 1e-4).iter().map(|x| x * x).collect();
                let s = AdamWScalars::new(cfg, step);
                let (mut pw, mut mw, mut vw) = (p.clone(), m.clone(), v.clone());
                adamw_update(&mut pw, &g, &mut mw, &mut vw, &s);
                let gs = gadamw::AdamWStep::from(&s);
                let (mut pd, gd, mut md, mut vd) = (dev.upload(&p).unwrap(), dev.upload(&g).unwrap(), dev.upload(&m).unwrap(), dev.upload(&v).unwrap());
                gadamw::adamw_update(dev, &mut pd.as_view_mut(), &gd.as_view(), &mut md.as_view_mut(), &mut vd.as_view_mut(), &gs).unwrap();
                let what = format!("adamw {cfg:?} step {step} n {n}");
                check_bits(&format!("{what}: p"), &dev.download(&pd).unwrap(), &pw);
                check_bits(&format!("{what}: m"), &dev.download(&md).unwrap(), &mw);
                check_bits(&format!("{what}: v"), &dev.download(&vd).unwrap(), &vw);
            }
        }
    }
}

// ------------------------------------------------------- CPU emulation
//
// The training-step kernel families compiled for the host
// (tests/common/emu.rs), launched with the launchers' shapes, against the
// CPU twins: the embedding gathers (fp32 and bf16 tables, the id check),
// the elementwise kernels, RoPE and AdamW bit for bit; RMSNorm, SwiGLU,
// the fused cross-entropy and the clipped gradient norm within 1e-6
// relative (host exp and the kernels' tree sums against the CPU's order);
// the soft-capped cross-entropy within its bounds (host tanhf).

const EMU_ENTRY: &str = r#"
extern "C" {
void emu_embed(int bf, unsigned grid, const void* table, u32 vocab, u32 dim, const u32* ids, u32 n, u32* status, float* out) {
    emu_launch(1, EMBED_CHECK_THREADS, [&] { embed_check_ids(ids, n, vocab, status); });
    const u64 total = (u64)n * dim;
    emu_launch(grid, EMBED_THREADS, [&] {
        if (bf) embed_gather_bf16((const u16*)table, dim, ids, total, status, out);
        else embed_gather_f32((const float*)table, dim, ids, total, status, out);
    });
}
void emu_norm_fwd(u32 rows, u32 dim, const float* x, const float* w, float eps, float* y, float* rstd) {
    emu_launch(rows, NORM_THREADS, [&] { norm_rmsnorm_fwd_f32(x, w, rows, dim, eps, y, rstd); });
}
void emu_norm_bwd(u32 rows, u32 dim, const float* x, const float* w, const float* rstd, const float* dy, float* dx,
                  u32 col_blocks, u32 chunks, u32 per, double* partial, float* dw) {
    emu_launch(rows, NORM_THREADS, [&] { norm_rmsnorm_bwd_dx_f32(x, w, rstd, dy, rows, dim, dx); });
    emu_launch3(dim3{col_blocks, chunks, 1}, NORM_THREADS, [&] { norm_rmsnorm_bwd_dw_partial_f32(x, rstd, dy, rows, dim, per, partial); });
    emu_launch(col_blocks, NORM_THREADS, [&] { norm_rmsnorm_bwd_dw_finish_f32(partial, dim, chunks, dw); });
}
void emu_rope(int bwd, unsigned grid, float* x, u32 seq, u32 heads, u32 half, u32 D, u64 items, const float* c, const float* s) {
    emu_launch(grid, ROPE_THREADS, [&] { if (bwd) rope_bwd_f32(x, seq, heads, half, D, items, c, s); else rope_fwd_f32(x, seq, heads, half, D, items, c, s); });
}
void emu_swiglu(unsigned grid, const float* g, const float* u, const float* dh, u64 n, float* h, float* dg, float* du, float* gi, float* ui, u32 act) {
    emu_launch(grid, SWIGLU_THREADS, [&] { swiglu_fwd_f32(g, u, n, h, act); });
    emu_launch(grid, SWIGLU_THREADS, [&] { swiglu_bwd_f32(g, u, dh, n, dg, du, act); });
    emu_launch(grid, SWIGLU_THREADS, [&] { swiglu_bwd_inplace_f32(gi, ui, dh, n, act); });
}
void emu_swiglu_bwd_dh(unsigned grid, const u16* g16, const u16* u16_, const u16* dh, u64 n, float* dg, float* du, u16* dgb, u16* dub) {
    emu_launch(grid, SWIGLU_THREADS, [&] { swiglu_bwd_out_bf16dh(g16, u16_, dh, n, dg, du, dgb, dub, 0u); });
}
void emu_rope_out(int bwd, unsigned grid, const float* x, float* y, u16* yb, u32 seq, u32 heads, u32 half, u32 D, u64 items, const float* c, const float* s) {
    emu_launch(grid, ROPE_THREADS, [&] { const u64 ld = (u64)heads * D; if (bwd) rope_bwd_out_f32(x, y, yb, seq, heads, half, D, items, c, s, ld, 0); else rope_fwd_out_f32(x, y, yb, seq, heads, half, D, items, c, s, ld, 0); });
}
void emu_norm_bwd_res(u32 rows, u32 dim, const float* x, const float* w, const float* rstd, const float* dy, const float* res, float* dx, u16* dxb) {
    emu_launch(rows, NORM_THREADS, [&] { norm_rmsnorm_bwd_dx_out_f32(x, w, rstd, dy, rows, dim, res, dx, dxb); });
}
void emu_norm_fwd_out(u32 rows, u32 dim, const float* x, const float* w, float eps, float* y, u16* yb, float* rstd) {
    emu_launch(rows, NORM_THREADS, [&] { norm_rmsnorm_fwd_out_f32(x, w, rows, dim, eps, y, yb, rstd); });
}
void emu_swiglu_out(unsigned grid, const float* g, const float* u, const u16* g16, const u16* u16_, const float* dh, u64 n,
                    float* h, u16* hb, u16* gb, u16* ub, float* h2, u16* hb2, float* dg, float* du, u16* dgb, u16* dub) {
    emu_launch(grid, SWIGLU_THREADS, [&] { swiglu_fwd_out_f32(g, u, n, h, hb, gb, ub, 0u); });
    emu_launch(grid, SWIGLU_THREADS, [&] { swiglu_fwd_out_bf16(g16, u16_, n, h2, hb2, 0u); });
    emu_launch(grid, SWIGLU_THREADS, [&] { swiglu_bwd_out_bf16(g16, u16_, dh, n, dg, du, dgb, dub, 0u); });
}
void emu_adamw(unsigned grid, float* p, const float* g, float* m, float* v, u64 n, u32 has_decay, const float* k7) {
    emu_launch(grid, ADAMW_THREADS, [&] { adamw_update_f32(p, g, m, v, n, has_decay, k7[0], k7[1], k7[2], k7[3], k7[4], k7[5], k7[6]); });
}
void emu_ce_bf16(u16* logits, const int* labels, u32 rows, u32 vocab, float scale, u32 mean, u32* status, double* row_loss, double* out, float cap) {
    emu_launch(1, LOSS_CHECK_THREADS, [&] { loss_ce_check_labels(labels, rows, vocab, status); });
    emu_launch(rows, LOSS_THREADS, [&] { loss_ce_fused_bf16(logits, labels, rows, vocab, status, scale, mean, row_loss, cap); });
    emu_launch(1, LOSS_CHECK_THREADS, [&] { loss_ce_finish(row_loss, rows, status, out); });
}
void emu_ce(float* logits, const int* labels, u32 rows, u32 vocab, float scale, u32 mean, u32* status, double* row_loss, double* out, float cap) {
    emu_launch(1, LOSS_CHECK_THREADS, [&] { loss_ce_check_labels(labels, rows, vocab, status); });
    emu_launch(rows, LOSS_THREADS, [&] { loss_ce_fused_f32(logits, labels, rows, vocab, status, scale, mean, row_loss, cap); });
    emu_launch(1, LOSS_CHECK_THREADS, [&] { loss_ce_finish(row_loss, rows, status, out); });
}
void emu_clip(u32 k, float* const* g, const u64* n, float max_norm, double* partial, float* norms, float* out, const unsigned* grids) {
    for (u32 i = 0; i < k; i++) emu_launch(LOSS_NORM_BLOCKS, LOSS_NORM_THREADS, [&] { loss_sumsq_partial_f32(g[i], n[i], partial + (u64)i * LOSS_NORM_BLOCKS); });
    emu_launch(k, LOSS_NORM_BLOCKS, [&] { loss_gradnorm_tensor(partial, norms); });
    emu_launch(1, 32, [&] { loss_gradnorm_total(norms, k, max_norm, out); });
    for (u32 i = 0; i < k; i++) emu_launch(grids[i], LOSS_NORM_THREADS, [&] { loss_clip_scale_f32(g[i], n[i], out); });
}
void emu_ew(int op, unsigned grid, float* y, const float* x, u64 n, u32 cols, u16* yb) {
    emu_launch(grid, EW_THREADS, [&] {
        if (op == 0) elementwise_add_f32(y, x, n);
        else if (op == 1) elementwise_add_bias_f32(y, x, n / cols, cols);
        else if (op == 2) elementwise_f32_to_bf16(x, yb, n);
        else elementwise_bf16_to_f32(yb, y, n, op == 4);
    });
}
}
"#;

type EmuEmbed = unsafe extern "C" fn(i32, u32, *const u8, u32, u32, *const u32, u32, *mut u32, *mut f32);
type EmuNormFwd = unsafe extern "C" fn(u32, u32, *const f32, *const f32, f32, *mut f32, *mut f32);
type EmuNormBwd = unsafe extern "C" fn(u32, u32, *const f32, *const f32, *const f32, *const f32, *mut f32, u32, u32, u32, *mut f64, *mut f32);
type EmuRope = unsafe extern "C" fn(i32, u32, *mut f32, u32, u32, u32, u32, u64, *const f32, *const f32);
type EmuSwiglu = unsafe extern "C" fn(u32, *const f32, *const f32, *const f32, u64, *mut f32, *mut f32, *mut f32, *mut f32, *mut f32, u32);
type EmuSwigluBwdDh = unsafe extern "C" fn(u32, *const u16, *const u16, *const u16, u64, *mut f32, *mut f32, *mut u16, *mut u16);
type EmuRopeOut = unsafe extern "C" fn(i32, u32, *const f32, *mut f32, *mut u16, u32, u32, u32, u32, u64, *const f32, *const f32);
type EmuNormBwdRes = unsafe extern "C" fn(u32, u32, *const f32, *const f32, *const f32, *const f32, *const f32, *mut f32, *mut u16);
type EmuNormFwdOut = unsafe extern "C" fn(u32, u32, *const f32, *const f32, f32, *mut f32, *mut u16, *mut f32);
type EmuSwigluOut = unsafe extern "C" fn(u32, *const f32, *const f32, *const u16, *const u16, *const f32, u64, *mut f32, *mut u16, *mut u16, *mut u16, *mut f32, *mut u16, *mut f32, *mut f32, *mut u16, *mut u16);
type EmuAdamw = unsafe extern "C" fn(u32, *mut f32, *const f32, *mut f32, *mut f32, u64, u32, *const f32);
type EmuCe = unsafe extern "C" fn(*mut f32, *const i32, u32, u32, f32, u32, *mut u32, *mut f64, *mut f64, f32);
type EmuCeBf16 = unsafe extern "C" fn(*mut u16, *const i32, u32, u32, f32, u32, *mut u32, *mut f64, *mut f64, f32);
type EmuClip = unsafe extern "C" fn(u32, *const *mut f32, *const u64, f32, *mut f64, *mut f32, *mut f32, *const u32);

/// `‖got − want‖/‖want‖ ≤ tol` and no NaN.
fn check_rel(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    assert!(got.iter().all(|x| x.is_finite()), "{what}: non-finite output");
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    let e = (num / den.max(f64::MIN_POSITIVE)).sqrt();
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

/// The grid of a grid-stride kernel, as the launchers compute it.
fn stride(n: usize, threads: usize) -> u32 {
    n.div_ceil(threads).clamp(1, 1 << 16) as u32
}

#[test]
fn emulated_training_step_kernels_match_the_cpu() {
    let Some(lib) = ops_emu("emulated_training_step_kernels_match_the_cpu") else { return };
    // SAFETY: entry points built just above with these signatures.
    let (nf, nb, rope, sw, adam, ce, clip): (EmuNormFwd, EmuNormBwd, EmuRope, EmuSwiglu, EmuAdamw, EmuCe, EmuClip) = unsafe {
        (
            *lib.get(b"emu_norm_fwd").unwrap(),
            *lib.get(b"emu_norm_bwd").unwrap(),
            *lib.get(b"emu_rope").unwrap(),
            *lib.get(b"emu_swiglu").unwrap(),
            *lib.get(b"emu_adamw").unwrap(),
            *lib.get(b"emu_ce").unwrap(),
            *lib.get(b"emu_clip").unwrap(),
        )
    };
    // SAFETY: entry points built above with these signatures.
    let (ceb, rope_out): (EmuCeBf16, EmuRopeOut) = unsafe { (*lib.get(b"emu_ce_bf16").unwrap(), *lib.get(b"emu_rope_out").unwrap()) };
    let mut rng = Rng(47);
    // RMSNorm forward and backward (dw accumulated into a prior value).
    for &(rows, dim) in &[(1usize, 1usize), (5, 300), (33, 64)] {
        let (x, w, dy) = (rng.vec(rows * dim, 1.0), rng.vec(dim, 1.0), rng.vec(rows * dim, 1.0));
        let (mut y, mut r) = (vec![0f32; rows * dim], vec![0f32; rows]);
        cnorm::rmsnorm_forward(&x, &w, rows, dim, 1e-5, &mut y, Some(&mut r));
        let (mut gy, mut gr) = (vec![f32::NAN; rows * dim], vec![f32::NAN; rows]);
        // SAFETY: buffers of rows·dim, dim and rows elements.
        unsafe { nf(rows as u32, dim as u32, x.as_ptr(), w.as_ptr(), 1e-5, gy.as_mut_ptr(), gr.as_mut_ptr()) };
        check_rel("emulated rmsnorm y", &gy, &y, 1e-6);
        check_rel("emulated rmsnorm rstd", &gr, &r, 1e-6);
        let dw0 = rng.vec(dim, 1.0);
        let (mut dx, mut dw) = (vec![0f32; rows * dim], dw0.clone());
        cnorm::rmsnorm_backward(&x, &w, &r, &dy, rows, dim, &mut dx, Some(&mut dw));
        let (chunks, per) = gnorm::dw_chunks(rows, dim);
        let col_blocks = dim.div_ceil(256) as u32;
        let (mut gdx, mut gdw, mut part) = (vec![f32::NAN; rows * dim], dw0.clone(), vec![f64::NAN; chunks * dim]);
        // SAFETY: as the launcher sizes them (partial chunks·dim).
        unsafe { nb(rows as u32, dim as u32, x.as_ptr(), w.as_ptr(), r.as_ptr(), dy.as_ptr(), gdx.as_mut_ptr(), col_blocks, chunks as u32, per as u32, part.as_mut_ptr(), gdw.as_mut_ptr()) };
        check_rel("emulated rmsnorm dx", &gdx, &dx, 1e-6);
        check_rel("emulated rmsnorm dw", &gdw, &dw, 1e-6);
    }
    // RoPE forward and backward: bit for bit.
    for &(batch, seq, heads, hd, rot) in &[(1usize, 1usize, 1usize, 2usize, 2usize), (2, 7, 3, 16, 16), (1, 33, 2, 64, 64), (2, 7, 3, 16, 10)] {
        let table = crope::RopeTable::new(&(0..rot / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / rot as f32)).collect::<Vec<_>>(), 0, seq + 3);
        let x = rng.vec(batch * seq * heads * hd, 1.0);
        for bwd in [0, 1] {
            let mut want = x.clone();
            if bwd == 0 {
                crope::rope_forward(&mut want, batch, seq, heads, hd, &table);
            } else {
                crope::rope_backward(&mut want, batch, seq, heads, hd, &table);
            }
            let mut got = x.clone();
            let items = (x.len() / hd * (hd - rot / 2)) as u64;
            // SAFETY: x holds batch·seq·heads·hd, the table (len ≥ seq)·half.
            unsafe { rope(bwd, stride(items as usize, 256), got.as_mut_ptr(), seq as u32, heads as u32, (rot / 2) as u32, hd as u32, items, table.cos.as_ptr(), table.sin.as_ptr()) };
            check_bits(if bwd == 0 { "emulated rope" } else { "emulated rope backward" }, &got, &want);
            // Out of place with the bf16 rounding: the same bits, rounded.
            for with_y in [true, false] {
                let (mut y, mut yb) = (vec![f32::NAN; x.len()], vec![0xFFFFu16; x.len()]);
                let yp = if with_y { y.as_mut_ptr() } else { std::ptr::null_mut() };
                // SAFETY: as above; y (or null) and yb hold as many as x.
                unsafe { rope_out(bwd, stride(items as usize, 256), x.as_ptr(), yp, yb.as_mut_ptr(), seq as u32, heads as u32, (rot / 2) as u32, hd as u32, items, table.cos.as_ptr(), table.sin.as_ptr()) };
                assert_eq!(yb, want.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect::<Vec<u16>>(), "emulated rope out of place: bf16");
                if with_y {
                    check_bits("emulated rope out of place: fp32", &y, &want);
                } else {
                    assert!(y.iter().all(|v| v.is_nan()), "emulated rope wrote y unasked");
                }
            }
        }
    }
    // SwiGLU and GeGLU forward, backward, backward in place.
    for (&n, (act, code)) in [1usize, 1000, 4099].iter().flat_map(|n| [(n, (Activation::Silu, 0u32)), (n, (Activation::GeluTanh, 1))]) {
        let (g, u, dh) = (rng.vec(n, 3.0), rng.vec(n, 1.0), rng.vec(n, 1.0));
        let mut h = vec![0f32; n];
        cswiglu::glu_forward(act, &g, &u, &mut h);
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        cswiglu::glu_backward(act, &g, &u, &dh, &mut dg, &mut du);
        let (mut gh, mut gdg, mut gdu, mut gi, mut ui) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n], g.clone(), u.clone());
        // SAFETY: every buffer holds n.
        unsafe { sw(stride(n, 256), g.as_ptr(), u.as_ptr(), dh.as_ptr(), n as u64, gh.as_mut_ptr(), gdg.as_mut_ptr(), gdu.as_mut_ptr(), gi.as_mut_ptr(), ui.as_mut_ptr(), code) };
        check_rel(&format!("emulated {act:?} gate h"), &gh, &h, 1e-6);
        check_rel(&format!("emulated {act:?} gate dgate"), &gdg, &dg, 1e-6);
        check_rel(&format!("emulated {act:?} gate dup"), &gdu, &du, 1e-6);
        check_bits("emulated swiglu in place (dgate)", &gi, &gdg);
        check_bits("emulated swiglu in place (dup)", &ui, &gdu);
    }
    // AdamW: bit for bit, with and without weight decay.
    for (wd, step) in [(0.0, 1u64), (0.01, 7)] {
        let cfg = AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: wd };
        let n = 1001;
        let (p, g, m) = (rng.vec(n, 1.0), rng.vec(n, 0.01), rng.vec(n, 0.001));
        let v: Vec<f32> = rng.vec(n, 1e-4).iter().map(|x| x * x).collect();
        let s = AdamWScalars::new(&cfg, step);
        let (mut pw, mut mw, mut vw) = (p.clone(), m.clone(), v.clone());
        adamw_update(&mut pw, &g, &mut mw, &mut vw, &s);
        let k7 = [s.decay.unwrap_or(1.0), s.lerp_weight, s.beta2, s.one_minus_beta2, s.bias_correction2_sqrt, s.eps, s.neg_step_size];
        let (mut pg, mut mg, mut vg) = (p.clone(), m.clone(), v.clone());
        // SAFETY: four buffers of n, seven constants.
        unsafe { adam(stride(n, 256), pg.as_mut_ptr(), g.as_ptr(), mg.as_mut_ptr(), vg.as_mut_ptr(), n as u64, s.decay.is_some() as u32, k7.as_ptr()) };
        check_bits("emulated adamw p", &pg, &pw);
        check_bits("emulated adamw m", &mg, &mw);
        check_bits("emulated adamw v", &vg, &vw);
    }
    // Fused cross-entropy (ignored rows, mean and given scales; soft caps,
    // with saturating logits, within the capped bounds: host tanhf against
    // vexp::tanh).
    for &(rows, vocab, scale, softcap) in &[(1usize, 5usize, None, None), (9, 1000, Some(0.25f32), None), (4, 32001, None, None), (9, 1000, Some(0.25), Some(30.0f32)), (6, 3001, None, Some(5.0))] {
        let logits = match softcap {
            None => rng.vec(rows * vocab, 3.0),
            Some(cap) => softcap_logits(&mut rng, rows * vocab, 3.0 * cap as f64, cap),
        };
        let labels: Vec<i32> = (0..rows).map(|i| if i % 4 == 3 { closs::IGNORE_INDEX } else { rng.below(vocab) as i32 }).collect();
        let mut want = logits.clone();
        let r = match softcap {
            None => closs::cross_entropy_fused(&mut want, &labels, vocab, scale).unwrap(),
            Some(cap) => closs::cross_entropy_fused_softcap(&mut want, &labels, vocab, scale, cap).unwrap(),
        };
        let (mut got, mut st, mut rl, mut out) = (logits.clone(), [0u32; 2], vec![f64::NAN; rows], [f64::NAN; 3]);
        let (sc, mean) = match scale {
            Some(c) => (c, 0),
            None => (0.0, 1),
        };
        let cap = softcap.unwrap_or(0.0);
        // SAFETY: logits rows·vocab, labels rows, status 2, row_loss rows, out 3.
        unsafe { ce(got.as_mut_ptr(), labels.as_ptr(), rows as u32, vocab as u32, sc, mean, st.as_mut_ptr(), rl.as_mut_ptr(), out.as_mut_ptr(), cap) };
        assert_eq!(out[1] as usize, r.count, "emulated cross-entropy count");
        assert!(out[2] < 0.0, "valid labels flagged: {}", out[2]);
        if let Some(cap) = softcap {
            let tol = gloss::ce_loss_tol_softcap(cap) * (r.sum.abs() + r.count as f64);
            assert!((out[0] - r.sum).abs() <= tol, "emulated soft-capped cross-entropy sum {} vs {}", out[0], r.sum);
            let tols = ce_grad_tols(&logits, &labels, vocab, scale, softcap);
            let exact = check_close(&format!("emulated cross-entropy gradient, cap {cap}"), &got, &want, |k| tols[k]);
            // The cap changed something: saturated logits' gradients are 0.
            assert!(got.iter().filter(|&&g| g == 0.0).count() > labels.iter().filter(|&&y| y == closs::IGNORE_INDEX).count() * vocab, "no saturated logit");
            eprintln!("emulated cross-entropy, cap {cap}: gradient bit-exact {exact}/{}", got.len());
        } else {
            assert!((out[0] - r.sum).abs() <= 1e-6 * (r.sum.abs() + r.count as f64), "emulated cross-entropy sum {} vs {}", out[0], r.sum);
            check_rel("emulated cross-entropy gradient", &got, &want, 1e-6);
        }
        // bf16 logits: the fp32 kernel's bits on the widened logits, each
        // gradient rounded; the same loss sums.
        let lb: Vec<u16> = logits.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        let mut wide: Vec<f32> = lb.iter().map(|&v| half::bf16::from_bits(v).to_f32()).collect();
        let (mut st2, mut rl2, mut out2) = ([0u32; 2], vec![f64::NAN; rows], [f64::NAN; 3]);
        // SAFETY: as above.
        unsafe { ce(wide.as_mut_ptr(), labels.as_ptr(), rows as u32, vocab as u32, sc, mean, st2.as_mut_ptr(), rl2.as_mut_ptr(), out2.as_mut_ptr(), cap) };
        let (mut gb, mut st3, mut rl3, mut out3) = (lb.clone(), [0u32; 2], vec![f64::NAN; rows], [f64::NAN; 3]);
        // SAFETY: as above, bf16 logits rows·vocab.
        unsafe { ceb(gb.as_mut_ptr(), labels.as_ptr(), rows as u32, vocab as u32, sc, mean, st3.as_mut_ptr(), rl3.as_mut_ptr(), out3.as_mut_ptr(), cap) };
        assert_eq!(gb, wide.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect::<Vec<u16>>(), "emulated bf16 cross-entropy gradient");
        assert_eq!(out3.map(f64::to_bits), out2.map(f64::to_bits), "emulated bf16 cross-entropy sums");
    }
    // Gradient norm and clipping over several tensors.
    let mut ts: Vec<Vec<f32>> = [1usize, 300, 4097].iter().map(|&n| rng.vec(n, 0.5)).collect();
    let mut want = ts.clone();
    let cpu = {
        let mut refs: Vec<&mut [f32]> = want.iter_mut().map(|t| t.as_mut_slice()).collect();
        closs::clip_grad_norm(&mut refs, 1.0)
    };
    let ptrs: Vec<*mut f32> = ts.iter_mut().map(|t| t.as_mut_ptr()).collect();
    let ns: Vec<u64> = ts.iter().map(|t| t.len() as u64).collect();
    let grids: Vec<u32> = ts.iter().map(|t| stride(t.len(), 256)).collect();
    let (mut part, mut norms, mut out) = (vec![f64::NAN; 3 * 128], vec![f32::NAN; 3], [f32::NAN; 3]);
    // SAFETY: k = 3 tensors of ns[i] elements, partial 3·128, norms 3, out 3.
    unsafe { clip(3, ptrs.as_ptr(), ns.as_ptr(), 1.0, part.as_mut_ptr(), norms.as_mut_ptr(), out.as_mut_ptr(), grids.as_ptr()) };
    assert!(((out[0] - cpu.total_norm) / cpu.total_norm).abs() <= 1e-6, "emulated grad norm {} vs {}", out[0], cpu.total_norm);
    assert_eq!(out[2] != 0.0, cpu.clipped, "clipping decision");
    for (i, (g, w)) in ts.iter().zip(&want).enumerate() {
        check_rel(&format!("emulated clipped tensor {i}"), g, w, 1e-6);
    }
}
type EmuEw = unsafe extern "C" fn(i32, u32, *mut f32, *const f32, u64, u32, *mut u16);

use harness::emu;

/// The emulation library of these kernel families, built once per process
/// (or why the tests skip).
fn ops_emu(test: &str) -> Option<&'static libloading::Library> {
    static LIB: std::sync::OnceLock<Result<libloading::Library, String>> = std::sync::OnceLock::new();
    match LIB.get_or_init(|| emu::build("ops", &["embed.cu", "elementwise.cu", "norm.cu", "rope.cu", "swiglu.cu", "adamw.cu", "loss.cu"], &[], emu::MIN_MAX, EMU_ENTRY)) {
        Ok(l) => Some(l),
        Err(why) => {
            eprintln!("SKIPPED {test}: kernel emulation unavailable: {why}");
            None
        }
    }
}

/// The kernels that round fp32 to bf16 in passing (RMSNorm's, SwiGLU's,
/// cross-entropy's and RoPE's fused outputs, the folded adapter columns) carry their own copy of the conversion (NVRTC compiles
/// each source alone); each copy is the tested one of elementwise.cu,
/// character for character, so the edges its tests cover hold for all.
#[test]
fn bf16_conversions_are_one_function() {
    let body = |src: &str, name: &str| -> String {
        let at = src.find(&format!("u16 {name}(float f) {{")).unwrap_or_else(|| panic!("{name} not found"));
        let rest = &src[at..];
        let open = rest.find('{').unwrap();
        let close = rest.find("\n}").unwrap_or_else(|| panic!("{name}: no closing brace"));
        rest[open..close].to_string()
    };
    let want = body(include_str!("../cuda/elementwise.cu"), "ew_f32_to_bf16_bits");
    assert!(want.contains("0x7fffu") && want.contains("0x40u"), "elementwise.cu's conversion changed: {want}");
    assert_eq!(body(include_str!("../cuda/norm.cu"), "norm_bf16"), want, "norm.cu's bf16 conversion differs from elementwise.cu's");
    assert_eq!(body(include_str!("../cuda/swiglu.cu"), "swiglu_bf16"), want, "swiglu.cu's bf16 conversion differs from elementwise.cu's");
    assert_eq!(body(include_str!("../cuda/loss.cu"), "loss_bf16"), want, "loss.cu's bf16 conversion differs from elementwise.cu's");
    assert_eq!(body(include_str!("../cuda/rope.cu"), "rope_bf16"), want, "rope.cu's bf16 conversion differs from elementwise.cu's");
    assert_eq!(body(include_str!("../cuda/lora.cu"), "lora_bf16"), want, "lora.cu's bf16 conversion differs from elementwise.cu's");
}

/// fp32 values where the rounding to bf16 has edges: ties to even (up and
/// down), NaN (signalling and quiet), ±∞, −0, subnormals, the largest
/// finite values.
const SPECIAL_F32_BITS: [u32; 12] = [0x3F80_8000, 0x3F81_8000, 0x3F80_7FFF, 0x7FA0_0001, 0xFFC0_0000, 0x7F80_0000, 0xFF80_0000, 0x8000_0000, 0x0000_8000, 0x0001_8000, 0x7F7F_FFFF, 0xFF7F_8000];

/// The bf16 step's fused kernels (RMSNorm with its bf16 output, SwiGLU with
/// its conversions) give, in emulation, the bits of the fp32 kernels and
/// the conversions they replace; null outputs are skipped.
#[test]
fn emulated_fused_bf16_outputs_match_the_unfused_kernels() {
    let Some(lib) = ops_emu("emulated_fused_bf16_outputs_match_the_unfused_kernels") else { return };
    // SAFETY: entry points built above with these signatures.
    let (nf, nfo, sw, swo): (EmuNormFwd, EmuNormFwdOut, EmuSwiglu, EmuSwigluOut) =
        unsafe { (*lib.get(b"emu_norm_fwd").unwrap(), *lib.get(b"emu_norm_fwd_out").unwrap(), *lib.get(b"emu_swiglu").unwrap(), *lib.get(b"emu_swiglu_out").unwrap()) };
    // SAFETY: as above.
    let (nb, nbr, swdh): (EmuNormBwd, EmuNormBwdRes, EmuSwigluBwdDh) =
        unsafe { (*lib.get(b"emu_norm_bwd").unwrap(), *lib.get(b"emu_norm_bwd_res").unwrap(), *lib.get(b"emu_swiglu_bwd_dh").unwrap()) };
    let bits = |x: &[f32]| x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect::<Vec<u16>>();
    let widen = |b: &[u16]| b.iter().map(|&v| half::bf16::from_bits(v).to_f32()).collect::<Vec<f32>>();
    let mut rng = Rng(48);
    for &(rows, dim) in &[(1usize, 1usize), (5, 300), (33, 64)] {
        let (x, w) = (rng.vec(rows * dim, 1.0), rng.vec(dim, 1.0));
        let (mut y, mut r) = (vec![f32::NAN; rows * dim], vec![f32::NAN; rows]);
        // SAFETY: buffers of rows·dim, dim and rows elements.
        unsafe { nf(rows as u32, dim as u32, x.as_ptr(), w.as_ptr(), 1e-5, y.as_mut_ptr(), r.as_mut_ptr()) };
        for with_y in [true, false] {
            let (mut y2, mut yb, mut r2) = (vec![f32::NAN; rows * dim], vec![0xFFFFu16; rows * dim], vec![f32::NAN; rows]);
            let yp = if with_y { y2.as_mut_ptr() } else { std::ptr::null_mut() };
            // SAFETY: as above; a null y is skipped by the kernel.
            unsafe { nfo(rows as u32, dim as u32, x.as_ptr(), w.as_ptr(), 1e-5, yp, yb.as_mut_ptr(), r2.as_mut_ptr()) };
            assert_eq!(yb, bits(&y), "emulated rmsnorm bf16 output");
            check_bits("emulated rmsnorm rstd (bf16 output)", &r2, &r);
            if with_y {
                check_bits("emulated rmsnorm y (bf16 output)", &y2, &y);
            } else {
                assert!(y2.iter().all(|v| v.is_nan()), "y written unasked");
            }
        }
        // The backward with the residual added and dx's bf16 rounding.
        let (dy, res) = (rng.vec(rows * dim, 1.0), rng.vec(rows * dim, 1.0));
        let (chunks, per) = gnorm::dw_chunks(rows, dim);
        let (mut dx, mut part, mut dw) = (vec![f32::NAN; rows * dim], vec![f64::NAN; chunks * dim], vec![0f32; dim]);
        // SAFETY: as the launcher sizes them.
        unsafe { nb(rows as u32, dim as u32, x.as_ptr(), w.as_ptr(), r.as_ptr(), dy.as_ptr(), dx.as_mut_ptr(), dim.div_ceil(256) as u32, chunks as u32, per as u32, part.as_mut_ptr(), dw.as_mut_ptr()) };
        let want: Vec<f32> = dx.iter().zip(&res).map(|(a, b)| a + b).collect();
        for with_b in [true, false] {
            let (mut dx2, mut dxb) = (vec![f32::NAN; rows * dim], vec![0xFFFFu16; rows * dim]);
            let bp = if with_b { dxb.as_mut_ptr() } else { std::ptr::null_mut() };
            // SAFETY: rows·dim buffers, rstd rows; a null dxb is skipped.
            unsafe { nbr(rows as u32, dim as u32, x.as_ptr(), w.as_ptr(), r.as_ptr(), dy.as_ptr(), res.as_ptr(), dx2.as_mut_ptr(), bp) };
            check_bits("emulated rmsnorm dx + residual", &dx2, &want);
            // Without a residual (the head's norm): dx itself.
            let mut dx3 = vec![f32::NAN; rows * dim];
            // SAFETY: as above; null res and dxb are skipped.
            unsafe { nbr(rows as u32, dim as u32, x.as_ptr(), w.as_ptr(), r.as_ptr(), dy.as_ptr(), std::ptr::null(), dx3.as_mut_ptr(), std::ptr::null_mut()) };
            check_bits("emulated rmsnorm dx (no residual)", &dx3, &dx);
            if with_b {
                assert_eq!(dxb, bits(&want), "emulated rmsnorm bf16 dx + residual");
            } else {
                assert!(dxb.iter().all(|&v| v == 0xFFFF), "bf16 dx written unasked");
            }
        }
    }
    for &n in &[1usize, 1000, 4099] {
        let (mut g, mut u, dh) = (rng.vec(n, 3.0), rng.vec(n, 1.0), rng.vec(n, 1.0));
        // The conversions on the values where rounding has edges: ties
        // (even and odd), NaN (kept quiet), ±∞, −0, subnormals, the largest
        // finite value (rounds to ∞).
        for (i, &b) in SPECIAL_F32_BITS.iter().enumerate().filter(|&(i, _)| i < n) {
            g[(i * 7) % n] = f32::from_bits(b);
            u[(i * 13 + 1) % n] = f32::from_bits(b);
        }
        let (gb, ub) = (bits(&g), bits(&u));
        let (gw, uw) = (widen(&gb), widen(&ub));
        // The unfused kernels: on fp32 g, u (forward) and on the widened
        // bf16 values (forward and backward).
        let unfused = |g: &[f32], u: &[f32]| {
            let (mut h, mut dg, mut du, mut gi, mut ui) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n], g.to_vec(), u.to_vec());
            // SAFETY: every buffer holds n.
            unsafe { sw(stride(n, 256), g.as_ptr(), u.as_ptr(), dh.as_ptr(), n as u64, h.as_mut_ptr(), dg.as_mut_ptr(), du.as_mut_ptr(), gi.as_mut_ptr(), ui.as_mut_ptr(), 0) };
            (h, dg, du)
        };
        let (h, _, _) = unfused(&g, &u);
        let (hw, dgw, duw) = unfused(&gw, &uw);
        for all in [true, false] {
            let mut o = [vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]];
            let mut ob = [vec![0xFFFFu16; n], vec![0xFFFFu16; n], vec![0xFFFFu16; n], vec![0xFFFFu16; n], vec![0xFFFFu16; n], vec![0xFFFFu16; n]];
            let [h1, h2, dg, du] = &mut o;
            let [hb, gbo, ubo, hb2, dgb, dub] = &mut ob;
            let opt = |p: *mut f32| if all { p } else { std::ptr::null_mut() };
            let optb = |p: *mut u16| if all { p } else { std::ptr::null_mut() };
            // SAFETY: every buffer holds n; null outputs are skipped.
            unsafe {
                swo(
                    stride(n, 256), g.as_ptr(), u.as_ptr(), gb.as_ptr(), ub.as_ptr(), dh.as_ptr(), n as u64,
                    opt(h1.as_mut_ptr()), hb.as_mut_ptr(), optb(gbo.as_mut_ptr()), ubo.as_mut_ptr(), opt(h2.as_mut_ptr()), hb2.as_mut_ptr(),
                    opt(dg.as_mut_ptr()), du.as_mut_ptr(), optb(dgb.as_mut_ptr()), dub.as_mut_ptr(),
                )
            };
            assert_eq!(*hb, bits(&h), "emulated fused swiglu: bf16 h");
            assert_eq!(*ubo, ub, "emulated fused swiglu: bf16 up");
            assert_eq!(*hb2, bits(&hw), "emulated swiglu from bf16: bf16 h");
            check_bits("emulated swiglu backward from bf16: dup", du, &duw);
            assert_eq!(*dub, bits(&duw), "emulated swiglu backward from bf16: bf16 dup");
            // dh in bf16 too: the unfused kernel's bits on the widened gate,
            // up and dh, and their roundings.
            if all {
                let dhb = bits(&dh);
                let dhw = widen(&dhb);
                let (mut h0, mut dg0, mut du0, mut gi, mut ui) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n], gw.clone(), uw.clone());
                let (mut dg1, mut du1, mut dgb1, mut dub1) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![0xFFFFu16; n], vec![0xFFFFu16; n]);
                // SAFETY: every buffer holds n.
                unsafe {
                    sw(stride(n, 256), gw.as_ptr(), uw.as_ptr(), dhw.as_ptr(), n as u64, h0.as_mut_ptr(), dg0.as_mut_ptr(), du0.as_mut_ptr(), gi.as_mut_ptr(), ui.as_mut_ptr(), 0);
                    swdh(stride(n, 256), gb.as_ptr(), ub.as_ptr(), dhb.as_ptr(), n as u64, dg1.as_mut_ptr(), du1.as_mut_ptr(), dgb1.as_mut_ptr(), dub1.as_mut_ptr());
                }
                check_bits("emulated swiglu backward, bf16 dh: dgate", &dg1, &dg0);
                check_bits("emulated swiglu backward, bf16 dh: dup", &du1, &du0);
                assert_eq!((&dgb1, &dub1), (&bits(&dg0), &bits(&du0)), "emulated swiglu backward, bf16 dh: bf16 outputs");
                // Only the bf16 outputs (the lean step's call): the same.
                let (mut dgb2, mut dub2) = (vec![0xFFFFu16; n], vec![0xFFFFu16; n]);
                // SAFETY: every buffer holds n; null outputs are skipped.
                unsafe { swdh(stride(n, 256), gb.as_ptr(), ub.as_ptr(), dhb.as_ptr(), n as u64, std::ptr::null_mut(), std::ptr::null_mut(), dgb2.as_mut_ptr(), dub2.as_mut_ptr()) };
                assert_eq!((dgb2, dub2), (dgb1, dub1), "emulated swiglu backward, bf16 dh, bf16 outputs only");
            }
            if all {
                check_bits("emulated fused swiglu: h", h1, &h);
                assert_eq!(*gbo, gb, "emulated fused swiglu: bf16 gate");
                check_bits("emulated swiglu from bf16: h", h2, &hw);
                check_bits("emulated swiglu backward from bf16: dgate", dg, &dgw);
                assert_eq!(*dgb, bits(&dgw), "emulated swiglu backward from bf16: bf16 dgate");
            } else {
                assert!(h1.iter().chain(h2.iter()).chain(dg.iter()).all(|v| v.is_nan()), "fp32 outputs written unasked");
                assert!(gbo.iter().chain(dgb.iter()).all(|&v| v == 0xFFFF), "bf16 outputs written unasked");
            }
        }
    }
}

#[test]
fn emulated_embedding_and_elementwise_match_the_cpu_bit_for_bit() {
    let Some(lib) = ops_emu("emulated_embedding_and_elementwise_match_the_cpu_bit_for_bit") else { return };
    // SAFETY: entry points built just above with these signatures.
    let (embed, ew): (EmuEmbed, EmuEw) = unsafe { (*lib.get(b"emu_embed").unwrap(), *lib.get(b"emu_ew").unwrap()) };
    let mut rng = Rng(46);
    for &(vocab, dim, n) in &[(1usize, 1usize, 1usize), (97, 13, 40), (300, 64, 33)] {
        let table = rng.vec(vocab * dim, 1.0);
        let bits: Vec<u16> = table.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
        let wide: Vec<f32> = bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
        let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
        let grid = ((n * dim).div_ceil(256)).clamp(1, 3) as u32; // fewer blocks than elements: the grid-stride loop
        for (bf, src, tab) in [(0, table.as_ptr() as *const u8, &table), (1, bits.as_ptr() as *const u8, &wide)] {
            let mut want = vec![0f32; n * dim];
            cembed::embedding_forward(tab, vocab, dim, &ids, &mut want).unwrap();
            let (mut out, mut st) = (vec![f32::NAN; n * dim], [0u32]);
            // SAFETY: table vocab·dim elements, ids n, out n·dim, status 1.
            unsafe { embed(bf, grid, src, vocab as u32, dim as u32, ids.as_ptr(), n as u32, st.as_mut_ptr(), out.as_mut_ptr()) };
            assert_eq!(st[0], gembed::ALL_IDS_VALID);
            check_bits(if bf == 1 { "emulated embedding (bf16)" } else { "emulated embedding" }, &out, &want);
        }
    }
    // A bad id: status names its position, nothing written.
    let table = rng.vec(8 * 4, 1.0);
    let ids = [1u32, 7, 8, 2];
    let (mut out, mut st) = (vec![f32::NAN; 16], [0u32]);
    // SAFETY: as above.
    unsafe { embed(0, 1, table.as_ptr() as *const u8, 8, 4, ids.as_ptr(), 4, st.as_mut_ptr(), out.as_mut_ptr()) };
    assert_eq!(st[0], 2);
    assert!(out.iter().all(|v| v.is_nan()));
    // Elementwise: y += x, the bias add, the bf16 conversion (specials too).
    for &(n, cols) in &[(1usize, 1usize), (7 * 586, 7), (3 * 64, 64)] {
        let (x, y0) = (rng.vec(n, 1.0), rng.vec(n, 1.0));
        let mut y = y0.clone();
        // SAFETY: y, x hold n; yb unused.
        unsafe { ew(0, 2, y.as_mut_ptr(), x.as_ptr(), n as u64, 1, std::ptr::null_mut()) };
        check_bits("emulated add", &y, &y0.iter().zip(&x).map(|(a, b)| a + b).collect::<Vec<_>>());
        let b = rng.vec(cols, 1.0);
        let mut y = y0.clone();
        // SAFETY: y holds n = rows·cols, b holds cols.
        unsafe { ew(1, 2, y.as_mut_ptr(), b.as_ptr(), n as u64, cols as u32, std::ptr::null_mut()) };
        check_bits("emulated bias add", &y, &y0.iter().enumerate().map(|(i, a)| a + b[i % cols]).collect::<Vec<_>>());
        let mut xs = x.clone();
        xs[0] = f32::NAN;
        if n > 3 {
            xs[1] = f32::INFINITY;
            xs[2] = -0.0;
            xs[3] = 3.0e38;
        }
        let mut yb = vec![0u16; n];
        // SAFETY: x and yb hold n.
        unsafe { ew(2, 2, std::ptr::null_mut(), xs.as_ptr(), n as u64, 1, yb.as_mut_ptr()) };
        assert_eq!(yb, xs.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect::<Vec<_>>(), "emulated bf16 conversion n={n}");
        // Widening back: set, then add into y0.
        let wide: Vec<f32> = yb.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
        let mut y = vec![f32::NAN; n];
        // SAFETY: yb and y hold n.
        unsafe { ew(3, 2, y.as_mut_ptr(), std::ptr::null(), n as u64, 1, yb.as_mut_ptr()) };
        check_bits("emulated bf16 widening", &y, &wide);
        let mut y = y0.clone();
        // SAFETY: as above.
        unsafe { ew(4, 2, y.as_mut_ptr(), std::ptr::null(), n as u64, 1, yb.as_mut_ptr()) };
        check_bits("emulated bf16 widening (add)", &y, &y0.iter().zip(&wide).map(|(a, b)| a + b).collect::<Vec<_>>());
    }
}
