//! NVRTC: finding the library, and compiling `cuda/*.cu` to machine code.
//!
//! Finding it. cudarc looks NVRTC up by its usual names (`libnvrtc.so`,
//! `libnvrtc.so.13`, ...) through the dynamic loader, and panics when it is
//! not there. The environment variable [`NVRTC_LIB_ENV`]
//! (`LORA_NVRTC_LIB`) may name the library by absolute path (for example
//! the `nvidia-cuda-nvrtc` wheel's `nvidia/cu13/lib/libnvrtc.so.13`): it is
//! loaded first with `RTLD_GLOBAL` and kept loaded, so cudarc's later
//! `dlopen("libnvrtc.so.13")` finds the same object by its SONAME without
//! `LD_LIBRARY_PATH`. Its builtins library (`libnvrtc-builtins.so.13.x`) is
//! found next to it through NVRTC's own `$ORIGIN` run path.
//!
//! Compiling. Kernels are compiled at first use to a CUBIN for the device's
//! own compute capability (`--gpu-architecture=sm_XY`), not to PTX: PTX made
//! by an NVRTC newer than the driver will not JIT on that driver, while a
//! CUBIN is plain machine code the driver loads as is. Every CUBIN is cached
//! for the life of the process, keyed by source and architecture (see
//! [`cubin_cached`]); modules are cached per device in `CudaDevice`.
//!
//! On disk too (so a new process skips the seconds NVRTC takes): the
//! directory [`CACHE_DIR_ENV`] (`LORA_CUDA_CACHE_DIR`) names, else
//! `$XDG_CACHE_HOME/liblora/cubin` or `~/.cache/liblora/cubin`;
//! `LORA_CUDA_CACHE_DIR=off` (or empty) turns it off. A file is named by
//! the source, the architecture and a hash of everything that shapes the
//! machine code (source text, options, NVRTC version), written atomically
//! (a temporary file created exclusively, then a rename), and carries a
//! checksum of its CUBIN: a damaged file is ignored and rewritten. A
//! directory another user owns or may write to is not used (a planted
//! file would pass the checksum); a new one is created private (0700).
//! Cache failures never fail a compile; they are logged.
//!
//! Every call into cudarc's NVRTC bindings runs behind `catch_unwind`:
//! cudarc panics when the library or one of its symbols is missing.

use crate::error::Result;
use cudarc::nvrtc::{result as nr, sys as ns};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, OnceLock};

/// Environment variable naming NVRTC by absolute path
/// (`libnvrtc.so.13`); it is preloaded before cudarc looks for NVRTC.
pub const NVRTC_LIB_ENV: &str = "LORA_NVRTC_LIB";

/// How to get NVRTC where it is missing; part of every "not found" error.
pub const NVRTC_INSTALL_HINT: &str = "install NVRTC 13 (the CUDA 13 toolkit's libnvrtc.so.13, or \
     `python3 -m pip install nvidia-cuda-nvrtc` which puts it in \
     <site-packages>/nvidia/cu13/lib/libnvrtc.so.13) and either add its directory to the \
     dynamic loader's path or set LORA_NVRTC_LIB to the library's absolute path";

/// Options every kernel is compiled with. The NF4 kernels are specified bit
/// for bit by the CPU backend, so nothing may change an fp32 rounding:
/// - `--fmad=false`: no contraction of a multiply and an add into an FMA
///   (kernels that want an FMA write `__fmaf_rn`);
/// - `--ftz=false`: subnormal inputs and results are kept, as on the CPU;
/// - `--prec-div=true` / `--prec-sqrt=true`: IEEE round-to-nearest division
///   and square root (NVRTC's defaults, stated so no one flips them).
pub const COMPILE_OPTIONS: &[&str] = &["--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "--std=c++17"];

/// Result of loading the library named by [`NVRTC_LIB_ENV`], once per
/// process: `Ok(None)` when the variable is unset or empty.
static PRELOAD: OnceLock<std::result::Result<Option<PathBuf>, String>> = OnceLock::new();

fn preload_env_library() -> std::result::Result<Option<PathBuf>, String> {
    let Some(raw) = std::env::var_os(NVRTC_LIB_ENV).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let path = PathBuf::from(&raw);
    if !path.is_absolute() {
        return Err(format!("{NVRTC_LIB_ENV}={} is not an absolute path to libnvrtc.so.13", path.display()));
    }
    if !path.is_file() {
        return Err(format!("{NVRTC_LIB_ENV}={}: no such file; {NVRTC_INSTALL_HINT}", path.display()));
    }
    load_global(&path).map_err(|e| format!("{NVRTC_LIB_ENV}={}: cannot load: {e}", path.display()))?;
    Ok(Some(path))
}

#[cfg(unix)]
fn load_global(path: &Path) -> std::result::Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading NVRTC runs its ELF initializers, which have no
    // preconditions. The handle is leaked on purpose: cudarc keeps function
    // pointers into the library for the rest of the process.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| e.to_string())?;
    std::mem::forget(lib);
    Ok(())
}

