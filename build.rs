//! Generates the C header from `src/ffi` with cbindgen into OUT_DIR; the
//! committed `include/lora.h` is compared with it by `tests/header.rs`.
//! `LORA_UPDATE_HEADER=1 cargo build` refreshes the committed copy.

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
}
