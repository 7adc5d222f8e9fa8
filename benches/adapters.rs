//! Adapter benchmarks on the runtime benchmark model (`bench_model.json`):
//! 1. decode tokens/s with 32 sequences on one adapter vs 32 sequences spread over 16
//!    adapters (each replacing ~10% of the routed experts of every MoE layer), plus the base;
//! 2. time to make a cold adapter servable (read + validate + copy into slots), as MB/s.
//!
//! The three batch configurations run in rounds (each round decodes every one once) and the
//! ratio is the median of per-round ratios. Also counts the routed-expert weights one step
//! reads in each configuration: spreading over adapters adds the adapters' expert copies.
//!
//! Knobs: `ESFT_BENCH_STEPS` (decode steps, 32), `ESFT_BENCH_REPS` (3), `ESFT_BENCH_LAYERS` (8).

mod common;

use candle_core::DType;
use common::{bench_config, env_usize, median, write_random_adapter};
use esft::adapter::{
    AdapterKey, AdapterRegistry, AdapterStats, AdapterStore, BaseModel, DeviceSlots, Install,
};
use esft::model::init::write_random_checkpoint;
use esft::model::{
    Decoder, ExpertMap, LoadOptions, LogitsWanted, RoutingRecord, SeqCache, SeqInput,
};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Instant;

const ADAPTERS: usize = 16;
const BATCH: usize = 32;
const PROMPT: usize = 32;

/// One configuration of the batch: sequence `i` uses `maps[i % maps.len()]`.
struct Batch<'a> {
    model: &'a Decoder,
    maps: &'a [Option<Arc<ExpertMap>>],
    prompts: Vec<Vec<u32>>,
    next: Vec<Vec<u32>>,
}

impl<'a> Batch<'a> {
    fn new(model: &'a Decoder, maps: &'a [Option<Arc<ExpertMap>>]) -> Self {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let vocab = model.config().vocab_size as u32;
        let prompts = (0..BATCH)
            .map(|_| (0..PROMPT).map(|_| rng.random_range(2..vocab)).collect())
            .collect();
        let next = (0..BATCH)
            .map(|i| vec![(i as u32 * 7 + 3) % vocab])
            .collect();
        Self {
            model,
            maps,
            prompts,
            next,
        }
    }

    fn step(
        &self,
        caches: &mut [SeqCache],
        tokens: &[Vec<u32>],
        record: Option<&mut RoutingRecord>,
    ) {
        let mut batch: Vec<SeqInput<'_>> = caches
            .iter_mut()
            .zip(tokens)
            .enumerate()
            .map(|(i, (c, t))| SeqInput {
                tokens: t,
                cache: c,
                experts: self.maps[i % self.maps.len()].as_deref(),
                logits: LogitsWanted::Last,
            })
            .collect();
        self.model.forward(&mut batch, record).unwrap();
    }

    /// Seconds for `steps` decode steps after the prompts.
    fn decode_seconds(&self, steps: usize) -> f64 {
        let mut caches: Vec<SeqCache> = (0..BATCH).map(|_| self.model.new_cache()).collect();
        self.step(&mut caches, &self.prompts, None);
        let t0 = Instant::now();
        for _ in 0..steps {
            self.step(&mut caches, &self.next, None);
        }
        t0.elapsed().as_secs_f64()
    }

    /// Megabytes of routed-expert weights one decode step reads: the distinct slots its
    /// tokens route to, per MoE layer, times the size of one expert.
    fn expert_mb_per_step(&self, expert_bytes: usize) -> f64 {
        let mut caches: Vec<SeqCache> = (0..BATCH).map(|_| self.model.new_cache()).collect();
        self.step(&mut caches, &self.prompts, None);
        let mut record = RoutingRecord::default();
        self.step(&mut caches, &self.next, Some(&mut record));
        let first_moe = self.model.config().first_k_dense_replace;
        let identity = ExpertMap::identity(self.model.config());
        let mut slots = 0;
        for layer in &record.layers {
            let moe_index = layer.layer - first_moe;
            let mut seen = std::collections::HashSet::new();
            for (token, ids) in layer.ids.chunks(layer.top_k).enumerate() {
                let map = self.maps[token % self.maps.len()]
                    .as_deref()
                    .unwrap_or(&identity);
                seen.extend(ids.iter().map(|&e| map.table(moe_index)[e as usize]));
            }
            slots += seen.len();
        }
        (slots * expert_bytes) as f64 / 1e6
    }
}

fn main() {
    esft::util::prepare_process();
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

    let mut model = Decoder::load_dir(&model_dir, &LoadOptions::default()).unwrap();
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
        let v = registry
            .resolve(&[AdapterKey::shared(&format!("task{i}"))])
            .unwrap();
        let w = registry.load(&v).unwrap();
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

    // Rounds: each runs every configuration once, so that a slow phase of a shared machine
    // reaches all of them alike; the ratio is the median of per-round ratios.
    let none = [None];
    let first = [Some(maps[0].clone())];
    let spread: Vec<Option<Arc<ExpertMap>>> = maps.iter().cloned().map(Some).collect();
    let configs = [
        Batch::new(&model, &none),
        Batch::new(&model, &first),
        Batch::new(&model, &spread),
    ];
    let mut seconds = vec![Vec::new(); configs.len()];
    for round in 0..=reps {
        for (c, s) in configs.iter().zip(seconds.iter_mut()) {
            let t = c.decode_seconds(steps);
            if round > 0 {
                s.push(t);
            }
        }
    }
    let tps = |s: &[f64]| (BATCH * steps) as f64 / median(s.to_vec());
    let (base_tps, one, many) = (tps(&seconds[0]), tps(&seconds[1]), tps(&seconds[2]));
    let ratio = median(
        seconds[1]
            .iter()
            .zip(&seconds[2])
            .map(|(a, b)| a / b)
            .collect(),
    );
    let expert_bytes = {
        let c = model.config();
        3 * c.hidden_size * c.moe_intermediate_size * 4
    };
    let (mb_one, mb_many) = (
        configs[1].expert_mb_per_step(expert_bytes),
        configs[2].expert_mb_per_step(expert_bytes),
    );

    println!("adapter benchmark: {layers} layers, {n_routed} routed experts, {per_layer} replaced per MoE layer per adapter ({:.1}%)", 100.0 * per_layer as f64 / n_routed as f64);
    println!("decode, batch {BATCH}, {steps} steps (median of {reps}):");
    println!("  base model                    {base_tps:>9.1} tok/s");
    println!("  32 sequences on 1 adapter      {one:>9.1} tok/s");
    println!("  32 sequences over 16 adapters  {many:>9.1} tok/s");
    println!(
        "  ratio 16 adapters / 1 adapter  {ratio:>9.3}  (goal >= 0.95; median of per-round ratios)"
    );
    println!(
        "  routed-expert weights read per step: {mb_one:.0} MB on 1 adapter, {mb_many:.0} MB over 16 \
         (ratio {:.3})",
        mb_one / mb_many
    );
    println!(
        "cold adapter load ({adapter_mb:.1} MB each, read + validate + slots): median {:.0} MB/s",
        median(mbps.clone())
    );
    let summary = serde_json::json!({
        "decode_tps": {"base": base_tps, "one_adapter": one, "sixteen_adapters": many},
        "ratio_16_vs_1": ratio,
        "expert_mb_per_step": {"one_adapter": mb_one, "sixteen_adapters": mb_many},
        "cold_load_mb_per_s": median(mbps),
        "adapter_mb": adapter_mb,
    });
    println!("{summary}");
}
