//! GPU benchmark on a random model of DeepSeek-V2-Lite's exact shape (27 layers, hidden
//! 2048, 64 routed experts top-6 + 2 shared, MLA with kv_lora_rank 512, vocab 102400), its
//! weights drawn on the device in bf16 (`WeightStore::drawn`: no 30 GB file).
//!
//! Measured, each against the bound it is reported as a fraction of:
//! - **bandwidth reference**: a device-to-device copy of 4 GiB (bytes read + written per
//!   second), beside the card's nominal HBM bandwidth (`GPU_BENCH_HBM_GBPS`, 4800 for an
//!   H200);
//! - **decode** at batch 1, 8, 32, 64 (`GPU_BENCH_BATCHES`): tokens/s, and the HBM roofline
//!   of the same steps: the bytes a step must read at least (every dense weight, the lm
//!   head, the shared experts, each routed expert some token of the step chose once, and
//!   each sequence's latent cache) over the measured copy bandwidth;
//! - **prefill**: 8 prompts of 512 tokens in one forward, tokens/s;
//! - **adapters**: 32 sequences over 16 adapters (2 each; every adapter replaces 6 routed
//!   experts per MoE layer, ~10%, held in GPU expert slots) against 32 sequences on one
//!   adapter, decode tokens/s ratio;
//! - **cold adapter**: one adapter's experts moved from host memory into device slots as
//!   the server's device tier does (`Tensor::to_device` per expert), against one copy of
//!   the same number of bytes, GB/s ratio.
//!
//! Every decode step feeds each sequence the argmax of its last logits, taken on the
//! device; only the ids come back. Rounds (`GPU_BENCH_REPS`, 3) alternate the contenders of
//! a ratio; medians are reported. Prints a table and one JSON line (`GPU_BENCH_JSON` also
//! writes it to a file).
//!
//! Run on a GPU: `cargo bench --features cuda --bench gpu` (or the binary that
//! `scripts/gpu-check.sh` carries). `GPU_BENCH_DEVICE=cpu GPU_BENCH_SHAPE=tiny` runs the
//! same code on the CPU on the test fixture's shape (a check of the benchmark itself).

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use common::{env_usize, median};
use esft::model::config::AttentionConfig;
use esft::model::load::WeightStore;
use esft::model::moe::Mlp;
use esft::model::{
    Config, Decoder, ExpertMap, LoadOptions, LogitsWanted, RoutingRecord, SeqCache, SeqInput,
};
use rand::{Rng, SeedableRng};
use serde_json::json;

/// DeepSeek-V2-Lite's published `config.json` values over the fixture's key set (`tiny`
/// keeps the fixture's own small dimensions).
fn shape_config(shape: &str) -> Result<serde_json::Value> {
    let mut c: serde_json::Value =
        serde_json::from_str(include_str!("../tests/fixtures/lite-yarn/config.json"))?;
    match shape {
        "lite" => {
            for (k, v) in [
                ("vocab_size", 102400),
                ("hidden_size", 2048),
                ("intermediate_size", 10944),
                ("moe_intermediate_size", 1408),
                ("num_hidden_layers", 27),
                ("num_attention_heads", 16),
                ("num_key_value_heads", 16),
                ("n_routed_experts", 64),
                ("num_experts_per_tok", 6),
                ("n_shared_experts", 2),
                ("kv_lora_rank", 512),
                ("qk_nope_head_dim", 128),
                ("qk_rope_head_dim", 64),
                ("v_head_dim", 128),
            ] {
                c[k] = v.into();
            }
        }
        "tiny" => {}
        other => anyhow::bail!("GPU_BENCH_SHAPE={other}: lite or tiny"),
    }
    c["torch_dtype"] = "bfloat16".into();
    Ok(c)
}

fn env_str(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn seconds(dev: &Device, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    dev.synchronize()?;
    let t = Instant::now();
    f()?;
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64())
}

/// Decoding sequences: their caches, expert maps and next tokens.
struct Batch {
    caches: Vec<SeqCache>,
    maps: Vec<Option<std::sync::Arc<ExpertMap>>>,
    next: Vec<[u32; 1]>,
}

