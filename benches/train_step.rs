//! Training-step benchmark on CPU, f32: one ESFT step (experts selected by token score,
//! p = 0.2) against one full fine-tuning step, on the same random model and the same
//! batch. Reports the time ratio and the peak-heap ratio (ESFT / FFT).
//!
//! The model is `benches/bench_model.json` (hidden 512, 64 routed experts top-6, 2 shared,
//! vocab 32000) with `BENCH_TRAIN_LAYERS` layers (default 8, as the runtime benchmark). The batch is
//! `BENCH_TRAIN_SAMPLES` (default 4) random sequences of `BENCH_TRAIN_SEQ` (default 256)
//! tokens, every position a target. Each variant is built and runs one warm-up step on its
//! own; peak memory is the largest heap in use (a counting allocator) meanwhile: model
//! weights, trainable copies, optimizer moments, gradients and activations. Then both stay
//! loaded and `BENCH_TRAIN_STEPS` (default 5) rounds each time one step of ESFT and one of
//! FFT; step times are medians, and the time ratio is the median of the per-round ratios.
//! `BENCH_TRAIN_ONLY=esft|fft` builds and times one variant alone (for profiling).
//!
//! Run: `cargo bench -p esft-train --bench train_step`.

#[path = "common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use common::{bench_config, env_usize, median};
use esft::model::init::write_random_checkpoint;
use esft::model::{Decoder, LoadOptions};
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

/// A variant built and warmed up: its run, and its memory numbers.
struct Prepared {
    run: Run,
    peak_bytes: usize,
    ready_bytes: usize,
}

/// Builds a variant and runs its warm-up step, tracking the heap it adds: what it holds
/// once built (`ready`) and the most it held up to the end of the warm-up step (`peak`).
/// Whatever other variants hold is constant meanwhile and subtracted.
fn prepare(
    dir: &std::path::Path,
    what: &Trainable,
    samples: &[Sample],
    cfg: &TrainConfig,
) -> anyhow::Result<Prepared> {
    let base = IN_USE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let model = Decoder::load_dir(dir, &LoadOptions::default())?;
    let mut run = Run::new(model, what, samples.to_vec(), Vec::new(), cfg.clone())?;
    let ready_bytes = IN_USE.load(Ordering::Relaxed) - base;
    run.train_step()?;
    Ok(Prepared {
        run,
        peak_bytes: PEAK.load(Ordering::Relaxed) - base,
        ready_bytes,
    })
}

fn main() -> anyhow::Result<()> {
    esft::util::prepare_process();
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
        let model = Decoder::load_dir(dir.path(), &LoadOptions::default())?;
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
    let only = std::env::var("BENCH_TRAIN_ONLY").unwrap_or_default();
    let mut variants: Vec<(&str, Prepared)> = Vec::new();
    if only != "fft" {
        let esft = Trainable::Experts(experts.clone());
        variants.push(("ESFT", prepare(dir.path(), &esft, &samples, &cfg)?));
    }
    if only != "esft" {
        variants.push(("FFT", prepare(dir.path(), &Trainable::All, &samples, &cfg)?));
    }
    // Timed steps in rounds, one step of each variant per round, so that a slow phase of a
    // shared machine reaches both alike; the time ratio is the median of per-round ratios.
    let mut times = vec![Vec::new(); variants.len()];
    let mut losses = vec![0.0; variants.len()];
    for _ in 0..steps {
        for (i, (_, v)) in variants.iter_mut().enumerate() {
            let t = Instant::now();
            losses[i] = v.run.train_step()?.loss;
            times[i].push(t.elapsed().as_secs_f64());
        }
    }
    let measured: Vec<Measured> = variants
        .iter()
        .zip(&times)
        .zip(&losses)
        .map(|(((_, v), t), &loss)| Measured {
            step_s: median(t.clone()),
            peak_bytes: v.peak_bytes,
            ready_bytes: v.ready_bytes,
            trainable: v.run.trainable_params(),
            loss,
        })
        .collect();
    if measured.len() < 2 {
        for ((name, _), m) in variants.iter().zip(&measured) {
            println!(
                "{name}: step {:.3} s, peak heap {:.0} MB",
                m.step_s,
                m.peak_bytes as f64 / 1e6
            );
        }
        return Ok(());
    }
    let (esft, fft) = (&measured[0], &measured[1]);
    let round_ratios: Vec<f64> = times[0].iter().zip(&times[1]).map(|(e, f)| e / f).collect();

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
    for (name, m) in [("ESFT", esft), ("FFT", fft)] {
        println!(
            "{name:>5}: step {:.3} s, peak heap {:.0} MB ({:.0} MB before the first step), \
             loss {:.4}",
            m.step_s,
            mb(m.peak_bytes),
            mb(m.ready_bytes),
            m.loss
        );
    }
    let time_ratio = median(round_ratios.clone());
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
        "round_time_ratios": round_ratios,
        "memory_ratio": mem_ratio,
    });
    println!("{line}");
    Ok(())
}
