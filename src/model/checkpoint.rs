//! A Hugging Face checkpoint directory: `config.json` plus
//! `model.safetensors`, or shards listed by `model.safetensors.index.json`
//! (`{"weight_map": {tensor: file}}`). Every file is memory-mapped and
//! validated when opened; tensors are converted one at a time, so loading
//! never holds more than one dense tensor beyond what the model keeps.

use crate::dtype::{DType, Elems};
use crate::io::safetensors::StFile;
use crate::quant::nf4::Nf4Tensor;
use crate::Result;
use half::{bf16, f16};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A dense tensor's elements, owned, in its file dtype.
pub enum Owned {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Owned {
    pub fn elems(&self) -> Elems<'_> {
        match self {
            Owned::F32(v) => Elems::F32(v),
            Owned::F16(v) => Elems::F16(v),
            Owned::BF16(v) => Elems::BF16(v),
        }
    }
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Owned::F32(v) => v.clone(),
            Owned::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Owned::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            Owned::F32(v) => v,
            o => o.to_f32(),
        }
    }
}

pub struct Checkpoint {
    pub dir: PathBuf,
    files: Vec<StFile>,
    /// Tensor name → index into `files`.
    map: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Opens the weights of checkpoint directory `dir`.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut map = BTreeMap::new();
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| err!(Io, "{}: cannot read: {e}", index.display()))?;
            let j: serde_json::Value = serde_json::from_str(&text).map_err(|e| err!(FileFormat, "{}: not JSON: {e}", index.display()))?;
            let wm = j
                .get("weight_map")
                .and_then(|v| v.as_object())
                .ok_or_else(|| err!(FileFormat, "{}: no `weight_map` object", index.display()))?;
            let mut by_file: HashMap<String, usize> = HashMap::new();
            for (name, f) in wm {
                let f = f.as_str().ok_or_else(|| err!(FileFormat, "{}: weight_map[{name}] is not a file name", index.display()))?;
                if f.contains('/') || f.contains("..") {
                    bail!(FileFormat, "{}: shard name '{f}' leaves the directory", index.display());
                }
                let i = match by_file.get(f) {
                    Some(&i) => i,
                    None => {
                        files.push(StFile::open(&dir.join(f))?);
                        by_file.insert(f.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if !files[i].contains(name) {
                    bail!(TensorNotFound, "{}: the index puts '{name}' in {f}, which does not hold it", index.display());
                }
                map.insert(name.clone(), i);
            }
        } else if single.is_file() {
            let f = StFile::open(&single)?;
            for n in f.names() {
                map.insert(n, 0);
            }
            files.push(f);
        } else if dir.join("pytorch_model.bin").is_file() || dir.join("pytorch_model.bin.index.json").is_file() {
            bail!(Unsupported, "{}: the weights are in pytorch_model.bin (PyTorch pickles); only safetensors checkpoints are read (save_pretrained(..., safe_serialization=True) writes them)", dir.display());
        } else {
            bail!(Io, "{}: neither model.safetensors nor model.safetensors.index.json", dir.display());
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), files, map })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(|s| s.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    fn file(&self, name: &str) -> Result<&StFile> {
        let i = self.map.get(name).ok_or_else(|| err!(TensorNotFound, "{}: the checkpoint has no tensor '{name}'", self.dir.display()))?;
        Ok(&self.files[*i])
    }

    /// A dense floating-point tensor, its shape checked against `shape`.
    pub fn dense(&self, name: &str, shape: &[usize]) -> Result<Owned> {
        let f = self.file(name)?;
        let t = f.get(name)?;
        if t.shape() != shape {
            bail!(ShapeMismatch, "{}: '{name}' has shape {:?}, the config implies {shape:?}", f.path().display(), t.shape());
        }
        let dt = DType::from_safetensors(t.dtype())
            .ok_or_else(|| err!(DtypeMismatch, "{}: '{name}' is {:?}; weights must be F32, F16 or BF16", f.path().display(), t.dtype()))?;
        let b = t.data();
        let out = match dt {
            DType::F32 => Owned::F32(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            DType::F16 => Owned::F16(b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect()),
            DType::BF16 => Owned::BF16(b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect()),
        };
        f.release(name);
        Ok(out)
    }

    /// Drops tensor `name`'s file pages from memory (after it was copied).
    pub fn release(&self, name: &str) {
        if let Ok(f) = self.file(name) {
            f.release(name);
        }
    }

    /// The dtype of a dense tensor.
    pub fn dtype_of(&self, name: &str) -> Result<Option<DType>> {
        let f = self.file(name)?;
        Ok(DType::from_safetensors(f.get(name)?.dtype()))
    }

    /// Whether `prefix` is stored as a bitsandbytes NF4 weight.
    pub fn is_nf4(&self, prefix: &str) -> bool {
        self.contains(&format!("{prefix}.weight.quant_state.bitsandbytes__nf4")) || self.contains(&format!("{prefix}.weight.quant_state.bitsandbytes__fp4"))
    }

    /// The NF4 weight of module `prefix`, checked to be `[out, in]`.
    pub fn nf4(&self, prefix: &str, out_f: usize, in_f: usize) -> Result<Nf4Tensor> {
        let f = self.file(&format!("{prefix}.weight"))?;
        let t = crate::io::nf4_file::load(f, prefix)?;
        for suf in [".weight", ".weight.absmax", ".weight.nested_absmax"] {
            f.release(&format!("{prefix}{suf}"));
        }
        if t.shape() != [out_f, in_f] {
            bail!(ShapeMismatch, "{}: NF4 weight '{prefix}' has shape {:?}, the config implies [{out_f}, {in_f}]", f.path().display(), t.shape());
        }
        Ok(t)
    }
}
