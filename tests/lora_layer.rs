//! LoRA layer: parity with PEFT 0.21 (fixtures from scripts/fixtures/gen_lora.py),
//! finite differences, merge/unmerge, swap drift, mixed batches, combining.

use lora::dtype::Elems;
use lora::io::{nf4_file, safetensors::StFile};
use lora::lora::{AdapterConfig, Combine, Init, LoraLayer};
use lora::quant::nf4::{Nf4Params, Nf4Tensor};
use lora::rng::SplitMix64;
use std::path::PathBuf;

/// PEFT and we both accumulate in fp32 but in different orders (PyTorch's
/// GEMM vs the `gemm` crate's). Over dot products of k ≤ 128 terms the
/// difference between two summation orders grows like √k·ε ≈ 1.3e-6 of
/// the terms' magnitude, which is a fraction of the outputs' scale; the
/// largest difference measured on these fixtures is 2.1e-7. Errors are
/// max|ours − ref| divided by max(1, max|ref|).
const FP32_REORDER_TOL: f32 = 1e-6;

fn fixtures() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    v.sort();
    assert!(v.len() >= 9);
    v
}

fn close(name: &str, what: &str, ours: &[f32], theirs: &[f32], tol: f32) {
    assert_eq!(ours.len(), theirs.len(), "{name} {what}: length");
    let scale = theirs.iter().fold(1f32, |m, v| m.max(v.abs()));
    let err = ours.iter().zip(theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    assert!(err <= tol, "{name} {what}: relative error {err:e} > {tol:e}");
}

/// Builds the fixture's layer with its adapters (all active, in order).
fn layer_from(f: &StFile) -> (LoraLayer, Vec<String>) {
    let meta = f.metadata();
    let in_f: usize = meta["in_features"].parse().unwrap();
    let out_f: usize = meta["out_features"].parse().unwrap();
    let fifo = meta["fan_in_fan_out"] == "True";
    let bias = if meta["bias"] == "True" { Some(f.read_f32("base.bias").unwrap()) } else { None };
    let mut layer = if f.contains("base.weight.quant_state.bitsandbytes__nf4") {
        LoraLayer::new_nf4(nf4_file::load(f, "base").unwrap(), bias, 1).unwrap()
    } else {
        let w = f.read_f32("base.weight").unwrap();
        LoraLayer::new_dense(Elems::F32(&w), in_f, out_f, fifo, bias, 1).unwrap()
    };
    let names: Vec<String> = meta["adapters"].split(',').map(str::to_string).collect();
    for n in &names {
        let r: usize = meta[&format!("r.{n}")].parse().unwrap();
        let alpha: f32 = meta[&format!("alpha.{n}")].parse().unwrap();
        let rs = meta[&format!("rslora.{n}")] == "True";
        let a = f.read_f32(&format!("lora_A.{n}")).unwrap();
        let b = f.read_f32(&format!("lora_B.{n}")).unwrap();
        layer.add_adapter(n, AdapterConfig { r, alpha, dropout: 0.0, use_rslora: rs, init: Init::Given { a, b } }).unwrap();
        let peft_scale: f64 = meta[&format!("scaling.{n}")].parse().unwrap();
        assert_eq!(layer.adapter(n).unwrap().scale, peft_scale as f32, "scaling of {n}");
    }
    let set: Vec<(&str, f32)> = names.iter().map(|n| (n.as_str(), 1.0)).collect();
    layer.set_active(&set).unwrap();
    (layer, names)
}

#[test]
fn peft_parity_forward_backward_merge() {
    for path in fixtures() {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let f = StFile::open(&path).unwrap();
        let (mut layer, names) = layer_from(&f);
        let x = f.read_f32("x").unwrap();
        let dy = f.read_f32("dy").unwrap();
        let n = x.len() / layer.in_features();
        let mut y = vec![f32::NAN; n * layer.out_features()];
        layer.forward(&x, n, &mut y, None, true).unwrap();
        close(&name, "y", &y, &f.read_f32("y").unwrap(), FP32_REORDER_TOL);
        let mut dx = vec![f32::NAN; x.len()];
        layer.backward(&x, &dy, n, Some(&mut dx)).unwrap();
        close(&name, "dx", &dx, &f.read_f32("dx").unwrap(), FP32_REORDER_TOL);
        for a in &names {
            let ad = layer.adapter(a).unwrap();
            close(&name, &format!("dA.{a}"), &ad.grad_a, &f.read_f32(&format!("dA.{a}")).unwrap(), FP32_REORDER_TOL);
            close(&name, &format!("dB.{a}"), &ad.grad_b, &f.read_f32(&format!("dB.{a}")).unwrap(), FP32_REORDER_TOL);
        }
        layer.zero_grad();
        // Merge: the dense merged weight (for NF4: dequantized base + delta,
        // what PEFT computes before it requantizes).
        layer.merge().unwrap();
        close(&name, "merged.weight", &layer.effective_weight(), &f.read_f32("merged.weight").unwrap(), FP32_REORDER_TOL);
        let mut ym = vec![f32::NAN; y.len()];
        layer.forward(&x, n, &mut ym, None, false).unwrap();
        close(&name, "merged forward vs unmerged", &ym, &y, FP32_REORDER_TOL);
        if f.contains("merged4.weight.quant_state.bitsandbytes__nf4") {
            // PEFT requantizes on merge; we do it only when asked, and it must
            // give bitsandbytes' NF4 of the same dense weight. Our dense merged
            // weight differs from PEFT's in the last bits, which can flip a
            // code at a decision boundary, so compare dequantized values.
            let want = nf4_file::load(&f, "merged4").unwrap();
            let rep = layer.requantize_merged(Nf4Params { blocksize: 64, double_quant: true }).unwrap();
            assert!(rep.rel_rms > 0.0 && rep.rel_rms < 0.2, "{name}: requantization error {rep:?}");
            let ours = layer.effective_weight();
            let theirs = want.dequantize_f32();
            let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
            assert!(differing * 100 <= ours.len(), "{name}: {differing} of {} requantized weights differ from PEFT's", ours.len());
            assert!(layer.active().is_empty());
        } else {
            layer.unmerge().unwrap();
            let mut yu = vec![f32::NAN; y.len()];
            layer.forward(&x, n, &mut yu, None, false).unwrap();
            assert_eq!(yu, y, "{name}: unmerge must restore the exact unmerged outputs");
        }
    }
}

fn rand_vec(rng: &mut SplitMix64, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * s).collect()
}

