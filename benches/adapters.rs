//! Adapter benchmarks on the runtime benchmark model (`bench_model.json`):
//! 1. decode tokens/s with 32 sequences on one adapter vs 32 sequences spread over 16
//!    adapters (each replacing ~10% of the routed experts of every MoE layer), plus the base;
//! 2. time to make a cold adapter servable (read + validate + copy into slots), as MB/s.
//!
//! Knobs: `ESFT_BENCH_STEPS` (decode steps, 32), `ESFT_BENCH_REPS` (3), `ESFT_BENCH_LAYERS` (8).

mod common;

use candle_core::DType;
use common::{bench_config, env_usize, median, write_random_adapter};
use esft::adapter::{AdapterRegistry, AdapterStats, AdapterStore, BaseModel, DeviceSlots, Install};
use esft::model::init::write_random_checkpoint;
use esft::model::{DeepSeekV2, ExpertMap, LoadOptions, LogitsWanted, SeqCache, SeqInput};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Instant;

const ADAPTERS: usize = 16;
const BATCH: usize = 32;
const PROMPT: usize = 32;

/// Decode tokens/s of `BATCH` sequences whose expert maps are `maps[i % maps.len()]`.
fn decode_tps(
    model: &DeepSeekV2,
    maps: &[Option<Arc<ExpertMap>>],
    steps: usize,
    reps: usize,
) -> f64 {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let vocab = model.config().vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..BATCH)
        .map(|_| (0..PROMPT).map(|_| rng.random_range(2..vocab)).collect())
        .collect();
    let mut times = Vec::new();
    for rep in 0..=reps {
        let mut caches: Vec<SeqCache> = (0..BATCH).map(|_| model.new_cache()).collect();
        let run = |caches: &mut [SeqCache], tokens: &[Vec<u32>]| {
            let mut batch: Vec<SeqInput<'_>> = caches
                .iter_mut()
                .zip(tokens)
                .enumerate()
                .map(|(i, (c, t))| SeqInput {
                    tokens: t,
                    cache: c,
                    experts: maps[i % maps.len()].as_deref(),
                    logits: LogitsWanted::Last,
                })
                .collect();
            model.forward(&mut batch, None).unwrap()
        };
        run(&mut caches, &prompts);
        let next: Vec<Vec<u32>> = (0..BATCH)
            .map(|i| vec![(i as u32 * 7 + 3) % vocab])
            .collect();
        let t0 = Instant::now();
        for _ in 0..steps {
            run(&mut caches, &next);
        }
        if rep > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    (BATCH * steps) as f64 / median(times)
}

fn main() {
    esft::util::pin_thread_count();
    let steps = env_usize("ESFT_BENCH_STEPS", 32).max(1);
    let reps = env_usize("ESFT_BENCH_REPS", 3).max(1);
    let layers = env_usize("ESFT_BENCH_LAYERS", 8).max(2);
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    write_random_checkpoint(&bench_config(layers), 1, &model_dir).unwrap();
    let base = Arc::new(BaseModel::open(&model_dir).unwrap());
    let root = tmp.path().join("adapters");
    let mut per_layer = 0;
    for i in 0..ADAPTERS {
        per_layer = write_random_adapter(&base, &root, i, 100 + i as u64, 0.02);
    }
    let n_routed = base.config.n_routed_experts;

    let mut model = DeepSeekV2::load_dir(&model_dir, &LoadOptions::default()).unwrap();
    let stats = Arc::new(AdapterStats::default());
    let make_registry = || {
        AdapterRegistry::new(
            AdapterStore::open(&root).unwrap(),
            base.clone(),
            DType::F32,
            1 << 34,
            stats.clone(),
        )
    };

    // Cold loads: a fresh registry (empty host tier) and fresh slots per adapter.
    let mut mbps = Vec::new();
    let mut maps = Vec::new();
    let mut slots = DeviceSlots::new(&model, usize::MAX, stats.clone());
    for i in 0..ADAPTERS {
        let registry = make_registry();
        let t0 = Instant::now();
        let w = registry.load(&format!("task{i}")).unwrap();
        let map = match slots.install(&mut model, &w).unwrap() {
            Install::Ready(m) => m,
            Install::NoRoom => unreachable!("unbounded budget"),
        };
        let secs = t0.elapsed().as_secs_f64();
        mbps.push(w.file_bytes as f64 / 1e6 / secs);
        maps.push(map);
    }
    let adapter_mb = std::fs::metadata(root.join("task0/adapter.safetensors"))
        .unwrap()
        .len() as f64
        / 1e6;

    let base_tps = decode_tps(&model, &[None], steps, reps);
    let one = decode_tps(&model, &[Some(maps[0].clone())], steps, reps);
    let spread: Vec<Option<Arc<ExpertMap>>> = maps.iter().cloned().map(Some).collect();
    let many = decode_tps(&model, &spread, steps, reps);

    println!("adapter benchmark: {layers} layers, {n_routed} routed experts, {per_layer} replaced per MoE layer per adapter ({:.1}%)", 100.0 * per_layer as f64 / n_routed as f64);
    println!("decode, batch {BATCH}, {steps} steps (median of {reps}):");
    println!("  base model                    {base_tps:>9.1} tok/s");
    println!("  32 sequences on 1 adapter      {one:>9.1} tok/s");
    println!("  32 sequences over 16 adapters  {many:>9.1} tok/s");
    println!(
        "  ratio 16 adapters / 1 adapter  {:>9.3}  (goal >= 0.95)",
        many / one
    );
    println!(
        "cold adapter load ({adapter_mb:.1} MB each, read + validate + slots): median {:.0} MB/s",
        median(mbps.clone())
    );
    let summary = serde_json::json!({
        "decode_tps": {"base": base_tps, "one_adapter": one, "sixteen_adapters": many},
        "ratio_16_vs_1": many / one,
        "cold_load_mb_per_s": median(mbps),
        "adapter_mb": adapter_mb,
    });
    println!("{summary}");
}
