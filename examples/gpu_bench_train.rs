//! GPU training-step benchmark: `Trainer::step` (what `lora_train_step`
//! runs) on a CUDA device, on a LLaMA of about 1B parameters with random
//! weights (Llama 3.2 1B's shape: hidden 2048, 16 layers, 32 heads / 8 KV
//! heads, MLP 8192, vocab 128256, tied embeddings), LoRA r 16 / alpha 32
//! on every linear layer, AdamW, clipping 1.0, bf16 compute.
//! `bench/peft_train_gpu.py` is the PyTorch + PEFT baseline on the same
//! shape; scripts/gpu-check.sh runs both in one session.
//!
//!     gpu_bench_train [nf4|bf16] [BATCH] [SEQ] [STEPS] [RANK] [ckpt] [f32]
//!
//! nf4: the base quantized to NF4 + double quantization (QLoRA); bf16: the
//! base in bf16. Prints the median step time, tokens/s, and the peak bytes
//! in use in the device's memory pool during the timed steps (every
//! buffer of the device path; the analogue of
//! torch.cuda.max_memory_allocated), after 2 warm-up steps; then one
//! synchronized step's per-category profile and the time to generate 64
//! greedy tokens after a 128-token prompt on the device; then merging on
//! the device and generating through the merged weights, and 8 sequences
//! with one adapter against a mixed batch of two adapters.

#[path = "common/llama_1b.rs"]
mod llama_1b;

use lora::model::generate::Request;
use lora::model::gpu::Compute;
use lora::model::peft::AdapterSpec;
use lora::session::trainer::{Trainer, TrainerConfig};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Instant;

fn main() {
    if let Err(e) = run() {
        eprintln!("gpu_bench_train: {e}");
        std::process::exit(1);
    }
}

