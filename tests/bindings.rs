//! Drives the language bindings' own tests and the examples, so that
//! `cargo test` (= `make test`) runs them, against the library this
//! `cargo test` built, installed with `make install PREFIX=<tmpdir>
//! LIBDIR=<the test's deps dir> LORA_NO_BUILD=1` (see tests/install.rs) and
//! found the way a user finds it: pkg-config (`PKG_CONFIG_PATH`) for Go and
//! Zig, `-I`/`-L` for C++, `LD_LIBRARY_PATH` at run time.
//!
//! - C: the examples in examples/c (quantize.c, finetune.c, swap.c), compiled
//!   with `-std=c11 -Wall -Wextra -Werror -pedantic` against the installed
//!   library and run (with few steps), so they never rot.
//! - C++ (`include/lora.hpp`): tests/cpp/lora_hpp.cpp with `-std=c++17
//!   -Wall -Wextra -Werror -pedantic` under AddressSanitizer, LeakSanitizer
//!   and UBSan, plus a handle ledger (`-Wl,--wrap` of every function that
//!   makes or frees a handle; see the file) because ASan cannot see a second
//!   `_free` of a liblora handle (liblora's uninstrumented Rust code ignores
//!   it). It runs a short QLoRA fine-tune of models/default through the
//!   model, trainer and tokenizer owners. Two canaries prove the set-up catches the wrapper's mistakes: a
//!   released-and-dropped handle must be reported as a leak (LSan and the
//!   ledger), a handle owned twice as a double free (the ledger).
//!   examples/cpp is compiled with -Werror and run.
//! - Go (`bindings/go`): `go test` (NF4 round trip, errors, per-call error
//!   messages across goroutines, the layer API, the tokenizer, a short
//!   QLoRA fine-tune of models/default with generation, adapter save/load,
//!   merge/unmerge and swaps), `go vet`, and `go run` of examples/go.
//! - Zig (`bindings/zig`): `zig build test` (the same checks, run in the
//!   repository root for models/ and data/) and `zig build run` of
//!   examples/zig. Zig's cache goes to
//!   `target/<profile>/bindings-cache/zig` (.ci/run warms it while cargo
//!   builds: a cold build runner takes minutes).
//!
//! Toolchains: `cc` (or `$CC`), `c++` (or `$CXX`), `go` (or `$LORA_GO`), Zig as `zig`, else
//! `python3 -m ziglang` (or `$LORA_ZIG`, a command line). A missing one
//! makes its tests print "SKIPPED: ..." and pass, unless
//! `LORA_REQUIRE_BINDINGS=1` (set by .ci/run), which makes it a failure.
//! `LORA_C_TESTS_NO_LEAK_CHECK=1` turns leak checking off where
//! LeakSanitizer cannot run (as for tests/c_api.rs).

#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[path = "common/scratch.rs"]
mod scratch;
use scratch::exe_dir;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require_bindings() -> bool {
    std::env::var("LORA_REQUIRE_BINDINGS").is_ok_and(|v| v == "1")
}

/// Prints why a test is skipped, or fails under LORA_REQUIRE_BINDINGS=1.
fn skip(msg: &str) {
    if require_bindings() {
        panic!("{msg}; LORA_REQUIRE_BINDINGS=1 makes this a failure");
    }
    // Straight to the process's stderr: libtest captures println!/eprintln!
    // of passing tests, and a skip must be seen.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {msg}");
}

/// A command line from an environment variable or the first candidate that
/// answers `probe` (e.g. `--version`).
fn find_tool(env: &str, candidates: &[&[&str]], probe: &str) -> Option<Vec<String>> {
    let lines: Vec<Vec<String>> = match std::env::var(env) {
        Ok(v) if !v.trim().is_empty() => vec![v.split_whitespace().map(str::to_string).collect()],
        _ => candidates.iter().map(|c| c.iter().map(|s| s.to_string()).collect()).collect(),
    };
    lines.into_iter().find(|c| {
        Command::new(&c[0]).args(&c[1..]).arg(probe).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    })
}

fn timeout() -> Duration {
    let s = std::env::var("LORA_BINDINGS_TIMEOUT").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
    Duration::from_secs(s)
}

/// This process's scratch directory, `target/<profile>/bindings-tests/<pid>`;
/// those of processes that are gone are removed.
fn tmp_root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| scratch::scratch_root("bindings-tests")).clone()
}