impl Batch {
    /// `b` sequences prefilled with `prompt` random tokens each (one forward).
    fn prefilled(
        model: &Decoder,
        b: usize,
        prompt: usize,
        maps: Vec<Option<std::sync::Arc<ExpertMap>>>,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        let vocab = model.config().vocab_size as u32;
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|_| (0..prompt).map(|_| rng.random_range(2..vocab)).collect())
            .collect();
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let mut me = Self {
            caches: (0..b).map(|_| model.new_cache()).collect(),
            maps,
            next: vec![[0]; b],
        };
        me.step(model, &refs, None)?;
        Ok(me)
    }

    /// One forward of `inputs[i]` on sequence `i`; the argmax of each last row, taken on
    /// the device, becomes its next token.
    fn step(
        &mut self,
        model: &Decoder,
        inputs: &[&[u32]],
        record: Option<&mut RoutingRecord>,
    ) -> Result<()> {
        let mut batch: Vec<SeqInput<'_>> = inputs
            .iter()
            .zip(self.caches.iter_mut())
            .zip(&self.maps)
            .map(|((tokens, cache), map)| SeqInput {
                tokens,
                cache,
                experts: map.as_deref(),
                logits: LogitsWanted::Last,
            })
            .collect();
        let out = model.forward(&mut batch, record)?;
        let ids: Vec<u32> = out
            .logits
            .context("logits were asked for")?
            .argmax(D::Minus1)?
            .to_vec1()?;
        self.next = ids.into_iter().map(|i| [i]).collect();
        Ok(())
    }

    fn decode(&mut self, model: &Decoder, record: Option<&mut RoutingRecord>) -> Result<()> {
        let next = self.next.clone();
        let refs: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
        self.step(model, &refs, record)
    }

    fn context(&self) -> usize {
        self.caches.iter().map(SeqCache::len).sum()
    }
}

/// Bytes one decode step must read at least: every weight but the routed experts and the
/// embedding table (one row per token), each routed expert some token of the step chose
/// (from the step's routing record), and each sequence's cache.
struct StepBytes {
    /// Weights read whatever the routing.
    fixed: f64,
    /// One routed expert.
    expert: f64,
    /// One cached token of one layer.
    cache_token: f64,
}

impl StepBytes {
    fn new(cfg: &Config, weights: &WeightStore, elem: usize) -> Self {
        let mut fixed = 0usize;
        let mut expert = 0usize;
        for name in weights.names() {
            let n: usize = weights.shape(name).map_or(0, |s| s.iter().product());
            if name.contains(".mlp.experts.") {
                if name.contains(".mlp.experts.0.") && expert == 0 {
                    expert = 3 * n;
                }
            } else if name != "model.embed_tokens.weight" {
                fixed += n;
            }
        }
        let cache_token = match &cfg.attention {
            AttentionConfig::Mla(m) => m.kv_lora_rank + m.qk_rope_head_dim,
            AttentionConfig::Gqa(g) => 2 * g.num_key_value_heads * g.head_dim,
        };
        Self {
            fixed: (fixed * elem) as f64,
            expert: (expert * elem) as f64,
            cache_token: (cache_token * elem) as f64,
        }
    }

    fn of(&self, cfg: &Config, record: &RoutingRecord, context_tokens: usize) -> f64 {
        let experts: usize = record
            .layers
            .iter()
            .map(|l| {
                let mut ids = l.ids.clone();
                ids.sort_unstable();
                ids.dedup();
                ids.len()
            })
            .sum();
        self.fixed
            + experts as f64 * self.expert
            + (context_tokens * cfg.num_hidden_layers) as f64 * self.cache_token
    }
}

/// A random adapter: 6 routed experts per MoE layer (~10% of 64) replaced by experts in
/// fresh slots after `first_slot`; returns its map.
fn install_adapter(
    model: &mut Decoder,
    first_slot: usize,
    per_layer: usize,
    dt: DType,
    rng: &mut impl Rng,
) -> Result<ExpertMap> {
    let cfg = model.config().clone();
    let dev = model.device().clone();
    let (h, inter) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let mut map = ExpertMap::identity(&cfg);
    for layer in cfg.moe_layers() {
        let mut picked: Vec<usize> = Vec::new();
        while picked.len() < per_layer.min(cfg.n_routed_experts) {
            let e = rng.random_range(0..cfg.n_routed_experts);
            if !picked.contains(&e) {
                picked.push(e);
            }
        }
        let moe = model.moe_mut(layer).context("a MoE layer")?;
        for (j, &e) in picked.iter().enumerate() {
            let slot = first_slot + j;
            let draw = |shape: (usize, usize)| -> Result<Tensor> {
                Ok(Tensor::randn(0f32, 0.02, shape, &dev)?.to_dtype(dt)?)
            };
            let mlp = Mlp::from_parts(&draw((inter, h))?, &draw((inter, h))?, draw((h, inter))?)?;
            moe.set_slot(slot, Some(mlp));
            map.set(layer, e, slot as u32);
        }
    }
    Ok(map)
}

