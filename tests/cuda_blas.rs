//! The device step's dense products and elementwise kernels against the
//! CPU on a GPU:
//! - `cuda::blas::gemm` (cuBLAS, row-major, every transpose combination,
//!   α/β, fp32 and bf16 operands) against an f64 product of the same
//!   operands (bf16 operands rounded first, as the device reads them):
//!   `|c − ref| ≤ (k + 2)·2⁻²⁴·Σ_k |α·a·b| + 2⁻²⁴·|β·c₀| + 2⁻²³·|ref|`
//!   (fp32 accumulation in any order, the β term and the final rounding);
//! - `cuda::elementwise` add, scale, bias add, the bf16 conversion and widening:
//!   bit for bit with the CPU's one-line loops (`half::bf16`); the logits'
//!   soft cap within `loss::softcap_tol` of the CPU head's.
//!
//! Outputs are poisoned (NaN) first; odd sizes. Skips without a GPU.

#[path = "common/gpu.rs"]
#[allow(dead_code)]
mod harness;
use half::bf16;
use harness::{gpu, Rng};
use lora::backend::cuda::blas::{gemm, Blas, MatRef};
use lora::backend::cuda::elementwise as ew;

fn vecr(r: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (r.gauss() as f32) + 1e-3).collect()
}

#[test]
fn gemm_matches_an_f64_product() {
    let Some(dev) = gpu("gemm_matches_an_f64_product") else { return };
    let blas = Blas::new(dev).unwrap();
    let mut r = Rng(11);
    let u = f64::powi(2.0, -24);
    for &(m, n, k) in &[(1, 1, 1), (37, 19, 65), (128, 96, 2048), (5, 1000, 7), (300, 17, 513)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for bf in [false, true] {
                let a = vecr(&mut r, m * k);
                let b = vecr(&mut r, k * n);
                let c0 = vecr(&mut r, m * n);
                let (alpha, beta) = (0.75f32, if ta { 1.0f32 } else { 0.0 });
                let round = |v: &[f32]| -> Vec<f32> { if bf { v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect() } else { v.to_vec() } };
                let (ar, br) = (round(&a), round(&b));
                let at = |i: usize, p: usize| if ta { ar[p * m + i] } else { ar[i * k + p] } as f64;
                let bt = |p: usize, j: usize| if tb { br[j * k + p] } else { br[p * n + j] } as f64;
                let mut want = vec![0f64; m * n];
                let mut tol = vec![0f64; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let (mut s, mut sa) = (0f64, 0f64);
                        for p in 0..k {
                            s += at(i, p) * bt(p, j);
                            sa += (at(i, p) * bt(p, j)).abs();
                        }
                        let v = alpha as f64 * s + beta as f64 * c0[i * n + j] as f64;
                        want[i * n + j] = v;
                        tol[i * n + j] = (k as f64 + 2.0) * u * alpha.abs() as f64 * sa + u * (beta as f64 * c0[i * n + j] as f64).abs() + 2.0 * u * v.abs();
                    }
                }
                let (ad, bd) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
                let (ab, bb) = (dev.upload(&a.iter().map(|&x| bf16::from_f32(x).to_bits()).collect::<Vec<u16>>()).unwrap(), dev.upload(&b.iter().map(|&x| bf16::from_f32(x).to_bits()).collect::<Vec<u16>>()).unwrap());
                let mut cd = if beta == 0.0 { dev.alloc_filled::<f32>(m * n, 0xFF).unwrap() } else { dev.upload(&c0).unwrap() };
                let (sa, sb) = if ta { (k, m) } else { (m, k) };
                let (sbr, sbc) = if tb { (n, k) } else { (k, n) };
                let (av, bv, abv, bbv) = (ad.as_view(), bd.as_view(), ab.as_view(), bb.as_view());
                let (am, bm) = if bf {
                    (MatRef::bf16(dev, &abv, sa, sb).unwrap(), MatRef::bf16(dev, &bbv, sbr, sbc).unwrap())
                } else {
                    (MatRef::f32(dev, &av, sa, sb).unwrap(), MatRef::f32(dev, &bv, sbr, sbc).unwrap())
                };
                gemm(dev, &blas, am, ta, bm, tb, &mut cd.as_view_mut(), alpha, beta).unwrap();
                let got = dev.download(&cd).unwrap();
                let mut worst = 0f64;
                for i in 0..m * n {
                    let e = (got[i] as f64 - want[i]).abs();
                    assert!(e <= tol[i], "gemm {m}x{n}x{k} ta={ta} tb={tb} bf16={bf}: c[{i}] = {} vs {} (bound {:.3e})", got[i], want[i], tol[i]);
                    worst = worst.max(e / tol[i].max(1e-300));
                }
                eprintln!("gemm {m}x{n}x{k} ta={ta} tb={tb} bf16={bf}: worst error {worst:.3} of the bound");
                if bf {
                    // A bf16 output: the same sums (β·C from the bf16 C
                    // widened) rounded once more, to bf16 (2⁻⁸ relative).
                    let c0b: Vec<u16> = c0.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
                    let mut cb = if beta == 0.0 { dev.alloc_filled::<u16>(m * n, 0xFF).unwrap() } else { dev.upload(&c0b).unwrap() };
                    let (am, bm) = (MatRef::bf16(dev, &abv, sa, sb).unwrap(), MatRef::bf16(dev, &bbv, sbr, sbc).unwrap());
                    gemm(dev, &blas, am, ta, bm, tb, &mut cb.as_view_mut(), alpha, beta).unwrap();
                    let got = dev.download(&cb).unwrap();
                    for i in 0..m * n {
                        let w = want[i] + beta as f64 * (bf16::from_bits(c0b[i]).to_f32() as f64 - c0[i] as f64);
                        let g = bf16::from_bits(got[i]).to_f32() as f64;
                        let bound = tol[i] + f64::powi(2.0, -8) * w.abs();
                        assert!((g - w).abs() <= bound, "gemm {m}x{n}x{k} ta={ta} tb={tb} bf16 output: c[{i}] = {g} vs {w} (bound {bound:.3e})");
                    }
                }
            }
        }
    }
    // Shape mistakes are errors, not launches.
    let a = dev.upload(&[1f32; 6]).unwrap();
    let av = a.as_view();
    let mut c = dev.alloc_filled::<f32>(4, 0xFF).unwrap();
    let e = gemm(dev, &blas, MatRef::f32(dev, &av, 2, 3).unwrap(), false, MatRef::f32(dev, &av, 2, 3).unwrap(), false, &mut c.as_view_mut(), 1.0, 0.0).unwrap_err();
    assert_eq!(e.kind, lora::ErrorKind::ShapeMismatch, "{e}");
    assert_eq!(MatRef::f32(dev, &av, 4, 2).unwrap_err().kind, lora::ErrorKind::BufferSize);
    // A bf16 output from fp32 operands is refused.
    let mut cb = dev.alloc_filled::<u16>(4, 0xFF).unwrap();
    let e = gemm(dev, &blas, MatRef::f32(dev, &av, 2, 3).unwrap(), false, MatRef::f32(dev, &av, 2, 3).unwrap(), true, &mut cb.as_view_mut(), 1.0, 0.0).unwrap_err();
    assert_eq!(e.kind, lora::ErrorKind::Unsupported, "{e}");
}

