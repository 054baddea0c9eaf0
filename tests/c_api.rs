//! Drives the C API tests in `tests/c/`: C programs that use only
//! `include/lora.h`, compiled with `-std=c11 -Wall -Wextra -Werror
//! -pedantic` and AddressSanitizer + UndefinedBehaviorSanitizer, linked
//! against the cdylib this `cargo test` just built, and run here, one
//! `#[test]` per program (DESIGN.md section 6). A test fails with the
//! program's output when it exits non-zero, dies on a signal, times out, or
//! prints any sanitizer report.
//!
//! Finding the library: `cargo test` compiles the `lora` lib target (crate
//! types cdylib + staticlib + rlib, one rustc invocation) before it links
//! this test, into the directory this test executable lives in
//! (`target/<profile>/deps/liblora.so`; it is not copied up to
//! `target/<profile>/` for tests). So the `.so` next to us is the one built
//! from the sources under test, with the same profile and target dir. Only
//! if it is missing (an unusual layout) the driver runs
//! `$CARGO build --lib` for the same profile, target and target dir (cargo
//! does not hold its build lock while tests run) and takes the cdylib path
//! from cargo's JSON messages. `LORA_CDYLIB=/path/liblora.so` overrides
//! both (to test another build).
//!
//! Linking: the cdylib, by absolute path, plus an rpath and
//! LD_LIBRARY_PATH to the same directory, so no other liblora on the
//! machine can be picked up (the library's SONAME is `liblora.so.N`;
//! build.rs links that name to the cdylib beside it, so the loader finds
//! this build). The shared library rather than `liblora.a`:
//! it is what C users link, its dynamic symbol table is exactly the public
//! ABI (tests/exports.rs checks it), and a static link would drag the whole
//! Rust std into every program and need `-lgcc_s -lpthread -ldl -lm`.
//!
//! Sanitizers: `-fsanitize=address,undefined -fno-sanitize-recover=all
//! -fno-omit-frame-pointer -g -O1`; at run time ASAN_OPTIONS and
//! UBSAN_OPTIONS are set (not inherited) so that every error stops the
//! program with a non-zero status (`halt_on_error=1`, `abort_on_error=0` so
//! no core files), leak detection is on, and `protect_shadow_gap=0` so that
//! on a machine with a GPU the CUDA driver (probed by the AUTO backend) can
//! map its memory under ASan: with ASan's default (1), `cuInit` fails there,
//! the CUDA backend is reported unavailable, and LSan reports the memory
//! libcuda leaks in its failed `cuInit` (seen on an H200; with 0 the same
//! programs pass on CPU, AUTO and CUDA contexts with no leak report). The Rust code in liblora is not instrumented,
//! but all its allocations go through ASan's malloc, so leaks, double frees
//! and bad frees of liblora's memory, and any C-side misuse of pointers it
//! hands out, are caught.
//!
//! Leaks: LeakSanitizer stays on, with no suppressions. liblora's worker
//! threads (a rayon pool per context) are stopped when the context is
//! freed, and whatever a still-exiting thread holds is reachable from its
//! stack or TLS, which LSan scans; repeated runs report nothing. Where LSan
//! cannot run at all (it needs ptrace, which some sandboxes forbid), the test
//! fails and says so; `LORA_C_TESTS_NO_LEAK_CHECK=1` is the explicit way to
//! run without leak checking there.
//!
//! `double_free_noasan.c` is built without sanitizers: liblora's documented
//! detection of a second free reads the freed handle, which ASan reports
//! (correctly) as a use after free. `sanitizer_canary.c` proves the set-up
//! catches heap overflows, use after free, UB and leaks.
//!
//! Needs a C compiler with ASan and UBSan (gcc >= 8 with libasan and
//! libubsan, or clang): `cc`, or `$CC`. Without one the tests fail with a
//! message saying so; they never pass silently.

