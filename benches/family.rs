//! Decode throughput of the other architectures on CPU, f32: a Qwen3-MoE-shaped and a
//! DeepSeek-V3-shaped random model of the runtime benchmark's size (hidden 512, 8 layers,
//! 64 routed experts 256 wide, vocab 32000; written once per run with
//! `write_random_checkpoint`), next to candle-transformers' `qwen3_moe` on the same Qwen3
//! weights (candle-transformers has no DeepSeek-V3).
//!
//! - Qwen3-MoE: 8 query heads and 4 kv heads of 64, per-head q/k norm, top-8 renormalised,
//!   no shared experts.
//! - DeepSeek-V3: the runtime benchmark's MLA (no q LoRA, kv rank 128), layer 0 dense,
//!   sigmoid router with `noaux_tc` (8 groups, keep 4), top-8, 1 shared expert, scaling 2.5.
//!
//! Per model and batch size B (1 and 32): B prompts of `ESFT_BENCH_PROMPT` tokens prefilled
//! in one forward, then `ESFT_BENCH_STEPS` decode steps of one token per sequence (each the
//! argmax of its previous logits). Tokens/s = B * steps / decode time. candle-transformers
//! runs the same prompts as one batch (they are of equal length, which its KV cache
//! needs). One warm-up round, then
//! `ESFT_BENCH_REPS` rounds; medians reported, the ratio as the median of per-round ratios.
//! The weight bytes a decode step must read at batch 1 (attention, router, the top-k routed
//! and shared experts of every layer, the LM head) over the step time give the bandwidth
//! the step sustains, the CPU roofline of decode.
//!
//! Knobs: `ESFT_BENCH_STEPS` (32), `ESFT_BENCH_REPS` (3), `ESFT_BENCH_PROMPT` (64),
//! `ESFT_BENCH_LAYERS` (8), `ESFT_BENCH_REFERENCE` (0 skips candle-transformers).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::qwen3_moe;
use common::{deepseek_v3_config, env_usize, median, qwen3_config};
use esft::model::init::write_random_checkpoint;
use esft::model::{Decoder, LoadOptions, LogitsWanted, SeqCache, SeqInput};
use serde_json::{json, Value};

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

/// Prefills `prompts` in one forward, then decodes `steps` tokens per sequence; returns
/// the decode time and the first sequence's prefill logits.
fn ours_decode(
    model: &Decoder,
    prompts: &[Vec<u32>],
    steps: usize,
) -> AnyResult<(Duration, Vec<f32>)> {
    let mut caches: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
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
        Ok(model
            .forward(&mut batch, None)?
            .logits
            .expect("logits were asked for")
            .to_vec2()?)
    };
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let logits = run(&refs)?;
    let first = logits[0].clone();
    let mut next: Vec<[u32; 1]> = logits.iter().map(|r| [argmax(r)]).collect();
    let t = Instant::now();
    for _ in 0..steps {
        let refs: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
        next = run(&refs)?.iter().map(|r| [argmax(r)]).collect();
    }
    Ok((t.elapsed(), first))
}

/// candle-transformers' decode of equal-length `prompts` as one batch: the time of
/// `steps` greedy steps, and the first sequence's prefill logits.
fn reference_decode(
    model: &mut qwen3_moe::ModelForCausalLM,
    prompts: &[Vec<u32>],
    steps: usize,
) -> AnyResult<(Duration, Vec<f32>)> {
    let dev = Device::Cpu;
    let (b, len) = (prompts.len(), prompts[0].len());
    model.clear_kv_cache();
    let rows = |t: Tensor| -> AnyResult<Vec<Vec<f32>>> { Ok(t.reshape((b, ()))?.to_vec2()?) };
    let input = Tensor::from_vec(prompts.concat(), (b, len), &dev)?;
    let logits = rows(model.forward(&input, 0)?)?;
    let first = logits[0].clone();
    let mut next: Vec<u32> = logits.iter().map(|r| argmax(r)).collect();
    let t = Instant::now();
    for i in 0..steps {
        let input = Tensor::from_vec(next, (b, 1), &dev)?;
        next = rows(model.forward(&input, len + i)?)?
            .iter()
            .map(|r| argmax(r))
            .collect();
    }
    Ok((t.elapsed(), first))
}

fn load_reference(dir: &Path, config: &Value) -> AnyResult<qwen3_moe::ModelForCausalLM> {
    let cfg: qwen3_moe::Config = serde_json::from_value(config.clone())?;
    // SAFETY: the checkpoint was just written to a private temporary directory and is not
    // modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    };
    Ok(qwen3_moe::ModelForCausalLM::new(&cfg, vb)?)
}

