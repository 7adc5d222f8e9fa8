//! Runtime benchmark on CPU, f32 compute: our batched DeepSeek-V2 against candle-transformers'
//! `deepseek2` on the same random weights (a model of the DeepSeek-V2 architecture, hidden 512,
//! 8 layers, 64 routed experts top-6 + 2 shared, vocab 32000: `benches/bench_model.json`,
//! written once per run with `write_random_checkpoint`).
//!
//! Two checkpoints of the same draws: stored in f32, and stored in bf16 (as DeepSeek's own
//! checkpoints are). On the bf16 one, ours keeps the weight matrices in bf16 and widens them
//! in its kernels (`LoadOptions::matrix_dtype`); candle-transformers loads them as f32 (its
//! CPU bf16 matmul widens both operands to f32 on every call, so f32 is its fast setting).
//! Both then compute in f32 on the same values.
//!
//! Measured:
//! - ours at batch 1, 8, 32: prefill (B prompts of 128 tokens in one `forward`, last-position
//!   logits) and decode (N steps, each one batched `forward` of one token per sequence);
//! - candle-transformers at batch 1: prefill `forward([1, 128], 0)`, then N decode steps
//!   `forward([1, 1], offset)`. Its `forward` returns last-position logits only (`[b, vocab]`),
//!   so both sides compute the LM head for one row per sequence.
//!
//! Every decode step feeds each sequence the argmax of its previous logits (host-side, like a
//! greedy sampler). Both models stay loaded and the passes run in rounds (one warm-up round,
//! then `ESFT_BENCH_REPS`): each round runs every batch size of ours and the reference once,
//! in turn. Medians over rounds are reported, and the ratios are medians of per-round ratios,
//! so a slow minute of a shared machine counts against both sides of a ratio alike. Prints a
//! table, the ratios, and one JSON line at the end.
//!
//! Environment knobs (for a quick smoke run): `ESFT_BENCH_STEPS` (decode steps, 32),
//! `ESFT_BENCH_REPS` (timed rounds, 5), `ESFT_BENCH_PROMPT` (prompt tokens, 128),
//! `ESFT_BENCH_BATCHES` (comma-separated, "1,8,32"), `ESFT_BENCH_LAYERS` (8),
//! `ESFT_BENCH_REFERENCE` (0 skips candle-transformers), `ESFT_BENCH_WEIGHTS` (checkpoints,
//! "f32,bf16").
//!
//! The process environment is used as given, like the server's. Note that candle 0.11 works
//! out its thread count on every matmul, parsing `/proc/cpuinfo` each time, unless
//! `RAYON_NUM_THREADS` is set: running with `RAYON_NUM_THREADS=<cores>` shows that cost.
//! The "other load" column is the number of cores other processes kept busy meanwhile (from
//! `/proc`); on a 2-core machine anything above ~0.2 skews the numbers.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::deepseek2;
use common::{bench_config, env_usize, median};
use esft::model::init::write_random_checkpoint;
use esft::model::{Decoder, LoadOptions, LogitsWanted, SeqCache, SeqInput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

type AnyResult<T> = anyhow::Result<T>;

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// One timed pass: prefill time, decode time, and the first sequence's prefill logits.
struct Pass {
    prefill: Duration,
    decode: Duration,
    first_logits: Vec<f32>,
}

fn ours_pass(model: &Decoder, prompts: &[Vec<u32>], steps: usize) -> AnyResult<Pass> {
    let mut caches: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
    // One batched forward of `inputs[i]` on `caches[i]`; last-position logits per sequence.
    let mut run = |inputs: &[&[u32]]| -> AnyResult<Vec<Vec<f32>>> {
        let mut batch: Vec<SeqInput<'_>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .map(|(tokens, cache)| SeqInput {
                tokens,
                cache,
                experts: None,
                logits: LogitsWanted::Last,
            })
            .collect();
        let out = model.forward(&mut batch, None)?;
        Ok(out.logits.expect("logits were asked for").to_vec2()?)
    };
    let t = Instant::now();
    let prompt_refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let logits = run(&prompt_refs)?;
    let prefill = t.elapsed();
    let first_logits = logits[0].clone();
    let mut next: Vec<[u32; 1]> = logits.iter().map(|r| [argmax(r)]).collect();

    let t = Instant::now();
    for _ in 0..steps {
        let refs: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
        let logits = run(&refs)?;
        next = logits.iter().map(|r| [argmax(r)]).collect();
    }
    Ok(Pass {
        prefill,
        decode: t.elapsed(),
        first_logits,
    })
}