#[cfg(not(unix))]
fn load_global(path: &Path) -> std::result::Result<(), String> {
    // SAFETY: as above; Windows resolves a loaded DLL by name process-wide.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
    std::mem::forget(lib);
    Ok(())
}

/// Loads the library named by `LORA_NVRTC_LIB`, if set (once per process).
/// Fails when the variable is set but does not name a loadable library.
pub fn preload() -> Result<Option<&'static Path>> {
    match PRELOAD.get_or_init(preload_env_library) {
        Ok(p) => Ok(p.as_deref()),
        Err(m) => Err(err!(CudaUnavailable, "{m}")),
    }
}

/// Chooses the NVRTC library at `path` (absolute) for this process, as
/// `LORA_NVRTC_LIB` would, taking precedence over it. Must come before any
/// other NVRTC use in the process (which fixes the choice); fails if NVRTC
/// was already chosen otherwise, or if `path` does not load.
pub fn use_library(path: &Path) -> Result<()> {
    let mut mine = false;
    let r = PRELOAD.get_or_init(|| {
        mine = true;
        if !path.is_absolute() || !path.is_file() {
            return Err(format!("{}: not an absolute path to an existing libnvrtc.so.13", path.display()));
        }
        load_global(path).map(|_| Some(path.to_path_buf())).map_err(|e| format!("{}: cannot load: {e}", path.display()))
    });
    match r {
        Ok(Some(p)) if p == path => Ok(()),
        Err(m) if mine => Err(err!(CudaUnavailable, "{m}")),
        _ => bail!(InvalidState, "NVRTC was already chosen for this process ({r:?}); use_library({}) must come first", path.display()),
    }
}

/// Checks that NVRTC can be used, or says why not and how to install it.
pub fn ensure() -> Result<()> {
    preload()?;
    // SAFETY: only tries to dlopen NVRTC by its usual names.
    let present = catch_unwind(|| unsafe { ns::is_culib_present() }).unwrap_or(false);
    if !present {
        bail!(CudaUnavailable, "NVRTC (libnvrtc.so.13) not found by the dynamic loader and {NVRTC_LIB_ENV} is unset: {NVRTC_INSTALL_HINT}");
    }
    Ok(())
}

/// Runs `f` (which calls into cudarc's NVRTC bindings) after [`ensure`],
/// turning a cudarc panic (missing symbol) into an error.
fn with_nvrtc<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    ensure()?;
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => bail!(CudaUnavailable, "{what}: the loaded NVRTC lacks a function cudarc needs (NVRTC older than 13.0?)"),
    }
}

fn nvrtc_err(call: &str, e: nr::NvrtcError) -> crate::error::Error {
    // SAFETY: nvrtcGetErrorString returns a static string for any code.
    let text = unsafe { CStr::from_ptr(ns::nvrtcGetErrorString(e.0)) }.to_string_lossy().into_owned();
    err!(Cuda, "{call} failed: {:?} ({text})", e.0)
}

/// NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32)> {
    with_nvrtc("nvrtcVersion", || {
        let (mut ma, mut mi) = (0, 0);
        // SAFETY: two valid out-pointers.
        unsafe { ns::nvrtcVersion(&mut ma, &mut mi) }.result().map_err(|e| nvrtc_err("nvrtcVersion", e))?;
        Ok((ma, mi))
    })
}