/// Weight bytes (f32) one batch-1 decode step reads: everything but the embeddings, the
/// unchosen routed experts and nothing else.
fn decode_bytes(model: &mut Decoder) -> AnyResult<f64> {
    let cfg = model.config().clone();
    let expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size;
    let mut elems = 0usize;
    for (name, _, t) in model.weights_mut() {
        if name == "model.embed_tokens.weight" || name.contains(".mlp.experts.") {
            continue;
        }
        elems += t.elem_count();
    }
    elems += cfg.moe_layers().len() * cfg.num_experts_per_tok * expert;
    Ok(elems as f64 * 4.0)
}

fn prompts(batch: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|b| {
            (0..len)
                .map(|i| ((b * 7919 + i * 104_729 + 3) % (vocab - 2) + 2) as u32)
                .collect()
        })
        .collect()
}

fn main() -> AnyResult<()> {
    esft::util::prepare_process();
    let steps = env_usize("ESFT_BENCH_STEPS", 32);
    let reps = env_usize("ESFT_BENCH_REPS", 3);
    let prompt_len = env_usize("ESFT_BENCH_PROMPT", 64);
    let layers = env_usize("ESFT_BENCH_LAYERS", 8);
    let with_reference = env_usize("ESFT_BENCH_REFERENCE", 1) != 0;
    let mut report = Vec::new();
    for (name, config, has_reference) in [
        ("qwen3-moe", qwen3_config(layers), true),
        ("deepseek-v3", deepseek_v3_config(layers), false),
    ] {
        let dir = tempfile::tempdir()?;
        write_random_checkpoint(&config, 1, dir.path())?;
        let mut ours = Decoder::load_dir(dir.path(), &LoadOptions::default())?;
        let bytes = decode_bytes(&mut ours)?;
        let mut reference = match has_reference && with_reference {
            true => Some(load_reference(dir.path(), &config)?),
            false => None,
        };
        let vocab = ours.config().vocab_size;
        let (mut b1, mut b32) = (vec![], vec![]);
        let (mut theirs1, mut theirs32, mut ratios1, mut ratios32) =
            (vec![], vec![], vec![], vec![]);
        for round in 0..=reps {
            let (t1, ours_logits) = ours_decode(&ours, &prompts(1, prompt_len, vocab), steps)?;
            let (t32, _) = ours_decode(&ours, &prompts(32, prompt_len, vocab), steps)?;
            let tr = match reference.as_mut() {
                Some(m) => {
                    let (t, logits) = reference_decode(m, &prompts(1, prompt_len, vocab), steps)?;
                    let (t32r, _) = reference_decode(m, &prompts(32, prompt_len, vocab), steps)?;
                    let d = ours_logits
                        .iter()
                        .zip(&logits)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    if round == 0 {
                        println!("{name}: prefill logits ours vs candle-transformers: max abs diff {d:.1e}");
                    }
                    Some((t, t32r))
                }
                None => None,
            };
            if round == 0 {
                continue; // warm-up
            }
            let tps = |t: Duration, b: usize| (b * steps) as f64 / t.as_secs_f64();
            b1.push(tps(t1, 1));
            b32.push(tps(t32, 32));
            if let Some((tr1, tr32)) = tr {
                theirs1.push(tps(tr1, 1));
                theirs32.push(tps(tr32, 32));
                ratios1.push(tps(t1, 1) / tps(tr1, 1));
                ratios32.push(tps(t32, 32) / tps(tr32, 32));
            }
        }
        let (b1, b32) = (median(b1), median(b32));
        let gbps = bytes * b1 / 1e9;
        println!(
            "{name:12} decode tok/s: batch 1 {b1:8.1}  batch 32 {b32:8.1}  \
             (batch 1 reads {:.1} MB/step = {gbps:.1} GB/s)",
            bytes / 1e6
        );
        let mut row = json!({
            "model": name, "decode_tok_s_b1": b1, "decode_tok_s_b32": b32,
            "decode_bytes_per_step_b1": bytes, "decode_gb_s_b1": gbps,
        });
        if !theirs1.is_empty() {
            let (t1, r1) = (median(theirs1), median(ratios1));
            let (t32, r32) = (median(theirs32), median(ratios32));
            println!(
                "{:12} candle-transformers batch 1 {t1:8.1}  batch 32 {t32:8.1}  \
                 ours / theirs {r1:.2}x, {r32:.2}x",
                ""
            );
            row["candle_transformers_tok_s_b1"] = t1.into();
            row["candle_transformers_tok_s_b32"] = t32.into();
            row["ratio_b1"] = r1.into();
            row["ratio_b32"] = r32.into();
        }
        report.push(row);
    }
    println!(
        "{}",
        json!({"bench": "family", "steps": steps, "reps": reps, "prompt": prompt_len,
               "layers": layers, "results": report})
    );
    Ok(())
}