fn reference_pass(
    model: &mut deepseek2::DeepSeekV2,
    prompt: &[u32],
    steps: usize,
) -> AnyResult<Pass> {
    let dev = Device::Cpu;
    model.clear_kv_cache();
    let t = Instant::now();
    let input = Tensor::new(prompt, &dev)?.unsqueeze(0)?;
    // `[1, vocab]`: candle-transformers' forward keeps the last position only.
    let first_logits: Vec<f32> = model.forward(&input, 0)?.squeeze(0)?.to_vec1()?;
    let prefill = t.elapsed();
    let mut next = argmax(&first_logits);

    let t = Instant::now();
    for i in 0..steps {
        let input = Tensor::new(&[[next]], &dev)?;
        let logits: Vec<f32> = model
            .forward(&input, prompt.len() + i)?
            .squeeze(0)?
            .to_vec1()?;
        next = argmax(&logits);
    }
    Ok(Pass {
        prefill,
        decode: t.elapsed(),
        first_logits,
    })
}

/// CPU time (seconds) used by the whole machine and by this process so far, from `/proc`
/// (Linux; `None` elsewhere). Their difference over a measurement is the load other
/// processes put on the machine meanwhile: on 2 cores a parallel build skews every number.
fn cpu_seconds() -> Option<(f64, f64)> {
    // /proc reports in USER_HZ, which is 100 on every Linux ABI in use.
    const HZ: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum();
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_name = &me[me.rfind(')')? + 1..];
    let g: Vec<u64> = after_name
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 of the file (utime, stime) are 12th and 13th after the name.
    Some((busy as f64 / HZ, (g.get(11)? + g.get(12)?) as f64 / HZ))
}

/// Average number of cores other processes kept busy between two `cpu_seconds` readings.
fn foreign_load(before: Option<(f64, f64)>, after: Option<(f64, f64)>, wall: f64) -> Option<f64> {
    let ((all0, me0), (all1, me1)) = (before?, after?);
    Some((((all1 - all0) - (me1 - me0)) / wall).max(0.0))
}

/// Medians of one contender's timed passes.
struct Measured {
    batch: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    prefill_ms: f64,
    decode_step_ms: f64,
    /// Cores kept busy by other processes during the measurement, if known.
    other_load: Option<f64>,
    first_logits: Vec<f32>,
    /// Decode seconds of each timed round (for per-round ratios).
    decode_s: Vec<f64>,
}

/// Something measured: a name, its batch size and one pass.
struct Contender<'a> {
    name: String,
    batch: usize,
    pass: Box<dyn FnMut() -> AnyResult<Pass> + 'a>,
}