#![cfg(unix)] // POSIX C programs, ELF/Mach-O linking, exit signals

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Each C program, with whether it is built with sanitizers.
const PROGRAMS: &[(&str, bool)] = &[
    ("basics", true),
    ("nf4_roundtrip", true),
    ("nf4_fixtures", true),
    ("bad_input", true),
    ("lora_layer", true),
    ("model", true),
    ("families", true),
    ("optimizer", true),
    ("tokenizer", true),
    ("paged", true),
    ("double_free_noasan", false),
    ("sanitizer_canary", true),
];

/// Warnings are errors; strict ISO C11 (POSIX where a file asks for it).
const WARN_FLAGS: &[&str] = &["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g"];
const SAN_FLAGS: &[&str] = &["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-O1"];

/// Output that means a sanitizer found something, even if the exit status
/// were somehow 0.
const SANITIZER_MARKERS: &[&str] = &[
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "WARNING: AddressSanitizer",
    "runtime error:",
    "SUMMARY: AddressSanitizer",
    "SUMMARY: UndefinedBehaviorSanitizer",
    "LeakSanitizer has encountered a fatal error",
];

/// Seconds one C program may run (ASan on a slow 2-core runner included);
/// `LORA_C_TEST_TIMEOUT` overrides.
const DEFAULT_TIMEOUT_S: u64 = 300;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn c_dir() -> PathBuf {
    manifest_dir().join("tests/c")
}

fn cdylib_name() -> String {
    format!("{}lora{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX)
}

/// The directory of this test executable: `target/[<triple>/]<profile>/deps`.
fn exe_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().expect("test executable has a directory").to_path_buf()
}

/// The cdylib under test (see the module doc).
fn cdylib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        if let Some(p) = std::env::var_os("LORA_CDYLIB") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "LORA_CDYLIB={} is not a file", p.display());
            return std::fs::canonicalize(&p).unwrap();
        }
        let next_to_us = exe_dir().join(cdylib_name());
        if next_to_us.is_file() {
            return std::fs::canonicalize(&next_to_us).unwrap();
        }
        build_cdylib()
    })
}

/// Fallback: `cargo build --lib` with this test's profile, target and
/// target dir, and the cdylib path from cargo's JSON messages.
fn build_cdylib() -> PathBuf {
    let deps = exe_dir();
    let profile_dir = deps.parent().expect("deps has a parent");
    let profile = profile_dir.file_name().unwrap().to_string_lossy().to_string();
    let mut root = profile_dir.parent().expect("profile dir has a parent").to_path_buf();
    let mut target_triple = None;
    if !root.join("CACHEDIR.TAG").exists() && root.parent().is_some_and(|p| p.join("CACHEDIR.TAG").exists()) {
        // target/<triple>/<profile>/deps
        target_triple = Some(root.file_name().unwrap().to_string_lossy().to_string());
        root = root.parent().unwrap().to_path_buf();
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from(env!("CARGO")));
    let mut cmd = Command::new(&cargo);
    cmd.arg("build").arg("--lib").arg("--message-format=json-render-diagnostics");
    cmd.arg("--manifest-path").arg(manifest_dir().join("Cargo.toml"));
    cmd.arg("--target-dir").arg(&root);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.arg("--profile").arg(other);
        }
    }
    if let Some(t) = &target_triple {
        cmd.arg("--target").arg(t);
    }
    let out = cmd.stderr(Stdio::inherit()).output().unwrap_or_else(|e| panic!("cannot run {cargo:?}: {e}"));
    assert!(out.status.success(), "`cargo build --lib` for the C tests failed ({})", out.status);
    let want = cdylib_name();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["reason"] != "compiler-artifact" || v["target"]["name"] != "lora" {
            continue;
        }
        for f in v["filenames"].as_array().into_iter().flatten() {
            let p = PathBuf::from(f.as_str().unwrap_or_default());
            if p.file_name().is_some_and(|n| n.to_string_lossy() == want) {
                return p;
            }
        }
    }
    panic!(
        "no {want} next to the test executable ({}) and `cargo build --lib` reported none: is \"cdylib\" still in [lib] crate-type?",
        deps.display()
    );
}

