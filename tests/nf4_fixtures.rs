//! Bit-exactness against bitsandbytes 0.50 (CPU): every fixture in
//! tests/fixtures/nf4 (made by scripts/fixtures/gen_nf4.py) holds an input
//! tensor and bitsandbytes' quantized state with and without double
//! quantization, plus its dequantization. Everything must match to the bit.

use lora::dtype::{DType, Elems, ElemsMut};
use lora::io::nf4_file;
use lora::io::safetensors::StFile;
use lora::quant::nf4::{Absmax, Nf4Params, Nf4Tensor};
use std::path::PathBuf;

fn fixtures() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixture dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    assert!(v.len() >= 10, "expected the NF4 fixtures in {}", dir.display());
    v
}

/// Typed input read from the fixture, and its dtype.
fn input(f: &StFile) -> (Vec<u8>, DType, Vec<usize>) {
    let t = f.get("input").unwrap();
    let dt = DType::from_safetensors(t.dtype()).expect("float input");
    (t.data().to_vec(), dt, t.shape().to_vec())
}

fn quantize(bytes: &[u8], dt: DType, shape: &[usize], bs: usize, dq: bool) -> Nf4Tensor {
    let p = Nf4Params { blocksize: bs, double_quant: dq };
    match dt {
        DType::F32 => {
            let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            Nf4Tensor::quantize(Elems::F32(&v), shape, p).unwrap()
        }
        DType::F16 => {
            let v: Vec<half::f16> = bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes(c.try_into().unwrap())).collect();
            Nf4Tensor::quantize(Elems::F16(&v), shape, p).unwrap()
        }
        DType::BF16 => {
            let v: Vec<half::bf16> = bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes(c.try_into().unwrap())).collect();
            Nf4Tensor::quantize(Elems::BF16(&v), shape, p).unwrap()
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Dequantizes `t` into the dtype of the fixture's `key` tensor and compares
/// bytes.
fn check_dequant(name: &str, f: &StFile, key: &str, t: &Nf4Tensor) {
    let want = f.get(key).unwrap();
    let n = t.numel();
    let got: Vec<u8> = match DType::from_safetensors(want.dtype()).unwrap() {
        DType::F32 => {
            let mut o = vec![0f32; n];
            t.dequantize_into(ElemsMut::F32(&mut o)).unwrap();
            o.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        DType::F16 => {
            let mut o = vec![half::f16::ZERO; n];
            t.dequantize_into(ElemsMut::F16(&mut o)).unwrap();
            o.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        DType::BF16 => {
            let mut o = vec![half::bf16::ZERO; n];
            t.dequantize_into(ElemsMut::BF16(&mut o)).unwrap();
            o.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
    };
    let w = want.data();
    assert_eq!(got.len(), w.len(), "{name} {key}: size");
    if let Some(i) = got.iter().zip(w.iter()).position(|(a, b)| a != b) {
        panic!("{name} {key}: dequantized bytes differ first at byte {i}");
    }
}

#[test]
fn quantize_matches_bitsandbytes_bit_for_bit() {
    for path in fixtures() {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let f = StFile::open(&path).unwrap();
        let (bytes, dt, shape) = input(&f);
        let reference = nf4_file::load(&f, "nodq").unwrap();
        let bs = reference.blocksize();
        for (prefix, dq) in [("nodq", false), ("dq", true)] {
            let ours = quantize(&bytes, dt, &shape, bs, dq);
            let theirs = nf4_file::load(&f, prefix).unwrap();
            assert_eq!(ours.shape(), theirs.shape(), "{name} {prefix}: shape");
            assert_eq!(ours.dtype(), theirs.dtype(), "{name} {prefix}: dtype");
            if let Some(i) = ours.packed().iter().zip(theirs.packed()).position(|(a, b)| a != b) {
                panic!("{name} {prefix}: packed byte {i}: ours {:#04x}, bitsandbytes {:#04x}", ours.packed()[i], theirs.packed()[i]);
            }
            match (ours.absmax(), theirs.absmax()) {
                (Absmax::F32(a), Absmax::F32(b)) => assert_eq!(bits(a), bits(b), "{name}: absmax"),
                (Absmax::Double(a), Absmax::Double(b)) => {
                    assert_eq!(a.offset.to_bits(), b.offset.to_bits(), "{name}: offset {} vs {}", a.offset, b.offset);
                    assert_eq!(bits(&a.nested_absmax), bits(&b.nested_absmax), "{name}: nested absmax");
                    assert_eq!(bits(&a.map[..]), bits(&b.map[..]), "{name}: nested quant map");
                    if let Some(i) = a.codes.iter().zip(&b.codes).position(|(x, y)| x != y) {
                        panic!("{name}: absmax code {i}: ours {}, bitsandbytes {}", a.codes[i], b.codes[i]);
                    }
                    let decoded = f.read_f32("dq.absmax_decoded").unwrap();
                    assert_eq!(bits(&ours.absmax_f32()), bits(&decoded), "{name}: decoded absmax");
                }
                _ => panic!("{name} {prefix}: absmax kind differs"),
            }
            assert_eq!(ours, theirs, "{name} {prefix}: whole tensor");
            check_dequant(&name, &f, &format!("{prefix}.dequant"), &ours);
        }
    }
}

#[test]
fn saved_files_match_bitsandbytes_layout_byte_for_byte() {
    let dir = std::env::temp_dir().join(format!("lora-nf4-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for path in fixtures() {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let f = StFile::open(&path).unwrap();
        for prefix in ["nodq", "dq"] {
            let t = nf4_file::load(&f, prefix).unwrap();
            let out = dir.join(format!("{name}-{prefix}.safetensors"));
            nf4_file::save(&out, &[(prefix, &t)]).unwrap();
            let g = StFile::open(&out).unwrap();
            let ours: Vec<String> = g.names();
            let theirs: Vec<String> = f.names().into_iter().filter(|k| k.starts_with(&format!("{prefix}.weight"))).collect();
            assert_eq!(ours, theirs, "{name}: key set");
            for k in &ours {
                let (a, b) = (g.get(k).unwrap(), f.get(k).unwrap());
                assert_eq!(a.dtype(), b.dtype(), "{name} {k}: dtype");
                assert_eq!(a.shape(), b.shape(), "{name} {k}: shape");
                assert!(a.data() == b.data(), "{name} {k}: bytes differ");
            }
            assert_eq!(nf4_file::load(&g, prefix).unwrap(), t, "{name}: reload");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
