//! Throughput of an AdamW update (`optim::adamw::adamw_update`, the
//! torch-exact kernel) over optimizer state that is fully resident
//! (`Vec<f32>` moments), paged with a generous budget (2× the state: nothing
//! is paged out after the first touch), and paged with a quarter budget
//! (every step writes ~3/4 of the moments to the backing file and reads them
//! back). Ratios against the resident run, measured in the same run,
//! rounds interleaved (resident, generous, quarter, resident, ...).
//!
//!     cargo run --release --example bench_paged [-- --elems 16777216 --steps 5 --threads 2 --dir DIR]
//!
//! Parameters and gradients stay resident (`Vec<f32>`) in every case; the
//! two moments (8 bytes per parameter) are what is paged. The update walks
//! the state in windows of `--window` elements (default 1 Mi: 4 MiB per
//! moment), prefetching the next window before updating the current one, and
//! splits each window over the threads in 64 Ki-element tasks: the loop a
//! trainer would run. The resident case runs the same loop over `Vec`s.
//!
//! Reported per case: the median step time, G parameters/s, and for the
//! paged cases the bytes paged in and out per step. The backing directory
//! defaults to the system temp directory; its file system type is printed
//! (on tmpfs "paging out" frees no memory and costs little).

use lora::backend::Device;
use lora::memory::{PagedBuf, Pager, PagingConfig};
use lora::optim::adamw::adamw_update;
use lora::optim::{AdamWConfig, AdamWScalars};
use rayon::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

struct Args {
    elems: usize,
    steps: usize,
    threads: usize,
    window: usize,
    dir: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args { elems: 1 << 24, steps: 5, threads: 2, window: 1 << 20, dir: None };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = || v.get(i + 1).unwrap_or_else(|| panic!("{} needs a value", v[i])).clone();
        match v[i].as_str() {
            "--elems" => a.elems = val().parse().expect("--elems N"),
            "--steps" => a.steps = val().parse().expect("--steps N"),
            "--threads" => a.threads = val().parse().expect("--threads N"),
            "--window" => a.window = val().parse().expect("--window N"),
            "--dir" => a.dir = Some(PathBuf::from(val())),
            other => panic!("unknown argument {other}; use --elems N --steps N --threads N --window N --dir DIR"),
        }
        i += 2;
    }
    a
}

const TASK: usize = 1 << 16;

/// `adamw_update` compiled with AVX2 and FMA (it is `#[inline(always)]`, so
/// it vectorizes here), as `optim::AdamW` runs it; the same bits as the
/// plain build, whose `f32::mul_add` is a libm call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn adamw_avx2(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars) {
    adamw_update(p, g, m, v, s)
}

fn adamw_task(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { adamw_avx2(p, g, m, v, s) };
    }
    adamw_update(p, g, m, v, s)
}

/// One AdamW step over one window of already borrowed slices, in parallel.
fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars) {
    p.par_chunks_mut(TASK)
        .zip(g.par_chunks(TASK))
        .zip(m.par_chunks_mut(TASK))
        .zip(v.par_chunks_mut(TASK))
        .for_each(|(((p, g), m), v)| adamw_task(p, g, m, v, s));
}

enum Moments {
    Resident(Vec<f32>, Vec<f32>),
    Paged(PagedBuf, PagedBuf, Arc<Pager>),
}

struct Case {
    name: &'static str,
    p: Vec<f32>,
    mom: Moments,
    step: u64,
    times: Vec<f64>,
    io_in: u64,
    io_out: u64,
}

