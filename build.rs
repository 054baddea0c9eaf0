//! Generates the C header from `src/ffi` with cbindgen into OUT_DIR; the
//! committed `include/lora.h` is compared with it by `tests/header.rs`.
//! `LORA_UPDATE_HEADER=1 cargo build` refreshes the committed copy.
//!
//! On ELF platforms it also gives the cdylib the SONAME `liblora.so.<major>`
//! (major from Cargo.toml, the ABI major of `LORA_VERSION_MAJOR`), so that
//! programs linked against an installed `liblora.so` record
//! `liblora.so.<major>` and keep working across compatible updates
//! (`make install` lays out `liblora.so.X.Y.Z` and its two symlinks). A
//! program linked against the build tree's copy records that name too, so
//! the build script puts a `liblora.so.<major> -> liblora.so` symlink next
//! to where cargo writes the cdylib (`target/<profile>/` and its `deps/`),
//! where `make demo` and the C tests' rpath find it.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=LORA_UPDATE_HEADER");
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("lora.h");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    // Only src/ffi is the C API: parse it alone (cbindgen follows its `mod`
    // declarations) so items of the safe core never leak into the header.
    let builder = cbindgen::Builder::new().with_config(config).with_src(crate_dir.join("src/ffi/mod.rs"));
    match builder.generate() {
        Ok(b) => {
            b.write_to_file(&out);
            if std::env::var("LORA_UPDATE_HEADER").is_ok_and(|v| v == "1") {
                std::fs::copy(&out, crate_dir.join("include/lora.h")).expect("write include/lora.h");
            }
        }
        Err(e) => panic!("cbindgen failed: {e}"),
    }
    println!("cargo:rustc-env=LORA_GENERATED_HEADER={}", out.display());
    soname();
}

/// `-Wl,-soname,liblora.so.<major>` for the cdylib, and the symlinks that
/// let build-tree programs resolve that name (see the module doc).
fn soname() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let family = std::env::var("CARGO_CFG_TARGET_FAMILY").unwrap_or_default();
    // ELF unix targets only: Apple uses install names, Windows DLL names.
    if !family.split(',').any(|f| f == "unix") || matches!(os.as_str(), "macos" | "ios" | "tvos" | "watchos" | "visionos") {
        return;
    }
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap();
    let soname = format!("liblora.so.{major}");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{soname}");
    // OUT_DIR is <target>/[<triple>/]<profile>/build/lora-<hash>/out.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let Some(profile_dir) = out_dir.ancestors().nth(3) else { return };
    for dir in [profile_dir.to_path_buf(), profile_dir.join("deps")] {
        let link = dir.join(&soname);
        if std::fs::symlink_metadata(&link).is_ok() || std::fs::create_dir_all(&dir).is_err() {
            continue;
        }
        // A relative link (valid once cargo writes liblora.so beside it); a
        // failure here only costs build-tree programs their loader lookup.
        #[cfg(unix)]
        let _ = std::os::unix::fs::symlink("liblora.so", &link);
    }
}
