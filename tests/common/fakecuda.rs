//! The emulated CUDA device: the GPU tests' device path without a GPU.
//!
//! Three small libraries stand in for NVIDIA's (tests/fakecuda/*.cpp):
//! `libcuda.so` (device memory is host memory; launches, products,
//! asynchronous copies, memsets and frees queued in stream order until
//! something synchronizes, so a host read that misses its synchronization
//! reads stale memory, as on a busy GPU — `LORA_FAKECUDA_DEFER=0` runs
//! every call at once; guard bytes around each allocation checked when it
//! is freed),
//! `libcublas.so` (GemmEx as a host loop, fp32 accumulation) and
//! `libnvrtc.so` (a program's "CUBIN" names its source). A module is the
//! source compiled as host C++ by tests/common/emu.rs, with one generated
//! wrapper per `extern "C" __global__` kernel that unpacks cuLaunchKernel's
//! parameter array by the kernel's declared parameter types and runs the
//! grid with the emulation's threads. They are loaded under the real
//! libraries' SONAMEs before cudarc looks for them, so the crate itself,
//! unchanged, drives them: this checks the Rust orchestration (the device
//! training step, generation, merges, swaps), launch shapes, argument
//! marshalling and buffer bounds on the kernels' real logic. It does not
//! check the GPU's instructions, memory model or speed; a GPU does
//! (scripts/gpu-check.sh, which never uses this: LORA_REQUIRE_GPU=1).
//!
//! Used by the GPU tests when there is no GPU (tests/common/gpu.rs) unless
//! `LORA_CUDA_EMULATE=0`. With `LORA_FAKECUDA_COUNT_ONLY=1` nothing runs
//! (kernels, products) and fresh memory is left untouched: the allocations
//! alone, to count a big model's device memory (examples/device_memory.rs).

use lora::backend::cuda;
use std::path::{Path, PathBuf};

const FAKE_CUDA: &str = include_str!("../fakecuda/fake_cuda.cpp");
const FAKE_CUBLAS: &str = include_str!("../fakecuda/fake_cublas.cpp");
const FAKE_NVRTC: &str = include_str!("../fakecuda/fake_nvrtc.cpp");

/// FNV-1a, 64 bits: names a build by its text (the cache below).
fn fnv(parts: &[&str]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Compiles `src` (C++) into the shared library `out` unless it is there
/// already (`out`'s name carries a hash of what built it: a cache shared by
/// test processes; written under a temporary name, then renamed).
fn compile(out: &Path, src: &str, args: &[&str]) -> Result<(), String> {
    if out.is_file() {
        return Ok(());
    }
    let tmp = out.with_extension(format!("{}-{:?}.tmp", std::process::id(), std::thread::current().id()));
    let cpp = tmp.with_extension("cpp");
    std::fs::write(&cpp, src).map_err(|e| format!("writing {}: {e}", cpp.display()))?;
    super::emu::compile_cpp(&cpp, &tmp, args)?;
    let _ = std::fs::remove_file(&cpp);
    std::fs::rename(&tmp, out).map_err(|e| format!("renaming {}: {e}", tmp.display()))
}

/// One kernel's name and parameter types, read from its declaration
/// `extern "C" __global__ void [__launch_bounds__(..)] name(type p, ...)`.
fn kernels(src: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("extern \"C\" __global__") {
        rest = &rest[i + "extern \"C\" __global__".len()..];
        let mut s = rest.trim_start().strip_prefix("void").unwrap_or_else(|| panic!("a kernel that does not return void: {}", &rest[..80.min(rest.len())])).trim_start();
        if let Some(t) = s.strip_prefix("__launch_bounds__") {
            let close = t.find(')').expect("__launch_bounds__(...)");
            s = t[close + 1..].trim_start();
        }
        let open = s.find('(').expect("a kernel's parameter list");
        let name = s[..open].trim().to_string();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !name.is_empty(), "kernel name {name:?}");
        let body = &s[open + 1..];
        let (mut depth, mut end) = (0i32, None);
        for (j, c) in body.char_indices() {
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => {
                    end = Some(j);
                    break;
                }
                ')' => depth -= 1,
                _ => {}
            }
        }
        let params = &body[..end.expect("the end of a kernel's parameter list")];
        let types = params
            .split(',')
            .map(|p| p.replace("__restrict__", " "))
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                let p = p.trim();
                // The type is everything before the parameter's name.
                let cut = p.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or_else(|| panic!("parameter {p:?} of {name} has no type"));
                p[..=cut].split_whitespace().collect::<Vec<_>>().join(" ")
            })
            .collect();
        out.push((name, types));
    }
    out
}

