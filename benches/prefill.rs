//! Batched prefill throughput on CPU, f32, for every architecture, next to Hugging Face
//! transformers on the same checkpoint in the same minutes.
//!
//! Per architecture (a random model of the runtime benchmark's size, written once per run
//! with `write_random_checkpoint`: DeepSeek-V2 `benches/bench_model.json`, and the
//! Qwen3-MoE, DeepSeek-V3 and OLMoE shapes of `benches/common`): B prompts of
//! `ESFT_BENCH_PROMPT` tokens prefilled in one `forward` (last-position logits), for every
//! B in `ESFT_BENCH_BATCHES`. Tokens/s = B * prompt / time. One warm-up round, then
//! `ESFT_BENCH_REPS` rounds; medians are reported.
//!
//! The reference: when `ESFT_BENCH_HF_PYTHON` names a Python with torch and transformers,
//! each round also runs `ESFT_BENCH_HF_SCRIPT` (default `../shared/tools/hf_decode_bench.py`
//! beside the repository) on the same checkpoint directory, same batch sizes, prompt
//! length and thread count, right after ours; the ratio is the median of per-round ratios,
//! so a slow minute of a shared machine counts against both sides alike. The script's
//! prefill is `model(ids)`, which computes the LM head at every position (ours computes it
//! at the last one, as serving does), so each round also times transformers' prefill with
//! `logits_to_keep=1` in the same way (a second number and ratio, "last position").
//! Without the variable, or when the reference fails (no torch), only our numbers are
//! reported.
//!
//! Knobs: `ESFT_BENCH_PROMPT` (32), `ESFT_BENCH_BATCHES` ("1,32"), `ESFT_BENCH_REPS` (3),
//! `ESFT_BENCH_LAYERS` (8), `ESFT_BENCH_MODELS` (comma-separated, default
//! "deepseek-v2,qwen3-moe,deepseek-v3,olmoe"). Prints a table and one JSON line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{bench_config, deepseek_v3_config, env_usize, median, olmoe_config, qwen3_config};
use esft::model::init::write_random_checkpoint;
use esft::model::{Decoder, LoadOptions, LogitsWanted, SeqCache, SeqInput};
use serde_json::{json, Value};

type AnyResult<T> = anyhow::Result<T>;

fn prompts(batch: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|b| {
            (0..len)
                .map(|i| ((b * 7919 + i * 104_729 + 3) % (vocab - 2) + 2) as u32)
                .collect()
        })
        .collect()
}

/// Seconds of one prefill of `prompts` in one forward.
fn ours_prefill(model: &Decoder, prompts: &[Vec<u32>]) -> AnyResult<f64> {
    let mut caches: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
    let t = Instant::now();
    let mut batch: Vec<SeqInput<'_>> = prompts
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
    let logits = out.logits.expect("logits were asked for");
    std::hint::black_box(logits.dims());
    Ok(t.elapsed().as_secs_f64())
}