fn main() -> Result<()> {
    let device_name = env_str("GPU_BENCH_DEVICE", "cuda:0");
    let shape = env_str("GPU_BENCH_SHAPE", "lite");
    let reps = env_usize("GPU_BENCH_REPS", 3).max(1);
    let steps = env_usize("GPU_BENCH_STEPS", 16).max(1);
    let prompt = env_usize("GPU_BENCH_PROMPT", 128);
    let nominal_gbps = env_usize("GPU_BENCH_HBM_GBPS", 4800) as f64;
    let batches: Vec<usize> = env_str("GPU_BENCH_BATCHES", "1,8,32,64")
        .split(',')
        .map(|s| s.trim().parse().context("GPU_BENCH_BATCHES"))
        .collect::<Result<_>>()?;
    let on_cpu = device_name == "cpu";
    let opts: LoadOptions = esft::cli::DeviceArgs {
        device: device_name.clone(),
        // bf16 compute on a GPU; the CPU has no bf16 matmul, so f32 over bf16 matrices.
        dtype: if on_cpu { "f32" } else { "bf16" }.into(),
        weight_dtype: Some("bf16".into()),
    }
    .load_options()?;
    let dev = opts.device.clone();
    let config = shape_config(&shape)?;
    let cfg = Config::from_json(&config.to_string())?;
    let t = Instant::now();
    let weights = WeightStore::drawn(&cfg);
    let mut model = Decoder::load(cfg.clone(), &weights, &opts)?;
    dev.synchronize()?;
    println!(
        "model {shape} drawn on {device_name} in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let bytes_of = StepBytes::new(&cfg, &weights, opts.matrices().size_in_bytes());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);

    // Bandwidth reference: a device-to-device copy (read + write).
    let copy_elems = if on_cpu { 1 << 26 } else { 1 << 31 };
    let src = Tensor::zeros(copy_elems, DType::BF16, &dev)?;
    let mut copy_s = Vec::new();
    for _ in 0..reps + 1 {
        copy_s.push(seconds(&dev, || {
            drop(src.copy()?);
            Ok(())
        })?);
    }
    let copy_gbps = (2 * copy_elems * 2) as f64 / median(copy_s[1..].to_vec()) / 1e9;
    drop(src);
    println!("device copy: {copy_gbps:.0} GB/s (nominal {nominal_gbps:.0} GB/s)");

    // Decode at each batch size.
    let mut decode = Vec::new();
    for &b in &batches {
        let mut tps = Vec::new();
        let mut bytes = Vec::new();
        for _ in 0..reps {
            let mut batch = Batch::prefilled(&model, b, prompt, vec![None; b], &mut rng)?;
            batch.decode(&model, None)?; // warm-up
            let mut s = 0.0;
            for _ in 0..steps {
                let mut record = RoutingRecord::default();
                let ctx = batch.context();
                s += seconds(&dev, || batch.decode(&model, Some(&mut record)))?;
                bytes.push(bytes_of.of(&cfg, &record, ctx));
            }
            tps.push((b * steps) as f64 / s);
        }
        let tok_s = median(tps);
        let step_bytes = bytes.iter().sum::<f64>() / bytes.len() as f64;
        let step_s = b as f64 / tok_s;
        let roofline_s = step_bytes / (copy_gbps * 1e9);
        let row = json!({
            "batch": b,
            "tokens_per_s": tok_s,
            "step_ms": step_s * 1e3,
            "step_bytes": step_bytes,
            "roofline_fraction": roofline_s / step_s,
            "nominal_roofline_fraction": step_bytes / (nominal_gbps * 1e9) / step_s,
        });
        println!(
            "decode batch {b:>3}: {tok_s:>9.1} tok/s, {:.2} ms/step, {:.2} GB/step, {:.1}% of the copy roofline, {:.1}% of nominal",
            step_s * 1e3,
            step_bytes / 1e9,
            100.0 * roofline_s / step_s,
            100.0 * step_bytes / (nominal_gbps * 1e9) / step_s
        );
        decode.push(row);
    }

    // Prefill: 8 prompts of 512 tokens in one forward.
    let (pb, plen) = (8, env_usize("GPU_BENCH_PREFILL", 512));
    let mut pre = Vec::new();
    for _ in 0..reps + 1 {
        let mut secs = 0.0;
        secs += seconds(&dev, || {
            Batch::prefilled(&model, pb, plen, vec![None; pb], &mut rng).map(drop)
        })?;
        pre.push((pb * plen) as f64 / secs);
    }
    let prefill_tps = median(pre[1..].to_vec());
    println!("prefill {pb} x {plen}: {prefill_tps:.0} tok/s");

    // 32 sequences over 16 adapters against 32 on one adapter.
    let per_layer = 6;
    let mut maps = Vec::new();
    for a in 0..16 {
        let first = cfg.n_routed_experts + a * per_layer;
        maps.push(std::sync::Arc::new(install_adapter(
            &mut model,
            first,
            per_layer,
            opts.matrices(),
            &mut rng,
        )?));
    }
    let mixed: Vec<_> = (0..32).map(|i| Some(maps[i % 16].clone())).collect();
    let single: Vec<_> = (0..32).map(|_| Some(maps[0].clone())).collect();
    let mut ratios = Vec::new();
    let (mut mixed_tps, mut single_tps) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let mut run = |maps: Vec<_>| -> Result<f64> {
            let mut batch = Batch::prefilled(&model, 32, prompt, maps, &mut rng)?;
            batch.decode(&model, None)?;
            let s = seconds(&dev, || {
                for _ in 0..steps {
                    batch.decode(&model, None)?;
                }
                Ok(())
            })?;
            Ok((32 * steps) as f64 / s)
        };
        let (m, s) = (run(mixed.clone())?, run(single.clone())?);
        ratios.push(m / s);
        mixed_tps.push(m);
        single_tps.push(s);
    }
    let adapters_ratio = median(ratios);
    println!(
        "32 sequences over 16 adapters: {:.1} tok/s, on one adapter: {:.1} tok/s, ratio {adapters_ratio:.3}",
        median(mixed_tps.clone()),
        median(single_tps.clone())
    );

    // A cold adapter from host memory into device slots, against one copy of its bytes.
    let host: Vec<Mlp> = (0..(cfg.moe_layers().len() * per_layer))
        .map(|_| {
            let (h, inter) = (cfg.hidden_size, cfg.moe_intermediate_size);
            let draw = |shape: (usize, usize)| -> Result<Tensor> {
                Ok(Tensor::randn(0f32, 0.02, shape, &Device::Cpu)?.to_dtype(DType::BF16)?)
            };
            Ok(Mlp::from_parts(
                &draw((inter, h))?,
                &draw((inter, h))?,
                draw((h, inter))?,
            )?)
        })
        .collect::<Result<_>>()?;
    let adapter_bytes: usize = host.iter().map(Mlp::size_bytes).sum();
    let flat = Tensor::zeros(adapter_bytes / 2, DType::BF16, &Device::Cpu)?;
    let (mut cold, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..reps + 1 {
        cold.push(seconds(&dev, || {
            let moved = host
                .iter()
                .map(|m| Ok((m.gate_up.to_device(&dev)?, m.down.to_device(&dev)?)))
                .collect::<Result<Vec<_>>>()?;
            drop(moved);
            Ok(())
        })?);
        raw.push(seconds(&dev, || {
            drop(flat.to_device(&dev)?);
            Ok(())
        })?);
    }
    let cold_gbps = adapter_bytes as f64 / median(cold[1..].to_vec()) / 1e9;
    let h2d_gbps = adapter_bytes as f64 / median(raw[1..].to_vec()) / 1e9;
    println!(
        "cold adapter ({:.2} GB): {cold_gbps:.1} GB/s into slots, one copy {h2d_gbps:.1} GB/s, ratio {:.3}",
        adapter_bytes as f64 / 1e9,
        cold_gbps / h2d_gbps
    );

    let out = json!({
        "bench": "gpu",
        "device": device_name,
        "shape": shape,
        "copy_gbps": copy_gbps,
        "nominal_gbps": nominal_gbps,
        "decode": decode,
        "prefill_tokens_per_s": prefill_tps,
        "adapters": {
            "mixed_16_tokens_per_s": median(mixed_tps),
            "single_tokens_per_s": median(single_tps),
            "ratio": adapters_ratio,
        },
        "cold_adapter": {
            "bytes": adapter_bytes,
            "slots_gbps": cold_gbps,
            "h2d_gbps": h2d_gbps,
            "ratio": cold_gbps / h2d_gbps,
        },
    });
    println!("{out}");
    if let Ok(path) = std::env::var("GPU_BENCH_JSON") {
        std::fs::write(&path, format!("{out}\n")).with_context(|| path.clone())?;
    }
    Ok(())
}