/// The C compiler: `$CC` (may hold arguments, e.g. "ccache gcc") or `cc`.
fn compiler() -> Vec<String> {
    let cc = std::env::var("CC").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| "cc".into());
    cc.split_whitespace().map(str::to_string).collect()
}

/// Checked once: the compiler runs at all.
fn check_compiler() {
    static OK: OnceLock<Result<String, String>> = OnceLock::new();
    let r = OK.get_or_init(|| {
        let cc = compiler();
        match Command::new(&cc[0]).args(&cc[1..]).arg("--version").output() {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string()),
            Ok(o) => Err(format!(
                "C compiler `{}` failed to run --version ({}): {}",
                cc.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => Err(format!(
                "no C compiler: cannot run `{}` ({e}). The C API tests (tests/c/*.c) need a C compiler with \
                 AddressSanitizer and UndefinedBehaviorSanitizer, e.g. gcc (with libasan/libubsan) or clang; \
                 install one or set CC.",
                cc.join(" ")
            )),
        }
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// Where the C programs and their scratch files go: next to the profile's
/// other outputs.
fn build_dir() -> PathBuf {
    let d = exe_dir().parent().unwrap().join("c-tests");
    std::fs::create_dir_all(&d).expect("create the C test build dir");
    d
}

/// Compiles `tests/c/<name>.c`; returns the executable's path.
fn compile(name: &str, sanitize: bool) -> PathBuf {
    check_compiler();
    let lib = cdylib();
    let lib_dir = lib.parent().unwrap();
    let src = c_dir().join(format!("{name}.c"));
    assert!(src.is_file(), "missing {}", src.display());
    let exe = build_dir().join(format!("{name}-{}", std::process::id()));
    let cc = compiler();
    let mut cmd = Command::new(&cc[0]);
    cmd.args(&cc[1..]).args(WARN_FLAGS);
    if sanitize {
        cmd.args(SAN_FLAGS);
    }
    cmd.arg("-I").arg(manifest_dir().join("include"));
    cmd.arg("-I").arg(c_dir());
    cmd.arg(&src);
    cmd.arg("-o").arg(&exe);
    cmd.arg(lib);
    cmd.arg(format!("-Wl,-rpath,{}", lib_dir.display()));
    cmd.args(["-pthread", "-lm"]);
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run the C compiler `{}`: {e}", cc.join(" ")));
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let hint = if ["-lasan", "-lubsan", "libasan", "libubsan"].iter().any(|m| err.contains(m)) {
            "\nhint: the compiler's sanitizer runtimes seem to be missing (Debian/Ubuntu: gcc's libasan and libubsan packages, e.g. libasan8 libubsan1)"
        } else {
            ""
        };
        panic!(
            "compiling {} failed ({}):\n$ {:?}\n{}{}{}",
            src.display(),
            out.status,
            cmd,
            String::from_utf8_lossy(&out.stdout),
            err,
            hint
        );
    }
    exe
}

struct RunResult {
    code: Option<i32>,
    signal: Option<i32>,
    output: String,
    timed_out: bool,
    cmdline: String,
}

impl RunResult {
    fn describe(&self) -> String {
        let status = if self.timed_out {
            "timed out".to_string()
        } else if let Some(c) = self.code {
            format!("exit status {c}")
        } else {
            format!("killed by signal {}", self.signal.unwrap_or(-1))
        };
        format!("$ {}\n{status}\n--- output ---\n{}--- end of output ---", self.cmdline, self.output)
    }
    fn sanitizer_report(&self) -> Option<&'static str> {
        SANITIZER_MARKERS.iter().copied().find(|m| self.output.contains(m))
    }
}

fn timeout() -> Duration {
    let s = std::env::var("LORA_C_TEST_TIMEOUT").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_TIMEOUT_S);
    Duration::from_secs(s)
}

/// Runs `exe args` with the sanitizer environment; stdout and stderr go to
/// one file (so their order is kept), read back when it ends.
fn run(exe: &Path, args: &[OsString]) -> RunResult {
    let lib_dir = cdylib().parent().unwrap().to_path_buf();
    let log = exe.with_extension("log");
    let f = std::fs::File::create(&log).expect("create the log file");
    let f2 = f.try_clone().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(args);
    cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
    let leak = if std::env::var("LORA_C_TESTS_NO_LEAK_CHECK").is_ok_and(|v| v == "1") { "0" } else { "1" };
    cmd.env(
        "ASAN_OPTIONS",
        format!("halt_on_error=1:abort_on_error=0:detect_leaks={leak}:protect_shadow_gap=0:detect_stack_use_after_return=1:print_summary=1:symbolize=1"),
    );
    cmd.env("UBSAN_OPTIONS", "halt_on_error=1:abort_on_error=0:print_stacktrace=1:print_summary=1");
    cmd.env_remove("LSAN_OPTIONS");
    cmd.env_remove("LD_PRELOAD"); // ASan must be the first DSO loaded
    let mut ld = OsString::from(&lib_dir);
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        ld.push(":");
        ld.push(old);
    }
    cmd.env("LD_LIBRARY_PATH", ld);
    let cmdline = format!(
        "{} {}",
        exe.display(),
        args.iter().map(|a| a.to_string_lossy().to_string()).collect::<Vec<_>>().join(" ")
    );
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    let deadline = Instant::now() + timeout();
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the C program") {
            break s;
        }
        if Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait for the killed C program");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).to_string();
    use std::os::unix::process::ExitStatusExt;
    RunResult { code: status.code(), signal: status.signal(), output, timed_out, cmdline }
}