/// The host C++ of one kernel source: the emulation shim, the source with
/// its substitutions, and a wrapper per kernel.
fn module_source(k: &cuda::nvrtc::KernelSource) -> String {
    let mut text = k.src.to_string();
    for (from, to) in super::emu::SUBST {
        text = text.replace(from, to);
    }
    assert!(!text.contains("asm(") && !text.contains("asm volatile("), "cuda/{} has inline PTX the emulation does not know: extend emu::SUBST", k.name);
    let mut src = format!("{}{}\n// ---- cuda/{}\n{text}\n", super::emu::EMU_SHIM, super::emu::MIN_MAX, k.name);
    let ks = kernels(&text);
    assert!(!ks.is_empty(), "cuda/{} declares no kernels", k.name);
    for (name, types) in ks {
        // The arguments are copied out of the parameter array at the call,
        // as the driver does; the grid runs when the fake driver's queue
        // reaches it (`defer`), or now without one.
        src.push_str(&format!("extern \"C\" void emuw_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned smem, void** p, void (*defer)(void (*)(void*), void*)) {{\n"));
        let mut args = Vec::new();
        for (i, t) in types.iter().enumerate() {
            src.push_str(&format!("    using T{i} = {t};\n    T{i} a{i} = *static_cast<T{i}*>(p[{i}]);\n"));
            args.push(format!("a{i}"));
        }
        src.push_str(&format!("    auto run = [=] {{ emu_dyn_bytes = smem; emu_launch3(dim3{{gx, gy, gz}}, bx, [&] {{ {name}({}); }}); }};\n", args.join(", ")));
        src.push_str("    if (!defer) { run(); return; }\n    using R = decltype(run);\n    defer([](void* j) { R* r = static_cast<R*>(j); (*r)(); delete r; }, new R(run));\n}\n");
    }
    src
}

/// Builds the emulated device's libraries (cached in the system's temporary
/// directory), loads them in place of NVIDIA's and points the crate at
/// them. Once per process, before any other CUDA or NVRTC use (the caller,
/// tests/common/gpu.rs, runs it first). `Err` says why it cannot.
pub fn install() -> Result<(), String> {
    if let Some(why) = super::emu::skip_reason() {
        return Err(why);
    }
    let cache = std::env::temp_dir().join("lora-fakecuda");
    std::fs::create_dir_all(&cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;
    let t0 = std::time::Instant::now();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    // The modules under "<source name>.so" (the name the fake NVRTC gives
    // the fake driver) in a directory named by everything that built them;
    // the stand-in libraries beside it, named the same way.
    let modules: Vec<(&str, String)> = cuda::SOURCES.iter().map(|k| (k.name, module_source(k))).collect();
    let flags = super::emu::cxx_flags(&cxx).join(" ");
    let dir = cache.join(format!("modules-{:016x}", fnv(&[&[cxx.as_str(), flags.as_str()][..], &modules.iter().map(|m| m.1.as_str()).collect::<Vec<_>>()].concat())));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let stand_in = |stem: &str, src: &str, args: &[&str]| cache.join(format!("{stem}-{:016x}.so", fnv(&[&[cxx.as_str(), flags.as_str(), src][..], args].concat())));
    const CUDA_ARGS: &[&str] = &["-O2", "-Wl,-soname,libcuda.so", "-ldl"];
    const CUBLAS_ARGS: &[&str] = &["-O2", "-Wl,-soname,libcublas.so", "-ldl"];
    const NVRTC_ARGS: &[&str] = &["-O2", "-Wl,-soname,libnvrtc.so"];
    let (libcuda, libcublas, libnvrtc) = (stand_in("libcuda", FAKE_CUDA, CUDA_ARGS), stand_in("libcublas", FAKE_CUBLAS, CUBLAS_ARGS), stand_in("libnvrtc", FAKE_NVRTC, NVRTC_ARGS));
    let jobs: Vec<(PathBuf, &str, &[&str])> = modules
        .iter()
        .map(|(name, src)| (dir.join(format!("{name}.so")), src.as_str(), &[][..]))
        .chain([(libcuda.clone(), FAKE_CUDA, CUDA_ARGS), (libcublas.clone(), FAKE_CUBLAS, CUBLAS_ARGS), (libnvrtc.clone(), FAKE_NVRTC, NVRTC_ARGS)])
        .collect();
    // Two compilers at a time (CI has two cores).
    let queue = std::sync::Mutex::new(jobs.iter());
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| loop {
                    let Some((out, src, args)) = queue.lock().unwrap().next() else { return Ok::<(), String>(()) };
                    compile(out, src, args)?;
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().unwrap())
    })?;
    // No on-disk CUBIN cache: the fake's "CUBINs" must not land in the
    // user's cache (its NVRTC version, 0.1, keeps them apart anyway).
    std::env::set_var(cuda::nvrtc::CACHE_DIR_ENV, "off");
    for lib in [&libcuda, &libcublas] {
        use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
        // SAFETY: the libraries just built; their initializers do nothing.
        let l = unsafe { Library::open(Some(lib), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| format!("loading {}: {e}", lib.display()))?;
        if lib == &libcuda {
            let d = std::ffi::CString::new(dir.to_str().ok_or("a non-UTF-8 temporary directory")?).unwrap();
            // SAFETY: the test hook's signature in tests/fakecuda/fake_cuda.cpp.
            unsafe { l.get::<unsafe extern "C" fn(*const std::ffi::c_char)>(b"lora_fakecuda_set_module_dir").map_err(|e| e.to_string())?(d.as_ptr()) };
        }
        std::mem::forget(l);
    }
    cuda::nvrtc::use_library(&libnvrtc).map_err(|e| format!("the fake NVRTC: {}", e.message))?;
    eprintln!("emulated CUDA device ready in {:.1} s ({})", t0.elapsed().as_secs_f64(), dir.display());
    Ok(())
}
