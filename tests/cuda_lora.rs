//! The LoRA product kernels (`cuda::lora`) against the CPU's computation
//! (`gemm_f32`, as `LoraLayer::forward_at` / `backward` call it), on a GPU:
//! - shrink `h = x·Aᵀ` within `dot_tol(in, Σ|x·A|)`; expand `y += s·h·Bᵀ`
//!   (from the CPU's h) within `accum_tol(r, s, Σ|h·B|, y0)`; the fused
//!   forward within that plus the propagated h bound `|s|·Σ_j tol_h·|B|`;
//! - the mixed-adapter batch (BGMV) with ranks 1, 16, 64, rows of −1 and an
//!   out-of-table index (both untouched, bit for bit), within the fused
//!   forward's bound per row;
//! - backward: `g = dy·B` within `dot_tol(out, ·)`, `dB`, `dA`, `dx` (from
//!   the CPU's h and g) within `accum_tol(k, s, ·, d0)`; the fused
//!   `backward` within those plus the propagated h/g bounds.
//!
//! Random seeded inputs, odd shapes (n not a multiple of the block size, r
//! in {1, 8, 16, 64}, in/out 192 and 4096+3), every written output poisoned
//! (0xFF: NaN) first. Without a GPU each test prints why it skips and
//! passes, unless `LORA_REQUIRE_GPU=1`.

use lora::backend::cpu::matmul::{gemm_f32, Mat};
use lora::backend::cuda::lora as glora;
use lora::backend::cuda::CudaDevice;

#[path = "common/gpu.rs"]
mod harness;
use harness::{gpu, Rng};

/// `op(a)[m×k]·op(b)[k×n]` into a fresh `[m, n]`.
#[allow(clippy::too_many_arguments)]
fn mm(a: Mat<'_>, b: Mat<'_>, m: usize, n: usize, k: usize, alpha: f32) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    gemm_f32(&mut c, n, a, b, m, n, k, alpha, false, true);
    c
}

fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

/// Asserts `|got − want| ≤ tol[i]` (NaN fails); returns how many were bit-exact.
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

/// Abs sums computed in f32 are a hair low; this covers it.
const SLACK: f64 = 1.001;

fn poisoned(dev: &CudaDevice, n: usize) -> cudarc::driver::CudaSlice<f32> {
    dev.alloc_filled::<f32>(n, 0xFF).unwrap()
}

const SHAPES: &[(usize, usize, usize)] = &[(37, 192, 4099), (261, 4099, 192), (1, 192, 192)];
const RANKS: &[usize] = &[1, 8, 16, 64];