/// transformers' prefill as serving needs it (`logits_to_keep=1`: the LM head at the last
/// position only, as ours), timed like `hf_decode_bench.py` times `model(ids)`.
const LAST_POSITION: &str = r#"
import json, sys, time, torch
from transformers import AutoModelForCausalLM
d, batches, p, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32); m.eval()
out = {}
for b in map(int, batches.split(",")):
    ids = torch.randint(2, m.config.vocab_size, (b, p), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m(ids[:, :8], logits_to_keep=1)
        t0 = time.perf_counter()
        m(ids, logits_to_keep=1)
        t = time.perf_counter() - t0
    out[b] = {"prefill_tok_s": b * p / t}
print(json.dumps(out))
"#;

/// The transformers reference, when a Python is given.
struct Reference {
    python: PathBuf,
    script: PathBuf,
}

impl Reference {
    fn from_env() -> Option<Reference> {
        let python = PathBuf::from(std::env::var_os("ESFT_BENCH_HF_PYTHON")?);
        let script = std::env::var_os("ESFT_BENCH_HF_SCRIPT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/hf_decode_bench.py")
            });
        Some(Reference { python, script })
    }

    /// Prefill tokens/s per batch size: from one run of the script, or with `last`, of
    /// [`LAST_POSITION`].
    fn prefill(
        &self,
        dir: &Path,
        batches: &[usize],
        prompt: usize,
        threads: usize,
        last: bool,
    ) -> Result<Vec<f64>, String> {
        let list: Vec<String> = batches.iter().map(|b| b.to_string()).collect();
        let mut cmd = Command::new(&self.python);
        if last {
            cmd.args(["-c", LAST_POSITION]).arg(dir).arg(list.join(","));
            cmd.args([prompt.to_string(), threads.to_string()]);
        } else {
            cmd.arg(&self.script).arg(dir);
            cmd.args(["--batch", &list.join(",")]);
            cmd.args(["--prompt", &prompt.to_string()]);
            cmd.args(["--new", "1", "--threads", &threads.to_string()]);
        }
        let out = cmd
            .output()
            .map_err(|e| format!("{}: {e}", self.python.display()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().last().unwrap_or("").to_string();
            return Err(format!("{}: {last}", out.status));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().ok_or("no output")?;
        let v: Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
        batches
            .iter()
            .map(|b| {
                v[b.to_string()]["prefill_tok_s"]
                    .as_f64()
                    .ok_or_else(|| format!("no prefill_tok_s for batch {b} in {line}"))
            })
            .collect()
    }
}

fn main() -> AnyResult<()> {
    esft::util::prepare_process();
    let prompt_len = env_usize("ESFT_BENCH_PROMPT", 32).max(1);
    let reps = env_usize("ESFT_BENCH_REPS", 3).max(1);
    let layers = env_usize("ESFT_BENCH_LAYERS", 8).max(2);
    let list = |name: &str, default: &str| -> Vec<String> {
        std::env::var(name)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let batches: Vec<usize> = list("ESFT_BENCH_BATCHES", "1,32")
        .iter()
        .map(|s| {
            s.parse()
                .expect("ESFT_BENCH_BATCHES: comma-separated sizes")
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut reference = Reference::from_env();
    if reference.is_none() {
        println!("ESFT_BENCH_HF_PYTHON unset: ours only");
    }

    let mut report = Vec::new();
    for name in list(
        "ESFT_BENCH_MODELS",
        "deepseek-v2,qwen3-moe,deepseek-v3,olmoe",
    ) {
        let config = match name.as_str() {
            "deepseek-v2" => bench_config(layers),
            "qwen3-moe" => qwen3_config(layers),
            "deepseek-v3" => deepseek_v3_config(layers),
            "olmoe" => olmoe_config(layers),
            other => anyhow::bail!("ESFT_BENCH_MODELS: unknown model {other}"),
        };
        let dir = tempfile::tempdir()?;
        write_random_checkpoint(&config, 1, dir.path())?;
        let model = Decoder::load_dir(dir.path(), &LoadOptions::default())?;
        let vocab = model.config().vocab_size;
        let inputs: Vec<Vec<Vec<u32>>> = batches
            .iter()
            .map(|&b| prompts(b, prompt_len, vocab))
            .collect();
        let per_batch = || vec![Vec::<f64>::new(); batches.len()];
        let mut ours = per_batch();
        // [script, last position]: transformers' tokens/s and ours over theirs per round.
        let (mut theirs, mut ratios) = ([per_batch(), per_batch()], [per_batch(), per_batch()]);
        for round in 0..=reps {
            let mut tok_s = Vec::new();
            for (&b, p) in batches.iter().zip(&inputs) {
                tok_s.push((b * prompt_len) as f64 / ours_prefill(&model, p)?);
            }
            if round == 0 {
                continue; // warm-up
            }
            for (i, t) in tok_s.iter().enumerate() {
                ours[i].push(*t);
            }
            for (v, last) in [false, true].into_iter().enumerate() {
                let Some(r) = reference.as_ref() else { break };
                match r.prefill(dir.path(), &batches, prompt_len, threads, last) {
                    Ok(hf) => {
                        eprintln!("{name} round {round}: ours {tok_s:.0?}, transformers {hf:.0?}");
                        for (i, t) in tok_s.iter().enumerate() {
                            theirs[v][i].push(hf[i]);
                            ratios[v][i].push(t / hf[i]);
                        }
                    }
                    Err(e) => {
                        println!("transformers reference failed ({e}): ours only");
                        reference = None;
                    }
                }
            }
        }
        let mut rows = Vec::new();
        for (i, &b) in batches.iter().enumerate() {
            let o = median(ours[i].clone());
            let mut row = json!({"batch": b, "prefill_tok_s": o});
            let mut line = format!("{name:12} batch {b:3}: prefill {o:8.0} tok/s");
            for (v, key) in ["transformers", "transformers_last_position"]
                .iter()
                .enumerate()
            {
                if theirs[v][i].is_empty() {
                    continue;
                }
                let (t, r) = (median(theirs[v][i].clone()), median(ratios[v][i].clone()));
                row[format!("{key}_prefill_tok_s")] = t.into();
                row[format!("{key}_ratio")] = r.into();
                let label = ["script", "last position"][v];
                line += &format!("  transformers ({label}) {t:6.0} tok/s, ours / theirs {r:.2}x");
            }
            println!("{line}");
            rows.push(row);
        }
        report.push(json!({"model": name, "rows": rows}));
    }
    println!(
        "{}",
        json!({"bench": "prefill", "prompt": prompt_len, "reps": reps, "layers": layers,
               "threads": threads, "results": report})
    );
    Ok(())
}
