//! Safetensors files: memory-mapped, validated reading, and atomic writing
//! (temporary file in the same directory, fsync, rename) so that a process
//! killed mid-save never leaves a half-written file under the final name.

use crate::error::{Error, ErrorKind, Result};
use memmap2::Mmap;
use safetensors::tensor::{SafeTensorError, SafeTensors, TensorView};
use safetensors::Dtype;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// An open, validated safetensors file. The header and every tensor's
/// offsets were checked against the file size when it was opened.
pub struct StFile {
    path: PathBuf,
    map: Mmap,
}

fn st_error(path: &Path, e: SafeTensorError) -> Error {
    let kind = match e {
        SafeTensorError::IoError(_) => ErrorKind::Io,
        SafeTensorError::TensorNotFound(_) => ErrorKind::TensorNotFound,
        _ => ErrorKind::FileFormat,
    };
    Error::new(kind, format!("{}: not a valid safetensors file: {e}", path.display()))
}

impl StFile {
    /// Opens and validates `path` (header length within the file, JSON
    /// header, offsets contiguous and in range, sizes matching shapes).
    pub fn open(path: &Path) -> Result<StFile> {
        let file = File::open(path).map_err(|e| err!(Io, "{}: cannot open: {e}", path.display()))?;
        let len = file.metadata().map_err(|e| err!(Io, "{}: cannot stat: {e}", path.display()))?.len();
        if len < 8 {
            bail!(FileFormat, "{}: {len} bytes is too short for a safetensors file (8-byte header length first)", path.display());
        }
        // SAFETY: the mapping is read-only and private to this object. A file
        // truncated by another process while mapped would fault on access;
        // checkpoint files are written atomically (rename), never in place.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| err!(Io, "{}: cannot map: {e}", path.display()))?;
        SafeTensors::deserialize(&map).map_err(|e| st_error(path, e))?;
        Ok(StFile { path: path.to_path_buf(), map })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.map).expect("validated at open")
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors().names().into_iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors().tensor(name).is_ok()
    }

    /// The `__metadata__` map of the header.
    pub fn metadata(&self) -> HashMap<String, String> {
        let (_, meta) = SafeTensors::read_metadata(&self.map).expect("validated at open");
        meta.metadata().clone().unwrap_or_default()
    }

    /// A tensor by name.
    pub fn get(&self, name: &str) -> Result<TensorView<'_>> {
        self.tensors()
            .tensor(name)
            .map_err(|_| err!(TensorNotFound, "{}: no tensor named '{name}'", self.path.display()))
    }

    /// A tensor by name, checked to have dtype `want`.
    pub fn get_typed(&self, name: &str, want: Dtype) -> Result<TensorView<'_>> {
        let t = self.get(name)?;
        if t.dtype() != want {
            bail!(DtypeMismatch, "{}: tensor '{name}' is {:?}, expected {want:?}", self.path.display(), t.dtype());
        }
        Ok(t)
    }

    /// An F32 tensor's values (copied: file data need not be aligned).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.get_typed(name, Dtype::F32)?;
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Drops the pages of tensor `name` from this process's memory (they
    /// are read again from the file if touched): a loader that has copied
    /// or converted a tensor calls this so the mapped file does not pile up
    /// in the resident set while a large checkpoint is read. Pages shared
    /// with neighbouring tensors are dropped too, harmlessly.
    pub fn release(&self, name: &str) {
        let Ok(t) = self.get(name) else { return };
        let d = t.data();
        if d.is_empty() {
            return;
        }
        let base = self.map.as_ptr() as usize;
        let page = 4096usize;
        let start = (d.as_ptr() as usize - base) / page * page;
        let end = (d.as_ptr() as usize - base + d.len()).div_ceil(page) * page;
        let end = end.min(self.map.len());
        // SAFETY: the mapping is a private, read-only file mapping owned by
        // `self`; no borrow of these bytes outlives this call (callers have
        // copied the tensor), and MADV_DONTNEED on such a mapping only drops
        // clean pages, which the kernel re-reads from the file on access.
        let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
    }

    /// A U8 tensor's bytes.
    pub fn read_u8(&self, name: &str) -> Result<Vec<u8>> {
        Ok(self.get_typed(name, Dtype::U8)?.data().to_vec())
    }
}

/// One tensor to write.
pub struct OutTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl OutTensor<'_> {
    pub fn f32(shape: Vec<usize>, v: &[f32]) -> OutTensor<'static> {
        OutTensor { dtype: Dtype::F32, shape, data: Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()) }
    }
    pub fn u8<'b>(shape: Vec<usize>, v: &'b [u8]) -> OutTensor<'b> {
        OutTensor { dtype: Dtype::U8, shape, data: Cow::Borrowed(v) }
    }
}

impl safetensors::View for &OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `tensors` to `path` atomically, with `metadata` in the header
/// (PyTorch's `{"format": "pt"}` is added when absent).
pub fn write_atomic(path: &Path, tensors: &[(String, OutTensor<'_>)], metadata: &HashMap<String, String>) -> Result<()> {
    let mut names = std::collections::HashSet::new();
    for (n, _) in tensors {
        if !names.insert(n.as_str()) {
            bail!(InvalidArgument, "tensor name '{n}' appears twice");
        }
    }
    let mut meta = metadata.clone();
    meta.entry("format".into()).or_insert_with(|| "pt".into());
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| err!(Internal, "serializing {}: {e}", path.display()))?;
    write_file_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same directory,
/// fsynced, then renamed over `path`, then the directory fsynced.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let fname = path.file_name().ok_or_else(|| err!(InvalidArgument, "'{}' names no file", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp.{}", fname.to_string_lossy(), std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        bail!(Io, "{}: cannot write: {e}", path.display());
    }
    Ok(())
}
