//! `esft-train` command line: the subcommands and the glue between files and the library.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

use esft::adapter::format::{BaseModel, Provenance};
use esft::jobs::contract;
use esft::model::{LoadOptions, LoadedModel};

use crate::data::{self, Limits, SpecialIds};
use crate::error::{DataProblem, Failure};
use crate::progress::Progress;
use crate::score::{self, ScoreAccumulator, Scores};
use crate::select::{self, ScoreFunction, Selection};
use crate::train::{self, Run, Schedule, TrainConfig, Trainable};

#[derive(Parser, Debug)]
#[command(
    name = "esft-train",
    version,
    about = "Expert-Specialized Fine-Tuning for fine-grained MoE models (DeepSeek-V2/V3, \
             Qwen3-MoE, OLMoE): score experts on task data, select them, train only them, \
             write adapters"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Score routed experts on task data (Token Selection Ratio, Average Gate Score).
    Score(ScoreArgs),
    /// Select experts per layer from scores (the reference top-p rule).
    Select(SelectArgs),
    /// Train the selected experts (or everything) and write an adapter (or a checkpoint).
    Train(TrainArgs),
    /// Evaluate a model, optionally with an adapter, on an eval set.
    Eval(EvalArgs),
    /// Write a full checkpoint with an adapter's tensors merged in.
    Merge(MergeArgs),
    /// Import an adapter released in the ESFT reference layout.
    Import(ImportArgs),
    /// Generate the synthetic demo data: three general domains to pretrain a base on and
    /// three downstream tasks to fine-tune it on (see docs/synthetic-data.md).
    Synth(SynthArgs),
    /// Draw the paper's routing heat map and selected-experts figure (SVG) and write routing
    /// statistics (top-expert shares and overlaps between tasks, JSON and Markdown).
    Plot(PlotArgs),
    /// Create a new model: a BPE tokenizer trained on a corpus and random weights.
    Init(InitArgs),
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// The model directory (Hugging Face layout).
    #[arg(long, required_unless_present = "from_logs")]
    pub model: Option<PathBuf>,
    /// Task data (JSONL: reference `messages` or `{"prompt", "completion"}`).
    #[arg(long, required_unless_present = "from_logs")]
    pub data: Option<PathBuf>,
    /// Tokens to route (a random sample of the data; default the paper's 32 x 4096).
    #[arg(long, default_value_t = 131072)]
    pub tokens: usize,
    /// Seed of the sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokens per forward pass.
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
    /// Also write the reference routing logs (`expert_weights_{L}.txt`) here.
    #[arg(long, conflicts_with = "from_logs")]
    pub log_dir: Option<PathBuf>,
    /// Compute the scores from reference routing logs in this directory instead.
    #[arg(long, conflicts_with_all = ["model", "data"])]
    pub from_logs: Option<PathBuf>,
    /// With --from-logs: experts per token in the logs (DeepSeek-V2-Lite: 6).
    #[arg(long, default_value_t = 6)]
    pub top_k: usize,
    /// With --from-logs: routed experts per layer (DeepSeek-V2-Lite: 64).
    #[arg(long, default_value_t = 64)]
    pub experts: usize,
    /// Where to write the scores (the reference summary.json shape).
    #[arg(long)]
    pub out: PathBuf,
    /// Print progress as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
    /// Where and in which precision the model computes.
    #[command(flatten)]
    pub device: esft::cli::DeviceArgs,
}