/// The `sm_XY` numbers (e.g. 90) this NVRTC can compile for.
pub fn supported_archs() -> Result<Vec<i32>> {
    with_nvrtc("nvrtcGetSupportedArchs", || {
        let mut n = 0;
        // SAFETY: valid out-pointer.
        unsafe { ns::nvrtcGetNumSupportedArchs(&mut n) }.result().map_err(|e| nvrtc_err("nvrtcGetNumSupportedArchs", e))?;
        let mut v = vec![0i32; n.max(0) as usize];
        // SAFETY: `v` holds the number of entries NVRTC just reported.
        unsafe { ns::nvrtcGetSupportedArchs(v.as_mut_ptr()) }.result().map_err(|e| nvrtc_err("nvrtcGetSupportedArchs", e))?;
        Ok(v)
    })
}

/// An NVRTC program, destroyed on drop whatever path leaves the scope.
struct Program(ns::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here.
        let _ = unsafe { nr::destroy_program(self.0) };
    }
}

fn program_log(p: &Program) -> String {
    // SAFETY: `p` is a live program.
    match unsafe { nr::get_program_log(p.0) } {
        Ok(bytes) => {
            let b: Vec<u8> = bytes.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
            String::from_utf8_lossy(&b).trim().to_string()
        }
        Err(_) => String::from("(no log)"),
    }
}

/// Compiles CUDA C++ `src` (named `name` in diagnostics) to a CUBIN for
/// `arch` (`"sm_80"`, `"sm_90"`, ...) with [`COMPILE_OPTIONS`]. A compile
/// error carries NVRTC's log.
pub fn compile_cubin(src: &str, name: &str, arch: &str) -> Result<Vec<u8>> {
    compile_with(src, name, arch, &[]).map(|(cubin, _)| cubin)
}

/// What ptxas reports of one kernel's resources (`--ptxas-options=-v`):
/// registers per thread, stack frame and spills (bytes per thread), and
/// static shared memory (bytes per block; dynamic shared memory is the
/// launch's and not counted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub kernel: String,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub shared_bytes: u32,
}

/// [`compile_cubin`] with ptxas's resource report (the same machine code:
/// the report is a log, not an option that changes code generation): the
/// CUBIN and one [`KernelResources`] per kernel, in ptxas's order.
pub fn compile_cubin_report(src: &str, name: &str, arch: &str) -> Result<(Vec<u8>, Vec<KernelResources>)> {
    let (cubin, log) = compile_with(src, name, arch, &["--ptxas-options=-v"])?;
    let report = parse_ptxas_report(&log);
    if report.is_empty() {
        bail!(Cuda, "{name} for {arch}: NVRTC's log has no ptxas resource report:\n{log}");
    }
    Ok((cubin, report))
}

/// The kernels' resource lines of a `ptxas -v` log: each kernel's
/// "Compiling entry function 'NAME'" line, then its "N bytes stack frame,
/// N bytes spill stores, N bytes spill loads" and "Used N registers, ...,
/// N bytes smem" lines.
pub fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    // The number before `unit` in `line` ("..., 27648 bytes smem"), or 0.
    fn before(line: &str, unit: &str) -> u32 {
        line.split(',').find_map(|part| part.trim().strip_suffix(unit).and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())).unwrap_or(0)
    }
    let mut out: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelResources { kernel, ..Default::default() });
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes stack frame") {
                k.stack_bytes = before(line, "bytes stack frame");
                k.spill_store_bytes = before(line, "bytes spill stores");
                k.spill_load_bytes = before(line, "bytes spill loads");
            } else if line.contains("Used ") && line.contains(" registers") {
                k.registers = line.split("Used ").nth(1).and_then(|r| r.split(' ').next()?.parse().ok()).unwrap_or(0);
                k.shared_bytes = before(line, "bytes smem");
            }
        }
    }
    out
}