/// One warm-up round, then `reps` rounds; each round runs every contender's pass once, in
/// turn, so that a slow phase of a shared machine (its memory bandwidth moves by tens of
/// percent between minutes here) reaches every contender alike and the per-round ratios
/// compare like with like.
fn measure_rounds(
    contenders: &mut [Contender<'_>],
    prompt_len: usize,
    steps: usize,
    reps: usize,
) -> AnyResult<Vec<Measured>> {
    let mut first = Vec::with_capacity(contenders.len());
    for c in contenders.iter_mut() {
        first.push((c.pass)()?.first_logits);
    }
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut times = vec![(Vec::new(), Vec::new()); contenders.len()];
    for _ in 0..reps {
        for (c, (pre, dec)) in contenders.iter_mut().zip(times.iter_mut()) {
            let p = (c.pass)()?;
            pre.push(p.prefill.as_secs_f64());
            dec.push(p.decode.as_secs_f64());
        }
    }
    let other_load = foreign_load(cpu0, cpu_seconds(), t0.elapsed().as_secs_f64());
    Ok(contenders
        .iter()
        .zip(times)
        .zip(first)
        .map(|((c, (pre, dec)), first_logits)| {
            let (p, d) = (median(pre), median(dec.clone()));
            Measured {
                batch: c.batch,
                prefill_tok_s: (c.batch * prompt_len) as f64 / p,
                decode_tok_s: (c.batch * steps) as f64 / d,
                prefill_ms: p * 1e3,
                decode_step_ms: d * 1e3 / steps as f64,
                other_load,
                first_logits,
                decode_s: dec,
            }
        })
        .collect())
}

/// Median over rounds of `(tokens of a per decode second) / (tokens of b per decode
/// second)`.
fn round_ratio(a: &Measured, b: &Measured) -> f64 {
    let per_round: Vec<f64> = a
        .decode_s
        .iter()
        .zip(&b.decode_s)
        .map(|(ta, tb)| (a.batch as f64 / ta) / (b.batch as f64 / tb))
        .collect();
    median(per_round)
}

fn load_reference(dir: &Path, config: &serde_json::Value) -> AnyResult<deepseek2::DeepSeekV2> {
    let cfg: deepseek2::DeepSeekV2Config = serde_json::from_value(config.clone())?;
    // SAFETY: the checkpoint was just written to a private temporary directory and is not
    // modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    };
    Ok(deepseek2::DeepSeekV2::new(&cfg, vb)?)
}

fn row_json(m: &Measured) -> serde_json::Value {
    json!({
        "batch": m.batch,
        "prefill_tok_s": m.prefill_tok_s,
        "decode_tok_s": m.decode_tok_s,
        "prefill_ms": m.prefill_ms,
        "decode_step_ms": m.decode_step_ms,
        "other_load_cores": m.other_load,
    })
}

/// One checkpoint of the bench model (the same seed, stored in `weights`) and both
/// implementations loaded from it. Ours keeps the matrices in the stored dtype; the
/// reference computes in f32 (its CPU bf16 matmul widens both operands to f32 on every
/// call), so on the bf16 checkpoint both multiply the same values in f32.
struct Suite {
    weights: &'static str,
    ours: Decoder,
    reference: Result<deepseek2::DeepSeekV2, String>,
    _dir: tempfile::TempDir,
}

fn load_suite(
    weights: &'static str,
    layers: usize,
    with_reference: bool,
    threads: usize,
) -> AnyResult<Suite> {
    let (torch_dtype, matrices) = match weights {
        "f32" => ("float32", None),
        "bf16" => ("bfloat16", Some(DType::BF16)),
        other => anyhow::bail!("ESFT_BENCH_WEIGHTS: {other} (expected f32 or bf16)"),
    };
    let mut config = bench_config(layers);
    config["torch_dtype"] = torch_dtype.into();
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    write_random_checkpoint(&config, 0, dir.path())?;
    let file_mb = std::fs::metadata(dir.path().join("model.safetensors"))?.len() as f64 / 1e6;
    eprintln!(
        "{weights} checkpoint: {file_mb:.0} MB written in {:.1}s ({layers} layers, {threads} \
         threads)",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let opts = LoadOptions {
        matrix_dtype: matrices,
        ..LoadOptions::default()
    };
    let ours = Decoder::load_dir(dir.path(), &opts)?;
    eprintln!("ours: loaded in {:.1}s", t.elapsed().as_secs_f64());
    let reference = if with_reference {
        let t = Instant::now();
        load_reference(dir.path(), &config)
            .inspect(|_| {
                eprintln!(
                    "candle-transformers: loaded in {:.1}s",
                    t.elapsed().as_secs_f64()
                )
            })
            .map_err(|e| format!("candle-transformers deepseek2 failed to load: {e}"))
    } else {
        Err("skipped (ESFT_BENCH_REFERENCE=0)".to_string())
    };
    Ok(Suite {
        weights,
        ours,
        reference,
        _dir: dir,
    })
}

/// One suite's measurements and ratios.
struct SuiteResult {
    weights: &'static str,
    ours: Vec<Measured>,
    reference: Result<Measured, String>,
}

impl SuiteResult {
    fn at(&self, batch: usize) -> Option<&Measured> {
        self.ours.iter().find(|m| m.batch == batch)
    }

    fn batch_scaling(&self) -> Option<f64> {
        self.at(32).zip(self.at(1)).map(|(a, b)| round_ratio(a, b))
    }

    fn decode_vs_reference(&self) -> Option<f64> {
        let r = self.reference.as_ref().ok()?;
        Some(round_ratio(self.at(1)?, r))
    }

    fn prefill_vs_reference(&self) -> Option<f64> {
        let r = self.reference.as_ref().ok()?;
        Some(self.at(1)?.prefill_tok_s / r.prefill_tok_s)
    }

    /// Same weights, same prompt: the last-position prefill logits should agree. Returns
    /// the largest difference, the largest logit and whether the argmax agrees.
    fn parity(&self) -> Option<(f32, f32, bool)> {
        let (a, b) = (self.at(1)?, self.reference.as_ref().ok()?);
        let diff = a
            .first_logits
            .iter()
            .zip(&b.first_logits)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let scale = a.first_logits.iter().map(|v| v.abs()).fold(0f32, f32::max);
        Some((
            diff,
            scale,
            argmax(&a.first_logits) == argmax(&b.first_logits),
        ))
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "weights": self.weights,
            "ours": self.ours.iter().map(row_json).collect::<Vec<_>>(),
            "candle_transformers": match &self.reference {
                Ok(m) => row_json(m),
                Err(why) => json!({ "error": why }),
            },
            "ratios": {
                "ours_decode_b32_over_b1": self.batch_scaling(),
                "decode_b1_ours_over_candle_transformers": self.decode_vs_reference(),
                "prefill_b1_ours_over_candle_transformers": self.prefill_vs_reference(),
            },
            "parity_max_abs_diff": self.parity().map(|p| p.0),
            "parity_same_argmax": self.parity().map(|p| p.2),
        })
    }
}