#[derive(Args, Debug)]
pub struct SelectArgs {
    /// Scores from `score` (or a reference summary.json).
    #[arg(long)]
    pub scores: PathBuf,
    #[arg(long, value_enum, required_unless_present = "random_like")]
    pub score_function: Option<ScoreFunction>,
    /// Cumulative score to reach per layer.
    #[arg(long, required_unless_present = "random_like")]
    pub top_p: Option<f64>,
    /// Instead of the top-p rule: as many experts per layer as this expert config has,
    /// drawn at random (the random-experts control of the paper's ablation).
    #[arg(long, conflicts_with_all = ["score_function", "top_p", "train_shared_experts", "train_non_expert_modules"])]
    pub random_like: Option<PathBuf>,
    /// Seed of --random-like.
    #[arg(long, default_value_t = 0, requires = "random_like")]
    pub seed: u64,
    /// Also train the shared experts.
    #[arg(long)]
    pub train_shared_experts: bool,
    /// Also train attention, norms, gates, dense layers and embeddings.
    #[arg(long)]
    pub train_non_expert_modules: bool,
    /// Where to write the expert config (the reference format).
    #[arg(long)]
    pub out: PathBuf,
    /// Print the outcome as a JSON line on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Training data (JSONL: reference `messages` or `{"prompt", "completion"}`).
    #[arg(long)]
    pub data: PathBuf,
    /// An expert config from `select`, or `all` to train every weight (full fine-tuning,
    /// written as a full checkpoint).
    #[arg(long)]
    pub experts: String,
    /// Output directory: `adapters/NAME` (its last component names the adapter).
    #[arg(long)]
    pub out: PathBuf,
    /// Optimizer steps [default: 500, unless --epochs is given].
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Passes over the training samples instead of --steps: as many steps as the run's
    /// packing needs to train on every sample this many times.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub epochs: Option<u64>,
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
    /// Sequences of --seq-len tokens per micro-batch (samples are packed, never padded).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Instead of --batch: as many sequences per micro-batch as make about this many tokens
    /// (at least one).
    #[arg(long, conflicts_with = "batch")]
    pub batch_tokens: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Longest sample; also the packing unit. `auto`: the longest sample of the data,
    /// rounded up to a multiple of 64 (at most the model's context).
    #[arg(long, default_value = "4096", value_parser = parse_seq_len)]
    pub seq_len: SeqLen,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    #[arg(long, value_enum, default_value_t = Schedule::Linear)]
    pub schedule: Schedule,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// AdamW betas as `b1,b2`.
    #[arg(long, default_value = "0.9,0.95")]
    pub betas: String,
    /// Clip the gradient's global L2 norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Share of samples held out for the eval loss (0: none; the last weights are kept)
    /// [default: 0.02, 0 with --eval-data].
    #[arg(long)]
    pub eval_split: Option<f64>,
    /// Held-out samples for the eval loss from this file (the formats of --data) instead of
    /// a share of --data.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// How the adapter's manifest names --data and --eval-data (e.g. the ids of uploaded
    /// files) [default: their paths].
    #[arg(long)]
    pub data_name: Option<String>,
    #[arg(long)]
    pub eval_data_name: Option<String>,
    /// Weight of DeepSeek's sequence-level load-balancing loss, summed over MoE layers
    /// (config.json's `aux_loss_alpha`; use it when pretraining so experts do not collapse).
    #[arg(long, default_value_t = 0.0)]
    pub aux_loss_alpha: f64,
    /// Evaluate every N steps (0: only at the end); the best checkpoint is kept.
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// Save a resumable state every N steps (0: never).
    #[arg(long, default_value_t = 100)]
    pub save_every: u64,
    /// Continue the run saved beside --out.
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub json: bool,
    /// Where and in which precision the model computes.
    #[command(flatten)]
    pub device: esft::cli::DeviceArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Metric {
    ExactMatch,
    Loss,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// An adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Eval data: `{"prompt", "answers"}` lines (loss also takes training formats).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value_t = Metric::ExactMatch)]
    pub metric: Metric,
    /// Longest generated answer in tokens.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Prompts generated together.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Evaluate only the first N items.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write every prediction here (JSONL).
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    /// Where and in which precision the model computes.
    #[command(flatten)]
    pub device: esft::cli::DeviceArgs,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The adapter directory (ours or the ESFT reference layout).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged checkpoint (created atomically).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// A config.json of any supported architecture (DeepSeek-V2/V3, Qwen3-MoE, OLMoE); its
    /// `vocab_size` is the tokenizer's target size (the written config holds the size
    /// reached).
    #[arg(long)]
    pub config: PathBuf,
    /// Directory of JSONL task data to train the tokenizer on (every *.jsonl below it).
    #[arg(long)]
    pub corpus: PathBuf,
    /// The new model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The released adapter (expert_cfg.json + safetensors).
    #[arg(long)]
    pub from: PathBuf,
    /// The base model it was trained on.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory: `adapters/NAME`.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Output directory (created; files in it are overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of every draw: the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Train samples per general domain (grammar, arithmetic, programs) and of the
    /// auxiliary `repeat` domain.
    #[arg(long, default_value_t = 20000)]
    pub general_train: usize,
    /// Train samples per downstream domain (intent, translation, law).
    #[arg(long, default_value_t = 3000)]
    pub task_train: usize,
    /// Eval items per domain, all distinct and absent from every train split.
    #[arg(long, default_value_t = 200)]
    pub eval: usize,
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A task's scores from `score` (or a reference summary.json), as NAME=FILE; repeat it
    /// for every task. NAME labels the task in the figures and tables.
    #[arg(long, required = true, value_name = "NAME=FILE", value_parser = crate::plot::parse_named)]
    pub scores: Vec<crate::plot::Named>,
    /// A task's expert config from `select`, as NAME=FILE; repeatable. With any, also draws
    /// selected_experts.svg.
    #[arg(long, value_name = "NAME=FILE", value_parser = crate::plot::parse_named)]
    pub configs: Vec<crate::plot::Named>,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// The scores to draw and to take the statistics over.
    #[arg(long, value_enum, default_value_t = ScoreFunction::Token)]
    pub score_function: ScoreFunction,
    /// A task's top experts per layer are this share of the routed experts, rounded up.
    #[arg(long, default_value_t = 0.1)]
    pub top_fraction: f64,
}

/// Steps when neither --steps nor --epochs is given.
pub const DEFAULT_STEPS: u64 = 500;
/// --eval-split without --eval-data.
pub const DEFAULT_EVAL_SPLIT: f64 = 0.02;

impl Command {
    /// The subcommand's name if it was asked for JSON lines (`--json`): a failure then ends
    /// with an `error` line (see [`crate::progress`]).
    pub fn json_task(&self) -> Option<&'static str> {
        match self {
            Command::Score(a) => a.json.then_some("score"),
            Command::Select(a) => a.json.then_some("select"),
            Command::Train(a) => a.json.then_some("train"),
            Command::Eval(a) => a.json.then_some("eval"),
            _ => None,
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Score(a) => score_cmd(&a),
        Command::Select(a) => select_cmd(&a),
        Command::Train(a) => train_cmd(&a),
        Command::Eval(a) => eval_cmd(&a),
        Command::Merge(a) => {
            esft::adapter::merge::merge_checkpoint(&a.model, &a.adapter, &a.out)
                .with_context(|| format!("merging {}", a.adapter.display()))?;
            eprintln!("wrote {}", a.out.display());
            Ok(())
        }
        Command::Import(a) => {
            let n = crate::import::import(&a.from, &a.model, &a.out)?;
            eprintln!("wrote {} ({n} experts)", a.out.display());
            Ok(())
        }
        Command::Synth(a) => synth_cmd(&a),
        Command::Plot(a) => plot_cmd(&a),
        Command::Init(a) => init_cmd(&a),
    }
}

fn synth_cmd(a: &SynthArgs) -> Result<()> {
    let sizes = crate::synth::Sizes {
        general_train: a.general_train,
        task_train: a.task_train,
        eval: a.eval,
    };
    let m = crate::synth::generate(&a.out, a.seed, sizes)?;
    for d in &m.domains {
        eprintln!(
            "{:<12} {:<10} {:>6} train {:>5} eval",
            d.name,
            format!("{:?}", d.kind).to_lowercase(),
            d.train,
            d.eval
        );
    }
    let pretrain: usize = m
        .domains
        .iter()
        .filter(|d| d.kind != crate::synth::Kind::Downstream)
        .map(|d| d.train)
        .sum();
    eprintln!(
        "wrote {} (seed {}, pretrain.jsonl: {pretrain} samples)",
        a.out.display(),
        m.seed
    );
    Ok(())
}

fn load_model(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    LoadedModel::load(dir, opts).with_context(|| format!("loading the model in {}", dir.display()))
}

fn score_cmd(a: &ScoreArgs) -> Result<()> {
    let scores = if let Some(dir) = &a.from_logs {
        score::from_logs(dir, a.experts, a.top_k)?
    } else {
        let (Some(model_dir), Some(data_path)) = (&a.model, &a.data) else {
            bail!("--model and --data are required without --from-logs");
        };
        if a.tokens == 0 {
            bail!("--tokens must be at least 1");
        }
        let loaded = load_model(model_dir, &a.device.load_options()?)?;
        let ids = SpecialIds::of(loaded.model.config(), &loaded.tokenizer)?;
        let samples = data::load_train(data_path, &loaded.tokenizer, ids, Limits::default())?;
        let picked = score::sample_tokens(samples, a.tokens, a.seed);
        let total: usize = picked.iter().map(Vec::len).sum();
        if total < a.tokens {
            eprintln!(
                "note: the data holds {total} tokens, fewer than --tokens {}; scoring all of them",
                a.tokens
            );
        }
        let cfg = loaded.model.config();
        let mut acc = ScoreAccumulator::new(cfg.n_routed_experts, cfg.num_experts_per_tok);
        let mut log = a
            .log_dir
            .as_deref()
            .map(score::LogWriter::create)
            .transpose()?;
        let mut progress = Progress::new("score", total as u64, "tokens", a.json);
        let start = Instant::now();
        score::score_samples(
            &loaded.model,
            &picked,
            a.batch_tokens.max(1),
            &mut acc,
            log.as_mut(),
            |n| {
                let rate = n as f64 / start.elapsed().as_secs_f64().max(1e-9);
                progress.advance(n as u64, json!({ "tokens_per_s": rate.round() }));
            },
        )?;
        if let Some(log) = log {
            log.finish()?;
        }
        let scores = acc.scores();
        scores.write(&a.out)?;
        progress.finish(contract::ScoreDone {
            tokens: total as u64,
        });
        scores
    };
    if a.from_logs.is_some() {
        scores.write(&a.out)?;
    }
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn select_cmd(a: &SelectArgs) -> Result<()> {
    let scores = Scores::read(&a.scores)?;
    let cfg = match (&a.random_like, a.score_function, a.top_p) {
        (Some(like), _, _) => {
            select::random_like(&scores, &select::read_expert_config(like)?, a.seed)?
        }
        (None, Some(function), Some(top_p)) => select::select(
            &scores,
            &Selection {
                function,
                top_p,
                shared_experts: a.train_shared_experts,
                non_expert_modules: a.train_non_expert_modules,
            },
        )?,
        _ => bail!("pass --score-function and --top-p, or --random-like"),
    };
    select::write_expert_config(&cfg, &a.out)?;
    let layers = cfg.experts.len().max(1);
    let total: usize = scores
        .token_scores
        .values()
        .next()
        .map_or(0, |l| l.len() * cfg.experts.len());
    eprintln!(
        "selected {} experts over {} layers ({:.1} per layer, {:.1}% of routed experts); wrote {}",
        cfg.expert_count(),
        cfg.experts.len(),
        cfg.expert_count() as f64 / layers as f64,
        100.0 * cfg.expert_count() as f64 / total.max(1) as f64,
        a.out.display()
    );
    if a.json {
        Progress::new("select", 1, "configs", true).finish(json!({
            "experts": cfg.expert_count(),
            "layers": cfg.experts.len(),
            "out": a.out.display().to_string(),
        }));
    }
    Ok(())
}

fn parse_betas(s: &str) -> Result<(f64, f64)> {
    let parts: Vec<&str> = s.split(',').collect();
    match parts.as_slice() {
        [a, b] => Ok((
            a.trim().parse().context("--betas: bad first value")?,
            b.trim().parse().context("--betas: bad second value")?,
        )),
        _ => bail!("--betas takes two numbers, e.g. 0.9,0.95"),
    }
}

fn file_sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// `--seq-len`: a number of tokens, or `auto` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqLen(pub Option<usize>);

fn parse_seq_len(s: &str) -> Result<SeqLen, String> {
    if s == "auto" {
        return Ok(SeqLen(None));
    }
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(SeqLen(Some(n))),
        _ => Err(format!(
            "expected a positive number of tokens or `auto`, not {s:?}"
        )),
    }
}

/// The packing unit `--seq-len auto` picks for samples whose longest is `longest` tokens:
/// rounded up to a multiple of 64, at most `max_context`.
pub fn auto_seq_len(longest: usize, max_context: usize) -> usize {
    longest
        .max(1)
        .div_ceil(64)
        .saturating_mul(64)
        .min(max_context.max(1))
}

/// The hidden directory beside `out` where a run keeps its resumable state.
pub fn state_dir(out: &Path) -> Result<PathBuf> {
    contract::state_dir(out)
        .with_context(|| format!("{}: --out needs a directory name", out.display()))
}

fn train_cmd(a: &TrainArgs) -> Result<()> {
    let (beta1, beta2) = parse_betas(&a.betas)?;
    let eval_split = match (&a.eval_data, a.eval_split) {
        (Some(_), Some(f)) if f != 0.0 => bail!("--eval-data replaces --eval-split {f}"),
        (Some(_), _) => 0.0,
        (None, f) => f.unwrap_or(DEFAULT_EVAL_SPLIT),
    };
    let mut cfg = TrainConfig {
        // Until --epochs is resolved on the data.
        steps: a.steps.unwrap_or(DEFAULT_STEPS),
        lr: a.lr,
        batch: a.batch,
        grad_accum: a.grad_accum,
        // Until `auto` and --batch-tokens are resolved on the data.
        seq_len: a.seq_len.0.unwrap_or(1),
        warmup: a.warmup,
        schedule: a.schedule,
        beta1,
        beta2,
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        seed: a.seed,
        eval_split,
        aux_loss_alpha: a.aux_loss_alpha,
    };
    cfg.validate()?;
    let what = if a.experts == "all" {
        Trainable::All
    } else {
        Trainable::Experts(select::read_expert_config(Path::new(&a.experts))?)
    };
    let name = a
        .out
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: --out needs a directory name", a.out.display()))?
        .to_string();
    if matches!(what, Trainable::Experts(_)) {
        esft::adapter::format::validate_name(&name)?;
    }
    let state = state_dir(&a.out)?;
    if state.exists() && !a.resume {
        bail!(
            "an unfinished run left its state in {}; pass --resume to continue it, or delete it",
            state.display()
        );
    }

    let loaded = load_model(&a.model, &a.device.load_options()?)?;
    let ids = SpecialIds::of(loaded.model.config(), &loaded.tokenizer)?;
    // Every sample is checked before any training starts.
    let mut limits = Limits {
        max_tokens: Some(a.seq_len.0.unwrap_or(loaded.max_context())),
        need_targets: true,
    };
    let samples = data::load_train(&a.data, &loaded.tokenizer, ids, limits)?;
    if a.seq_len.0.is_none() {
        let longest = samples.iter().map(data::Sample::len).max().unwrap_or(1);
        cfg.seq_len = auto_seq_len(longest, loaded.max_context());
        limits.max_tokens = Some(cfg.seq_len);
    }
    if let Some(tokens) = a.batch_tokens {
        cfg.batch = (tokens / cfg.seq_len).max(1);
    }
    cfg.validate()?;
    if eval_split > 0.0 && samples.len() < 2 {
        return Err(Failure::DataTooSmall(DataProblem::new(
            &a.data,
            None,
            format!(
                "{} sample is too few to hold out --eval-split {eval_split} of them (two or \
                 more are needed; or pass --eval-split 0)",
                samples.len()
            ),
        ))
        .into());
    }
    let (train_set, eval_set) = match &a.eval_data {
        Some(path) => (
            samples,
            data::load_train(path, &loaded.tokenizer, ids, limits)?,
        ),
        None => train::split_eval(samples, eval_split, a.seed),
    };
    if let Some(epochs) = a.epochs {
        cfg.steps = train::steps_for_epochs(&train_set, epochs, &cfg);
    }
    let (steps, seq_len, batch) = (cfg.steps, cfg.seq_len, cfg.batch);
    let mut identity = json!({
        "base": loaded.model.config().fingerprint(),
        "trainable": match &what {
            Trainable::All => json!("all"),
            Trainable::Experts(c) => serde_json::to_value(c)?,
        },
        "data": file_sha256(&a.data)?,
        "batch": cfg.batch,
        "grad_accum": a.grad_accum,
        "seq_len": cfg.seq_len,
        "seed": a.seed,
        "eval_split": eval_split,
        "aux_loss_alpha": a.aux_loss_alpha,
    });
    if let Some(path) = &a.eval_data {
        identity["eval_data"] = file_sha256(path)?.into();
    }
    let LoadedModel { model, store, .. } = loaded;
    let config = model.config().clone();
    let (n_train, n_eval) = (train_set.len(), eval_set.len());
    let mut run = Run::new(model, &what, train_set, eval_set, cfg)?;
    if a.resume && state.exists() {
        run.restore(&state, &identity)?;
        eprintln!("resumed {} at step {}", state.display(), run.step());
    }
    let trainable = run.trainable_params();
    let mut progress = Progress::new("train", steps, "steps", a.json);
    progress.event(
        "start",
        contract::TrainStart {
            steps,
            train_samples: n_train as u64,
            eval_samples: n_eval as u64,
            trainable_params: trainable as u64,
            step: run.step(),
            seq_len: seq_len as u64,
            batch: batch as u64,
        },
    );
    if run.step() > 0 {
        progress.advance(
            run.step(),
            json!({"resumed_at": run.step(), "trained_tokens": run.trained_tokens()}),
        );
    }
    let started = Instant::now();
    let mut evaluated_at = None;
    while run.step() < steps {
        let t0 = Instant::now();
        let r = match run.train_step() {
            Ok(r) => r,
            Err(e) => return Err(drop_diverged_state(e, &state)),
        };
        let dt = t0.elapsed().as_secs_f64();
        progress.advance(
            1,
            contract::Step {
                step: r.step,
                total_steps: steps,
                loss: r.loss,
                balance_loss: r.balance_loss,
                lr: r.lr,
                grad_norm: r.grad_norm,
                tokens_per_s: (r.tokens as f64 / dt).round(),
                trained_tokens: i64::try_from(run.trained_tokens()).unwrap_or(i64::MAX),
            },
        );
        if a.eval_every > 0 && r.step % a.eval_every == 0 {
            evaluate(&mut run, &mut progress).map_err(|e| drop_diverged_state(e, &state))?;
            evaluated_at = Some(r.step);
        }
        if a.save_every > 0 && r.step % a.save_every == 0 && r.step < steps {
            run.save(&state, &identity)?;
            progress.event(
                "save",
                contract::Save {
                    step: i64::try_from(r.step).unwrap_or(i64::MAX),
                    dir: state.display().to_string(),
                },
            );
        }
    }
    if evaluated_at != Some(run.step()) {
        evaluate(&mut run, &mut progress).map_err(|e| drop_diverged_state(e, &state))?;
    }
    let seconds = started.elapsed().as_secs_f64();

    let base = BaseModel::new(config, store);
    let mut training = Provenance {
        data: Some(
            a.data_name
                .clone()
                .unwrap_or_else(|| a.data.display().to_string()),
        ),
        steps: Some(steps),
        lr: Some(a.lr),
        seed: Some(a.seed),
        ..Provenance::default()
    };
    if let Some(epochs) = a.epochs {
        training.extra.insert("epochs".into(), epochs.into());
    }
    if let Some(path) = &a.eval_data {
        let name = a
            .eval_data_name
            .clone()
            .unwrap_or_else(|| path.display().to_string());
        training.extra.insert("eval_data".into(), name.into());
    }
    train::write_result(&run, &what, &base, &a.model, &a.out, training)?;
    if state.exists() {
        std::fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
    }
    let best = run.best();
    progress.finish(contract::TrainDone {
        out: a.out.display().to_string(),
        steps: i64::try_from(steps).unwrap_or(i64::MAX),
        trained_tokens: i64::try_from(run.trained_tokens()).unwrap_or(i64::MAX),
        trainable_params: trainable as u64,
        seconds,
        best_eval_loss: best.map(|b| b.0),
        best_step: best.map(|b| b.1),
    });
    eprintln!(
        "wrote {} ({trainable} trainable parameters, {:.1} s{})",
        a.out.display(),
        seconds,
        best.map(|(l, s)| format!(", best eval loss {l:.4} at step {s}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// A run whose loss diverged cannot be resumed to anything else: its saved state goes
/// with it. Returns `e`.
fn drop_diverged_state(e: anyhow::Error, state: &Path) -> anyhow::Error {
    if crate::error::code(&e) == "nan_loss" && state.exists() {
        if let Err(rm) = std::fs::remove_dir_all(state) {
            eprintln!("note: could not remove {}: {rm}", state.display());
        }
    }
    e
}

fn evaluate(run: &mut Run, progress: &mut Progress) -> Result<()> {
    if let Some(loss) = run.eval_loss()? {
        let best = run.note_eval(loss)?;
        progress.event(
            "eval",
            contract::Eval {
                step: run.step(),
                eval_loss: loss,
                best,
            },
        );
    }
    Ok(())
}

fn eval_cmd(a: &EvalArgs) -> Result<()> {
    let opts = a.device.load_options()?;
    let mut loaded = load_model(&a.model, &opts)?;
    let experts = match &a.adapter {
        Some(dir) => Some(esft::adapter::apply_adapter_dir(
            &mut loaded,
            dir,
            opts.matrices(),
        )?),
        None => None,
    };
    let ids = SpecialIds::of(loaded.model.config(), &loaded.tokenizer)?;
    let limit = a.limit.unwrap_or(usize::MAX);
    let summary = match a.metric {
        Metric::ExactMatch => {
            let mut items = data::load_eval(&a.data)?;
            items.truncate(limit);
            let mut progress = Progress::new("eval", items.len() as u64, "items", a.json);
            let preds =
                crate::eval::exact_match(&loaded, experts, &items, a.max_tokens, a.batch, |n| {
                    progress.advance(n as u64, json!({}))
                })?;
            progress.finish(json!({}));
            if let Some(path) = &a.predictions {
                let mut text = String::new();
                for p in &preds {
                    text.push_str(&serde_json::to_string(p)?);
                    text.push('\n');
                }
                esft::util::write_atomic(path, text.as_bytes())?;
            }
            let correct = preds.iter().filter(|p| p.correct).count();
            json!({
                "metric": "exact-match",
                "score": correct as f64 / preds.len().max(1) as f64,
                "correct": correct,
                "total": preds.len(),
            })
        }
        Metric::Loss => {
            let mut samples = match data::load_eval(&a.data) {
                Ok(items) => items
                    .iter()
                    .map(|i| data::eval_as_sample(i, &loaded.tokenizer, ids))
                    .collect::<Result<Vec<_>>>()?,
                Err(_) => data::load_train(&a.data, &loaded.tokenizer, ids, Limits::default())?,
            };
            samples.truncate(limit);
            let refs: Vec<&data::Sample> = samples.iter().collect();
            let loss = train::mean_loss(&loaded.model, experts.as_deref(), &refs, 8192)?;
            json!({"metric": "loss", "score": loss, "total": samples.len()})
        }
    };
    println!("{summary}");
    Ok(())
}

fn plot_cmd(a: &PlotArgs) -> Result<()> {
    let written = crate::plot::plot(&crate::plot::PlotRequest {
        scores: &a.scores,
        configs: &a.configs,
        out: &a.out,
        function: a.score_function,
        top_fraction: a.top_fraction,
    })?;
    for path in written {
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn init_cmd(a: &InitArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", a.config.display()))?;
    let target = config
        .get("vocab_size")
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("{}: `vocab_size` is missing", a.config.display()))?;
    let mut texts = Vec::new();
    for file in crate::init::corpus_files(&a.corpus)? {
        texts.extend(crate::init::corpus_texts(&file)?);
    }
    let summary = crate::init::init_model(config, &texts, target as usize, a.seed, &a.out)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command lines the job runner builds (`esft::jobs::contract`) parse here to
    /// what they say.
    #[test]
    fn the_runners_command_lines_parse_to_what_they_say() {
        use contract::{Batch, Length, ScoreRun, SelectRun, TrainRun};
        let parse = |argv: Vec<std::ffi::OsString>| {
            let mut all = vec![std::ffi::OsString::from("esft-train")];
            all.extend(argv);
            Cli::try_parse_from(all).unwrap().command
        };
        let (model, data, out) = (Path::new("/m"), Path::new("/w/t.jsonl"), Path::new("/w/a"));
        let score = ScoreRun {
            model,
            data,
            tokens: 5000,
            seed: 7,
            out,
        };
        let Command::Score(s) = parse(score.argv()) else {
            panic!("not score")
        };
        assert_eq!(
            (
                s.model.as_deref(),
                s.data.as_deref(),
                s.tokens,
                s.seed,
                s.json
            ),
            (Some(model), Some(data), 5000, 7, true)
        );
        let select = SelectRun {
            scores: data,
            score_function: "gate",
            top_p: 0.25,
            train_shared_experts: true,
            train_non_expert_modules: false,
            out,
        };
        let Command::Select(s) = parse(select.argv()) else {
            panic!("not select")
        };
        assert_eq!(s.score_function, Some(ScoreFunction::Gate));
        assert_eq!(s.top_p, Some(0.25));
        assert!(s.train_shared_experts && !s.train_non_expert_modules && s.json);
        for (eval, batch, length) in [
            (None, Batch::Tokens(512), Length::Epochs(3)),
            (
                Some((Path::new("/w/v.jsonl"), "file-v")),
                Batch::Rows(4),
                Length::Steps(9),
            ),
        ] {
            let train = TrainRun {
                model,
                data,
                data_name: "file-t",
                eval,
                experts: Path::new("/w/experts.json"),
                out,
                lr: 2e-4,
                seed: 11,
                save_every: 5,
                seq_len: if eval.is_some() { Some(256) } else { None },
                batch,
                length,
            };
            let Command::Train(t) = parse(train.argv()) else {
                panic!("not train")
            };
            assert_eq!((t.model.as_path(), t.data.as_path()), (model, data));
            assert_eq!(t.experts, "/w/experts.json");
            assert_eq!((t.lr, t.seed, t.save_every, t.eval_every), (2e-4, 11, 5, 5));
            assert!(t.resume && t.json);
            assert_eq!(t.data_name.as_deref(), Some("file-t"));
            match eval {
                Some((path, name)) => {
                    assert_eq!(t.eval_data.as_deref(), Some(path));
                    assert_eq!(t.eval_data_name.as_deref(), Some(name));
                    assert_eq!(t.seq_len, SeqLen(Some(256)));
                    assert_eq!((t.batch, t.steps, t.epochs), (4, Some(9), None));
                }
                None => {
                    assert_eq!(t.eval_split, Some(contract::EVAL_SPLIT));
                    assert_eq!(t.seq_len, SeqLen(None));
                    assert_eq!((t.batch_tokens, t.epochs), (Some(512), Some(3)));
                }
            }
        }
    }

    #[test]
    fn seq_len_auto_rounds_the_longest_sample_up_to_64_within_the_context() {
        assert_eq!(parse_seq_len("auto"), Ok(SeqLen(None)));
        assert_eq!(parse_seq_len("256"), Ok(SeqLen(Some(256))));
        assert!(parse_seq_len("0").is_err() && parse_seq_len("long").is_err());
        assert_eq!(auto_seq_len(1, 4096), 64);
        assert_eq!(auto_seq_len(64, 4096), 64);
        assert_eq!(auto_seq_len(65, 4096), 128);
        assert_eq!(auto_seq_len(5000, 4096), 4096);
        assert_eq!(auto_seq_len(0, 4096), 64);
    }
}