/// Compiles with [`COMPILE_OPTIONS`], the architecture and `extra`
/// options: the CUBIN and NVRTC's log.
fn compile_with(src: &str, name: &str, arch: &str, extra: &[&str]) -> Result<(Vec<u8>, String)> {
    if !arch.starts_with("sm_") {
        bail!(InvalidArgument, "CUBIN architecture '{arch}' must be a real one (sm_XY), not a virtual compute_XY");
    }
    let csrc = CString::new(src).map_err(|_| err!(InvalidArgument, "{name}: source holds a NUL byte"))?;
    let cname = CString::new(name).map_err(|_| err!(InvalidArgument, "kernel source name '{name}' holds a NUL byte"))?;
    with_nvrtc("nvrtc", || {
        let prog = Program(nr::create_program(&csrc, Some(&cname)).map_err(|e| nvrtc_err(&format!("nvrtcCreateProgram({name})"), e))?);
        let mut opts: Vec<String> = COMPILE_OPTIONS.iter().map(|s| s.to_string()).collect();
        opts.push(format!("--gpu-architecture={arch}"));
        opts.extend(extra.iter().map(|s| s.to_string()));
        // SAFETY: `prog` is live; the options are NUL-free ASCII.
        if let Err(e) = unsafe { nr::compile_program(prog.0, &opts) } {
            let (ma, mi) = version().unwrap_or((0, 0));
            bail!(Cuda, "nvrtcCompileProgram({name}, {arch}) with NVRTC {ma}.{mi} failed: {:?}\noptions: {}\n{}", e.0, opts.join(" "), program_log(&prog));
        }
        let mut size = 0usize;
        // SAFETY: `prog` compiled successfully; `size` is a valid out-pointer.
        unsafe { ns::nvrtcGetCUBINSize(prog.0, &mut size) }.result().map_err(|e| nvrtc_err(&format!("nvrtcGetCUBINSize({name})"), e))?;
        if size == 0 {
            bail!(Cuda, "nvrtcGetCUBINSize({name}, {arch}) returned 0 bytes: NVRTC made no machine code");
        }
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` has the `size` bytes NVRTC asked for.
        unsafe { ns::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast()) }.result().map_err(|e| nvrtc_err(&format!("nvrtcGetCUBIN({name})"), e))?;
        Ok((cubin, program_log(&prog)))
    })
}

/// One `cuda/*.cu` file, embedded in the library at build time so no file
/// is looked up at run time.
#[derive(Debug)]
pub struct KernelSource {
    /// File name under `cuda/` (e.g. `"nf4.cu"`).
    pub name: &'static str,
    pub src: &'static str,
}

/// Process-wide CUBIN cache: `(source name, architecture) → CUBIN`.
type CubinCache = HashMap<(&'static str, String), Arc<Vec<u8>>>;
static CUBINS: LazyLock<Mutex<CubinCache>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// The CUBIN of `k` for `arch`, compiled on first request in this process
/// (or read from the disk cache, [`cubin_disk_cached`]). The lock is held
/// while compiling so one source is never compiled twice.
pub fn cubin_cached(k: &'static KernelSource, arch: &str) -> Result<Arc<Vec<u8>>> {
    let mut cache = CUBINS.lock();
    if let Some(c) = cache.get(&(k.name, arch.to_string())) {
        return Ok(c.clone());
    }
    let c = Arc::new(match cache_dir() {
        Some(dir) => cubin_disk_cached(&dir, k.src, k.name, arch)?.0,
        None => compile_cubin(k.src, k.name, arch)?,
    });
    cache.insert((k.name, arch.to_string()), c.clone());
    Ok(c)
}

/// Environment variable naming the on-disk CUBIN cache directory (`off`
/// or empty: no disk cache).
pub const CACHE_DIR_ENV: &str = "LORA_CUDA_CACHE_DIR";

/// The disk cache's directory, if any (module docs).
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os(CACHE_DIR_ENV) {
        Some(v) if v.is_empty() || v.eq_ignore_ascii_case("off") => None,
        Some(v) => Some(PathBuf::from(v)),
        None => {
            let base = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()).map(PathBuf::from).or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
            Some(base.join("liblora").join("cubin"))
        }
    }
}

/// FNV-1a, 64 bits: a stable hash (the standard library's may change
/// between Rust releases, which would only miss the cache, but a fixed one
/// keeps file names meaningful across builds).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate the parts, so ("ab", "c") and ("a", "bc") differ.
        h = (h ^ 0xff).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Magic of a cache file: `LORACUBIN1`, the CUBIN's length (u64 LE) and
/// FNV-1a hash (u64 LE), then the CUBIN.
const CACHE_MAGIC: &[u8; 10] = b"LORACUBIN1";

/// The CUBIN of `src` (named `name`) for `arch` through the disk cache in
/// `dir`: read when a valid file is there, else compiled and written.
/// Returns the CUBIN and whether it came from the disk.
pub fn cubin_disk_cached(dir: &Path, src: &str, name: &str, arch: &str) -> Result<(Vec<u8>, bool)> {
    if let Some(why) = unsafe_cache_dir(dir) {
        crate::log!(Warn, "CUBIN cache: not using {}: {why}", dir.display());
        return Ok((compile_cubin(src, name, arch)?, false));
    }
    let (ma, mi) = version()?;
    let nv = format!("{ma}.{mi}");
    let opts = COMPILE_OPTIONS.join(" ");
    let key = fnv1a(&[src.as_bytes(), arch.as_bytes(), opts.as_bytes(), nv.as_bytes()]);
    let stem = name.trim_end_matches(".cu").replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_");
    let path = dir.join(format!("{stem}-{arch}-{key:016x}.cubin"));
    if let Ok(bytes) = std::fs::read(&path) {
        let h = CACHE_MAGIC.len();
        if bytes.len() >= h + 16 && &bytes[..h] == CACHE_MAGIC {
            let len = u64::from_le_bytes(bytes[h..h + 8].try_into().expect("8 bytes")) as usize;
            let sum = u64::from_le_bytes(bytes[h + 8..h + 16].try_into().expect("8 bytes"));
            let body = &bytes[h + 16..];
            if body.len() == len && fnv1a(&[body]) == sum {
                return Ok((body.to_vec(), true));
            }
        }
        crate::log!(Warn, "CUBIN cache: {} is damaged or not a cache file; recompiling", path.display());
    }
    let cubin = compile_cubin(src, name, arch)?;
    if let Err(e) = write_cache_file(dir, &path, &cubin) {
        crate::log!(Warn, "CUBIN cache: cannot write {}: {e}", path.display());
    }
    Ok((cubin, false))
}

/// Why `dir` must not hold cached machine code, if it must not: a
/// directory other users may write to (or one owned by another user)
/// could hand this process a planted CUBIN, which the checksum would not
/// catch. A directory that does not exist yet is fine (it is created
/// private).
#[cfg(unix)]
fn unsafe_cache_dir(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir).ok()?;
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    if m.uid() != me {
        return Some(format!("owned by uid {}, not this user ({me})", m.uid()));
    }
    if m.mode() & 0o022 != 0 {
        return Some(format!("writable by others (mode {:o})", m.mode() & 0o777));
    }
    None
}

#[cfg(not(unix))]
fn unsafe_cache_dir(_dir: &Path) -> Option<String> {
    None
}

fn write_cache_file(dir: &Path, path: &Path, cubin: &[u8]) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)?;
    let mut data = Vec::with_capacity(CACHE_MAGIC.len() + 16 + cubin.len());
    data.extend_from_slice(CACHE_MAGIC);
    data.extend_from_slice(&(cubin.len() as u64).to_le_bytes());
    data.extend_from_slice(&fnv1a(&[cubin]).to_le_bytes());
    data.extend_from_slice(cubin);
    // A fresh temporary file (created exclusively: never an existing file
    // or a link), then a rename: readers see the old file, no file, or the
    // whole new one.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let tmp = path.with_extension(format!("tmp{}x{nanos}", std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    let r = std::io::Write::write_all(&mut f, &data).and_then(|_| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_report_is_read_per_kernel() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'attention_tc_dq_d64_bf16' for 'sm_90'\n\
            ptxas info    : Function properties for attention_tc_dq_d64_bf16\n\
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 160 registers, used 1 barriers, 14336 bytes smem\n\
            ptxas info    : Compile time = 98.818 ms\n\
            ptxas info    : Compiling entry function 'fwd' for 'sm_80'\n\
            ptxas info    : Function properties for fwd\n\
            ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 128 registers, used 1 barriers, 8 bytes cumulative stack size, 18432 bytes smem\n\
            ptxas info    : Compiling entry function 'plain' for 'sm_90'\n\
            ptxas info    : Function properties for plain\n\
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 31 registers, used 0 barriers\n";
        let r = parse_ptxas_report(log);
        let k = |kernel: &str, registers, stack_bytes, spill_store_bytes, spill_load_bytes, shared_bytes| KernelResources { kernel: kernel.into(), registers, stack_bytes, spill_store_bytes, spill_load_bytes, shared_bytes };
        assert_eq!(r, vec![k("attention_tc_dq_d64_bf16", 160, 0, 0, 0, 14336), k("fwd", 128, 8, 4, 12, 18432), k("plain", 31, 0, 0, 0, 0)]);
        assert!(parse_ptxas_report("").is_empty());
    }
}
