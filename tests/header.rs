//! The committed C header must equal a fresh cbindgen generation (build.rs
//! writes one to OUT_DIR), and must declare nothing outside the `lora_` /
//! `LORA_` namespace.

use std::path::PathBuf;

#[test]
fn committed_header_is_current() {
    let fresh = std::fs::read_to_string(env!("LORA_GENERATED_HEADER")).expect("generated header");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include/lora.h");
    let committed = std::fs::read_to_string(&path).expect("include/lora.h");
    assert!(
        fresh == committed,
        "include/lora.h is stale: regenerate it with `LORA_UPDATE_HEADER=1 cargo build` and commit it"
    );
}

#[test]
fn header_names_are_prefixed() {
    let h = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include/lora.h")).unwrap();
    for line in h.lines() {
        let l = line.trim_start();
        if let Some(rest) = l.strip_prefix("#define ") {
            let name = rest.split_whitespace().next().unwrap();
            assert!(name.starts_with("LORA_"), "macro {name} is not LORA_-prefixed");
        }
        if let Some(rest) = l.strip_prefix("typedef ") {
            let name = rest.trim_end_matches(';').split(|c: char| !c.is_alphanumeric() && c != '_').rfind(|s| !s.is_empty()).unwrap_or("");
            if !rest.contains('(') && !rest.ends_with('{') {
                assert!(name.starts_with("lora_"), "typedef {name} is not lora_-prefixed: {line}");
            }
        }
        // Function declarations start at column 0: "<type> name(".
        let top = !line.starts_with([' ', '#', '/', '*', '}', '{']) && !line.starts_with("typedef") && !line.starts_with("extern");
        if top && line.contains('(') {
            let name = line.split('(').next().unwrap().split_whitespace().last().unwrap().trim_start_matches('*');
            assert!(name.starts_with("lora_"), "function {name} is not lora_-prefixed: {line}");
        }
    }
}