#[test]
fn elementwise_kernels_are_bit_exact() {
    let Some(dev) = gpu("elementwise_kernels_are_bit_exact") else { return };
    let mut r = Rng(12);
    for &n in &[1usize, 33, 4099, 1 << 20] {
        let (x, y0) = (vecr(&mut r, n), vecr(&mut r, n));
        let mut yd = dev.upload(&y0).unwrap();
        ew::add(dev, &mut yd.as_view_mut(), &dev.upload(&x).unwrap().as_view()).unwrap();
        let want: Vec<u32> = y0.iter().zip(&x).map(|(a, b)| (a + b).to_bits()).collect();
        assert_eq!(dev.download(&yd).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "add n={n}");
        // y *= s by a scale that is not a power of two (each product rounded).
        let mut yd = dev.upload(&y0).unwrap();
        ew::scale(dev, &mut yd.as_view_mut(), 0.22 / 12.0).unwrap();
        let want: Vec<u32> = y0.iter().map(|a| (a * (0.22f32 / 12.0)).to_bits()).collect();
        assert_eq!(dev.download(&yd).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "scale n={n}");
        let mut special = x.clone();
        special[0] = f32::NAN;
        if n > 3 {
            special[1] = f32::INFINITY;
            special[2] = -0.0;
            special[3] = 3.0e38;
        }
        let mut bd = dev.alloc_filled::<u16>(n, 0xFF).unwrap();
        ew::to_bf16(dev, &dev.upload(&special).unwrap().as_view(), &mut bd.as_view_mut()).unwrap();
        let want: Vec<u16> = special.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        assert_eq!(dev.download(&bd).unwrap(), want, "to_bf16 n={n}");
        let wide: Vec<f32> = want.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
        let mut wd = dev.alloc_filled::<f32>(n, 0xFF).unwrap();
        ew::from_bf16(dev, &bd.as_view(), &mut wd.as_view_mut(), false).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&dev.download(&wd).unwrap()), bits(&wide), "from_bf16 n={n}");
        let mut yd = dev.upload(&y0).unwrap();
        ew::from_bf16(dev, &bd.as_view(), &mut yd.as_view_mut(), true).unwrap();
        assert_eq!(bits(&dev.download(&yd).unwrap()), bits(&y0.iter().zip(&wide).map(|(a, b)| a + b).collect::<Vec<_>>()), "from_bf16 (add) n={n}");
        for cols in [1usize, 7, 64] {
            if n % cols != 0 {
                continue;
            }
            let b = vecr(&mut r, cols);
            let mut yd = dev.upload(&y0).unwrap();
            ew::add_bias(dev, &mut yd.as_view_mut(), &dev.upload(&b).unwrap().as_view()).unwrap();
            let want: Vec<u32> = y0.iter().enumerate().map(|(i, a)| (a + b[i % cols]).to_bits()).collect();
            assert_eq!(dev.download(&yd).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "add_bias n={n} cols={cols}");
        }
    }
    let mut y = dev.alloc_filled::<f32>(4, 0).unwrap();
    let x = dev.alloc_filled::<f32>(5, 0).unwrap();
    assert_eq!(ew::add(dev, &mut y.as_view_mut(), &x.as_view()).unwrap_err().kind, lora::ErrorKind::ShapeMismatch);
    assert_eq!(ew::add_bias(dev, &mut y.as_view_mut(), &x.as_view()).unwrap_err().kind, lora::ErrorKind::ShapeMismatch);
    eprintln!("elementwise add, scale, bias add, bf16 conversion: bit for bit");
}

