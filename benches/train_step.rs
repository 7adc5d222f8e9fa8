//! Training-step benchmark on CPU, f32: one ESFT step (experts selected by token score,
//! p = 0.2) against one full fine-tuning step, on the same random model and the same
//! batch. Reports the time ratio and the peak-heap ratio (ESFT / FFT).
//!
//! The model is `benches/bench_model.json` (hidden 512, 64 routed experts top-6, 2 shared,
//! vocab 32000) with `BENCH_TRAIN_LAYERS` layers (default 8, as the runtime benchmark). The batch is
//! `BENCH_TRAIN_SAMPLES` (default 4) random sequences of `BENCH_TRAIN_SEQ` (default 256)
//! tokens, every position a target. Each variant runs one warm-up step, then
//! `BENCH_TRAIN_STEPS` (default 5) timed steps; the median is reported. Peak memory is the
//! largest heap in use (a counting allocator) while the variant is built and stepped:
//! model weights, trainable copies, optimizer moments, gradients and activations.
//!
//! Run: `cargo bench -p esft-train --bench train_step`.

#[path = "common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use common::{bench_config, env_usize, median};
use esft::model::init::write_random_checkpoint;
use esft::model::{DeepSeekV2, LoadOptions};
use esft_train::data::Sample;
use esft_train::score::{score_samples, ScoreAccumulator};
use esft_train::select::{select, ScoreFunction, Selection};
use esft_train::train::{Run, Schedule, TrainConfig, Trainable};
use rand::{Rng, SeedableRng};

/// The system allocator, counting bytes in use and their high-water mark.
struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                let grow = new_size - layout.size();
                let now = IN_USE.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                IN_USE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

struct Measured {
    step_s: f64,
    peak_bytes: usize,
    /// Heap held once the model is loaded and its trainable copies and optimizer state
    /// exist, before the first step: the peak minus this is what a step adds.
    ready_bytes: usize,
    trainable: usize,
    loss: f64,
}

fn measure(
    dir: &std::path::Path,
    what: &Trainable,
    samples: &[Sample],
    cfg: &TrainConfig,
    steps: usize,
) -> anyhow::Result<Measured> {
    let base = IN_USE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let model = DeepSeekV2::load_dir(dir, &LoadOptions::default())?;
    let mut run = Run::new(model, what, samples.to_vec(), Vec::new(), cfg.clone())?;
    let ready_bytes = IN_USE.load(Ordering::Relaxed) - base;
    let mut loss = run.train_step()?.loss;
    let mut times = Vec::new();
    for _ in 0..steps {
        let t = Instant::now();
        loss = run.train_step()?.loss;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(Measured {
        step_s: median(times),
        peak_bytes: PEAK.load(Ordering::Relaxed) - base,
        ready_bytes,
        trainable: run.trainable_params(),
        loss,
    })
}

fn main() -> anyhow::Result<()> {
    esft::util::pin_thread_count();
    let layers = env_usize("BENCH_TRAIN_LAYERS", 8);
    let n_samples = env_usize("BENCH_TRAIN_SAMPLES", 4);
    let seq = env_usize("BENCH_TRAIN_SEQ", 256);
    let steps = env_usize("BENCH_TRAIN_STEPS", 5);
    let config = bench_config(layers);
    let dir = tempfile::tempdir()?;
    write_random_checkpoint(&config, 0, dir.path())?;
    let vocab = config["vocab_size"].as_u64().unwrap_or(32000) as u32;

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let samples: Vec<Sample> = (0..n_samples)
        .map(|i| Sample {
            line: i + 1,
            tokens: (0..seq).map(|_| rng.random_range(0..vocab)).collect(),
            trained: vec![true; seq],
        })
        .collect();

    // ESFT-Token, p = 0.2, scored on the batch itself.
    let experts = {
        let model = DeepSeekV2::load_dir(dir.path(), &LoadOptions::default())?;
        let c = model.config();
        let mut acc = ScoreAccumulator::new(c.n_routed_experts, c.num_experts_per_tok);
        let tokens: Vec<Vec<u32>> = samples.iter().map(|s| s.tokens.clone()).collect();
        score_samples(&model, &tokens, 4096, &mut acc, None, |_| {})?;
        select(
            &acc.scores(),
            &Selection {
                function: ScoreFunction::Token,
                top_p: 0.2,
                shared_experts: false,
                non_expert_modules: false,
            },
        )?
    };
    let cfg = TrainConfig {
        steps: 1000,
        lr: 1e-5,
        batch: n_samples,
        grad_accum: 1,
        seq_len: seq,
        warmup: 0,
        schedule: Schedule::Constant,
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        max_grad_norm: 1.0,
        seed: 0,
        eval_split: 0.0,
        aux_loss_alpha: 0.0,
    };
    let routed = (layers - 1) * 64;
    let esft = measure(
        dir.path(),
        &Trainable::Experts(experts.clone()),
        &samples,
        &cfg,
        steps,
    )?;
    let fft = measure(dir.path(), &Trainable::All, &samples, &cfg, steps)?;

    let mb = |b: usize| b as f64 / 1e6;
    println!(
        "model: {layers} layers, {} routed experts; batch {n_samples} x {seq} tokens; {} threads",
        routed,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_default()
    );
    println!(
        "ESFT-Token p=0.2: {} experts ({:.1}%), {} trainable params",
        experts.expert_count(),
        100.0 * experts.expert_count() as f64 / routed as f64,
        esft.trainable
    );
    for (name, m) in [("ESFT", &esft), ("FFT", &fft)] {
        println!(
            "{name:>5}: step {:.3} s, peak heap {:.0} MB ({:.0} MB before the first step), \
             loss {:.4}",
            m.step_s,
            mb(m.peak_bytes),
            mb(m.ready_bytes),
            m.loss
        );
    }
    let time_ratio = esft.step_s / fft.step_s;
    let mem_ratio = esft.peak_bytes as f64 / fft.peak_bytes as f64;
    println!(
        "ESFT / FFT: time {time_ratio:.3} (goal <= 0.5), peak memory {mem_ratio:.3} (goal <= 0.4)"
    );
    let line = serde_json::json!({
        "bench": "train_step",
        "layers": layers,
        "tokens": n_samples * seq,
        "experts_selected": experts.expert_count(),
        "esft_step_s": esft.step_s,
        "fft_step_s": fft.step_s,
        "esft_peak_bytes": esft.peak_bytes,
        "fft_peak_bytes": fft.peak_bytes,
        "esft_ready_bytes": esft.ready_bytes,
        "fft_ready_bytes": fft.ready_bytes,
        "time_ratio": time_ratio,
        "memory_ratio": mem_ratio,
    });
    println!("{line}");
    Ok(())
}