#[test]
fn shrink_expand_and_forward_match_the_cpu() {
    let Some(dev) = gpu("shrink_expand_and_forward_match_the_cpu") else { return };
    let mut rng = Rng(61);
    for &(n, in_f, out_f) in SHAPES {
        for &r in RANKS {
            let s = (rng.unit() * 4.0 - 2.0) as f32;
            let x = rng.vec(n * in_f, 1.0);
            let a = rng.vec(r * in_f, 1.0 / (in_f as f64).sqrt());
            let b = rng.vec(out_f * r, 0.1);
            let y0 = rng.vec(n * out_f, 1.0);
            // CPU, as LoraLayer::forward_at.
            let h = mm(Mat::n(&x, in_f), Mat::t(&a, in_f), n, r, in_f, 1.0);
            let mut y = y0.clone();
            gemm_f32(&mut y, out_f, Mat::n(&h, r), Mat::t(&b, r), n, out_f, r, s, true, true);
            // Bounds.
            let (xa, aa, ba) = (abs(&x), abs(&a), abs(&b));
            let sh = mm(Mat::n(&xa, in_f), Mat::t(&aa, in_f), n, r, in_f, 1.0);
            let tol_h: Vec<f32> = sh.iter().map(|&v| (SLACK * glora::dot_tol(in_f, v as f64)) as f32).collect();
            let shb = mm(Mat::n(&abs(&h), r), Mat::t(&ba, r), n, out_f, r, 1.0);
            let prop = mm(Mat::n(&tol_h, r), Mat::t(&ba, r), n, out_f, r, s.abs());
            let tol_y = |i: usize| SLACK * glora::accum_tol(r, s, shb[i] as f64, y0[i]);

            let (xd, ad, bd) = (dev.upload(&x).unwrap(), dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
            let mut hd = poisoned(dev, n * r);
            glora::shrink(dev, &xd.as_view(), &ad.as_view(), n, in_f, r, &mut hd.as_view_mut()).unwrap();
            let eh = check_close("h", &dev.download(&hd).unwrap(), &h, |i| tol_h[i] as f64);

            let hc = dev.upload(&h).unwrap();
            let mut yd = dev.upload(&y0).unwrap();
            glora::expand(dev, &hc.as_view(), &bd.as_view(), n, r, out_f, s, &mut yd.as_view_mut()).unwrap();
            let ey = check_close("y (expand)", &dev.download(&yd).unwrap(), &y, tol_y);

            let mut yf = dev.upload(&y0).unwrap();
            glora::forward(dev, &xd.as_view(), &ad.as_view(), &bd.as_view(), n, in_f, out_f, r, s, &mut yf.as_view_mut()).unwrap();
            let ef = check_close("y (forward)", &dev.download(&yf).unwrap(), &y, |i| tol_y(i) + SLACK * prop[i] as f64);
            eprintln!("lora fwd n={n} in={in_f} out={out_f} r={r}: bit-exact h {eh}/{}, y {ey}/{m}, fused y {ef}/{m}", n * r, m = n * out_f);
        }
    }
    // Shape checks.
    let xd = dev.upload(&[1f32; 6]).unwrap();
    let ad = dev.upload(&[1f32; 6]).unwrap();
    // h of 3 elements where n·r = 2·2 = 4 are needed.
    let mut hd = poisoned(dev, 3);
    let e = glora::shrink(dev, &xd.as_view(), &ad.as_view(), 2, 3, 2, &mut hd.as_view_mut()).unwrap_err();
    assert_eq!(e.kind, lora::ErrorKind::BufferSize, "{e}");
    let e = glora::shrink(dev, &xd.as_view(), &ad.as_view(), 2, 3, 0, &mut hd.as_view_mut()).unwrap_err();
    assert_eq!(e.kind, lora::ErrorKind::InvalidShape, "{e}");
}

#[test]
fn bgmv_mixed_batch_matches_the_cpu() {
    let Some(dev) = gpu("bgmv_mixed_batch_matches_the_cpu") else { return };
    let mut rng = Rng(62);
    for &(n, in_f, out_f) in SHAPES {
        let ranks = [16usize, 1, 64, 8];
        let scales: Vec<f32> = ranks.iter().map(|_| (rng.unit() * 4.0 - 2.0) as f32).collect();
        let a_s: Vec<Vec<f32>> = ranks.iter().map(|&r| rng.vec(r * in_f, 1.0 / (in_f as f64).sqrt())).collect();
        let b_s: Vec<Vec<f32>> = ranks.iter().map(|&r| rng.vec(out_f * r, 0.1)).collect();
        let x = rng.vec(n * in_f, 1.0);
        let y0 = rng.vec(n * out_f, 1.0);
        // Row adapters: −1, each adapter, and 7 (outside the table).
        let idx: Vec<i32> = (0..n).map(|i| if i == 0 && n > 1 { -1 } else { [-1, 0, 1, 2, 3, 7][rng.below(6)] }).collect();
        // CPU, as forward_at's mixed path: per row group, u = h·Bᵀ, y += s·u.
        let mut y = y0.clone();
        let mut tol = vec![0f64; n * out_f];
        for (k, &r) in ranks.iter().enumerate() {
            let rows: Vec<usize> = (0..n).filter(|&i| idx[i] == k as i32).collect();
            if rows.is_empty() {
                continue;
            }
            let m = rows.len();
            let xg: Vec<f32> = rows.iter().flat_map(|&i| x[i * in_f..(i + 1) * in_f].iter().copied()).collect();
            let h = mm(Mat::n(&xg, in_f), Mat::t(&a_s[k], in_f), m, r, in_f, 1.0);
            let u = mm(Mat::n(&h, r), Mat::t(&b_s[k], r), m, out_f, r, 1.0);
            let ba = abs(&b_s[k]);
            let sh = mm(Mat::n(&abs(&xg), in_f), Mat::t(&abs(&a_s[k]), in_f), m, r, in_f, 1.0);
            let tol_h: Vec<f32> = sh.iter().map(|&v| (SLACK * glora::dot_tol(in_f, v as f64)) as f32).collect();
            let shb = mm(Mat::n(&abs(&h), r), Mat::t(&ba, r), m, out_f, r, 1.0);
            let prop = mm(Mat::n(&tol_h, r), Mat::t(&ba, r), m, out_f, r, scales[k].abs());
            for (j, &i) in rows.iter().enumerate() {
                for o in 0..out_f {
                    let (d, v) = (i * out_f + o, j * out_f + o);
                    y[d] += scales[k] * u[v];
                    tol[d] = SLACK * (glora::accum_tol(r, scales[k], shb[v] as f64, y0[d]) + prop[v] as f64);
                }
            }
        }
        let xd = dev.upload(&x).unwrap();
        let idxd = dev.upload(&idx).unwrap();
        let ad: Vec<_> = a_s.iter().map(|v| dev.upload(v).unwrap()).collect();
        let bd: Vec<_> = b_s.iter().map(|v| dev.upload(v).unwrap()).collect();
        let adapters: Vec<glora::BgmvAdapter<'_>> = (0..ranks.len())
            .map(|k| glora::BgmvAdapter { a: ad[k].as_view(), b: bd[k].as_view(), rank: ranks[k], scale: scales[k] })
            .collect();
        let mut yd = dev.upload(&y0).unwrap();
        glora::bgmv(dev, &xd.as_view(), &idxd.as_view(), &adapters, n, in_f, out_f, &mut yd.as_view_mut()).unwrap();
        let got = dev.download(&yd).unwrap();
        for i in 0..n {
            if !(0..ranks.len() as i32).contains(&idx[i]) {
                assert!(got[i * out_f..(i + 1) * out_f].iter().zip(&y0[i * out_f..(i + 1) * out_f]).all(|(a, b)| a.to_bits() == b.to_bits()), "row {i} (adapter {}) was modified", idx[i]);
            }
        }
        let e = check_close("y (bgmv)", &got, &y, |i| tol[i]);
        let none = idx.iter().filter(|&&a| !(0..ranks.len() as i32).contains(&a)).count();
        eprintln!("lora bgmv n={n} in={in_f} out={out_f}: {none} rows without adapter, bit-exact y {e}/{}", n * out_f);
    }
}

#[test]
fn backward_matches_the_cpu() {
    let Some(dev) = gpu("backward_matches_the_cpu") else { return };
    let mut rng = Rng(63);
    for &(n, in_f, out_f) in SHAPES {
        for &r in RANKS {
            let s = (rng.unit() * 4.0 - 2.0) as f32;
            let x = rng.vec(n * in_f, 1.0);
            let dy = rng.vec(n * out_f, 0.1);
            let a = rng.vec(r * in_f, 1.0 / (in_f as f64).sqrt());
            let b = rng.vec(out_f * r, 0.1);
            let (da0, db0, dx0) = (rng.vec(r * in_f, 0.01), rng.vec(out_f * r, 0.01), rng.vec(n * in_f, 1.0));
            // CPU, as LoraLayer::backward (no dropout).
            let h = mm(Mat::n(&x, in_f), Mat::t(&a, in_f), n, r, in_f, 1.0);
            let g = mm(Mat::n(&dy, out_f), Mat::n(&b, r), n, r, out_f, 1.0);
            let gdx = mm(Mat::n(&g, r), Mat::n(&a, in_f), n, in_f, r, 1.0);
            let mut db = db0.clone();
            gemm_f32(&mut db, r, Mat::t(&dy, out_f), Mat::n(&h, r), out_f, r, n, s, true, true);
            let mut da = da0.clone();
            gemm_f32(&mut da, in_f, Mat::t(&g, r), Mat::n(&x, in_f), r, in_f, n, s, true, true);
            let dx: Vec<f32> = dx0.iter().zip(&gdx).map(|(o, v)| o + s * v).collect();
            // Bounds: sums of |terms|, and the h/g bounds propagated.
            let (xa, dya, aa, ba) = (abs(&x), abs(&dy), abs(&a), abs(&b));
            let tol_h: Vec<f32> = mm(Mat::n(&xa, in_f), Mat::t(&aa, in_f), n, r, in_f, 1.0).iter().map(|&v| (SLACK * glora::dot_tol(in_f, v as f64)) as f32).collect();
            let sg = mm(Mat::n(&dya, out_f), Mat::n(&ba, r), n, r, out_f, 1.0);
            let tol_g: Vec<f32> = sg.iter().map(|&v| (SLACK * glora::dot_tol(out_f, v as f64)) as f32).collect();
            let (ha, ga) = (abs(&h), abs(&g));
            let sdb = mm(Mat::t(&dya, out_f), Mat::n(&ha, r), out_f, r, n, 1.0);
            let pdb = mm(Mat::t(&dya, out_f), Mat::n(&tol_h, r), out_f, r, n, s.abs());
            let sda = mm(Mat::t(&ga, r), Mat::n(&xa, in_f), r, in_f, n, 1.0);
            let pda = mm(Mat::t(&tol_g, r), Mat::n(&xa, in_f), r, in_f, n, s.abs());
            let sdx = mm(Mat::n(&ga, r), Mat::n(&aa, in_f), n, in_f, r, 1.0);
            let pdx = mm(Mat::n(&tol_g, r), Mat::n(&aa, in_f), n, in_f, r, s.abs());
            let tol_db = |i: usize| SLACK * glora::accum_tol(n, s, sdb[i] as f64, db0[i]);
            let tol_da = |i: usize| SLACK * glora::accum_tol(n, s, sda[i] as f64, da0[i]);
            let tol_dx = |i: usize| SLACK * glora::accum_tol(r, s, sdx[i] as f64, dx0[i]);

            let up = |v: &Vec<f32>| dev.upload(v).unwrap();
            let (xd, dyd, ad, bd, hc, gc) = (up(&x), up(&dy), up(&a), up(&b), up(&h), up(&g));
            // Each kernel alone, from the CPU's h and g.
            let mut gd = poisoned(dev, n * r);
            glora::bwd_g(dev, &dyd.as_view(), &bd.as_view(), n, out_f, r, &mut gd.as_view_mut()).unwrap();
            let eg = check_close("g", &dev.download(&gd).unwrap(), &g, |i| tol_g[i] as f64);
            let mut dbd = up(&db0);
            glora::grad_b(dev, &dyd.as_view(), &hc.as_view(), n, out_f, r, s, &mut dbd.as_view_mut()).unwrap();
            let edb = check_close("dB", &dev.download(&dbd).unwrap(), &db, tol_db);
            let mut dad = up(&da0);
            glora::grad_a(dev, &gc.as_view(), &xd.as_view(), n, r, in_f, s, &mut dad.as_view_mut()).unwrap();
            let eda = check_close("dA", &dev.download(&dad).unwrap(), &da, tol_da);
            let mut dxd = up(&dx0);
            glora::bwd_dx(dev, &gc.as_view(), &ad.as_view(), n, r, in_f, s, &mut dxd.as_view_mut()).unwrap();
            let edx = check_close("dx", &dev.download(&dxd).unwrap(), &dx, tol_dx);
            // The fused backward.
            let (mut dad, mut dbd, mut dxd) = (up(&da0), up(&db0), up(&dx0));
            glora::backward(
                dev,
                &xd.as_view(),
                &dyd.as_view(),
                &ad.as_view(),
                &bd.as_view(),
                n,
                in_f,
                out_f,
                r,
                s,
                &mut dad.as_view_mut(),
                &mut dbd.as_view_mut(),
                Some(&mut dxd.as_view_mut()),
            )
            .unwrap();
            check_close("dB (fused)", &dev.download(&dbd).unwrap(), &db, |i| tol_db(i) + SLACK * pdb[i] as f64);
            check_close("dA (fused)", &dev.download(&dad).unwrap(), &da, |i| tol_da(i) + SLACK * pda[i] as f64);
            check_close("dx (fused)", &dev.download(&dxd).unwrap(), &dx, |i| tol_dx(i) + SLACK * pdx[i] as f64);
            eprintln!(
                "lora bwd n={n} in={in_f} out={out_f} r={r}: bit-exact g {eg}/{}, dB {edb}/{}, dA {eda}/{}, dx {edx}/{}",
                n * r,
                out_f * r,
                r * in_f,
                n * in_f
            );
        }
    }
}

// ------------------------------------------------------- CPU emulation
//
// The LoRA kernels compiled for the host (tests/common/emu.rs), launched
// with the launchers' grids, against f64 products: shrink, expand into a
// base output, the backward's g, dx, dA, dB, and the mixed-adapter BGMV
// (rows without an adapter untouched), within the bounds of the GPU tests
// above (`dot_tol`, `accum_tol` times SLACK).

use harness::emu;

const EMU_ENTRY: &str = r#"
extern "C" {
void emu_lora_fwd(u32 n, u32 in_f, u32 r, u32 out_f, float s, const float* x, const float* A, const float* B, float* h, float* y) {
    emu_launch(n, LORA_THREADS, [&] { lora_shrink_f32(x, A, n, in_f, r, h); });
    emu_launch3(dim3{n, (out_f + LORA_THREADS - 1) / LORA_THREADS, 1}, LORA_THREADS, [&] { lora_expand_f32(h, B, n, r, out_f, s, y); });
}
void emu_lora_bwd(u32 n, u32 in_f, u32 r, u32 out_f, float s, const float* x, const float* dy, const float* A, const float* B, const float* h,
                  float* g, float* dx, float* dA, float* dB, unsigned ga, unsigned gb) {
    emu_launch(n, LORA_THREADS, [&] { lora_bwd_g_f32(dy, B, n, out_f, r, g); });
    emu_launch3(dim3{n, (in_f + LORA_THREADS - 1) / LORA_THREADS, 1}, LORA_THREADS, [&] { lora_bwd_dx_f32(g, A, n, r, in_f, s, dx); });
    emu_launch(gb, LORA_THREADS, [&] { lora_bwd_outer_f32(dy, out_f, h, r, n, out_f, r, s, dB); });
    emu_launch(ga, LORA_THREADS, [&] { lora_bwd_outer_f32(g, r, x, in_f, n, r, in_f, s, dA); });
}
void emu_lora_dropout(u64 n, u64 seed, u64 call, float p, float scale, float s, const float* x, float* out, const float* v, float* dx, unsigned grid) {
    emu_launch(grid, LORA_THREADS, [&] { lora_dropout_f32(x, n, seed, call, p, scale, out); });
    emu_launch(grid, LORA_THREADS, [&] { lora_dropout_accum_f32(v, n, seed, call, p, scale, s, dx); });
}
void emu_lora_bgmv(u32 n, u32 in_f, u32 out_f, u32 count, const float* x, const int* idx, const u64* A, const u64* B, const u32* ranks, const float* scales,
                   u32 r_max, float* h, float* y) {
    emu_launch(n, LORA_THREADS, [&] { lora_bgmv_shrink_f32(x, idx, A, ranks, count, n, in_f, r_max, h); });
    emu_launch3(dim3{n, (out_f + LORA_THREADS - 1) / LORA_THREADS, 1}, LORA_THREADS, [&] { lora_bgmv_expand_f32(h, idx, B, ranks, scales, count, n, r_max, out_f, y); });
}
}
"#;

type EmuFwd = unsafe extern "C" fn(u32, u32, u32, u32, f32, *const f32, *const f32, *const f32, *mut f32, *mut f32);
type EmuBwd = unsafe extern "C" fn(u32, u32, u32, u32, f32, *const f32, *const f32, *const f32, *const f32, *const f32, *mut f32, *mut f32, *mut f32, *mut f32, u32, u32);
type EmuDropout = unsafe extern "C" fn(u64, u64, u64, f32, f32, f32, *const f32, *mut f32, *const f32, *mut f32, u32);
type EmuBgmv = unsafe extern "C" fn(u32, u32, u32, u32, *const f32, *const i32, *const u64, *const u64, *const u32, *const f32, u32, *mut f32, *mut f32);

#[test]
fn emulated_kernels_match_the_cpu() {
    let lib = match emu::build("lora", &["lora.cu"], &[], "", EMU_ENTRY) {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIPPED emulated_kernels_match_the_cpu: kernel emulation unavailable: {why}");
            return;
        }
    };
    // SAFETY: entry points built just above with these signatures.
    let (fwd, bwd, bgmv): (EmuFwd, EmuBwd, EmuBgmv) = unsafe { (*lib.get(b"emu_lora_fwd").unwrap(), *lib.get(b"emu_lora_bwd").unwrap(), *lib.get(b"emu_lora_bgmv").unwrap()) };
    let mut rng = Rng(81);
    let grid = |p: usize| (p.div_ceil(256)).clamp(1, 1 << 16) as u32;
    for &(n, in_f, out_f, r) in &[(1usize, 3usize, 5usize, 1usize), (7, 300, 70, 8), (3, 64, 600, 16)] {
        let s = 0.5f32;
        let (x, a, b, y0, dy) = (rng.vec(n * in_f, 1.0), rng.vec(r * in_f, 0.3), rng.vec(out_f * r, 0.3), rng.vec(n * out_f, 1.0), rng.vec(n * out_f, 1.0));
        // f64 references.
        let h: Vec<f32> = (0..n * r).map(|e| (0..in_f).map(|k| x[e / r * in_f + k] as f64 * a[e % r * in_f + k] as f64).sum::<f64>() as f32).collect();
        let y: Vec<f64> = (0..n * out_f).map(|e| y0[e] as f64 + s as f64 * (0..r).map(|k| h[e / out_f * r + k] as f64 * b[e % out_f * r + k] as f64).sum::<f64>()).collect();
        let (mut gh, mut gy) = (vec![f32::NAN; n * r], y0.clone());
        // SAFETY: buffers as the kernels index them.
        unsafe { fwd(n as u32, in_f as u32, r as u32, out_f as u32, s, x.as_ptr(), a.as_ptr(), b.as_ptr(), gh.as_mut_ptr(), gy.as_mut_ptr()) };
        for e in 0..n * r {
            let sa: f64 = (0..in_f).map(|k| (x[e / r * in_f + k] as f64 * a[e % r * in_f + k] as f64).abs()).sum();
            assert!((gh[e] as f64 - h[e] as f64).abs() <= SLACK * glora::dot_tol(in_f, sa) + 1e-30, "emulated shrink h[{e}] {} vs {}", gh[e], h[e]);
        }
        for e in 0..n * out_f {
            let sa: f64 = (0..r).map(|k| (h[e / out_f * r + k] as f64 * b[e % out_f * r + k] as f64).abs()).sum();
            assert!((gy[e] as f64 - y[e]).abs() <= SLACK * glora::accum_tol(r, s, sa, y0[e]) + 1e-6 * sa, "emulated expand y[{e}] {} vs {}", gy[e], y[e]);
        }
        // Backward from the emulated h.
        let g: Vec<f64> = (0..n * r).map(|e| (0..out_f).map(|k| dy[e / r * out_f + k] as f64 * b[k * r + e % r] as f64).sum()).collect();
        let (mut gg, mut gdx, mut gda, mut gdb) = (vec![f32::NAN; n * r], vec![0f32; n * in_f], vec![0f32; r * in_f], vec![0f32; out_f * r]);
        // SAFETY: as above; dx, dA, dB accumulate into zeros.
        unsafe {
            bwd(n as u32, in_f as u32, r as u32, out_f as u32, s, x.as_ptr(), dy.as_ptr(), a.as_ptr(), b.as_ptr(), gh.as_ptr(), gg.as_mut_ptr(), gdx.as_mut_ptr(), gda.as_mut_ptr(), gdb.as_mut_ptr(), grid(r * in_f), grid(out_f * r))
        };
        let rel = |got: &[f32], want: &[f64]| -> f64 {
            let num: f64 = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
            let den: f64 = want.iter().map(|b| b * b).sum();
            (num / den.max(1e-300)).sqrt()
        };
        let dx: Vec<f64> = (0..n * in_f).map(|e| s as f64 * (0..r).map(|k| gg[e / in_f * r + k] as f64 * a[k * in_f + e % in_f] as f64).sum::<f64>()).collect();
        let da: Vec<f64> = (0..r * in_f).map(|e| s as f64 * (0..n).map(|i| gg[i * r + e / in_f] as f64 * x[i * in_f + e % in_f] as f64).sum::<f64>()).collect();
        let db: Vec<f64> = (0..out_f * r).map(|e| s as f64 * (0..n).map(|i| dy[i * out_f + e / r] as f64 * gh[i * r + e % r] as f64).sum::<f64>()).collect();
        for (what, got, want) in [("g", &gg[..], &g[..]), ("dx", &gdx[..], &dx[..]), ("dA", &gda[..], &da[..]), ("dB", &gdb[..], &db[..])] {
            let e = rel(got, want);
            assert!(e <= 1e-6, "emulated lora backward {what} (n {n}, in {in_f}, out {out_f}, r {r}): relative error {e:e}");
        }
    }
    // Mixed batch: two adapters of ranks 4 and 7, rows with −1 untouched.
    let (n, in_f, out_f) = (6usize, 50usize, 300usize);
    let ranks = [4u32, 7];
    let scales = [0.5f32, 2.0];
    let x = rng.vec(n * in_f, 1.0);
    let ad: Vec<(Vec<f32>, Vec<f32>)> = ranks.iter().map(|&r| (rng.vec(r as usize * in_f, 0.3), rng.vec(out_f * r as usize, 0.3))).collect();
    let idx = [0i32, -1, 1, 1, 0, -1];
    let y0 = rng.vec(n * out_f, 1.0);
    let (pa, pb): (Vec<u64>, Vec<u64>) = ad.iter().map(|(a, b)| (a.as_ptr() as u64, b.as_ptr() as u64)).unzip();
    let r_max = 7u32;
    let (mut h, mut y) = (vec![f32::NAN; n * r_max as usize], y0.clone());
    // SAFETY: host pointers stand in for the device pointer tables; every
    // buffer outlives the call.
    unsafe { bgmv(n as u32, in_f as u32, out_f as u32, 2, x.as_ptr(), idx.as_ptr(), pa.as_ptr(), pb.as_ptr(), ranks.as_ptr(), scales.as_ptr(), r_max, h.as_mut_ptr(), y.as_mut_ptr()) };
    for i in 0..n {
        for o in 0..out_f {
            let e = i * out_f + o;
            if idx[i] < 0 {
                assert_eq!(y[e].to_bits(), y0[e].to_bits(), "row {i} without an adapter was written");
                continue;
            }
            let (a, b) = &ad[idx[i] as usize];
            let r = ranks[idx[i] as usize] as usize;
            let want: f64 = y0[e] as f64
                + scales[idx[i] as usize] as f64
                    * (0..r).map(|k| (0..in_f).map(|c| x[i * in_f + c] as f64 * a[k * in_f + c] as f64).sum::<f64>() * b[o * r + k] as f64).sum::<f64>();
            assert!((y[e] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "emulated bgmv y[{i}, {o}] {} vs {want}", y[e]);
        }
    }
}

/// The CPU's dropout (LoraLayer::adapter_input and the dx update of
/// LoraLayer::backward) for `n` elements of call `call`.
fn cpu_dropout(x: &[f32], v: &[f32], dx0: &[f32], seed: u64, call: u64, p: f32, s: f32) -> (Vec<f32>, Vec<f32>) {
    let keep = glora::dropout_scale(p);
    let out = x.iter().enumerate().map(|(i, &xv)| if lora::rng::dropout_keep(seed, call, i as u64, p) { xv * keep } else { 0.0 }).collect();
    let dx = dx0
        .iter()
        .zip(v)
        .enumerate()
        .map(|(i, (&d, &vv))| {
            let m = if lora::rng::dropout_keep(seed, call, i as u64, p) { keep } else { 0.0 };
            d + s * m * vv
        })
        .collect();
    (out, dx)
}

const DROPOUT_CASES: &[(usize, u64, u64, f32)] = &[(1, 7, 1, 0.1), (1000, 0x5eed, 3, 0.05), (70_001, u64::MAX - 3, 1 << 40, 0.5), (4096, 11, 2, 0.0)];

/// The dropout kernels draw the CPU's mask and give its bits: the
/// adapter input and the dx update, for several seeds, calls and rates.
#[test]
fn emulated_dropout_is_the_cpus_bit_for_bit() {
    let lib = match emu::build("lora", &["lora.cu"], &[], "", EMU_ENTRY) {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIPPED emulated_dropout_is_the_cpus_bit_for_bit: kernel emulation unavailable: {why}");
            return;
        }
    };
    // SAFETY: entry point built just above with this signature.
    let drop: EmuDropout = unsafe { *lib.get(b"emu_lora_dropout").unwrap() };
    let mut rng = Rng(91);
    for &(n, seed, call, p) in DROPOUT_CASES {
        let (x, v, dx0) = (rng.vec(n, 1.0), rng.vec(n, 1.0), rng.vec(n, 1.0));
        let s = 0.75f32;
        let (want_out, want_dx) = cpu_dropout(&x, &v, &dx0, seed, call, p, s);
        let (mut out, mut dx) = (vec![f32::NAN; n], dx0.clone());
        let grid = (n.div_ceil(256)).clamp(1, 1 << 16) as u32;
        // SAFETY: buffers of n floats each.
        unsafe { drop(n as u64, seed, call, p, glora::dropout_scale(p), s, x.as_ptr(), out.as_mut_ptr(), v.as_ptr(), dx.as_mut_ptr(), grid) };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&want_out), "emulated dropout n {n} p {p}: the adapter input differs from the CPU's");
        assert_eq!(bits(&dx), bits(&want_dx), "emulated dropout n {n} p {p}: the dx update differs from the CPU's");
        let kept = want_out.iter().filter(|&&o| o != 0.0).count() as f64 / n as f64;
        if n >= 1000 {
            assert!((kept - (1.0 - p as f64)).abs() < 0.05, "kept fraction {kept} for p {p}");
        }
    }
}