/// The logits' soft cap `y = c·tanh(y/c)` (Gemma 2's
/// `final_logit_softcapping`) against the CPU head's `vexp::tanh(z / c) * c`
/// within `loss::softcap_tol` (CUDA's tanhf against vexp::tanh, both within
/// 2 ulp): moderate, saturating, huge, tiny and signed-zero logits, in
/// place. A cap that is not finite and positive is refused.
#[test]
fn elementwise_softcap_matches_the_cpu() {
    use lora::backend::cpu::vexp;
    use lora::backend::cuda::loss::softcap_tol;
    let Some(dev) = gpu("elementwise_softcap_matches_the_cpu") else { return };
    let mut r = Rng(13);
    let mut worst = 0f64;
    for &(n, cap) in &[(1usize, 30.0f32), (33, 5.0), (4099, 30.0), (1 << 20, 50.0), (70_001, 0.75)] {
        let mut z: Vec<f32> = (0..n).map(|_| (r.gauss() * 4.0 * cap as f64) as f32).collect();
        for (k, &v) in [0.0f32, -0.0, 1e-30, -2e-3, 9.5 * cap, -12.0 * cap, 3e38, -1e6, 0.55 * cap, 0.5 * cap].iter().enumerate().filter(|&(k, _)| k < n) {
            z[(k * 7919 + 1) % n] = v;
        }
        let want: Vec<f32> = z.iter().map(|&v| vexp::tanh(v / cap) * cap).collect();
        // In place: a kernel that writes nothing leaves z, not its cap.
        let mut yd = dev.upload(&z).unwrap();
        ew::softcap(dev, &mut yd.as_view_mut(), cap).unwrap();
        let got = dev.download(&yd).unwrap();
        let mut exact = 0;
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            if g.to_bits() == w.to_bits() {
                exact += 1;
                continue;
            }
            let (d, tol) = ((g as f64 - w as f64).abs(), softcap_tol(w as f64, cap));
            assert!(d <= tol, "softcap {cap} n={n} [{i}] (z = {:e}): GPU {g:e} vs CPU {w:e}, |diff| {d:e} > bound {tol:e}", z[i]);
            worst = worst.max(d / tol);
        }
        assert!(got.iter().all(|v| v.abs() <= cap), "softcap {cap}: a value beyond the cap");
        eprintln!("softcap {cap} n={n}: bit-exact {exact}/{n}");
    }
    eprintln!("softcap: worst |diff|/bound {worst:.3e}");
    let mut y = dev.alloc_filled::<f32>(4, 0).unwrap();
    for cap in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        assert_eq!(ew::softcap(dev, &mut y.as_view_mut(), cap).unwrap_err().kind, lora::ErrorKind::InvalidArgument, "cap {cap}");
    }
}