fn run() -> lora::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let mode = a.first().map(String::as_str).unwrap_or("nf4").to_string();
    let num = |i: usize, d: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, seq, steps, rank) = (num(1, 4), num(2, 1024), num(3, 5), num(4, 16));
    let ckpt = a.iter().any(|s| s == "ckpt");
    let compute = if a.iter().any(|s| s == "f32") { Compute::F32 } else { Compute::BF16 };
    // Fail fast without a GPU, before building a 1B model.
    let dev = lora::backend::cuda::open(0)?;
    lora::backend::cuda::nvrtc::ensure()?;
    let t0 = Instant::now();
    let m = llama_1b::build(&mode, rank)?;
    let (trainable, total) = m.param_counts();
    let build_s = t0.elapsed().as_secs_f64();
    let mut tc = TrainerConfig { checkpointing: ckpt, ..Default::default() };
    tc.adamw.lr = 1e-4;
    tc.adamw.weight_decay = 0.0;
    let mut t = Trainer::new(Arc::new(Mutex::new(m)), "a", tc)?;
    let t1 = Instant::now();
    t.use_device(Some((0, compute)))?;
    let upload_s = t1.elapsed().as_secs_f64();
    let vocab = llama_1b::VOCAB as u64;
    let mut s = 0x1234_5678u64;
    let ids: Vec<i32> = (0..batch * seq)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % vocab) as i32
        })
        .collect();
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for i in 0..steps + 2 {
        if i == 2 {
            dev.reset_pool_peak()?;
        }
        let r = t.step(&ids, None, batch, seq, &mut |_, _| true)?;
        losses.push(r.loss);
        if i >= 2 {
            times.push(r.seconds);
        }
    }
    let peak = dev.pool_peak_bytes()?;
    // One more step with the per-category profile (each op waits for the
    // device, so this step is slower; the shares are what it shows).
    t.device_profile(Some(true));
    let r = t.step(&ids, None, batch, seq, &mut |_, _| true)?;
    let prof = t.device_profile(Some(false)).unwrap_or_default();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = times[times.len() / 2];
    let opts: Vec<String> = ["LORA_CUDA_ATTENTION", "LORA_CUDA_LORA", "LORA_CUDA_LEAN", "LORA_CUDA_RECOMPUTE", "LORA_CUDA_FOLD", "LORA_BENCH_HEAD_DIM"].iter().filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}"))).collect();
    println!(
        "liblora {mode}{} {:?}{} | {} | {:.3}B params ({trainable} trainable) | build {build_s:.1} s, upload {upload_s:.1} s",
        if ckpt { " +ckpt" } else { "" },
        compute,
        if opts.is_empty() { String::new() } else { format!(" [{}]", opts.join(" ")) },
        t.device().unwrap_or_default(),
        total as f64 / 1e9
    );
    println!(
        "  batch {batch} x seq {seq}, r {rank}: median step {:.1} ms = {:.0} tokens/s (min {:.1}) | peak pool {:.2} GiB | losses {:.4} .. {:.4}",
        med * 1e3,
        (batch * seq) as f64 / med,
        times[0] * 1e3,
        peak as f64 / (1u64 << 30) as f64,
        losses[0],
        losses[losses.len() - 1]
    );
    // Generation on the device with the trained adapter: one sequence, a
    // 128-token prompt, 64 greedy tokens (prefill included in the time).
    let prompt = &ids[..128.min(ids.len())];
    let t2 = Instant::now();
    let gen = t.generate(&[prompt], 64, &Default::default(), &[], &mut |_, _| true)?;
    let gen_s = t2.elapsed().as_secs_f64();
    let total = prof.iter().find(|e| e.0.ends_with("(total)")).map_or(0.0, |e| e.1);
    println!("  profile of one synchronized step ({:.1} ms; forward+backward {:.1} ms):", r.seconds * 1e3, total * 1e3);
    let mut named = 0.0;
    for (what, secs, calls) in &prof {
        if !what.ends_with("(total)") {
            println!("    {what:<32} {:>8.1} ms  {calls:>5} calls", secs * 1e3);
            if !what.starts_with("clip") && !what.starts_with("adapter") {
                named += secs;
            }
        }
    }
    println!("    {:<32} {:>8.1} ms  (norms, rope, SwiGLU, bf16 casts, copies, launches)", "rest of forward+backward", (total - named) * 1e3);
    println!("  generate: 1 × {} prompt + {} new tokens in {:.1} ms = {:.1} tokens/s (prefill included)", prompt.len(), gen[0].len(), gen_s * 1e3, gen[0].len() as f64 / gen_s);
    // The model's device copy after training: merging on the device, then
    // generating through the merged (dense) weights; a second adapter and
    // a mixed batch of 8 sequences (BGMV) against 8 with one adapter.
    let model = t.model.clone();
    let mut m = model.lock();
    let t3 = Instant::now();
    m.merge()?;
    m.logits(&prompt[..1], 1, 1, None)?;
    let merge_s = t3.elapsed().as_secs_f64();
    let t4 = Instant::now();
    let genm = m.generate(&[Request { prompt, adapter: None }], 64, &Default::default(), &[], &mut |_, _| true)?;
    let genm_s = t4.elapsed().as_secs_f64();
    m.unmerge()?;
    let same = genm[0].iter().zip(&gen[0]).take_while(|(a, b)| a == b).count();
    println!(
        "  merge on the device {:.1} ms (+ a 1-token forward); merged generate 64 tokens in {:.1} ms = {:.1} tokens/s ({same}/64 leading tokens as unmerged)",
        merge_s * 1e3,
        genm_s * 1e3,
        genm[0].len() as f64 / genm_s
    );
    m.add_adapter("b", AdapterSpec::new(rank, 2.0 * rank as f32))?;
    let pl = prompt.len();
    let prompts: Vec<&[i32]> = (0..8).map(|i| &ids[(i * pl) % (ids.len() - pl + 1)..][..pl]).collect();
    let mut timed = |ads: &dyn Fn(usize) -> i32| -> lora::Result<(f64, usize)> {
        let reqs: Vec<Request<'_>> = prompts.iter().enumerate().map(|(i, p)| Request { prompt: p, adapter: Some(ads(i)) }).collect();
        let t5 = Instant::now();
        let out = m.generate(&reqs, 64, &Default::default(), &[], &mut |_, _| true)?;
        Ok((t5.elapsed().as_secs_f64(), out.iter().map(|o| o.len()).sum()))
    };
    let (one_s, one_n) = timed(&|_| 0)?;
    let (mix_s, mix_n) = timed(&|i| (i % 2) as i32)?;
    println!(
        "  generate 8 × ({pl} + 64): one adapter {:.1} ms = {:.0} tokens/s; mixed batch of 2 adapters (BGMV) {:.1} ms = {:.0} tokens/s",
        one_s * 1e3,
        one_n as f64 / one_s,
        mix_s * 1e3,
        mix_n as f64 / mix_s
    );
    Ok(())
}
