//! Per-process scratch directories for the tests that build and run
//! programs (bindings, install): `target/<profile>/<name>/<pid>`, with the
//! directories of processes that are gone removed. Included by `#[path]`.

use std::path::{Path, PathBuf};

/// The directory of the running test executable (`target/<profile>/deps`).
pub fn exe_dir() -> PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().to_path_buf()
}

/// `target/<profile>/<name>/<pid>`, created; sibling directories of dead
/// processes removed first.
pub fn scratch_root(name: &str) -> PathBuf {
    let base = exe_dir().parent().unwrap().join(name);
    if let Ok(entries) = std::fs::read_dir(&base) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.parse::<u32>().is_ok() && !Path::new("/proc").join(&n).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let d = base.join(std::process::id().to_string());
    std::fs::create_dir_all(&d).unwrap();
    d
}