fn toy_layer(nf4: bool, in_f: usize, out_f: usize, seed: u64) -> LoraLayer {
    let mut rng = SplitMix64::new(seed);
    let w = rand_vec(&mut rng, in_f * out_f, 0.2);
    let bias = Some(rand_vec(&mut rng, out_f, 0.1));
    if nf4 {
        let t = Nf4Tensor::quantize(Elems::F32(&w), &[out_f, in_f], Nf4Params { blocksize: 32, double_quant: true }).unwrap();
        LoraLayer::new_nf4(t, bias, seed).unwrap()
    } else {
        LoraLayer::new_dense(Elems::F32(&w), in_f, out_f, false, bias, seed).unwrap()
    }
}

fn given(rng: &mut SplitMix64, r: usize, in_f: usize, out_f: usize, alpha: f32, rs: bool) -> AdapterConfig {
    AdapterConfig { r, alpha, dropout: 0.0, use_rslora: rs, init: Init::Given { a: rand_vec(rng, r * in_f, 0.3), b: rand_vec(rng, out_f * r, 0.3) } }
}

/// L = Σ dy ⊙ y is linear in x, in A (for fixed B) and in B (for fixed A),
/// so central differences are exact up to rounding: we evaluate L in f64
/// from the f32 outputs and compare every gradient entry.
#[test]
fn finite_differences() {
    for nf4 in [false, true] {
        let (in_f, out_f, n) = (12, 10, 5);
        let mut layer = toy_layer(nf4, in_f, out_f, 7);
        layer.set_bias_trainable(true).unwrap();
        let mut rng = SplitMix64::new(99);
        layer.add_adapter("a", given(&mut rng, 3, in_f, out_f, 6.0, false)).unwrap();
        // Rank 13 > min(in, out) = 10, as PEFT allows.
        layer.add_adapter("b", given(&mut rng, 13, in_f, out_f, 2.0, true)).unwrap();
        layer.set_active(&[("a", 1.0), ("b", 0.5)]).unwrap();
        let x = rand_vec(&mut rng, n * in_f, 1.0);
        let dy = rand_vec(&mut rng, n * out_f, 1.0);
        let loss = |l: &mut LoraLayer, x: &[f32]| -> f64 {
            let mut y = vec![0f32; n * out_f];
            l.forward(x, n, &mut y, None, false).unwrap();
            y.iter().zip(&dy).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let mut y = vec![0f32; n * out_f];
        layer.forward(&x, n, &mut y, None, false).unwrap();
        let mut dx = vec![0f32; x.len()];
        layer.backward(&x, &dy, n, Some(&mut dx)).unwrap();
        let h = 1e-2f32;
        let tol = |g: f64| 2e-3 * (1.0 + g.abs());
        for i in 0..x.len() {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let fd = (loss(&mut layer.clone(), &xp) - loss(&mut layer.clone(), &xm)) / (2.0 * h as f64);
            assert!((fd - dx[i] as f64).abs() < tol(fd), "nf4={nf4} dx[{i}]: fd {fd} vs {}", dx[i]);
        }
        for name in ["a", "b"] {
            let ad = layer.adapter(name).unwrap().clone();
            for (which, len) in [("A", ad.a.len()), ("B", ad.b.len())] {
                for i in 0..len {
                    let eval = |d: f32| {
                        let mut l = layer.clone();
                        l.zero_grad();
                        let (mut a, mut b) = (ad.a.clone(), ad.b.clone());
                        if which == "A" { a[i] += d } else { b[i] += d }
                        l.set_adapter_weights(name, &a, &b).unwrap();
                        loss(&mut l, &x)
                    };
                    let fd = (eval(h) - eval(-h)) / (2.0 * h as f64);
                    let g = if which == "A" { ad.grad_a[i] } else { ad.grad_b[i] } as f64;
                    assert!((fd - g).abs() < tol(fd), "nf4={nf4} d{which}.{name}[{i}]: fd {fd} vs {g}");
                }
            }
        }
        // Bias gradient: Σ over rows of dy.
        let gb = layer.grad_bias().unwrap();
        for o in 0..out_f {
            let want: f32 = (0..n).map(|r| dy[r * out_f + o]).sum();
            assert!((gb[o] - want).abs() < 1e-5);
        }
    }
}

#[test]
fn fresh_adapter_changes_nothing_and_counts() {
    for init in [Init::KaimingUniform, Init::Gaussian] {
        let mut layer = toy_layer(false, 16, 8, 3);
        let x: Vec<f32> = (0..4 * 16).map(|i| (i as f32).sin()).collect();
        let mut y0 = vec![0f32; 32];
        layer.forward(&x, 4, &mut y0, None, false).unwrap();
        layer.add_adapter("default", AdapterConfig { r: 4, alpha: 8.0, dropout: 0.0, use_rslora: false, init: init.clone() }).unwrap();
        let mut y1 = vec![0f32; 32];
        layer.forward(&x, 4, &mut y1, None, false).unwrap();
        assert_eq!(y0, y1);
        let a = &layer.adapter("default").unwrap().a;
        assert!(a.iter().any(|v| *v != 0.0));
        if matches!(init, Init::KaimingUniform) {
            assert!(a.iter().all(|v| v.abs() <= 0.25), "U(±1/√16)");
        }
        assert_eq!(layer.trainable_params(), 4 * 16 + 8 * 4);
        assert_eq!(layer.total_params(), 16 * 8 + 8 + 4 * 16 + 8 * 4);
    }
}

#[test]
fn swap_drift_10000_merged_swaps_is_bit_exact() {
    for nf4 in [false, true] {
        let (in_f, out_f) = (64, 48);
        let mut rng = SplitMix64::new(5);
        let c1 = given(&mut rng, 4, in_f, out_f, 8.0, false);
        let c2 = given(&mut rng, 8, in_f, out_f, 16.0, true);
        let mut layer = toy_layer(nf4, in_f, out_f, 11);
        layer.add_adapter("one", c1).unwrap();
        layer.add_adapter("two", c2.clone()).unwrap();
        layer.merge().unwrap();
        for i in 0..10_000 {
            let name = if i % 2 == 0 { "two" } else { "one" };
            layer.set_active(&[(name, 1.0)]).unwrap();
        }
        assert_eq!(layer.active(), vec![("one".to_string(), 1.0)]);
        layer.set_active(&[("two", 1.0)]).unwrap();
        let mut fresh = toy_layer(nf4, in_f, out_f, 11);
        fresh.add_adapter("two", c2).unwrap();
        fresh.merge().unwrap();
        let (a, b) = (layer.effective_weight(), fresh.effective_weight());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "nf4={nf4}: drift after 10,000 swaps");
        // And it is W0 + s·B₂·A₂.
        let w0 = fresh.base_weight_f32();
        let d = fresh.delta_weight(fresh.adapter_index("two").unwrap(), 1.0);
        assert!(a.iter().zip(w0.iter().zip(&d)).all(|(m, (w, dd))| m.to_bits() == (w + dd).to_bits()));
    }
}