/// Compiles and runs one program; panics with its output unless it exits
/// 0 with no sanitizer report. Cleans up after a pass; keeps the
/// executable and its log after a failure.
fn run_c_test(name: &str, args: &[OsString]) {
    let sanitize = PROGRAMS.iter().find(|(n, _)| *n == name).expect("listed in PROGRAMS").1;
    let exe = compile(name, sanitize);
    let r = run(&exe, args);
    let leak_hint = if r.output.contains("LeakSanitizer has encountered a fatal error") || r.output.contains("LeakSanitizer does not work") {
        "\nhint: LeakSanitizer cannot run in this environment (it needs ptrace); set LORA_C_TESTS_NO_LEAK_CHECK=1 to run without leak checking"
    } else {
        ""
    };
    if r.timed_out || r.code != Some(0) {
        panic!("C test {name} failed:\n{}{leak_hint}", r.describe());
    }
    if let Some(m) = r.sanitizer_report() {
        panic!("C test {name} exited 0 but a sanitizer reported \"{m}\":\n{}{leak_hint}", r.describe());
    }
    print!("{}", r.output);
    let _ = std::fs::remove_file(&exe);
    let _ = std::fs::remove_file(exe.with_extension("log"));
}

/// A fresh scratch directory for a program's files (it makes its own
/// temporary directory inside and removes it when it passes).
fn scratch(name: &str) -> OsString {
    let d = build_dir().join(format!("{name}-{}.scratch", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.into_os_string()
}

fn remove_scratch(d: &OsString) {
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn c_basics() {
    run_c_test("basics", &[]);
}

#[test]
fn c_nf4_roundtrip() {
    let d = scratch("nf4_roundtrip");
    run_c_test("nf4_roundtrip", std::slice::from_ref(&d));
    remove_scratch(&d);
}

#[test]
fn c_nf4_fixtures() {
    run_c_test("nf4_fixtures", &fixture_files("nf4", 10));
}

/// The `.safetensors` fixtures in tests/fixtures/`sub`, sorted (at least `min`).
fn fixture_files(sub: &str, min: usize) -> Vec<OsString> {
    let dir = manifest_dir().join("tests/fixtures").join(sub);
    let mut files: Vec<OsString> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(PathBuf::into_os_string)
        .collect();
    files.sort();
    assert!(files.len() >= min, "expected at least {min} fixtures in {}", dir.display());
    files
}

#[test]
fn c_lora_layer() {
    run_c_test("lora_layer", &fixture_files("lora", 9));
}

#[test]
fn c_model() {
    let d = scratch("model");
    run_c_test("model", &[manifest_dir().join("tests/fixtures/model/llama_nf4").into_os_string(), d.clone()]);
    remove_scratch(&d);
}

#[test]
fn c_model_families() {
    let d = scratch("families");
    let mut args = vec![d.clone()];
    for case in ["gemma_fp32", "gemma2_fp32", "gemma3_fp32", "granite_fp32", "phi3_fp32", "olmo2_fp32", "smollm3_fp32"] {
        args.push(manifest_dir().join("tests/fixtures/model").join(case).into_os_string());
    }
    run_c_test("families", &args);
    remove_scratch(&d);
}

#[test]
fn c_optimizer() {
    let d = scratch("optimizer");
    run_c_test("optimizer", &[manifest_dir().join("tests/fixtures/optim/adamw8bit.safetensors").into_os_string(), d.clone()]);
    remove_scratch(&d);
}

#[test]
fn c_tokenizer() {
    let d = scratch("tokenizer");
    let fixtures = manifest_dir().join("tests/fixtures/tokenizer").into_os_string();
    run_c_test("tokenizer", &[fixtures, d.clone()]);
    remove_scratch(&d);
}

#[test]
fn c_bad_input() {
    let d = scratch("bad_input");
    run_c_test("bad_input", std::slice::from_ref(&d));
    remove_scratch(&d);
}

#[test]
fn c_paged() {
    let d = scratch("paged");
    run_c_test("paged", std::slice::from_ref(&d));
    remove_scratch(&d);
}

#[test]
fn c_double_free_without_sanitizers() {
    run_c_test("double_free_noasan", &[]);
}

/// The harness catches what it claims to: each deliberate error fails the
/// run with its sanitizer's report; the clean run passes.
#[test]
fn c_sanitizers_catch_errors() {
    let exe = compile("sanitizer_canary", true);
    let ok = run(&exe, &["ok".into()]);
    assert!(ok.code == Some(0) && ok.sanitizer_report().is_none(), "clean canary run failed:\n{}", ok.describe());
    let mut cases = vec![
        ("heap-overflow", "AddressSanitizer: heap-buffer-overflow"),
        ("use-after-free", "AddressSanitizer: heap-use-after-free"),
        ("signed-overflow", "runtime error: signed integer overflow"),
        ("misaligned", "runtime error: load of misaligned address"),
    ];
    if !std::env::var("LORA_C_TESTS_NO_LEAK_CHECK").is_ok_and(|v| v == "1") {
        cases.push(("leak", "LeakSanitizer: detected memory leaks"));
    }
    for (mode, report) in cases {
        let r = run(&exe, &[mode.into()]);
        assert!(
            !r.timed_out && r.code != Some(0),
            "canary `{mode}` was not stopped by the sanitizers (they are not active?):\n{}",
            r.describe()
        );
        assert!(r.output.contains(report), "canary `{mode}`: expected \"{report}\" in the output:\n{}", r.describe());
    }
    let _ = std::fs::remove_file(&exe);
    let _ = std::fs::remove_file(exe.with_extension("log"));
}

/// Every C program in tests/c is driven by a test above.
#[test]
fn every_c_program_is_run() {
    let mut found: Vec<String> = std::fs::read_dir(c_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().to_string())
        .collect();
    found.sort();
    let mut listed: Vec<String> = PROGRAMS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed, "tests/c/*.c and PROGRAMS in tests/c_api.rs differ: add a #[test] for each new C program");
}
