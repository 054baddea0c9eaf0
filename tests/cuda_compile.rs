//! Every kernel source (`cuda/*.cu`, embedded in the library) compiles with
//! NVRTC to machine code (CUBIN) for sm_80 (A100) and sm_90 (H100/H200), on
//! a machine without a GPU, so a syntax or type error never waits for a GPU
//! (DESIGN.md section 5); ptxas's report of each kernel's registers and
//! spills is printed, and a kernel that spills its working set to local
//! memory fails.
//!
//! NVRTC is found, in this order: `LORA_NVRTC_LIB` (absolute path of
//! libnvrtc.so.13); a libnvrtc the dynamic loader finds; the
//! `nvidia-cuda-nvrtc` wheel in python3's site-packages
//! (`nvidia/cu13/lib/libnvrtc.so.13`). Without one the tests FAIL, saying
//! how to install it, unless `LORA_SKIP_CUDA_COMPILE=1` opts out.

#[path = "common/scratch.rs"]
mod scratch;

use lora::backend::cuda::{nvrtc, SOURCES};
use lora::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

/// Architectures every kernel must compile for.
const ARCHS: &[&str] = &["sm_80", "sm_90"];

const INSTALL: &str = "install NVRTC with `python3 -m pip install nvidia-cuda-nvrtc` (CUDA 13.x wheel) and set \
     LORA_NVRTC_LIB=<site-packages>/nvidia/cu13/lib/libnvrtc.so.13 (found automatically when python3 \
     can import it), or set LORA_SKIP_CUDA_COMPILE=1 to skip these tests";

/// The wheel's libnvrtc.so.13 in one of python3's site-packages, if any.
fn wheel_nvrtc() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import site,sysconfig\n\
             dirs=[sysconfig.get_paths()['purelib'],sysconfig.get_paths()['platlib']]\n\
             try: dirs+=site.getsitepackages()+[site.getusersitepackages()]\n\
             except Exception: pass\n\
             print('\\n'.join(dirs))",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|d| Path::new(d.trim()).join("nvidia/cu13/lib/libnvrtc.so.13"))
        .find(|p| p.is_file())
}

/// Finds NVRTC once per process: `Ok(description)` or `Err(why not)`.
fn nvrtc_found() -> &'static Result<String, String> {
    static FOUND: OnceLock<Result<String, String>> = OnceLock::new();
    FOUND.get_or_init(|| {
        if std::env::var_os(nvrtc::NVRTC_LIB_ENV).is_some_and(|v| !v.is_empty()) {
            nvrtc::ensure().map_err(|e| e.message)?;
            return Ok(format!("{}={}", nvrtc::NVRTC_LIB_ENV, std::env::var(nvrtc::NVRTC_LIB_ENV).unwrap_or_default()));
        }
        // SAFETY: only tries to dlopen NVRTC by its usual names.
        let system = std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false);
        if system {
            nvrtc::ensure().map_err(|e| e.message)?;
            return Ok("the dynamic loader's libnvrtc".to_string());
        }
        match wheel_nvrtc() {
            Some(p) => {
                nvrtc::use_library(&p).map_err(|e| e.message)?;
                Ok(format!("the nvidia-cuda-nvrtc wheel at {}", p.display()))
            }
            None => Err("no NVRTC: LORA_NVRTC_LIB is unset, the dynamic loader finds no libnvrtc, and python3 has no nvidia-cuda-nvrtc wheel".into()),
        }
    })
}

/// True when the test should go on; false (with a message) when the
/// developer opted out; panics when NVRTC is missing.
fn need_nvrtc(test: &str) -> bool {
    match nvrtc_found() {
        Ok(how) => {
            let (ma, mi) = nvrtc::version().expect("nvrtcVersion");
            eprintln!("{test}: NVRTC {ma}.{mi} from {how}");
            true
        }
        Err(why) => {
            if std::env::var("LORA_SKIP_CUDA_COMPILE").is_ok_and(|v| v == "1") {
                eprintln!("SKIPPED {test}: LORA_SKIP_CUDA_COMPILE=1 ({why})");
                false
            } else {
                panic!("{test}: {why}.\nTo fix: {INSTALL}");
            }
        }
    }
}