#[test]
fn mixed_batch_equals_separate_runs() {
    for nf4 in [false, true] {
        let (in_f, out_f, n) = (24, 20, 9);
        let mut rng = SplitMix64::new(8);
        let mut layer = toy_layer(nf4, in_f, out_f, 13);
        for (k, r) in [3usize, 5, 2].iter().enumerate() {
            layer.add_adapter(&format!("ad{k}"), given(&mut rng, *r, in_f, out_f, 4.0, k == 1)).unwrap();
        }
        let x = rand_vec(&mut rng, n * in_f, 1.0);
        let dy = rand_vec(&mut rng, n * out_f, 1.0);
        let rows: Vec<i32> = vec![0, 2, -1, 1, 0, 1, -1, 2, 0];
        let mut y = vec![0f32; n * out_f];
        layer.forward(&x, n, &mut y, Some(&rows), true).unwrap();
        let mut dx = vec![0f32; n * in_f];
        layer.backward(&x, &dy, n, Some(&mut dx)).unwrap();
        let mixed = layer.clone();
        // Reference: each adapter alone over the whole batch, rows picked.
        let mut want_y = vec![0f32; n * out_f];
        let mut want_dx = vec![0f32; n * in_f];
        for a in [-1i32, 0, 1, 2] {
            let mut l = layer.clone();
            l.zero_grad();
            let set: Vec<(String, f32)> = if a < 0 { vec![] } else { vec![(format!("ad{a}"), 1.0)] };
            let set_ref: Vec<(&str, f32)> = set.iter().map(|(s, m)| (s.as_str(), *m)).collect();
            l.set_active(&set_ref).unwrap();
            let mut ya = vec![0f32; n * out_f];
            l.forward(&x, n, &mut ya, None, true).unwrap();
            // Gradients only from this adapter's rows: mask dy.
            let mut dym = vec![0f32; n * out_f];
            for r in 0..n {
                if rows[r] == a {
                    want_y[r * out_f..(r + 1) * out_f].copy_from_slice(&ya[r * out_f..(r + 1) * out_f]);
                    dym[r * out_f..(r + 1) * out_f].copy_from_slice(&dy[r * out_f..(r + 1) * out_f]);
                }
            }
            let mut dxa = vec![0f32; n * in_f];
            l.backward(&x, &dym, n, Some(&mut dxa)).unwrap();
            for r in 0..n {
                if rows[r] == a {
                    want_dx[r * in_f..(r + 1) * in_f].copy_from_slice(&dxa[r * in_f..(r + 1) * in_f]);
                }
            }
            if a >= 0 {
                let name = format!("ad{a}");
                close("mixed", &format!("dA {name}"), &mixed.adapter(&name).unwrap().grad_a, &l.adapter(&name).unwrap().grad_a, 1e-5);
                close("mixed", &format!("dB {name}"), &mixed.adapter(&name).unwrap().grad_b, &l.adapter(&name).unwrap().grad_b, 1e-5);
            }
        }
        close("mixed", "y", &y, &want_y, 1e-5);
        close("mixed", "dx", &dx, &want_dx, 1e-5);
    }
}