/// Caches shared by runs (Go's and Zig's compiled std), next to the
/// profile's outputs so nothing is written into the source tree.
fn cache_dir(name: &str) -> PathBuf {
    let d = exe_dir().parent().unwrap().join("bindings-cache").join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Out {
    ok: bool,
    text: String,
}

/// Runs `cmd` with stdout and stderr into one log, with the timeout.
fn run(mut cmd: Command) -> Out {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let log = tmp_root().join(format!("cmd-{}.log", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let f = std::fs::File::create(&log).unwrap();
    cmd.stdin(Stdio::null()).stdout(f.try_clone().unwrap()).stderr(f);
    let line = format!("{cmd:?}");
    let t = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {line}: {e}"));
    let deadline = t + timeout();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).to_string();
    let _ = std::fs::remove_file(&log);
    let st = match status {
        Some(s) => format!("{s}"),
        None => format!("timed out after {}s", timeout().as_secs()),
    };
    Out { ok: status.is_some_and(|s| s.success()), text: format!("$ {line}\n{st} in {:.1}s\n{out}", t.elapsed().as_secs_f64()) }
}

fn must(cmd: Command) -> String {
    let o = run(cmd);
    assert!(o.ok, "command failed:\n{}", o.text);
    println!("{}", o.text);
    o.text
}

/// `make install` of the library under test into a fresh prefix, once.
fn prefix() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let lib_dir = match std::env::var_os("LORA_CDYLIB") {
            Some(p) => PathBuf::from(p).parent().unwrap().to_path_buf(),
            None => exe_dir(),
        };
        assert!(lib_dir.join("liblora.so").is_file() && lib_dir.join("liblora.a").is_file(), "no liblora.so/.a in {}", lib_dir.display());
        let prefix = tmp_root().join("prefix");
        let mut cmd = Command::new(std::env::var("MAKE").unwrap_or_else(|_| "make".into()));
        cmd.arg("-C").arg(manifest_dir()).arg("install");
        cmd.arg(format!("PREFIX={}", prefix.display()));
        cmd.arg(format!("LIBDIR={}", lib_dir.display()));
        cmd.arg("LORA_NO_BUILD=1");
        must(cmd);
        prefix
    })
}

/// The environment a user of the installed library has.
fn user_env(cmd: &mut Command) {
    let p = prefix();
    cmd.env("PKG_CONFIG_PATH", p.join("lib/pkgconfig"));
    let mut ld = p.join("lib").into_os_string();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        ld.push(":");
        ld.push(old);
    }
    cmd.env("LD_LIBRARY_PATH", ld);
}

/* ---- C examples --------------------------------------------------------- */

fn cc() -> Option<Vec<String>> {
    find_tool("CC", &[&["cc"], &["gcc"], &["clang"]], "--version")
}

