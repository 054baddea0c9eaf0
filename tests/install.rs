//! `make install` and the installed tree: runs `make install
//! PREFIX=<tmpdir>` for the library this `cargo test` built (the cdylib and
//! staticlib next to this test executable, see tests/c_api.rs; installed
//! with `LIBDIR=<that dir> LORA_NO_BUILD=1`, so no release build is
//! needed), checks the layout (versioned `liblora.so.X.Y.Z` with SONAME
//! `liblora.so.X`, its two symlinks, `liblora.a`, the headers, `lora.pc`,
//! the CMake package), then builds an out-of-tree C program against the
//! installed copy and runs it:
//!
//! - through pkg-config, linked with the shared library and, with
//!   `pkg-config --static`, with `liblora.a` (run without any library path:
//!   nothing of liblora may be loaded at run time);
//! - through CMake, `find_package(lora 0.1 REQUIRED)` with
//!   `lora::lora` and `lora::lora_static`, and the C++ example
//!   (examples/cpp) with its own CMakeLists.txt.
//!
//! Needs make, a C and a C++ compiler, readelf (binutils), pkg-config and
//! cmake. Without pkg-config or cmake the tests that need them print why
//! and skip, unless `LORA_REQUIRE_BINDINGS=1` (set by .ci/run) makes a
//! missing tool a failure.

#![cfg(target_os = "linux")] // ELF SONAMEs, .so/.a, pkg-config and CMake on Linux

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// An out-of-tree C program: version check, NF4 round trip, an error with
/// its message. Prints "lora install ok" when all is well.
const APP_C: &str = r#"
#include <lora.h>
#include <stdio.h>
#include <string.h>

int main(void) {
    lora_context_params cp = lora_context_default_params();
    lora_context *ctx = NULL;
    lora_nf4 *q = NULL;
    float w[256], back[256];
    size_t shape[1] = {256};
    char msg[256];
    int i;
    if ((lora_version() >> 16) != LORA_VERSION_MAJOR) { fprintf(stderr, "ABI mismatch\n"); return 1; }
    cp.backend = LORA_BACKEND_CPU;
    cp.n_threads = 1;
    if (lora_context_new(&cp, &ctx) != LORA_OK) { fprintf(stderr, "context failed\n"); return 1; }
    for (i = 0; i < 256; i++) w[i] = (float)(i % 13) - 6.0f;
    if (lora_quantize_nf4(ctx, w, sizeof w, LORA_DTYPE_F32, shape, 1, NULL, &q) != LORA_OK) return 1;
    if (lora_nf4_dequantize(ctx, q, LORA_DTYPE_F32, back, sizeof back) != LORA_OK) return 1;
    if (back[0] != -6.0f) { fprintf(stderr, "dequantized %g\n", (double)back[0]); return 1; }
    if (lora_nf4_load("/nonexistent/x.safetensors", "p", &q) != LORA_ERR_IO) return 1;
    lora_last_error(msg, sizeof msg);
    if (strstr(msg, "x.safetensors") == NULL) { fprintf(stderr, "message: %s\n", msg); return 1; }
    lora_nf4_free(q);
    lora_context_free(ctx);
    printf("lora install ok (liblora %s)\n", lora_version_string());
    return 0;
}
"#;

const APP_CMAKE: &str = r#"
cmake_minimum_required(VERSION 3.16)
project(lora_install_test LANGUAGES C)
find_package(lora 0.1 REQUIRED)
add_executable(app app.c)
target_link_libraries(app PRIVATE lora::lora)
add_executable(app_static app.c)
target_link_libraries(app_static PRIVATE lora::lora_static)
"#;

#[path = "common/scratch.rs"]
mod scratch;
use scratch::exe_dir;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory with the liblora.so and liblora.a under test.
fn lib_dir() -> PathBuf {
    let dir = match std::env::var_os("LORA_CDYLIB") {
        Some(p) => PathBuf::from(p).parent().unwrap().to_path_buf(),
        None => exe_dir(),
    };
    for f in ["liblora.so", "liblora.a"] {
        assert!(
            dir.join(f).is_file(),
            "{f} is not in {} (cargo builds the lib's cdylib and staticlib there for `cargo test`; are \"cdylib\" and \
             \"staticlib\" still in [lib] crate-type?)",
            dir.display()
        );
    }
    dir
}

fn require_bindings() -> bool {
    std::env::var("LORA_REQUIRE_BINDINGS").is_ok_and(|v| v == "1")
}

