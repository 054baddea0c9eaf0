//! Optimizer state as named tensors, and their safetensors file.
//!
//! Each optimizer exports its state as a list of [`StateTensor`]s and
//! imports it back (all or nothing: a list that does not fit leaves the
//! optimizer unchanged). The names follow the references' state keys:
//! `"{param}.exp_avg"` / `"{param}.exp_avg_sq"` for torch AdamW,
//! `"{param}.state1"`, `"{param}.state2"`, `"{param}.absmax1"`,
//! `"{param}.absmax2"` for bitsandbytes' 8-bit state, and `"step"`.
//!
//! The step counter is stored as an `I64` scalar, not as PyTorch's fp32
//! `step` tensor (which stops counting at 2^24), so every count resumes
//! exactly.

use crate::error::Result;
use crate::io::safetensors::{write_atomic, OutTensor, StFile};
use safetensors::Dtype;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// The values of one state tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum StateData {
    F32(Vec<f32>),
    U8(Vec<u8>),
    I64(Vec<i64>),
}

impl StateData {
    pub fn len(&self) -> usize {
        match self {
            StateData::F32(v) => v.len(),
            StateData::U8(v) => v.len(),
            StateData::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn dtype_name(&self) -> &'static str {
        match self {
            StateData::F32(_) => "F32",
            StateData::U8(_) => "U8",
            StateData::I64(_) => "I64",
        }
    }
}

/// One named tensor of optimizer state. Moments are flat (`[numel]`): the
/// optimizers see parameters as slices.
#[derive(Clone, Debug, PartialEq)]
pub struct StateTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: StateData,
}

impl StateTensor {
    pub fn f32(name: impl Into<String>, v: Vec<f32>) -> StateTensor {
        StateTensor { name: name.into(), shape: vec![v.len()], data: StateData::F32(v) }
    }

    pub fn u8(name: impl Into<String>, v: Vec<u8>) -> StateTensor {
        StateTensor { name: name.into(), shape: vec![v.len()], data: StateData::U8(v) }
    }

    /// The step counter: an `I64` scalar (shape `[]`).
    pub fn step(step: u64) -> StateTensor {
        StateTensor { name: "step".into(), shape: vec![], data: StateData::I64(vec![step as i64]) }
    }
}

/// Name lookup over a list of state tensors, with the checks every import
/// needs (present, dtype, element count).
pub(crate) struct Lookup<'a> {
    map: HashMap<&'a str, &'a StateTensor>,
}

impl<'a> Lookup<'a> {
    pub(crate) fn new(tensors: &'a [StateTensor]) -> Result<Lookup<'a>> {
        let mut map = HashMap::with_capacity(tensors.len());
        for t in tensors {
            if t.shape.iter().product::<usize>() != t.data.len() {
                bail!(
                    ShapeMismatch,
                    "state tensor '{}': shape {:?} does not hold {} values",
                    t.name,
                    t.shape,
                    t.data.len()
                );
            }
            if map.insert(t.name.as_str(), t).is_some() {
                bail!(InvalidArgument, "state tensor '{}' appears twice", t.name);
            }
        }
        Ok(Lookup { map })
    }

    fn get(&self, name: &str) -> Result<&'a StateTensor> {
        self.map.get(name).copied().ok_or_else(|| err!(TensorNotFound, "optimizer state has no tensor '{name}'"))
    }

    pub(crate) fn f32(&self, name: &str, len: usize) -> Result<&'a [f32]> {
        let t = self.get(name)?;
        match &t.data {
            StateData::F32(v) if v.len() == len => Ok(v),
            StateData::F32(v) => bail!(ShapeMismatch, "state tensor '{name}' has {} elements, expected {len}", v.len()),
            d => bail!(DtypeMismatch, "state tensor '{name}' is {}, expected F32", d.dtype_name()),
        }
    }

    pub(crate) fn u8(&self, name: &str, len: usize) -> Result<&'a [u8]> {
        let t = self.get(name)?;
        match &t.data {
            StateData::U8(v) if v.len() == len => Ok(v),
            StateData::U8(v) => bail!(ShapeMismatch, "state tensor '{name}' has {} elements, expected {len}", v.len()),
            d => bail!(DtypeMismatch, "state tensor '{name}' is {}, expected U8", d.dtype_name()),
        }
    }

    /// The `step` scalar: a non-negative I64 with one element.
    pub(crate) fn step(&self) -> Result<u64> {
        let t = self.get("step")?;
        match &t.data {
            StateData::I64(v) if v.len() == 1 && v[0] >= 0 => Ok(v[0] as u64),
            StateData::I64(v) => bail!(InvalidArgument, "state tensor 'step' must be one non-negative value, got {v:?}"),
            d => bail!(DtypeMismatch, "state tensor 'step' is {}, expected I64", d.dtype_name()),
        }
    }
}

/// Checks that `names` are as many as the optimizer's tensors, distinct,
/// and do not collide with `step`.
pub(crate) fn check_names(names: &[&str], count: usize) -> Result<()> {
    if names.len() != count {
        bail!(InvalidArgument, "optimizer holds {count} tensors, got {} names", names.len());
    }
    let mut seen = std::collections::HashSet::new();
    for n in names {
        if n.is_empty() || *n == "step" {
            bail!(InvalidArgument, "'{n}' cannot name a parameter's optimizer state");
        }
        if !seen.insert(*n) {
            bail!(InvalidArgument, "parameter name '{n}' appears twice");
        }
    }
    Ok(())
}

/// Writes state tensors to a safetensors file, atomically (see
/// [`write_atomic`]), with `metadata` in its header.
pub fn save(path: &Path, tensors: &[StateTensor], metadata: &HashMap<String, String>) -> Result<()> {
    let out: Vec<(String, OutTensor<'_>)> = tensors
        .iter()
        .map(|t| {
            let (dtype, data): (Dtype, Cow<'_, [u8]>) = match &t.data {
                StateData::F32(v) => (Dtype::F32, Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())),
                StateData::U8(v) => (Dtype::U8, Cow::Borrowed(v.as_slice())),
                StateData::I64(v) => (Dtype::I64, Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())),
            };
            (t.name.clone(), OutTensor { dtype, shape: t.shape.clone(), data })
        })
        .collect();
    write_atomic(path, &out, metadata)
}

/// Reads every tensor of a safetensors file written by [`save`]. Tensors of
/// other dtypes than F32, U8 and I64 are refused.
pub fn load(path: &Path) -> Result<Vec<StateTensor>> {
    let f = StFile::open(path)?;
    let mut out = Vec::new();
    for name in f.names() {
        let t = f.get(&name)?;
        let bytes = t.data();
        let data = match t.dtype() {
            Dtype::F32 => StateData::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
            Dtype::U8 => StateData::U8(bytes.to_vec()),
            Dtype::I64 => StateData::I64(bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
            d => bail!(DtypeMismatch, "{}: state tensor '{name}' is {d:?}; optimizer state is F32, U8 or I64", path.display()),
        };
        out.push(StateTensor { name, shape: t.shape().to_vec(), data });
    }
    Ok(out)
}