#[test]
fn combining_adapters_follows_peft() {
    let (in_f, out_f) = (16, 12);
    let mut rng = SplitMix64::new(21);
    let mut layer = toy_layer(false, in_f, out_f, 17);
    layer.add_adapter("p", given(&mut rng, 4, in_f, out_f, 8.0, false)).unwrap();
    layer.add_adapter("q", given(&mut rng, 4, in_f, out_f, 4.0, true)).unwrap();
    layer.add_adapter("z", given(&mut rng, 3, in_f, out_f, 3.0, false)).unwrap();
    // cat is exact: delta(cat) = Σ wᵢ·delta(i).
    layer.add_weighted("c", &[("p", 0.7), ("z", -1.5)], Combine::Cat).unwrap();
    let ip = layer.adapter_index("p").unwrap();
    let iz = layer.adapter_index("z").unwrap();
    let ic = layer.adapter_index("c").unwrap();
    assert_eq!(layer.adapter("c").unwrap().r, 7);
    assert_eq!(layer.adapter("c").unwrap().scale, 1.0);
    let want: Vec<f32> = layer.delta_weight(ip, 0.7).iter().zip(layer.delta_weight(iz, -1.5)).map(|(a, b)| a + b).collect();
    close("cat", "delta", &layer.delta_weight(ic, 1.0), &want, 1e-5);
    // linear: A = Σ sign·√|w s|·A, B = Σ √|w s|·B (checked entrywise).
    layer.add_weighted("l", &[("p", 0.5), ("q", -2.0)], Combine::Linear).unwrap();
    let (p, q, l) = (layer.adapter("p").unwrap(), layer.adapter("q").unwrap(), layer.adapter("l").unwrap());
    let (wp, wq) = (0.5f64 * p.scale as f64, -2.0f64 * q.scale as f64);
    for i in 0..l.a.len() {
        let want = p.a[i] * wp.abs().sqrt() as f32 - q.a[i] * wq.abs().sqrt() as f32;
        assert!((l.a[i] - want).abs() < 1e-6);
    }
    for i in 0..l.b.len() {
        let want = p.b[i] * wp.abs().sqrt() as f32 + q.b[i] * wq.abs().sqrt() as f32;
        assert!((l.b[i] - want).abs() < 1e-6);
    }
    assert!(layer.add_weighted("bad", &[("p", 1.0), ("z", 1.0)], Combine::Linear).is_err(), "unequal ranks");
}