/// The folded adapter product, kernel by kernel: the normed input written
/// wide (its bf16 values in the first columns, the rest zero; the norm's
/// backward likewise for its bf16 dx), x·Aᵀ beside
/// it (`copy_cols_bf16`), the wide weight's adapter columns
/// (`fold_tail_bf16`: `bf16(s·B)` in the module's block, zero elsewhere),
/// and one product over the wide operands (`MatRef::bf16_ld`) giving
/// `x·Wᵀ + s·h·Bᵀ` within the product bound of those bf16 operands.
#[test]
fn wide_operands_fold_an_adapter_into_one_product() {
    use lora::backend::cuda::{lora as glora, norm as gnorm};
    let Some(dev) = gpu("wide_operands_fold_an_adapter_into_one_product") else { return };
    let blas = Blas::new(dev).unwrap();
    let mut rng = Rng(23);
    let u = f64::powi(2.0, -24);
    let b16 = |v: f32| bf16::from_f32(v).to_bits();
    let w16 = |v: u16| bf16::from_bits(v).to_f32();
    // (rows n, in, out, rank, the block's offset in the tail, tail width).
    for &(n, inf, outf, r, off, tail) in &[(5usize, 64usize, 24usize, 4usize, 0usize, 8usize), (33, 96, 40, 16, 16, 48), (17, 128, 7, 3, 8, 24)] {
        let ld = inf + tail;
        let (x, nw) = (vecr(&mut rng, n * inf), vecr(&mut rng, inf));
        let xd = dev.upload(&x).unwrap();
        let nwd = dev.upload(&nw).unwrap();
        // The wide norm: the bf16 output's bits in each row, zeros after.
        let mut narrow = dev.alloc_filled::<u16>(n * inf, 0xFF).unwrap();
        gnorm::rmsnorm_forward_bf16(dev, &xd.as_view(), &nwd.as_view(), n, inf, 1e-5, None, &mut narrow.as_view_mut(), None).unwrap();
        let mut wide = dev.alloc_filled::<u16>(n * ld, 0xFF).unwrap();
        gnorm::rmsnorm_forward_wide_bf16(dev, &xd.as_view(), &nwd.as_view(), n, inf, 1e-5, &mut wide.as_view_mut(), ld, None).unwrap();
        let (xn, xw) = (dev.download(&narrow).unwrap(), dev.download(&wide).unwrap());
        for i in 0..n {
            assert_eq!(&xw[i * ld..i * ld + inf], &xn[i * inf..(i + 1) * inf], "wide norm row {i}");
            assert!(xw[i * ld + inf..(i + 1) * ld].iter().all(|&v| v == 0), "wide norm row {i}: tail not zeroed");
        }
        // The norm's backward with its bf16 dx written wide: the same dx,
        // the bf16 bits in each row, zeros after.
        {
            let (dy, res) = (vecr(&mut rng, n * inf), vecr(&mut rng, n * inf));
            let rstd = dev.upload(&(0..n).map(|i| 0.5 + i as f32 / n as f32).collect::<Vec<f32>>()).unwrap();
            let (dyd, resd) = (dev.upload(&dy).unwrap(), dev.upload(&res).unwrap());
            let (mut dx1, mut dxb1) = (dev.alloc_filled::<f32>(n * inf, 0xFF).unwrap(), dev.alloc_filled::<u16>(n * inf, 0xFF).unwrap());
            gnorm::rmsnorm_backward_residual(dev, &xd.as_view(), &nwd.as_view(), &rstd.as_view(), &dyd.as_view(), n, inf, Some(&resd.as_view()), &mut dx1.as_view_mut(), Some(&mut dxb1.as_view_mut())).unwrap();
            let (mut dx2, mut dxb2) = (dev.alloc_filled::<f32>(n * inf, 0xFF).unwrap(), dev.alloc_filled::<u16>(n * ld, 0xFF).unwrap());
            gnorm::rmsnorm_backward_residual_wide(dev, &xd.as_view(), &nwd.as_view(), &rstd.as_view(), &dyd.as_view(), n, inf, Some(&resd.as_view()), &mut dx2.as_view_mut(), &mut dxb2.as_view_mut(), ld).unwrap();
            let (a, b) = (dev.download(&dx1).unwrap(), dev.download(&dx2).unwrap());
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "wide norm backward: dx differs");
            let (nb, wb) = (dev.download(&dxb1).unwrap(), dev.download(&dxb2).unwrap());
            for i in 0..n {
                assert_eq!(&wb[i * ld..i * ld + inf], &nb[i * inf..(i + 1) * inf], "wide norm backward row {i}");
                assert!(wb[i * ld + inf..(i + 1) * ld].iter().all(|&v| v == 0), "wide norm backward row {i}: tail not zeroed");
            }
        }
        // h (any bf16 values) into the block at off.
        let h: Vec<u16> = vecr(&mut rng, n * r).iter().map(|&v| b16(v)).collect();
        let hd = dev.upload(&h).unwrap();
        ew::copy_cols_bf16(dev, &hd.as_view(), n, r, &mut wide.as_view_mut(), ld, inf + off).unwrap();
        let xw = dev.download(&wide).unwrap();
        for i in 0..n {
            for c in 0..ld {
                let want = if c < inf { xn[i * inf + c] } else if (inf + off..inf + off + r).contains(&c) { h[i * r + c - inf - off] } else { 0 };
                assert_eq!(xw[i * ld + c], want, "wide operand [{i}, {c}] after copy_cols");
            }
        }
        // The wide weight: W (bf16) in the first columns, the tail by the
        // fold kernel; K runs to the end of the block (padded to 8).
        let kw = inf + off + r.next_multiple_of(8);
        let (w, b) = (vecr(&mut rng, outf * inf), vecr(&mut rng, outf * r));
        let s = 0.625f32;
        let mut wwide = vec![0xFFFFu16; outf * kw];
        for o in 0..outf {
            for c in 0..inf {
                wwide[o * kw + c] = b16(w[o * inf + c]);
            }
        }
        let mut wd = dev.upload(&wwide).unwrap();
        let bd = dev.upload(&b).unwrap();
        glora::fold_tail_bf16(dev, &bd.as_view(), outf, r, s, inf, off, &mut wd.as_view_mut(), kw).unwrap();
        let wg = dev.download(&wd).unwrap();
        for o in 0..outf {
            for c in 0..kw {
                let want = if c < inf { wwide[o * kw + c] } else if (inf + off..inf + off + r).contains(&c) { b16(s * b[o * r + c - inf - off]) } else { 0 };
                assert_eq!(wg[o * kw + c], want, "wide weight [{o}, {c}]");
            }
        }
        // One product: y = x·Wᵀ + h·bf16(s·B)ᵀ over the bf16 operands.
        let mut yd = dev.alloc_filled::<f32>(n * outf, 0xFF).unwrap();
        let (xv, wv) = (wide.as_view(), wd.as_view());
        gemm(dev, &blas, MatRef::bf16_ld(dev, &xv, n, kw, ld).unwrap(), false, MatRef::bf16(dev, &wv, outf, kw).unwrap(), true, &mut yd.as_view_mut(), 1.0, 0.0).unwrap();
        let y = dev.download(&yd).unwrap();
        for i in 0..n {
            for o in 0..outf {
                let (mut sum, mut abs) = (0f64, 0f64);
                for c in 0..inf {
                    let t = w16(xn[i * inf + c]) as f64 * w16(wwide[o * kw + c]) as f64;
                    sum += t;
                    abs += t.abs();
                }
                for k in 0..r {
                    let t = w16(h[i * r + k]) as f64 * w16(b16(s * b[o * r + k])) as f64;
                    sum += t;
                    abs += t.abs();
                }
                let tol = (kw as f64 + 2.0) * u * abs + 2.0 * u * sum.abs();
                let g = y[i * outf + o] as f64;
                assert!((g - sum).abs() <= tol, "folded product n={n} in={inf} r={r}: y[{i}, {o}] = {g} vs {sum} (bound {tol:.3e})");
            }
        }
    }
    // Refusals: a wide operand whose rows do not fit, a block past the row,
    // columns that do not fit the destination.
    let buf = dev.alloc_filled::<u16>(4 * 40, 0).unwrap();
    assert_eq!(MatRef::bf16_ld(dev, &buf.as_view(), 4, 48, 40).unwrap_err().kind, lora::ErrorKind::InvalidShape);
    assert_eq!(MatRef::bf16_ld(dev, &buf.as_view(), 5, 32, 40).unwrap_err().kind, lora::ErrorKind::BufferSize);
    let bsmall = dev.alloc_filled::<f32>(4 * 8, 0).unwrap();
    let mut wb = dev.alloc_filled::<u16>(4 * 40, 0).unwrap();
    assert!(glora::fold_tail_bf16(dev, &bsmall.as_view(), 4, 8, 1.0, 32, 4, &mut wb.as_view_mut(), 40).is_err());
    let src = dev.alloc_filled::<u16>(4 * 8, 0).unwrap();
    assert!(ew::copy_cols_bf16(dev, &src.as_view(), 4, 8, &mut wb.as_view_mut(), 40, 33).is_err());
}