/// Names of the `extern "C" __global__` kernels of a source.
fn kernel_names(src: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (i, _) in src.match_indices("extern \"C\" __global__") {
        let mut rest = src[i + "extern \"C\" __global__".len()..].trim_start();
        rest = rest.strip_prefix("void").unwrap_or(rest).trim_start();
        if let Some(r) = rest.strip_prefix("__launch_bounds__") {
            let close = r.find(')').expect("__launch_bounds__(...)");
            rest = r[close + 1..].trim_start();
        }
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        assert!(!name.is_empty(), "cannot read a kernel name at byte {i}");
        names.push(name);
    }
    names
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn every_kernel_source_compiles_to_cubin_for_sm80_and_sm90() {
    if !need_nvrtc("every_kernel_source_compiles_to_cubin_for_sm80_and_sm90") {
        return;
    }
    let supported = nvrtc::supported_archs().expect("nvrtcGetSupportedArchs");
    for arch in ARCHS {
        let num: i32 = arch[3..].parse().unwrap();
        assert!(supported.contains(&num), "this NVRTC cannot compile for {arch} (it supports {supported:?})");
    }
    for k in SOURCES {
        let names = kernel_names(k.src);
        assert!(!names.is_empty(), "cuda/{} defines no extern \"C\" __global__ kernel", k.name);
        for arch in ARCHS {
            let t = Instant::now();
            let (cubin, report) = nvrtc::compile_cubin_report(k.src, k.name, arch).unwrap_or_else(|e| panic!("cuda/{} for {arch}: {e}", k.name));
            eprintln!("cuda/{} -> {arch} CUBIN: {} bytes, {} kernels, {:.0} ms", k.name, cubin.len(), names.len(), t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(&cubin[..4], b"\x7fELF", "cuda/{} for {arch}: NVRTC did not return an ELF CUBIN", k.name);
            for n in &names {
                assert!(contains(&cubin, n.as_bytes()), "cuda/{} for {arch}: kernel {n} missing from the CUBIN", k.name);
                let r = report.iter().find(|r| &r.kernel == n).unwrap_or_else(|| panic!("cuda/{} for {arch}: no ptxas report for kernel {n}", k.name));
                eprintln!(
                    "  {n}: {} registers, {} B stack, {}/{} B spilled (stores/loads), {} B static shared",
                    r.registers, r.stack_bytes, r.spill_store_bytes, r.spill_load_bytes, r.shared_bytes
                );
                // A few bytes is ptxas keeping one value in local memory
                // (4 B in the head_dim-64 tensor-core forward); a kernel
                // whose working set no longer fits its registers spills
                // hundreds, and on a GPU that is a slowdown no emulated
                // test sees.
                assert!(
                    r.spill_store_bytes <= MAX_SPILL_BYTES && r.spill_load_bytes <= MAX_SPILL_BYTES,
                    "cuda/{} for {arch}: kernel {n} spills {}/{} bytes per thread to local memory (stores/loads; at most {MAX_SPILL_BYTES} allowed): \
                     its registers ({}) no longer hold its working set",
                    k.name,
                    r.spill_store_bytes,
                    r.spill_load_bytes,
                    r.registers
                );
            }
        }
    }
}

/// Register spills (bytes per thread, stores or loads) a kernel may have.
const MAX_SPILL_BYTES: u32 = 16;

#[test]
fn cached_cubin_is_reused() {
    if !need_nvrtc("cached_cubin_is_reused") {
        return;
    }
    let k = SOURCES[0];
    let a = nvrtc::cubin_cached(k, "sm_90").expect("compile");
    let b = nvrtc::cubin_cached(k, "sm_90").expect("cache");
    assert!(std::sync::Arc::ptr_eq(&a, &b), "second request compiled again");
}

/// The on-disk CUBIN cache: a second process (here: a second call that
/// bypasses the in-process cache) reads the file instead of compiling; a
/// damaged file is detected by its checksum, recompiled and rewritten;
/// another architecture or source text is another file.
#[test]
fn disk_cache_reuses_and_repairs() {
    if !need_nvrtc("disk_cache_reuses_and_repairs") {
        return;
    }
    let dir = scratch::scratch_root("cubin-cache");
    let k = SOURCES[0];
    let (a, from_disk) = nvrtc::cubin_disk_cached(&dir, k.src, k.name, "sm_80").expect("compile");
    assert!(!from_disk, "an empty cache directory served a CUBIN");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "one file per (source, architecture): {files:?}");
    let t = Instant::now();
    let (b, from_disk) = nvrtc::cubin_disk_cached(&dir, k.src, k.name, "sm_80").expect("cache");
    assert!(from_disk, "the second request compiled again");
    assert_eq!(a, b);
    eprintln!("cuda/{} sm_80 from the disk cache in {:.1} ms ({} bytes)", k.name, t.elapsed().as_secs_f64() * 1e3, b.len());
    // One flipped byte of the CUBIN: detected, recompiled, rewritten.
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a;
    std::fs::write(&files[0], &bytes).unwrap();
    let (c, from_disk) = nvrtc::cubin_disk_cached(&dir, k.src, k.name, "sm_80").expect("repair");
    assert!(!from_disk, "a damaged cache file was used");
    assert_eq!(c, a);
    assert!(nvrtc::cubin_disk_cached(&dir, k.src, k.name, "sm_80").unwrap().1, "the repaired file was not rewritten");
    // Another architecture, or another source text: other files.
    nvrtc::cubin_disk_cached(&dir, k.src, k.name, "sm_90").unwrap();
    let edited = format!("{}\n// edited\n", k.src);
    assert!(!nvrtc::cubin_disk_cached(&dir, &edited, k.name, "sm_80").unwrap().1, "an edited source was served the old CUBIN");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3);
    // A directory others may write to is not trusted (a planted CUBIN
    // would pass the checksum): compiled every time, nothing written.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let shared = dir.join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        for _ in 0..2 {
            assert!(!nvrtc::cubin_disk_cached(&shared, k.src, k.name, "sm_80").unwrap().1, "a world-writable cache directory was used");
        }
        assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compile_errors_carry_nvrtcs_log() {
    if !need_nvrtc("compile_errors_carry_nvrtcs_log") {
        return;
    }
    let e = nvrtc::compile_cubin("extern \"C\" __global__ void broken(float* x) { x[0] = undeclared_thing; }", "broken.cu", "sm_90").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Cuda);
    assert!(e.message.contains("nvrtcCompileProgram(broken.cu, sm_90)"), "{}", e.message);
    assert!(e.message.contains("undeclared_thing"), "the log should name the error: {}", e.message);
    let e = nvrtc::compile_cubin("extern \"C\" __global__ void k() {}", "k.cu", "compute_90").unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
}