/// Whether `tool` runs; if not, prints why the caller skips (or fails
/// under LORA_REQUIRE_BINDINGS=1).
fn have(tool: &str, what: &str) -> bool {
    let ok = Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        let msg = format!("`{tool}` not found: {what} needs it (Debian/Ubuntu: apt-get install {tool})");
        if require_bindings() {
            panic!("{msg}; LORA_REQUIRE_BINDINGS=1 makes this a failure");
        }
        // Straight to the process's stderr: libtest captures println!/eprintln!
        // of passing tests, and a skip must be seen.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED: {msg}");
    }
    ok
}

struct Out {
    ok: bool,
    text: String,
}

/// Runs `cmd` (stdout and stderr to one log) with a timeout.
fn run(mut cmd: Command, timeout: Duration) -> Out {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let log = tmp_root().join(format!("cmd-{}.log", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let f = std::fs::File::create(&log).unwrap();
    cmd.stdin(Stdio::null()).stdout(f.try_clone().unwrap()).stderr(f);
    let line = format!("{cmd:?}");
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {line}: {e}"));
    let deadline = Instant::now() + timeout;
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
    let ok = status.is_some_and(|s| s.success());
    let st = match status {
        Some(s) => format!("{s}"),
        None => format!("timed out after {}s", timeout.as_secs()),
    };
    Out { ok, text: format!("$ {line}\n{st}\n{out}") }
}

fn must(cmd: Command, timeout: Duration) -> String {
    let o = run(cmd, timeout);
    assert!(o.ok, "command failed:\n{}", o.text);
    o.text
}

const MIN: Duration = Duration::from_secs(60);

/// This process's scratch directory, `target/<profile>/install-tests/<pid>`;
/// those of processes that are gone (an install is ~200 MB) are removed.
fn tmp_root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| scratch::scratch_root("install-tests")).clone()
}

/// `make install` into a fresh prefix, once per test process.
fn prefix() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let prefix = tmp_root().join("prefix");
        let _ = std::fs::remove_dir_all(&prefix);
        let mut cmd = Command::new(std::env::var("MAKE").unwrap_or_else(|_| "make".into()));
        cmd.arg("-C").arg(manifest_dir()).arg("install");
        cmd.arg(format!("PREFIX={}", prefix.display()));
        cmd.arg(format!("LIBDIR={}", lib_dir().display()));
        cmd.arg("LORA_NO_BUILD=1");
        let t = Instant::now();
        must(cmd, 2 * MIN);
        println!("make install: {:.1}s", t.elapsed().as_secs_f64());
        prefix
    })
}

fn cc() -> String {
    std::env::var("CC").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| "cc".into())
}