/// The kernels that write the lean step's stacked input-gradient operand
/// `[dq | dk | dv | g…]` and weight rows `[…; s·A]`: RoPE's backward into
/// a block of wide rows (the bits of `rope_bf16` with `backward`), the fp32
/// → bf16 conversion into a block (the bits of `to_bf16`), each leaving the
/// other columns as they were; `bf16(s·A)` rows with zero padding;
/// SwiGLU's product written wide (the folded down projection's input) and
/// its kernels on gate and up side by side in one wide buffer; and a
/// product into a block of a wide output.
#[test]
fn stacked_gradient_operand_kernels_write_their_blocks() {
    use lora::backend::cpu::rope as crope;
    use lora::backend::cuda::{lora as glora, rope as grope};
    let Some(dev) = gpu("stacked_gradient_operand_kernels_write_their_blocks") else { return };
    let mut rng = Rng(29);
    for &(b, t, h, d, extra, off) in &[(1usize, 3usize, 2usize, 8usize, 0usize, 0usize), (2, 5, 3, 16, 40, 24), (1, 9, 4, 64, 8, 8)] {
        let (tokens, w) = (b * t, h * d);
        let ld = w + extra + off;
        let table = crope::RopeTable::new(&crope::rope_inv_freq(d, 10000.0), 3, t);
        let gt = grope::CudaRopeTable::upload(dev, &table).unwrap();
        let x = vecr(&mut rng, tokens * w);
        let xd = dev.upload(&x).unwrap();
        let mut want = dev.alloc_filled::<u16>(tokens * w, 0xFF).unwrap();
        grope::rope_bf16(dev, &xd.as_view(), None, &mut want.as_view_mut(), b, t, h, d, &gt, true).unwrap();
        let want = dev.download(&want).unwrap();
        let mut wide = dev.alloc_filled::<u16>(tokens * ld, 0xFF).unwrap();
        grope::rope_bf16_into(dev, &xd.as_view(), None, &mut wide.as_view_mut(), ld, off, b, t, h, d, &gt, true).unwrap();
        let got = dev.download(&wide).unwrap();
        let mut conv = dev.alloc_filled::<u16>(tokens * ld, 0xFF).unwrap();
        ew::to_bf16_cols(dev, &xd.as_view(), tokens, w, &mut conv.as_view_mut(), ld, off).unwrap();
        let conv = dev.download(&conv).unwrap();
        for i in 0..tokens {
            for c in 0..ld {
                let inside = (off..off + w).contains(&c);
                let (wr, wc) = if inside { (want[i * w + c - off], bf16::from_f32(x[i * w + c - off]).to_bits()) } else { (0xFFFF, 0xFFFF) };
                assert_eq!(got[i * ld + c], wr, "rope into a wide block [{b}, {t}, {h}, {d}] ld {ld} off {off}: [{i}, {c}]");
                assert_eq!(conv[i * ld + c], wc, "to_bf16_cols ld {ld} off {off}: [{i}, {c}]");
            }
        }
    }
    for &(r, inf, rows, s) in &[(1usize, 8usize, 8usize, 2.0f32), (4, 64, 8, 0.75), (16, 40, 16, 1.0)] {
        let a = vecr(&mut rng, r * inf);
        let ad = dev.upload(&a).unwrap();
        let mut out = dev.alloc_filled::<u16>(rows * inf, 0xFF).unwrap();
        glora::scaled_rows_bf16(dev, &ad.as_view(), r, inf, s, &mut out.as_view_mut(), rows).unwrap();
        let got = dev.download(&out).unwrap();
        for (i, &g) in got.iter().enumerate() {
            let want = if i / inf < r { bf16::from_f32(s * a[i]).to_bits() } else { 0 };
            assert_eq!(g, want, "scaled rows r {r} rows {rows}: element {i}");
        }
    }
    // SwiGLU's (and GeGLU's) bf16 product written wide: the bits of the
    // contiguous kernel's, then zeros.
    use lora::backend::cuda::swiglu as gswiglu;
    for act in [gswiglu::Activation::Silu, gswiglu::Activation::GeluTanh] {
        let (rows, cols, ld) = (7usize, 40usize, 56usize);
        let g: Vec<u16> = vecr(&mut rng, rows * cols).iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let u: Vec<u16> = vecr(&mut rng, rows * cols).iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let (gd, ud) = (dev.upload(&g).unwrap(), dev.upload(&u).unwrap());
        let mut want = dev.alloc_filled::<u16>(rows * cols, 0xFF).unwrap();
        gswiglu::swiglu_forward_bf16(dev, &gd.as_view(), &ud.as_view(), None, Some(&mut want.as_view_mut()), act).unwrap();
        let want = dev.download(&want).unwrap();
        let mut wide = dev.alloc_filled::<u16>(rows * ld, 0xFF).unwrap();
        gswiglu::swiglu_forward_wide_bf16(dev, &gd.as_view(), &ud.as_view(), rows, cols, cols, &mut wide.as_view_mut(), ld, act).unwrap();
        let got = dev.download(&wide).unwrap();
        for i in 0..rows {
            assert_eq!(&got[i * ld..i * ld + cols], &want[i * cols..(i + 1) * cols], "swiglu wide row {i}");
            assert!(got[i * ld + cols..(i + 1) * ld].iter().all(|&v| v == 0), "swiglu wide row {i}: tail not zeroed");
        }
        assert!(gswiglu::swiglu_forward_wide_bf16(dev, &gd.as_view(), &ud.as_view(), rows, cols, cols, &mut wide.as_view_mut(), cols - 1, act).is_err());
        // Gate and up side by side in one wide buffer (rows pld apart): the
        // product read from there, and the backward in place there, with
        // fp32 and bf16 dh, give the bits of the kernels on separate
        // buffers; the rest of each row is not touched.
        let (pld, uoff) = (2 * cols + 24, cols + 8);
        let mut pair = vec![0x7777u16; rows * pld];
        for i in 0..rows {
            pair[i * pld..i * pld + cols].copy_from_slice(&g[i * cols..(i + 1) * cols]);
            pair[i * pld + uoff..i * pld + uoff + cols].copy_from_slice(&u[i * cols..(i + 1) * cols]);
        }
        let pd = dev.upload(&pair).unwrap();
        let mut hb = dev.alloc_filled::<u16>(rows * cols, 0xFF).unwrap();
        gswiglu::swiglu_forward_wide_bf16(dev, &pd.slice(..), &pd.slice(uoff..), rows, cols, pld, &mut hb.as_view_mut(), cols, act).unwrap();
        assert_eq!(dev.download(&hb).unwrap(), want, "swiglu from gate and up side by side");
        let dh = vecr(&mut rng, rows * cols);
        let dhb: Vec<u16> = dh.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let (dhd, dhbd) = (dev.upload(&dh).unwrap(), dev.upload(&dhb).unwrap());
        for bf in [false, true] {
            let (mut g2, mut u2) = (dev.upload(&g).unwrap(), dev.upload(&u).unwrap());
            let (dhv, dhbv) = (dhd.as_view(), dhbd.as_view());
            let mk = || if bf { gswiglu::Dh::Bf16(&dhbv) } else { gswiglu::Dh::F32(&dhv) };
            gswiglu::swiglu_backward_bf16_inplace(dev, &mut g2.as_view_mut(), &mut u2.as_view_mut(), mk(), act).unwrap();
            let mut p2 = dev.upload(&pair).unwrap();
            gswiglu::swiglu_backward_pair_inplace(dev, &mut p2.as_view_mut(), rows, cols, pld, uoff, mk(), act).unwrap();
            let (g2, u2, p2) = (dev.download(&g2).unwrap(), dev.download(&u2).unwrap(), dev.download(&p2).unwrap());
            for i in 0..rows {
                assert_eq!(&p2[i * pld..i * pld + cols], &g2[i * cols..(i + 1) * cols], "swiglu pair backward (bf16 dh {bf}): gate row {i}");
                assert_eq!(&p2[i * pld + uoff..i * pld + uoff + cols], &u2[i * cols..(i + 1) * cols], "swiglu pair backward (bf16 dh {bf}): up row {i}");
                let other = p2[i * pld + cols..i * pld + uoff].iter().chain(&p2[i * pld + uoff + cols..(i + 1) * pld]);
                assert!(other.into_iter().all(|&v| v == 0x7777), "swiglu pair backward: row {i}'s other columns written");
            }
        }
        let mut p3 = dev.upload(&pair).unwrap();
        assert!(gswiglu::swiglu_backward_pair_inplace(dev, &mut p3.as_view_mut(), rows, cols, 2 * cols - 1, cols, gswiglu::Dh::F32(&dhd.as_view()), act).is_err());
        assert!(gswiglu::swiglu_backward_pair_inplace(dev, &mut p3.as_view_mut(), rows, cols, pld, cols - 1, gswiglu::Dh::F32(&dhd.as_view()), act).is_err());
    }
    // A product into a block of a wide output (gemm_ld): the values of the
    // contiguous product, the rest of each row untouched.
    {
        use lora::backend::cuda::blas::gemm_ld;
        let blas = Blas::new(dev).unwrap();
        let (m, n, k, ldc, off) = (9usize, 12usize, 40usize, 30usize, 5usize);
        let a: Vec<u16> = vecr(&mut rng, m * k).iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let b: Vec<u16> = vecr(&mut rng, n * k).iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let (ad, bd) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
        let (av, bv) = (ad.as_view(), bd.as_view());
        let mut c = dev.alloc_filled::<u16>(m * n, 0xFF).unwrap();
        gemm(dev, &blas, MatRef::bf16(dev, &av, m, k).unwrap(), false, MatRef::bf16(dev, &bv, n, k).unwrap(), true, &mut c.as_view_mut(), 1.0, 0.0).unwrap();
        let want = dev.download(&c).unwrap();
        let mut wide = dev.alloc_filled::<u16>(m * ldc, 0x55).unwrap();
        gemm_ld(dev, &blas, MatRef::bf16(dev, &av, m, k).unwrap(), false, MatRef::bf16(dev, &bv, n, k).unwrap(), true, &mut wide.slice_mut(off..), ldc, 1.0, 0.0).unwrap();
        let got = dev.download(&wide).unwrap();
        for i in 0..m {
            for j in 0..ldc {
                if (off..off + n).contains(&j) {
                    // The same sums; on a GPU cuBLAS may pick another kernel
                    // for another ldc, so within a bf16 rounding.
                    let (gv, wv) = (bf16::from_bits(got[i * ldc + j]).to_f32(), bf16::from_bits(want[i * n + j - off]).to_f32());
                    assert!((gv - wv).abs() <= wv.abs() * 2f32.powi(-7) + 1e-6, "gemm_ld [{i}, {j}]: {gv} vs {wv}");
                } else {
                    assert_eq!(got[i * ldc + j], 0x5555, "gemm_ld wrote [{i}, {j}] outside its block");
                }
            }
        }
        let mut small = dev.alloc_filled::<u16>(m * ldc - off - 1, 0).unwrap();
        assert!(gemm_ld(dev, &blas, MatRef::bf16(dev, &av, m, k).unwrap(), false, MatRef::bf16(dev, &bv, n, k).unwrap(), true, &mut small.as_view_mut(), ldc, 1.0, 0.0).is_ok());
        let mut tiny = dev.alloc_filled::<u16>((m - 1) * ldc + n - 1, 0).unwrap();
        assert!(gemm_ld(dev, &blas, MatRef::bf16(dev, &av, m, k).unwrap(), false, MatRef::bf16(dev, &bv, n, k).unwrap(), true, &mut tiny.as_view_mut(), ldc, 1.0, 0.0).is_err());
    }
    // Refusals: a block past the row, padding rows fewer than the rank.
    let table = crope::RopeTable::new(&crope::rope_inv_freq(8, 10000.0), 0, 2);
    let gt = grope::CudaRopeTable::upload(dev, &table).unwrap();
    let x = dev.alloc_filled::<f32>(2 * 16, 0).unwrap();
    let mut y = dev.alloc_filled::<u16>(2 * 20, 0).unwrap();
    assert!(grope::rope_bf16_into(dev, &x.as_view(), None, &mut y.as_view_mut(), 20, 8, 1, 2, 2, 8, &gt, true).is_err());
    assert!(ew::to_bf16_cols(dev, &x.as_view(), 2, 16, &mut y.as_view_mut(), 20, 5).is_err());
    let a = dev.alloc_filled::<f32>(4 * 8, 0).unwrap();
    let mut o = dev.alloc_filled::<u16>(2 * 8, 0).unwrap();
    assert!(glora::scaled_rows_bf16(dev, &a.as_view(), 4, 8, 1.0, &mut o.as_view_mut(), 2).is_err());
}
