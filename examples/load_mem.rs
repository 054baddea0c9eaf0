//! Peak memory of loading a model: VmHWM and the anonymous/file split of
//! the resident set after `Model::load`, with and without NF4 at load.
//!
//! cargo run --release --example load_mem -- MODEL_DIR [nf4|fp32]
use lora::model::{LoadOptions, Model};
use lora::quant::nf4::Nf4Params;

fn status(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let quant = a.get(2).is_none_or(|s| s == "nf4");
    let before = status("VmRSS:");
    let m = Model::load(std::path::Path::new(&a[1]), LoadOptions { quantize: quant.then(Nf4Params::default), seed: 0 }, &mut |_, _| true).unwrap();
    let mem = m.memory();
    println!(
        "{} ({}): model holds {:.1} MB (NF4 part {:.1} MB); process RSS before {:.1} MB, peak (VmHWM) {:.1} MB, now anon {:.1} MB + file {:.1} MB",
        a[1],
        if quant { "NF4 at load" } else { "fp32" },
        mem.base_weights as f64 / 1e6,
        mem.base_quantized as f64 / 1e6,
        before as f64 / 1e3,
        status("VmHWM:") as f64 / 1e3,
        status("RssAnon:") as f64 / 1e3,
        status("RssFile:") as f64 / 1e3
    );
}
