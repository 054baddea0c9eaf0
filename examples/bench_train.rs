//! Training-step throughput: `lora_train_step`'s Rust core on a model
//! directory, QLoRA (NF4 base) or fp32 base, LoRA on all linear layers.
//! The PyTorch + PEFT baseline on the same model and batch is
//! bench/peft_train.py; bench/RESULTS.md has both, from the same session.
//!
//! cargo run --release --example bench_train -- [MODEL_DIR] [nf4|fp32] [BATCH] [SEQ] [STEPS] [RANK] [STATE]
//!
//! STATE: `resident` (default), or `paged:F` — AdamW moments in paged
//! memory with a budget of F × the state's size (e.g. `paged:2`,
//! `paged:0.25`), backed by files in $LORA_PAGING_DIR (default /var/tmp).

use lora::model::peft::AdapterSpec;
use lora::model::{LoadOptions, Model};
use lora::optim::adamw::AdamWConfig;
use lora::quant::nf4::Nf4Params;
use lora::rng::SplitMix64;
use lora::session::trainer::{Trainer, TrainerConfig};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dir = a.get(1).cloned().unwrap_or_else(|| "models/default".into());
    let quant = a.get(2).is_none_or(|s| s == "nf4");
    let batch: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
    let seq: usize = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(128);
    let steps: usize = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(10);
    let rank: usize = a.get(6).and_then(|s| s.parse().ok()).unwrap_or(16);
    let state = a.get(7).cloned().unwrap_or_else(|| "resident".into());
    let budget_frac: Option<f64> = state.strip_prefix("paged:").map(|f| f.parse().expect("paged:FRACTION"));
    let t = Instant::now();
    let mut m = Model::load(std::path::Path::new(&dir), LoadOptions { quantize: quant.then(Nf4Params::default), seed: 1 }, &mut |_, _| true).expect("load");
    let load_s = t.elapsed().as_secs_f64();
    m.add_adapter("a", AdapterSpec::new(rank, 2.0 * rank as f32)).unwrap();
    let vocab = m.vocab();
    println!("{} | {} base | load {:.2} s | {}", dir, if quant { "NF4+DQ" } else { "fp32" }, load_s, m.trainable_summary());
    let model = Arc::new(Mutex::new(m));
    let state_bytes: usize = model.lock().adapter_sizes("a").unwrap().iter().sum::<usize>() * 8;
    let pager = budget_frac.map(|f| {
        let dir = std::env::var("LORA_PAGING_DIR").unwrap_or_else(|_| "/var/tmp".into());
        let budget = (state_bytes as f64 * f) as u64;
        println!("paged AdamW state: {:.1} MB, budget {:.1} MB ({f}x), backing in {dir}", state_bytes as f64 / 1e6, budget as f64 / 1e6);
        lora::memory::Pager::new(lora::backend::Device::Cpu, lora::memory::PagingConfig { budget_bytes: budget, dir: Some(dir.into()), allow_oversubscription: false }).unwrap()
    });
    let cfg = TrainerConfig { adamw: AdamWConfig { lr: 1e-3, weight_decay: 0.0, ..Default::default() }, paged: pager.is_some(), ..Default::default() };
    let mut tr = Trainer::with_pager(model.clone(), "a", cfg, pager.as_ref()).unwrap();
    let mut rng = SplitMix64::new(3);
    let ids: Vec<i32> = (0..batch * seq).map(|_| (rng.next_u64() % vocab as u64) as i32).collect();
    tr.step(&ids, None, batch, seq, &mut |_, _| true).unwrap(); // warm-up
    let mut times = Vec::new();
    for _ in 0..steps {
        let r = tr.step(&ids, None, batch, seq, &mut |_, _| true).unwrap();
        times.push(r.seconds);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = times[times.len() / 2];
    let mem = tr.memory();
    println!(
        "batch {batch} x seq {seq}, rank {rank}: median step {:.1} ms = {:.0} tokens/s (min {:.1} ms) | peak {:.1} MB (base {:.1}, adapters {:.1}, optimizer {:.1}, activations {:.1})",
        med * 1e3,
        (batch * seq) as f64 / med,
        times[0] * 1e3,
        mem.peak as f64 / 1e6,
        mem.base_weights as f64 / 1e6,
        mem.adapters as f64 / 1e6,
        mem.optimizer as f64 / 1e6,
        mem.activations as f64 / 1e6
    );
    if let Some((m, v)) = tr.paged_stats() {
        println!("paging: page-ins {} / page-outs {} chunks over the run", m.page_ins + v.page_ins, m.page_outs + v.page_outs);
    }
}
