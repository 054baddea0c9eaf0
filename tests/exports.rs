//! The cdylib's dynamic symbol table is exactly the public C API: every
//! exported function is named `lora_*` (nothing of Rust's std, of the
//! dependencies or of liblora's internals leaks out to collide with a host's
//! symbols), the core entry points are there, and the set equals the
//! functions declared in include/lora.h.
//!
//! The library is the one `cargo test` built next to this test executable
//! (`target/<profile>/deps/liblora.so`; see tests/c_api.rs), or
//! `LORA_CDYLIB`. Needs `nm` (GNU binutils or LLVM); fails saying so when
//! it is missing.

#![cfg(target_os = "linux")] // `nm -D` reads ELF dynamic symbol tables

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

fn cdylib() -> PathBuf {
    if let Some(p) = std::env::var_os("LORA_CDYLIB") {
        return PathBuf::from(p);
    }
    let name = format!("{}lora{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test executable has a directory");
    let p = dir.join(&name);
    assert!(
        p.is_file(),
        "{name} is not next to the test executable in {} (cargo builds the lib's cdylib there for `cargo test`; \
         is \"cdylib\" still in [lib] crate-type?). Set LORA_CDYLIB to check another build.",
        dir.display()
    );
    p
}

/// (type letter, name) of every defined dynamic symbol, version suffixes
/// (`@@VERS`) removed.
fn dynamic_symbols() -> Vec<(char, String)> {
    let lib = cdylib();
    let nm = std::env::var("NM").unwrap_or_else(|_| "nm".into());
    let out = match Command::new(&nm).args(["-D", "--defined-only"]).arg(&lib).output() {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run `{nm}` ({e}): this test needs nm to read the library's dynamic symbols \
             (Debian/Ubuntu: apt-get install binutils; or set NM, e.g. NM=llvm-nm)"
        ),
    };
    assert!(out.status.success(), "`{nm} -D --defined-only {}` failed: {}", lib.display(), String::from_utf8_lossy(&out.stderr));
    let mut syms = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "0000000000059410 T lora_context_default_params" (address may be blank)
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (ty, name) = match parts.as_slice() {
            [_, ty, name] => (*ty, *name),
            [ty, name] => (*ty, *name),
            _ => continue,
        };
        let name = name.split('@').next().unwrap_or(name);
        syms.push((ty.chars().next().unwrap_or('?'), name.to_string()));
    }
    assert!(!syms.is_empty(), "nm listed no dynamic symbols in {}", lib.display());
    syms
}

/// Function-like symbol types: text (T/t), weak (W/w), indirect (i).
fn is_function(ty: char) -> bool {
    matches!(ty, 'T' | 't' | 'W' | 'w' | 'i')
}

/// Symbols some linkers define in every shared object.
const LINKER_SYMBOLS: &[&str] = &["_init", "_fini", "__bss_start", "_edata", "_end", "__data_start", "__dso_handle"];

#[test]
fn every_exported_symbol_is_lora_prefixed() {
    let syms = dynamic_symbols();
    let bad: Vec<String> = syms
        .iter()
        .filter(|(ty, n)| !n.starts_with("lora_") && (is_function(*ty) || !LINKER_SYMBOLS.contains(&n.as_str())))
        .map(|(ty, n)| format!("{ty} {n}"))
        .collect();
    assert!(bad.is_empty(), "exported symbols without the lora_ prefix:\n{}", bad.join("\n"));
    let funcs: BTreeSet<&str> = syms.iter().filter(|(t, _)| is_function(*t)).map(|(_, n)| n.as_str()).collect();
    for must in ["lora_quantize_nf4", "lora_context_new", "lora_context_free", "lora_status_str", "lora_last_error", "lora_version"] {
        assert!(funcs.contains(must), "{must} is not exported; exported: {funcs:?}");
    }
}

/// Names of the functions declared in include/lora.h: a declaration starts
/// at column 0 with its return type and has `lora_<name>(` on that line.
fn header_functions() -> BTreeSet<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include/lora.h");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = BTreeSet::new();
    let mut in_comment = false;
    for line in text.lines() {
        let t = line.trim_start();
        if in_comment {
            if t.contains("*/") {
                in_comment = false;
            }
            continue;
        }
        if t.starts_with("/*") {
            in_comment = !t.contains("*/");
            continue;
        }
        if line.starts_with(char::is_whitespace) || t.starts_with('#') || t.starts_with("//") || t.starts_with("typedef") || t.starts_with('}') {
            continue;
        }
        let Some(open) = line.find('(') else { continue };
        let before = &line[..open];
        let name: String = before.chars().rev().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<Vec<_>>().into_iter().rev().collect();
        if name.starts_with("lora_") {
            out.insert(name);
        }
    }
    assert!(out.len() >= 10, "found only {} function declarations in {}: {out:?}", out.len(), path.display());
    out
}

#[test]
fn exports_match_the_header() {
    let exported: BTreeSet<String> = dynamic_symbols().into_iter().filter(|(t, _)| is_function(*t)).map(|(_, n)| n).collect();
    let declared = header_functions();
    let missing: Vec<&String> = declared.difference(&exported).collect();
    let undeclared: Vec<&String> = exported.difference(&declared).collect();
    assert!(missing.is_empty(), "declared in include/lora.h but not exported by the library: {missing:?}");
    assert!(undeclared.is_empty(), "exported by the library but not declared in include/lora.h: {undeclared:?}");
}
