//! Tokenizer encode/decode speed (a benchmark, not a test).
//!
//!     cargo run --release --example bench_tokenizer [-- [--text FILE] [--reps N] [TOKENIZER_PATH...]]
//!
//! Encodes about 1 MiB of mixed text (English prose, code, numbers, CJK,
//! emoji; or the UTF-8 of FILE) with each tokenizer — by default the
//! fixtures in tests/fixtures/tokenizer — and decodes the ids back. Prints
//! the median of N runs (default 5) after one warm-up run, whose time is
//! printed separately: it fills the piece cache, which the later runs hit.
//! `--dump FILE` writes the generated text, to time `tokenizers` on the
//! same input; `--ids-out PREFIX` writes each tokenizer's ids (one per line)
//! to PREFIX.<name>.ids, to compare them with `tokenizers`' on a large text.

use lora::tokenizer::Tokenizer;
use std::path::PathBuf;
use std::time::Instant;

fn sample_text(target: usize) -> String {
    let parts = [
        "The quick brown fox jumps over the lazy dog. ",
        "I'll be there at 10:30, don't worry; we're all set and they've agreed.\n",
        "fn main() {\n    let x: Vec<u32> = (0..100).map(|i| i * 2).collect();\n}\n",
        "Numbers 12345678 3.14159 2024-01-01 and 1,000,000. ",
        "Café au lait, naïve résumé, Zürich. ",
        "日本語のテキストを少し。中文文本也有一点。",
        "Emoji 🤗 and 🎉 appear sometimes 👍. ",
        "    indented\tand\ttabbed   text   \n\n",
    ];
    let mut s = String::with_capacity(target + 200);
    let mut i: u64 = 1;
    while s.len() < target {
        // A little deterministic variety so the piece cache is not all hits.
        i = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        s.push_str(parts[(i >> 33) as usize % parts.len()]);
        s.push_str(&format!("w{} ", (i >> 40) % 5000));
    }
    s
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut reps = 5;
    let mut text = None;
    let mut paths = Vec::new();
    let mut ids_out: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--reps" => reps = it.next().expect("--reps N").parse().expect("--reps N"),
            "--text" => text = Some(std::fs::read_to_string(it.next().expect("--text FILE")).expect("read --text")),
            "--ids-out" => ids_out = Some(it.next().expect("--ids-out PREFIX").clone()),
            "--dump" => {
                std::fs::write(it.next().expect("--dump FILE"), sample_text(1 << 20)).expect("write --dump");
                return;
            }
            p => paths.push(PathBuf::from(p)),
        }
    }
    if paths.is_empty() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer");
        let mut d: Vec<PathBuf> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.join("tokenizer.json").is_file()).collect();
        d.sort();
        paths = d;
    }
    let text = text.unwrap_or_else(|| sample_text(1 << 20));
    let mb = text.len() as f64 / (1 << 20) as f64;
    println!("text: {} bytes ({mb:.2} MiB), {} chars; {reps} runs after a warm-up", text.len(), text.chars().count());
    println!("{:<40} {:>8} {:>10} {:>12} {:>10} {:>12}", "tokenizer", "ids", "cold ms", "encode ms", "MiB/s", "decode ms");
    for p in paths {
        let t0 = Instant::now();
        let tok = match Tokenizer::load(&p) {
            Ok(t) => t,
            Err(e) => {
                println!("{}: {e}", p.display());
                continue;
            }
        };
        let load_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t0 = Instant::now();
        let ids = tok.encode(&text, false).unwrap();
        let cold = t0.elapsed().as_secs_f64() * 1e3;
        let mut enc = Vec::new();
        let mut dec = Vec::new();
        for _ in 0..reps {
            let t0 = Instant::now();
            let again = tok.encode(&text, false).unwrap();
            enc.push(t0.elapsed().as_secs_f64() * 1e3);
            assert_eq!(again, ids);
            let t0 = Instant::now();
            let back = tok.decode(&ids, false).unwrap();
            dec.push(t0.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(back);
        }
        if let Some(prefix) = &ids_out {
            let name = p.file_name().unwrap_or_default().to_string_lossy().to_string();
            let lines: String = ids.iter().map(|i| format!("{i}\n")).collect();
            std::fs::write(format!("{prefix}.{name}.ids"), lines).expect("write ids");
        }
        let e = median(enc);
        let name = format!("{} (load {load_ms:.0} ms)", p.file_name().unwrap_or_default().to_string_lossy());
        println!("{:<40} {:>8} {:>10.1} {:>12.1} {:>10.2} {:>12.1}", name, ids.len(), cold, e, mb / (e / 1e3), median(dec));
    }
}