/// The same on the GPU.
#[test]
fn dropout_is_the_cpus_bit_for_bit() {
    let Some(dev) = gpu("dropout_is_the_cpus_bit_for_bit") else { return };
    let mut rng = Rng(92);
    for &(n, seed, call, p) in DROPOUT_CASES {
        let (x, v, dx0) = (rng.vec(n, 1.0), rng.vec(n, 1.0), rng.vec(n, 1.0));
        let s = 0.75f32;
        let (want_out, want_dx) = cpu_dropout(&x, &v, &dx0, seed, call, p, s);
        let (xd, vd) = (dev.upload(&x).unwrap(), dev.upload(&v).unwrap());
        let mut out = poisoned(dev, n);
        let mut dx = dev.upload(&dx0).unwrap();
        glora::dropout(dev, &xd.as_view(), seed, call, p, &mut out.as_view_mut()).unwrap();
        glora::dropout_accum(dev, &vd.as_view(), seed, call, p, s, &mut dx.as_view_mut()).unwrap();
        let (out, dx) = (dev.download(&out).unwrap(), dev.download(&dx).unwrap());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&want_out), "dropout n {n} p {p}: the adapter input differs from the CPU's");
        assert_eq!(bits(&dx), bits(&want_dx), "dropout n {n} p {p}: the dx update differs from the CPU's");
    }
    let x = dev.upload(&[1f32; 4]).unwrap();
    let mut o = poisoned(dev, 4);
    assert!(glora::dropout(dev, &x.as_view(), 1, 1, 1.0, &mut o.as_view_mut()).is_err(), "p = 1 accepted");
    eprintln!("dropout: {} cases bit-exact", DROPOUT_CASES.len());
}
