//! NF4 tensors in safetensors files, laid out exactly as transformers saves
//! a bitsandbytes `Linear4bit` weight (`QuantState.as_dict(packed=True)`),
//! for a module prefix `P`:
//!
//! | key | dtype | shape |
//! |---|---|---|
//! | `P.weight` | U8 | `[(n+1)/2, 1]` packed codes (any `quant_storage` dtype read as its bytes) |
//! | `P.weight.absmax` | F32 `[blocks]`, or U8 `[blocks]` with double quant |
//! | `P.weight.quant_map` | F32 | `[16]` the NF4 table |
//! | `P.weight.nested_absmax` | F32 | `[⌈blocks/256⌉]` (double quant) |
//! | `P.weight.nested_quant_map` | F32 | `[256]` (double quant) |
//! | `P.weight.quant_state.bitsandbytes__nf4` | U8 | JSON bytes |
//!
//! The JSON is Python's `json.dumps` of `{"quant_type", "blocksize",
//! "dtype", "shape"[, "nested_blocksize", "nested_dtype", "nested_offset"]}`
//! in that order, so files we write are byte-identical to bitsandbytes'.

use crate::backend::cpu::nf4::NF4_CODE;
use crate::dtype::DType;
use crate::error::Result;
use crate::io::safetensors::{write_atomic, OutTensor, StFile};
use crate::quant::nf4::{Absmax, DoubleQuant, Nf4Tensor};
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

const QS_SUFFIX_NF4: &str = ".weight.quant_state.bitsandbytes__nf4";
const QS_SUFFIX_FP4: &str = ".weight.quant_state.bitsandbytes__fp4";

/// Python's `repr(float)`: shortest round-trip digits, fixed notation for
/// decimal exponents in [-5, 16), else `d.ddde±XX`.
pub fn python_float_repr(v: f64) -> String {
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    let sci = format!("{v:e}"); // e.g. "-1.2345e-2", shortest round-trip digits
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-5..16).contains(&exp) {
        let s = format!("{v}");
        if s.contains('.') { s } else { format!("{s}.0") }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    }
}

/// The quant-state JSON bitsandbytes packs for `t`.
pub fn quant_state_json(t: &Nf4Tensor) -> String {
    let shape: Vec<String> = t.shape().iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        t.blocksize(),
        t.dtype().torch_name(),
        shape.join(", ")
    );
    if let Absmax::Double(d) = t.absmax() {
        s += &format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            d.nested_blocksize,
            python_float_repr(d.offset as f64)
        );
    }
    s.push('}');
    s
}

/// Tensors (key, data) for one NF4 weight under module prefix `prefix`.
pub fn nf4_tensors<'a>(prefix: &str, t: &'a Nf4Tensor) -> Vec<(String, OutTensor<'a>)> {
    let p = format!("{prefix}.weight");
    let mut v = vec![(p.clone(), OutTensor::u8(vec![t.packed().len(), 1], t.packed()))];
    match t.absmax() {
        Absmax::F32(a) => v.push((format!("{p}.absmax"), OutTensor::f32(vec![a.len()], a))),
        Absmax::Double(d) => {
            v.push((format!("{p}.absmax"), OutTensor::u8(vec![d.codes.len()], &d.codes)));
            v.push((format!("{p}.nested_absmax"), OutTensor::f32(vec![d.nested_absmax.len()], &d.nested_absmax)));
            v.push((format!("{p}.nested_quant_map"), OutTensor::f32(vec![256], &d.map[..])));
        }
    }
    v.push((format!("{p}.quant_map"), OutTensor::f32(vec![16], &NF4_CODE)));
    let json = quant_state_json(t).into_bytes();
    v.push((
        format!("{p}.quant_state.bitsandbytes__nf4"),
        OutTensor { dtype: Dtype::U8, shape: vec![json.len()], data: json.into() },
    ));
    v
}

/// Saves NF4 tensors, each under its module prefix, to one safetensors file
/// (atomically).
pub fn save(path: &Path, items: &[(&str, &Nf4Tensor)]) -> Result<()> {
    let mut all = Vec::new();
    for (prefix, t) in items {
        if prefix.is_empty() {
            bail!(InvalidArgument, "an NF4 tensor needs a non-empty module prefix");
        }
        all.extend(nf4_tensors(prefix, t));
    }
    write_atomic(path, &all, &HashMap::new())
}

/// Module prefixes of all NF4 weights in an open file, sorted.
pub fn list(f: &StFile) -> Vec<String> {
    f.names().iter().filter_map(|n| n.strip_suffix(QS_SUFFIX_NF4).map(str::to_string)).collect()
}