/// examples/c: each compiled as a user would (`-I`/`-L` of the install) and
/// run briefly: quantize.c on a small matrix, finetune.c (the main demo) and
/// swap.c with a few steps each.
#[test]
fn c_examples() {
    let Some(cc) = cc() else {
        return skip("no C compiler (cc, gcc or clang; or set CC): examples/c needs one");
    };
    let p = prefix();
    let dir = tmp_root().join("c-examples");
    std::fs::create_dir_all(dir.join("build")).unwrap();
    for name in ["quantize", "finetune", "swap"] {
        let mut cmd = Command::new(&cc[0]);
        cmd.args(&cc[1..]).args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic"]);
        cmd.arg(format!("-I{}", p.join("include").display()));
        cmd.arg(manifest_dir().join(format!("examples/c/{name}.c"))).arg("-o").arg(dir.join(name));
        cmd.arg(format!("-L{}", p.join("lib").display())).arg("-llora");
        cmd.arg(format!("-Wl,-rpath,{}", p.join("lib").display())).arg("-lm");
        must(cmd);
    }
    // quantize.c writes build/demo_nf4.safetensors under its working directory.
    let mut cmd = Command::new(dir.join("quantize"));
    cmd.args(["1024", "1024", "64"]).current_dir(&dir);
    let out = must(cmd);
    assert!(out.contains("reloaded: identical"), "{out}");
    // The other two read models/default and data/ from the repository root.
    let mut cmd = Command::new(dir.join("finetune"));
    cmd.arg("models/default").arg("data/finetune.txt").arg(dir.join("demo")).current_dir(manifest_dir());
    cmd.env("LORA_DEMO_STEPS", "3").env("LORA_DEMO_THREADS", "2");
    let out = must(cmd);
    assert!(out.contains("saved the adapter") && out.contains("== done"), "{out}");
    let mut cmd = Command::new(dir.join("swap"));
    cmd.arg("models/default").arg("data/finetune.txt").arg("data/pretrain.txt").arg(dir.join("swap-out"));
    cmd.current_dir(manifest_dir()).env("LORA_SWAP_STEPS", "5");
    let out = must(cmd);
    assert!(out.contains("loaded ") && out.contains("swapped to 'verse' merged") && out.contains("swap demo done"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/* ---- C++ ---------------------------------------------------------------- */

fn cxx() -> Option<Vec<String>> {
    find_tool("CXX", &[&["c++"], &["g++"], &["clang++"]], "--version")
}

const CXX_WARN: &[&str] = &["-std=c++17", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g"];
/// Functions that make or free a handle, wrapped by the ledger in
/// tests/cpp/lora_hpp.cpp (its WRAPPED list).
const WRAPPED: &[&str] = &[
    "lora_context_new",
    "lora_context_free",
    "lora_quantize_nf4",
    "lora_nf4_load",
    "lora_nf4_free",
    "lora_layer_new",
    "lora_layer_new_nf4",
    "lora_layer_free",
    "lora_model_load",
    "lora_model_free",
    "lora_trainer_new",
    "lora_trainer_resume",
    "lora_trainer_free",
    "lora_tokenizer_load",
    "lora_tokenizer_free",
];
const SAN: &[&str] = &["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-O1"];

fn compile_cxx(cxx: &[String], src: &Path, exe: &Path, sanitize: bool, wrap: &[&str]) {
    let p = prefix();
    let mut cmd = Command::new(&cxx[0]);
    cmd.args(&cxx[1..]).args(CXX_WARN);
    if sanitize {
        cmd.args(SAN);
    }
    cmd.arg(format!("-I{}", p.join("include").display()));
    cmd.arg(src).arg("-o").arg(exe);
    cmd.arg(format!("-L{}", p.join("lib").display())).arg("-llora");
    cmd.arg(format!("-Wl,-rpath,{}", p.join("lib").display()));
    for f in wrap {
        cmd.arg(format!("-Wl,--wrap={f}"));
    }
    must(cmd);
}

fn asan_env(cmd: &mut Command, leaks: bool) {
    cmd.env(
        "ASAN_OPTIONS",
        format!("halt_on_error=1:abort_on_error=0:detect_leaks={}:protect_shadow_gap=0:print_summary=1", if leaks { 1 } else { 0 }),
    );
    cmd.env("UBSAN_OPTIONS", "halt_on_error=1:abort_on_error=0:print_stacktrace=1");
    cmd.env_remove("LSAN_OPTIONS");
    cmd.env_remove("LD_PRELOAD");
}

#[test]
fn cpp_raii_under_asan() {
    let Some(cxx) = cxx() else {
        return skip("no C++ compiler (c++, g++ or clang++; or set CXX): the lora.hpp tests need one with AddressSanitizer");
    };
    let leaks = !std::env::var("LORA_C_TESTS_NO_LEAK_CHECK").is_ok_and(|v| v == "1");
    let dir = tmp_root().join("cpp");
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("lora_hpp");
    compile_cxx(&cxx, &manifest_dir().join("tests/cpp/lora_hpp.cpp"), &exe, true, WRAPPED);

    let mut cmd = Command::new(&exe);
    cmd.arg(&dir).arg(manifest_dir());
    asan_env(&mut cmd, leaks);
    let out = must(cmd);
    assert!(out.contains("lora.hpp: all checks passed"), "{out}");
    for marker in ["ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:", "handle ledger"] {
        assert!(!out.contains(marker), "sanitizer report in a passing run:\n{out}");
    }

    // The canaries: the same build must catch a leak and a double free.
    let mut cmd = Command::new(&exe);
    cmd.arg("--canary-double-free");
    asan_env(&mut cmd, leaks);
    let o = run(cmd);
    assert!(!o.ok && o.text.contains("handle ledger: double free"), "two owners of one handle went unnoticed:\n{}", o.text);
    if leaks {
        let mut cmd = Command::new(&exe);
        cmd.arg("--canary-leak");
        asan_env(&mut cmd, true);
        let o = run(cmd);
        assert!(
            !o.ok && o.text.contains("ERROR: LeakSanitizer") && o.text.contains("handle ledger: leak"),
            "a leaked handle went unnoticed:\n{}",
            o.text
        );
    } else {
        println!("leak canary not run: LORA_C_TESTS_NO_LEAK_CHECK=1");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cpp_example() {
    let Some(cxx) = cxx() else {
        return skip("no C++ compiler (c++, g++ or clang++; or set CXX): examples/cpp needs one");
    };
    let dir = tmp_root().join("cpp-example");
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("quantize_lora");
    compile_cxx(&cxx, &manifest_dir().join("examples/cpp/quantize_lora.cpp"), &exe, false, &[]);
    let mut cmd = Command::new(&exe);
    cmd.arg(manifest_dir().join("models/default")).arg(manifest_dir().join("data/finetune.txt"));
    let out = must(cmd);
    assert!(out.contains("merged: yes") && out.contains("expected error"), "{out}");
    assert!(out.contains("step 8: loss") && out.contains("generated: When I consider"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/* ---- Go ----------------------------------------------------------------- */

fn go() -> Option<Vec<String>> {
    find_tool("LORA_GO", &[&["go"], &["/usr/lib/go/bin/go"]], "version")
}

fn go_cmd(go: &[String], dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(&go[0]);
    cmd.args(&go[1..]).args(args).current_dir(dir);
    user_env(&mut cmd);
    // Offline and with the toolchain at hand: the module has no
    // dependencies, and nothing may be downloaded.
    cmd.env("GOTOOLCHAIN", "local").env("GOPROXY", "off").env("GOFLAGS", "-mod=mod").env("CGO_ENABLED", "1");
    // Go's build cache does not key a cgo package on its pkg-config output
    // (seen with Go 1.19: a package cached from an earlier run kept that
    // run's -L, long deleted, and the link failed). CGO_CFLAGS is in the
    // key, so naming this run's prefix there rebuilds the binding against
    // this run's header and library ("-g -O2" is cgo's default).
    cmd.env("CGO_CFLAGS", format!("-g -O2 -I{}", prefix().join("include").display()));
    if std::env::var_os("GOCACHE").is_none() && std::env::var_os("HOME").is_none() {
        cmd.env("GOCACHE", cache_dir("go-build"));
    }
    cmd
}

fn need_pkg_config() -> bool {
    let ok = Command::new("pkg-config").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        skip("`pkg-config` not found: the Go and Zig bindings find liblora through lora.pc (apt-get install pkg-config)");
    }
    ok
}

#[test]
fn go_binding() {
    let Some(go) = go() else {
        return skip("`go` not found: the Go binding's tests need it (Debian/Ubuntu: apt-get install golang-go; or set LORA_GO)");
    };
    if !need_pkg_config() {
        return;
    }
    let dir = manifest_dir().join("bindings/go");
    must(go_cmd(&go, &dir, &["vet", "./..."]));
    let out = must(go_cmd(&go, &dir, &["test", "-count=1", "-v", "./..."]));
    assert!(out.contains("--- PASS: TestQuantizeRoundTrip") && out.contains("--- PASS: TestFineTune") && out.contains("\nok "), "{out}");
}

#[test]
fn go_example() {
    let Some(go) = go() else {
        return skip("`go` not found: examples/go needs it (Debian/Ubuntu: apt-get install golang-go; or set LORA_GO)");
    };
    if !need_pkg_config() {
        return;
    }
    let out = must(go_cmd(&go, &manifest_dir().join("examples/go"), &["run", "."]));
    assert!(out.contains("merged: true") && out.contains("expected error"), "{out}");
    assert!(out.contains("step 8: loss") && out.contains("generated: When I consider"), "{out}");
}

/* ---- Zig ---------------------------------------------------------------- */

fn zig() -> Option<Vec<String>> {
    find_tool("LORA_ZIG", &[&["zig"], &["python3", "-m", "ziglang"]], "version")
}

fn zig_build(zig: &[String], dir: &Path, step: &str) -> Command {
    let mut cmd = Command::new(&zig[0]);
    cmd.args(&zig[1..]).arg("build").arg(step).current_dir(dir);
    // Build outputs outside the source tree; one cache for both packages.
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    cmd.arg("--cache-dir").arg(cache_dir("zig"));
    cmd.arg("--prefix").arg(tmp_root().join(format!("zig-out-{name}")));
    cmd.arg("--summary").arg("all");
    user_env(&mut cmd);
    cmd
}

/// The binding's tests, then the example: one after the other, because a
/// cold Zig cache compiles the build runner and translate-c from source
/// (minutes on 2 cores), which two concurrent builds would both do.
#[test]
fn zig_binding_and_example() {
    let Some(zig) = zig() else {
        return skip(
            "Zig not found (`zig`, or `python3 -m ziglang` from `pip install ziglang`; or set LORA_ZIG): the Zig binding's tests need it",
        );
    };
    if !need_pkg_config() {
        return;
    }
    let out = must(zig_build(&zig, &manifest_dir().join("bindings/zig"), "test"));
    assert!(out.contains("run test") && out.contains("tests passed"), "{out}");
    let out = must(zig_build(&zig, &manifest_dir().join("examples/zig"), "run"));
    assert!(out.contains("merged: true") && out.contains("expected error: InvalidState"), "{out}");
    assert!(out.contains("step 8: loss") && out.contains("generated: When I consider"), "{out}");
}