impl Case {
    fn run_step(&mut self, g: &[f32], cfg: &AdamWConfig, window: usize) -> f64 {
        self.step += 1;
        let s = AdamWScalars::new(cfg, self.step);
        let n = self.p.len();
        let before = match &self.mom {
            Moments::Paged(_, _, pager) => Some(pager.stats()),
            _ => None,
        };
        let t0 = Instant::now();
        for w0 in (0..n).step_by(window) {
            let w = w0..(w0 + window).min(n);
            match &mut self.mom {
                Moments::Resident(m, v) => update(&mut self.p[w.clone()], &g[w.clone()], &mut m[w.clone()], &mut v[w.clone()], &s),
                Moments::Paged(m, v, _) => {
                    if w.end < n {
                        let next = w.end * 4..(w.end + window).min(n) * 4;
                        m.prefetch(next.clone()).unwrap();
                        v.prefetch(next).unwrap();
                    }
                    let m = m.as_f32_mut(w.clone()).unwrap();
                    let v = v.as_f32_mut(w.clone()).unwrap();
                    update(&mut self.p[w.clone()], &g[w.clone()], m, v, &s);
                }
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        if let (Some(b), Moments::Paged(_, _, pager)) = (before, &self.mom) {
            let a = pager.stats();
            self.io_in = a.bytes_paged_in_total - b.bytes_paged_in_total;
            self.io_out = a.bytes_paged_out_total - b.bytes_paged_out_total;
        }
        dt
    }
}

fn fs_type(dir: &std::path::Path) -> String {
    let out = std::process::Command::new("df").arg("-T").arg(dir).output();
    match out {
        Ok(o) if o.status.success() => {
            let s = String::from_utf8_lossy(&o.stdout);
            s.lines().nth(1).and_then(|l| l.split_whitespace().nth(1)).unwrap_or("?").to_string()
        }
        _ => "?".to_string(),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}

fn main() {
    let a = args();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(a.threads).build().unwrap();
    let n = a.elems;
    let state = 8 * n; // two fp32 moments
    let dir = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    println!(
        "AdamW update, {n} parameters ({:.0} MiB of moments), window {} elements, {} threads, {} steps after 1 warm-up; backing dir {} ({})",
        state as f64 / (1 << 20) as f64,
        a.window,
        a.threads,
        a.steps,
        dir.display(),
        fs_type(&dir)
    );
    let cfg = AdamWConfig { lr: 1e-3, weight_decay: 0.01, ..Default::default() };
    let mut x = 0x1234_5678u32;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x as f32 / u32::MAX as f32) - 0.5
    };
    let p0: Vec<f32> = (0..n).map(|_| rnd()).collect();
    let g: Vec<f32> = (0..n).map(|_| rnd() * 0.01).collect();

    let paged = |budget: u64| {
        let pager = Pager::new(Device::Cpu, PagingConfig { budget_bytes: budget, dir: Some(dir.clone()), allow_oversubscription: false }).unwrap();
        let m = PagedBuf::new(&pager, 4 * n).unwrap();
        let v = PagedBuf::new(&pager, 4 * n).unwrap();
        Moments::Paged(m, v, pager)
    };
    let mut cases = vec![
        Case { name: "resident (Vec)", p: p0.clone(), mom: Moments::Resident(vec![0.0; n], vec![0.0; n]), step: 0, times: vec![], io_in: 0, io_out: 0 },
        Case { name: "paged, budget 2x state", p: p0.clone(), mom: paged(2 * state as u64), step: 0, times: vec![], io_in: 0, io_out: 0 },
        Case { name: "paged, budget 1/4 state", p: p0.clone(), mom: paged(state as u64 / 4), step: 0, times: vec![], io_in: 0, io_out: 0 },
    ];
    pool.install(|| {
        for c in cases.iter_mut() {
            c.run_step(&g, &cfg, a.window); // warm-up: first touch of everything
        }
        for _ in 0..a.steps {
            for c in cases.iter_mut() {
                let dt = c.run_step(&g, &cfg, a.window);
                c.times.push(dt);
            }
        }
    });
    // Same bits in every case.
    for c in &cases[1..] {
        assert!(c.p.iter().zip(&cases[0].p).all(|(a, b)| a.to_bits() == b.to_bits()), "{}: parameters differ from the resident run", c.name);
    }
    let base = median(&cases[0].times);
    println!("{:<26} {:>10} {:>12} {:>10} {:>14} {:>14}", "case", "step ms", "G param/s", "vs resident", "paged in/step", "paged out/step");
    for c in &cases {
        let t = median(&c.times);
        println!(
            "{:<26} {:>10.2} {:>12.3} {:>10.2}x {:>11.1} MiB {:>11.1} MiB",
            c.name,
            t * 1e3,
            n as f64 / t / 1e9,
            base / t,
            c.io_in as f64 / (1 << 20) as f64,
            c.io_out as f64 / (1 << 20) as f64
        );
    }
    println!("parameters identical to the resident run in every case (bit for bit)");
}