fn json_usize(j: &serde_json::Value, key: &str, ctx: &str) -> Result<usize> {
    j.get(key)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| err!(FileFormat, "{ctx}: quant state has no integer '{key}'"))
}

/// Loads the NF4 weight stored under module prefix `prefix`.
pub fn load(f: &StFile, prefix: &str) -> Result<Nf4Tensor> {
    let file = f.path().display().to_string();
    let p = format!("{prefix}.weight");
    let qs_key = format!("{prefix}{QS_SUFFIX_NF4}");
    if !f.contains(&qs_key) {
        if f.contains(&format!("{prefix}{QS_SUFFIX_FP4}")) {
            bail!(Unsupported, "{file}: '{p}' is quantized as FP4; only NF4 is supported");
        }
        bail!(TensorNotFound, "{file}: no NF4 quant state '{qs_key}'");
    }
    let ctx = format!("{file}: '{p}'");
    let qs = f.read_u8(&qs_key)?;
    let j: serde_json::Value =
        serde_json::from_slice(&qs).map_err(|e| err!(FileFormat, "{ctx}: quant state is not JSON: {e}"))?;
    if j.get("quant_type").and_then(|v| v.as_str()) != Some("nf4") {
        bail!(FileFormat, "{ctx}: quant state's quant_type is not \"nf4\"");
    }
    let blocksize = json_usize(&j, "blocksize", &ctx)?;
    let dtype_s = j.get("dtype").and_then(|v| v.as_str()).unwrap_or("");
    let dtype = DType::from_torch_name(dtype_s).ok_or_else(|| err!(Unsupported, "{ctx}: dtype '{dtype_s}' is not float32, float16 or bfloat16"))?;
    let shape: Vec<usize> = j
        .get("shape")
        .and_then(|v| v.as_array())
        .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| err!(FileFormat, "{ctx}: quant state has no integer list 'shape'"))?;
    if shape.is_empty() || shape.contains(&0) {
        bail!(ShapeMismatch, "{ctx}: quant state shape {shape:?} has no elements but the tensor has data");
    }

    // bitsandbytes' `quant_storage` (uint8 by default; bfloat16 for
    // FSDP-QLoRA; transformers allows uint8, int8, float16, bfloat16,
    // float32, float64) is a view of the same packed bytes: read them as
    // they are.
    let packed_t = f.get(&p)?;
    if !matches!(packed_t.dtype(), Dtype::U8 | Dtype::I8 | Dtype::BF16 | Dtype::F16 | Dtype::F32 | Dtype::F64) {
        bail!(DtypeMismatch, "{ctx}: packed NF4 codes stored as {:?} (bitsandbytes stores uint8, int8, float16, bfloat16, float32 or float64)", packed_t.dtype());
    }
    let packed = packed_t.data().to_vec();
    let qmap = f.read_f32(&format!("{p}.quant_map"))?;
    if qmap.len() != 16 || qmap.iter().zip(NF4_CODE.iter()).any(|(a, b)| a.to_bits() != b.to_bits()) {
        bail!(FileFormat, "{ctx}: quant_map is not the NF4 table");
    }
    let nested_key = format!("{p}.nested_absmax");
    let absmax = if f.contains(&nested_key) {
        let codes = f.read_u8(&format!("{p}.absmax"))?;
        let nested_absmax = f.read_f32(&nested_key)?;
        let map_v = f.read_f32(&format!("{p}.nested_quant_map"))?;
        let map: Box<[f32; 256]> = map_v
            .try_into()
            .map(Box::new)
            .map_err(|v: Vec<f32>| err!(ShapeMismatch, "{ctx}: nested_quant_map has {} entries, expected 256", v.len()))?;
        let nested_blocksize = json_usize(&j, "nested_blocksize", &ctx)?;
        let offset = j
            .get("nested_offset")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| err!(FileFormat, "{ctx}: quant state has no number 'nested_offset'"))? as f32;
        match j.get("nested_dtype").and_then(|v| v.as_str()) {
            Some("float32") | None => {}
            Some(o) => bail!(Unsupported, "{ctx}: nested_dtype '{o}' is not float32"),
        }
        Absmax::Double(DoubleQuant { codes, nested_absmax, offset, nested_blocksize, map })
    } else {
        Absmax::F32(f.read_f32(&format!("{p}.absmax"))?)
    };
    Nf4Tensor::from_parts(shape, dtype, blocksize, packed, absmax).map_err(|e| e.context(&ctx))
}