/// Rules from DESIGN.md section 5 that need no compiler: each file opens
/// with a comment, includes nothing, holds no host code, and names its
/// kernels `<family>_<op>[_<dtype>]` after the file.
#[test]
fn sources_follow_the_kernel_conventions() {
    for k in SOURCES {
        let family = k.name.strip_suffix(".cu").expect(".cu file");
        assert!(k.src.starts_with("//") || k.src.starts_with("/*"), "cuda/{} must open with a comment on its math and memory traffic", k.name);
        assert!(!k.src.lines().any(|l| l.trim_start().starts_with("#include")), "cuda/{} must not #include (NVRTC compiles it without headers)", k.name);
        for host in ["__host__", "int main", "cudaMalloc", "<<<"] {
            assert!(!k.src.contains(host), "cuda/{} holds host code ({host})", k.name);
        }
        for n in kernel_names(k.src) {
            assert!(n.starts_with(&format!("{family}_")), "kernel {n} in cuda/{} should be named {family}_<op>_<dtype>", k.name);
        }
    }
}

/// The embedded sources are the files in cuda/ (checked where the source
/// tree is at hand; a test binary copied elsewhere skips this).
#[test]
fn embedded_sources_are_the_cuda_directory() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        eprintln!("SKIPPED embedded_sources_are_the_cuda_directory: {} not present", dir.display());
        return;
    };
    let mut on_disk: Vec<String> = rd
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    on_disk.sort();
    let mut embedded: Vec<String> = SOURCES.iter().map(|k| k.name.to_string()).collect();
    embedded.sort();
    assert_eq!(on_disk, embedded, "every cuda/*.cu must be listed in backend::cuda::SOURCES");
    for k in SOURCES {
        let text = std::fs::read_to_string(dir.join(k.name)).unwrap();
        assert!(text == k.src, "cuda/{} differs from the embedded copy (rebuild)", k.name);
    }
}