fn pkg_config(args: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("pkg-config");
    cmd.args(args).arg("lora");
    cmd.env("PKG_CONFIG_PATH", prefix().join("lib/pkgconfig"));
    let out = cmd.output().expect("run pkg-config");
    assert!(out.status.success(), "pkg-config {args:?} lora failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect()
}

fn readelf_dynamic(file: &Path) -> String {
    let out = Command::new("readelf").arg("-d").arg(file).output().unwrap_or_else(|e| {
        panic!("cannot run readelf ({e}); it comes with binutils (apt-get install binutils), which the test suite needs")
    });
    assert!(out.status.success(), "readelf -d {} failed", file.display());
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn write_app(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("app.c"), APP_C).unwrap();
}

/// Runs a built program with the environment cleared of library paths.
fn run_app(exe: &Path, ld_library_path: Option<&Path>) -> String {
    let mut cmd = Command::new(exe);
    cmd.env_remove("LD_LIBRARY_PATH");
    if let Some(p) = ld_library_path {
        cmd.env("LD_LIBRARY_PATH", p);
    }
    let out = must(cmd, 2 * MIN);
    assert!(out.contains("lora install ok"), "{out}");
    out
}

#[test]
fn install_layout() {
    let p = prefix();
    let lib = p.join("lib");
    let version = env!("CARGO_PKG_VERSION");
    let major = env!("CARGO_PKG_VERSION_MAJOR");
    let real = lib.join(format!("liblora.so.{version}"));
    assert!(real.is_file() && !real.is_symlink(), "{} missing", real.display());
    assert_eq!(std::fs::read_link(lib.join(format!("liblora.so.{major}"))).unwrap(), PathBuf::from(format!("liblora.so.{version}")));
    assert_eq!(std::fs::read_link(lib.join("liblora.so")).unwrap(), PathBuf::from(format!("liblora.so.{major}")));
    for f in [
        "lib/liblora.a",
        "include/lora.h",
        "include/lora.hpp",
        "lib/pkgconfig/lora.pc",
        "lib/cmake/lora/loraConfig.cmake",
        "lib/cmake/lora/loraConfigVersion.cmake",
    ] {
        assert!(p.join(f).is_file(), "{f} not installed");
    }
    assert_eq!(std::fs::read(p.join("include/lora.h")).unwrap(), std::fs::read(manifest_dir().join("include/lora.h")).unwrap());
    let dynamic = readelf_dynamic(&real);
    assert!(dynamic.contains(&format!("Library soname: [liblora.so.{major}]")), "SONAME of {}:\n{dynamic}", real.display());
}

#[test]
fn pkg_config_shared_and_static() {
    if !have("pkg-config", "building against the installed lora.pc") {
        return;
    }
    let p = prefix();
    let version = pkg_config(&["--modversion"]);
    assert_eq!(version, vec![env!("CARGO_PKG_VERSION").to_string()]);
    let dir = tmp_root().join("pkgconfig-app");
    write_app(&dir);

    // Shared: DT_NEEDED is the SONAME, found through LD_LIBRARY_PATH.
    let exe = dir.join("app");
    let mut cmd = Command::new(cc());
    cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"]).arg(dir.join("app.c")).arg("-o").arg(&exe);
    cmd.args(pkg_config(&["--cflags", "--libs"]));
    must(cmd, 2 * MIN);
    let needed = readelf_dynamic(&exe);
    assert!(needed.contains(&format!("Shared library: [liblora.so.{}]", env!("CARGO_PKG_VERSION_MAJOR"))), "{needed}");
    println!("{}", run_app(&exe, Some(&p.join("lib"))));

    // Static: liblora.a plus Libs.private; runs with no library path.
    let exe_static = dir.join("app_static");
    let mut cmd = Command::new(cc());
    cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"]).arg(dir.join("app.c")).arg("-o").arg(&exe_static);
    cmd.args(pkg_config(&["--cflags"]));
    let libs = pkg_config(&["--static", "--libs"]);
    for l in &libs {
        if l == "-llora" {
            cmd.args(["-Wl,-Bstatic", "-llora", "-Wl,-Bdynamic"]);
        } else {
            cmd.arg(l);
        }
    }
    must(cmd, 2 * MIN);
    let needed = readelf_dynamic(&exe_static);
    assert!(!needed.contains("liblora"), "the static link still needs liblora:\n{needed}");
    println!("{}", run_app(&exe_static, None));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cmake_find_package() {
    if !have("cmake", "building against the installed CMake package (find_package(lora))") {
        return;
    }
    let p = prefix();
    let src = tmp_root().join("cmake-app");
    write_app(&src);
    std::fs::write(src.join("CMakeLists.txt"), APP_CMAKE).unwrap();
    let build = src.join("build");
    let t = Instant::now();
    let configure = |src: &Path, build: &Path| {
        let mut cmd = Command::new("cmake");
        cmd.arg("-S").arg(src).arg("-B").arg(build);
        cmd.arg(format!("-DCMAKE_PREFIX_PATH={}", p.display()));
        cmd.arg("-DCMAKE_BUILD_TYPE=Release");
        cmd.env_remove("PKG_CONFIG_PATH");
        must(cmd, 3 * MIN);
        let mut cmd = Command::new("cmake");
        cmd.arg("--build").arg(build).arg("--parallel").arg("2");
        must(cmd, 5 * MIN);
    };
    configure(&src, &build);
    // lora::lora carries its location: CMake's build rpath finds it.
    println!("{}", run_app(&build.join("app"), None));
    let needed = readelf_dynamic(&build.join("app_static"));
    assert!(!needed.contains("liblora"), "lora::lora_static still needs liblora:\n{needed}");
    println!("{}", run_app(&build.join("app_static"), None));

    // The C++ example, with its own CMakeLists.txt, against the install.
    let ex_build = tmp_root().join("cmake-example-cpp");
    configure(&manifest_dir().join("examples/cpp"), &ex_build);
    let mut cmd = Command::new(ex_build.join("quantize_lora"));
    cmd.arg(manifest_dir().join("models/default")).arg(manifest_dir().join("data/finetune.txt"));
    cmd.env_remove("LD_LIBRARY_PATH");
    let out = must(cmd, 2 * MIN);
    assert!(out.contains("merged: yes") && out.contains("expected error") && out.contains("generated: "), "{out}");
    println!("{out}\ncmake builds: {:.1}s", t.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&ex_build);
}