#[test]
fn dropout_is_reproducible_and_only_on_the_adapter_path() {
    let (in_f, out_f, n) = (32, 16, 6);
    let mut rng = SplitMix64::new(31);
    let mut cfg = given(&mut rng, 4, in_f, out_f, 8.0, false);
    cfg.dropout = 0.3;
    let x = rand_vec(&mut rng, n * in_f, 1.0);
    let run = || {
        let mut l = toy_layer(false, in_f, out_f, 41);
        l.add_adapter("d", cfg.clone()).unwrap();
        let mut y = vec![0f32; n * out_f];
        l.forward(&x, n, &mut y, None, true).unwrap();
        let mut ye = vec![0f32; n * out_f];
        l.forward(&x, n, &mut ye, None, false).unwrap();
        (y, ye)
    };
    let (y1, e1) = run();
    let (y2, _) = run();
    assert_eq!(y1, y2, "same seed, same masks");
    assert_ne!(y1, e1, "dropout changes the training output");
}

#[test]
fn bad_input_has_statuses() {
    use lora::ErrorKind::*;
    let mut l = toy_layer(false, 8, 6, 1);
    let cfg = |r, alpha, dropout| AdapterConfig { r, alpha, dropout, use_rslora: false, init: Init::KaimingUniform };
    assert_eq!(l.add_adapter("x", cfg(0, 1.0, 0.0)).unwrap_err().kind, InvalidArgument);
    // Ranks above min(in, out) load (PEFT writes them for small layers:
    // finite_differences trains one), up to the larger of 1024 and
    // in + out; beyond, refused before anything is allocated.
    assert_eq!(l.add_adapter("x", cfg(1025, 1.0, 0.0)).unwrap_err().kind, InvalidArgument);
    assert_eq!(l.add_adapter("x", cfg(usize::MAX, 1.0, 0.0)).unwrap_err().kind, InvalidArgument);
    l.add_adapter("wide", cfg(1024, 1.0, 0.0)).unwrap();
    l.remove_adapter("wide").unwrap();
    assert_eq!(l.add_adapter("x", cfg(2, 0.0, 0.0)).unwrap_err().kind, InvalidArgument);
    assert_eq!(l.add_adapter("x", cfg(2, -1.0, 0.0)).unwrap_err().kind, InvalidArgument);
    assert_eq!(l.add_adapter("x", cfg(2, 1.0, 1.0)).unwrap_err().kind, InvalidArgument);
    assert_eq!(l.add_adapter("x", cfg(2, 1.0, -0.1)).unwrap_err().kind, InvalidArgument);
    l.add_adapter("x", cfg(2, 1.0, 0.0)).unwrap();
    assert_eq!(l.add_adapter("x", cfg(2, 1.0, 0.0)).unwrap_err().kind, InvalidArgument, "duplicate");
    assert_eq!(l.set_active(&[("nope", 1.0)]).unwrap_err().kind, InvalidArgument);
    let x = vec![0.5f32; 16];
    let mut y = vec![0f32; 12];
    assert_eq!(l.forward(&x[..15], 2, &mut y, None, true).unwrap_err().kind, ShapeMismatch);
    assert_eq!(l.forward(&x, 2, &mut y[..11], None, true).unwrap_err().kind, ShapeMismatch);
    l.forward(&x, 2, &mut y, None, true).unwrap();
    l.backward(&x, &y.clone(), 2, None).unwrap();
    assert_eq!(l.set_active(&[("x", 1.0)]).unwrap_err().kind, InvalidState, "swap with pending grads");
    assert_eq!(l.merge().unwrap_err().kind, InvalidState, "merge with pending grads");
    l.zero_grad();
    l.merge().unwrap();
    assert_eq!(l.merge().unwrap_err().kind, InvalidState, "merge twice");
    assert_eq!(l.backward(&x, &y.clone(), 2, None).unwrap_err().kind, InvalidState);
    l.unmerge().unwrap();
    assert_eq!(l.unmerge().unwrap_err().kind, InvalidState);
}