fn main() -> AnyResult<()> {
    esft::util::prepare_process();
    let steps = env_usize("ESFT_BENCH_STEPS", 32).max(1);
    let reps = env_usize("ESFT_BENCH_REPS", 5).max(1);
    let prompt_len = env_usize("ESFT_BENCH_PROMPT", 128).max(1);
    let layers = env_usize("ESFT_BENCH_LAYERS", 8).max(2);
    let with_reference = env_usize("ESFT_BENCH_REFERENCE", 1) != 0;
    let list = |name: &str, default: &str| -> Vec<String> {
        std::env::var(name)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .map(|s| s.trim().to_string())
            .collect()
    };
    let batches: Vec<usize> = list("ESFT_BENCH_BATCHES", "1,8,32")
        .iter()
        .map(|s| {
            s.parse()
                .expect("ESFT_BENCH_BATCHES: comma-separated sizes")
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    let mut suites = Vec::new();
    for w in list("ESFT_BENCH_WEIGHTS", "f32,bf16") {
        let weights = match w.as_str() {
            "f32" => "f32",
            "bf16" => "bf16",
            other => anyhow::bail!("ESFT_BENCH_WEIGHTS: {other} (expected f32 or bf16)"),
        };
        suites.push(load_suite(weights, layers, with_reference, threads)?);
    }
    let vocab = bench_config(layers)["vocab_size"].as_u64().unwrap_or(32000) as u32;
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let prompts: Vec<Vec<u32>> = (0..max_batch)
        .map(|_| {
            (0..prompt_len)
                .map(|_| rng.random_range(0..vocab))
                .collect()
        })
        .collect();

    // Every suite's contenders in one list, so that each round runs them all. The
    // reference runs right after ours at batch 1, so the two passes of a round's batch-1
    // ratio are seconds apart.
    let mut contenders: Vec<Contender<'_>> = Vec::new();
    let mut owners: Vec<(usize, bool)> = Vec::new(); // (suite, is the reference)
    for (si, suite) in suites.iter_mut().enumerate() {
        let (model, prompts) = (&suite.ours, &prompts);
        let mut reference = suite.reference.as_mut().ok();
        for &b in &batches {
            contenders.push(Contender {
                name: format!("esft ({} weights)", suite.weights),
                batch: b,
                pass: Box::new(move || ours_pass(model, &prompts[..b], steps)),
            });
            owners.push((si, false));
            if b == 1 {
                if let Some(rm) = reference.take() {
                    let prompt = &prompts[0];
                    contenders.push(Contender {
                        name: format!("candle-transformers ({} weights)", suite.weights),
                        batch: 1,
                        pass: Box::new(move || reference_pass(rm, prompt, steps)),
                    });
                    owners.push((si, true));
                }
            }
        }
    }
    let t = Instant::now();
    let measured = measure_rounds(&mut contenders, prompt_len, steps, reps)?;
    eprintln!(
        "measured {} contenders x {reps} rounds in {:.1}s",
        contenders.len(),
        t.elapsed().as_secs_f64()
    );
    for (c, m) in contenders.iter().zip(&measured) {
        eprintln!(
            "{} batch {}: prefill {:.0} tok/s, decode {:.1} tok/s",
            c.name, c.batch, m.prefill_tok_s, m.decode_tok_s
        );
    }
    drop(contenders);
    let mut results: Vec<SuiteResult> = suites
        .iter()
        .map(|s| SuiteResult {
            weights: s.weights,
            ours: Vec::new(),
            reference: match &s.reference {
                Ok(_) => Err("not measured".to_string()),
                Err(why) => Err(why.clone()),
            },
        })
        .collect();
    for (m, &(si, is_reference)) in measured.into_iter().zip(&owners) {
        if is_reference {
            results[si].reference = Ok(m);
        } else {
            results[si].ours.push(m);
        }
    }

    println!();
    println!(
        "DeepSeek-V2 random model: hidden 512, {layers} layers, 64 experts top-6 + 2 shared, \
         vocab 32000, f32 compute on the CPU, {threads} threads; prompt {prompt_len}, {steps} \
         decode steps, median of {reps} rounds"
    );
    println!(
        "weights: the checkpoint's dtype (the same draws; bf16 = each rounded). On bf16 ours \
         keeps the matrices in bf16, candle-transformers converts them to f32 at load."
    );
    println!(
        "{:<20} {:>7} {:>5} {:>14} {:>11} {:>13} {:>15} {:>11}",
        "implementation",
        "weights",
        "batch",
        "prefill tok/s",
        "prefill ms",
        "decode tok/s",
        "decode ms/step",
        "other load"
    );
    let print_row = |name: &str, weights: &str, m: &Measured| {
        let load = m
            .other_load
            .map_or("n/a".into(), |l| format!("{l:.2} cores"));
        println!(
            "{:<20} {:>7} {:>5} {:>14.1} {:>11.1} {:>13.1} {:>15.2} {:>11}",
            name,
            weights,
            m.batch,
            m.prefill_tok_s,
            m.prefill_ms,
            m.decode_tok_s,
            m.decode_step_ms,
            load
        );
    };
    for r in &results {
        for m in &r.ours {
            print_row("esft", r.weights, m);
        }
        match &r.reference {
            Ok(m) => print_row("candle-transformers", r.weights, m),
            Err(why) => println!("{:<20} {:>7} {why}", "candle-transformers", r.weights),
        }
    }
    let busiest = results
        .iter()
        .flat_map(|r| r.ours.iter().chain(r.reference.as_ref().ok()))
        .filter_map(|m| m.other_load)
        .fold(0f64, f64::max);
    if busiest > 0.2 {
        println!(
            "warning: other processes kept up to {busiest:.2} cores busy during a measurement; \
             on a 2-core machine the numbers above are skewed"
        );
    }
    let show = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{r:.2}"));
    for r in &results {
        let w = r.weights;
        println!();
        println!(
            "{w:>4} ratio decode batch 32 / batch 1 (ours):            {} (goal >= 10)",
            show(r.batch_scaling())
        );
        println!(
            "{w:>4} ratio decode batch 1 ours / candle-transformers:   {} (goal >= 1.5)",
            show(r.decode_vs_reference())
        );
        println!(
            "{w:>4} ratio prefill batch 1 ours / candle-transformers:  {}",
            show(r.prefill_vs_reference())
        );
        if let Some((diff, scale, same)) = r.parity() {
            println!(
                "{w:>4} parity: prefill last logits max |diff| {diff:.2e} (max |logit| \
                 {scale:.2e}), same argmax: {same}"
            );
        }
    }

    let summary = json!({
        "bench": "runtime",
        "device": "cpu",
        "compute_dtype": "f32",
        "threads": threads,
        "rayon_num_threads_env": std::env::var("RAYON_NUM_THREADS").ok(),
        "layers": layers,
        "prompt_tokens": prompt_len,
        "decode_steps": steps,
        "reps": reps,
        "suites": results.iter().map(SuiteResult::json).collect::<Vec<_>>(),
    });
    println!("{summary}");
    Ok(())
}
