//! Training: the selected weights become trainable [`Var`]s, everything else stays a frozen
//! tensor that never enters the optimizer. Samples are packed into micro-batches of up to
//! `batch x seq_len` tokens (each sample its own sequence in the ragged batch, so nothing is
//! padded and no sample attends to another), the loss is the mean cross-entropy over target
//! tokens of a whole optimizer step, and AdamW updates the trainable weights.
//!
//! A run can be saved (weights, optimizer moments, data position, best eval checkpoint) and
//! resumed to give exactly what an uninterrupted run gives.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

use esft::adapter::format::{new_manifest, write_adapter, BaseModel, Provenance};
use esft::adapter::ExpertConfig;
use esft::model::{Decoder, ExpertMap, LogitsWanted, SeqInput, TrainableWeight, WeightKind};

use crate::data::Sample;
use crate::error::Failure;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, Moments};

/// What to train.
#[derive(Debug, Clone, PartialEq)]
pub enum Trainable {
    /// ESFT: the listed routed experts, plus shared experts / non-expert modules if set.
    Experts(ExpertConfig),
    /// Every weight (full-parameter fine-tuning).
    All,
}

impl Trainable {
    pub fn picks(&self, kind: &WeightKind) -> bool {
        match self {
            Trainable::All => true,
            Trainable::Experts(cfg) => match *kind {
                WeightKind::RoutedExpert { layer, expert } => cfg
                    .experts
                    .get(&layer)
                    .is_some_and(|list| list.contains(&expert)),
                WeightKind::SharedExperts { .. } => cfg.shared_experts,
                WeightKind::Other => cfg.non_expert_modules,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// Hyper-parameters of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub steps: u64,
    pub lr: f64,
    /// Sequences of `seq_len` tokens per micro-batch (the token budget is their product).
    pub batch: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub warmup: u64,
    pub schedule: Schedule,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub eval_split: f64,
    /// Weight of DeepSeek's sequence-level load-balancing loss (0 = off).
    #[serde(default)]
    pub aux_loss_alpha: f64,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let pos = |v: usize, name: &str| {
            if v == 0 {
                bail!("--{name} must be at least 1");
            }
            Ok(())
        };
        pos(self.steps as usize, "steps")?;
        pos(self.batch, "batch")?;
        pos(self.grad_accum, "grad-accum")?;
        pos(self.seq_len, "seq-len")?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a positive number");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            bail!("--betas must both be in [0, 1)");
        }
        if !(0.0..0.5).contains(&self.eval_split) {
            bail!("--eval-split must be in [0, 0.5)");
        }
        if !(self.weight_decay >= 0.0 && self.max_grad_norm >= 0.0) {
            bail!("--weight-decay and --max-grad-norm must be >= 0");
        }
        if !(self.aux_loss_alpha.is_finite() && self.aux_loss_alpha >= 0.0) {
            bail!("--aux-loss-alpha must be >= 0");
        }
        Ok(())
    }

    /// The learning rate of update `step` (0-based): linear warmup, then the schedule.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let done = (step - self.warmup) as f64 / span;
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Linear => self.lr * (1.0 - done).max(0.0),
            Schedule::Cosine => {
                self.lr * 0.5 * (1.0 + (std::f64::consts::PI * done.min(1.0)).cos())
            }
        }
    }

    fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: 1e-8,
            weight_decay: self.weight_decay,
        }
    }
}

/// Splits samples into (train, eval): a seeded shuffle, the first `frac` (at least one
/// when `frac > 0` and there are two or more samples) held out.
pub fn split_eval(mut samples: Vec<Sample>, frac: f64, seed: u64) -> (Vec<Sample>, Vec<Sample>) {
    if frac <= 0.0 || samples.len() < 2 {
        return (samples, Vec::new());
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_e7a1);
    samples.shuffle(&mut rng);
    let n_eval = ((samples.len() as f64 * frac).ceil() as usize).clamp(1, samples.len() - 1);
    let train = samples.split_off(n_eval);
    (train, samples)
}

/// What one forward over a group of samples gives the loss.
pub struct GroupLoss {
    /// Sum of the target tokens' negative log-likelihoods.
    pub nll: Tensor,
    /// Number of target tokens.
    pub targets: usize,
    /// The load-balancing loss, when the model computes one (see
    /// [`Decoder::set_balance_alpha`]).
    pub balance: Option<Tensor>,
}

/// The loss terms of `group` (one forward). With `for_backward` false (evaluation) the
/// loss node skips the gradient products it would otherwise make in its forward.
pub fn group_loss(
    model: &Decoder,
    experts: Option<&ExpertMap>,
    group: &[&Sample],
    for_backward: bool,
) -> Result<GroupLoss> {
    let positions: Vec<Vec<u32>> = group
        .iter()
        .map(|s| s.targets().map(|(p, _)| p as u32).collect())
        .collect();
    let targets: Vec<u32> = group
        .iter()
        .flat_map(|s| s.targets().map(|t| t.1))
        .collect();
    if targets.is_empty() {
        bail!("the batch has no target tokens");
    }
    let mut caches: Vec<_> = group.iter().map(|_| model.new_cache()).collect();
    let mut batch: Vec<SeqInput<'_>> = group
        .iter()
        .zip(caches.iter_mut())
        .zip(&positions)
        .filter(|((s, _), _)| s.len() > 1)
        .map(|((s, cache), pos)| SeqInput {
            // The last token predicts nothing.
            tokens: &s.tokens[..s.len() - 1],
            cache,
            experts,
            logits: LogitsWanted::Positions(pos),
        })
        .collect();
    let out = model.forward_hidden(&mut batch, None)?;
    let mut hidden = out.hidden.context("the forward returned no hidden rows")?;
    // A head kept in bf16 or f16 (frozen) joins the loss in the compute dtype.
    let mut head = model.lm_head().to_dtype(hidden.dtype())?;
    if !for_backward {
        (hidden, head) = (hidden.detach(), head.detach());
    }
    let n = targets.len();
    Ok(GroupLoss {
        nll: crate::loss::head_nll_sum(&hidden, &head, targets)?,
        targets: n,
        balance: out.balance_loss,
    })
}

/// Where a run is in its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct DataCursor {
    epoch: u64,
    next: usize,
}

/// The order samples are trained in and their packing: every epoch a seeded shuffle of all
/// of them, cut in order into micro-batches of at most `budget` tokens (at least one sample
/// each; no micro-batch spans two epochs).
#[derive(Debug, Clone)]
struct Feed {
    seed: u64,
    budget: usize,
    cursor: DataCursor,
    order: Vec<usize>,
}

impl Feed {
    /// The feed of `n` samples at `cursor`.
    fn new(cfg: &TrainConfig, n: usize, cursor: DataCursor) -> Self {
        let mut feed = Self {
            seed: cfg.seed,
            budget: cfg.batch * cfg.seq_len,
            cursor,
            order: Vec::new(),
        };
        feed.shuffle(n);
        feed
    }

    fn shuffle(&mut self, n: usize) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed
                .wrapping_add(self.cursor.epoch.wrapping_mul(0x9e37_79b9)),
        );
        self.order = (0..n).collect();
        self.order.shuffle(&mut rng);
    }

    /// The next micro-batch: samples in epoch order while they fit the token budget (at
    /// least one). `len` gives a sample's tokens.
    fn next_micro(&mut self, len: impl Fn(usize) -> usize) -> Vec<usize> {
        let mut group = Vec::new();
        let mut tokens = 0;
        loop {
            if self.cursor.next == self.order.len() {
                if !group.is_empty() {
                    break;
                }
                self.cursor = DataCursor {
                    epoch: self.cursor.epoch + 1,
                    next: 0,
                };
                self.shuffle(self.order.len());
            }
            let i = self.order[self.cursor.next];
            let l = len(i);
            if !group.is_empty() && tokens + l > self.budget {
                break;
            }
            group.push(i);
            tokens += l;
            self.cursor.next += 1;
        }
        group
    }
}

/// The optimizer steps of `epochs` passes over `train` with `cfg`'s packing (its `batch`,
/// `seq_len`, `grad_accum` and `seed`; `cfg.steps` is not read): every micro-batch of the
/// epochs, in steps of `grad_accum`, the last one rounded up.
pub fn steps_for_epochs(train: &[Sample], epochs: u64, cfg: &TrainConfig) -> u64 {
    if train.is_empty() || epochs == 0 {
        return 0;
    }
    let mut feed = Feed::new(cfg, train.len(), DataCursor { epoch: 0, next: 0 });
    let mut micro = 0u64;
    while feed.cursor.epoch < epochs - 1 || feed.cursor.next < train.len() {
        feed.next_micro(|i| train[i].len());
        micro += 1;
    }
    micro.div_ceil(cfg.grad_accum.max(1) as u64)
}

/// Tokens of the samples in the first `steps` optimizer steps of a run over `train`.
fn tokens_of_steps(train: &[Sample], steps: u64, cfg: &TrainConfig) -> u64 {
    let mut feed = Feed::new(cfg, train.len(), DataCursor { epoch: 0, next: 0 });
    let mut tokens = 0;
    for _ in 0..steps * cfg.grad_accum as u64 {
        for i in feed.next_micro(|i| train[i].len()) {
            tokens += train[i].len() as u64;
        }
    }
    tokens
}

/// The best eval checkpoint so far.
struct Best {
    loss: f64,
    step: u64,
    values: Vec<Tensor>,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub step: u64,
    /// Mean target-token cross-entropy.
    pub loss: f64,
    /// The load-balancing loss (0 when off).
    pub balance_loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub targets: usize,
}

pub struct Run {
    pub model: Decoder,
    pub weights: Vec<TrainableWeight>,
    opt: AdamW,
    cfg: TrainConfig,
    train: Vec<Sample>,
    eval: Vec<Sample>,
    feed: Feed,
    /// Tokens of the samples trained on so far, every step's summed.
    trained_tokens: u64,
    best: Option<Best>,
}

impl Run {
    /// Prepares a run: makes the picked weights trainable (the model must compute in f32 or
    /// f64; its frozen matrices may be kept in bf16 or f16, on any device).
    pub fn new(
        mut model: Decoder,
        what: &Trainable,
        train: Vec<Sample>,
        eval: Vec<Sample>,
        cfg: TrainConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        if !matches!(model.dtype(), DType::F32 | DType::F64) {
            bail!(
                "training needs f32 (or f64) compute, got {:?}",
                model.dtype()
            );
        }
        if train.is_empty() {
            bail!("no training samples");
        }
        if let Trainable::Experts(ec) = what {
            ec.validate(model.config()).map_err(anyhow::Error::msg)?;
        }
        let weights = model.make_trainable(|k| what.picks(k))?;
        model.set_balance_alpha(cfg.aux_loss_alpha);
        if weights.is_empty() {
            bail!("the expert config selects nothing to train");
        }
        let vars: Vec<&Var> = weights.iter().map(|w| &w.var).collect();
        let opt = AdamW::new(cfg.adamw(), &vars);
        let feed = Feed::new(&cfg, train.len(), DataCursor { epoch: 0, next: 0 });
        Ok(Self {
            model,
            weights,
            opt,
            cfg,
            train,
            eval,
            feed,
            trained_tokens: 0,
            best: None,
        })
    }

    pub fn step(&self) -> u64 {
        self.opt.step
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    pub fn has_eval(&self) -> bool {
        !self.eval.is_empty()
    }

    pub fn trainable_params(&self) -> usize {
        self.weights.iter().map(|w| w.var.elem_count()).sum()
    }

    /// Tokens of the samples trained on so far (prompts included), summed over the steps.
    pub fn trained_tokens(&self) -> u64 {
        self.trained_tokens
    }

    /// One optimizer step over `grad_accum` micro-batches.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let train = &self.train;
        let micro: Vec<Vec<usize>> = (0..self.cfg.grad_accum)
            .map(|_| self.feed.next_micro(|i| train[i].len()))
            .collect();
        let targets: usize = micro
            .iter()
            .flatten()
            .map(|&i| self.train[i].target_count())
            .sum();
        let tokens: usize = micro.iter().flatten().map(|&i| self.train[i].len()).sum();
        let mut grads: Vec<Option<Tensor>> = vec![None; self.weights.len()];
        let mut nll_total = 0.0;
        let mut balance_total = 0.0;
        for group in &micro {
            let samples: Vec<&Sample> = group.iter().map(|&i| &self.train[i]).collect();
            let l = group_loss(&self.model, None, &samples, true)?;
            nll_total += l.nll.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let mut objective = (l.nll / targets as f64)?;
            if let Some(b) = l.balance {
                // The balance loss is a per-micro-batch mean: average it over the step.
                let b = (b / micro.len() as f64)?;
                balance_total += b.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                objective = (objective + b)?;
            }
            let store = objective.backward()?;
            for (acc, w) in grads.iter_mut().zip(&self.weights) {
                if let Some(g) = store.get(w.var.as_tensor()) {
                    *acc = Some(match acc.take() {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        let loss = nll_total / targets as f64;
        // Nothing is updated with a diverged loss or gradient: the run stops here.
        let failed = |quantity, value| Failure::NonFinite {
            quantity,
            value,
            step: self.opt.step + 1,
        };
        if !loss.is_finite() {
            return Err(failed("loss", loss).into());
        }
        if !balance_total.is_finite() {
            return Err(failed("load-balancing loss", balance_total).into());
        }
        let grad_norm = clip_grad_norm(&mut grads, self.cfg.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(failed("gradient norm", grad_norm).into());
        }
        let step = self.opt.step;
        let lr = self.cfg.lr_at(step);
        let vars: Vec<&Var> = self.weights.iter().map(|w| &w.var).collect();
        self.opt.update(&vars, &grads, lr)?;
        self.model.refresh_derived()?;
        self.trained_tokens += tokens as u64;
        Ok(StepReport {
            step: self.opt.step,
            loss,
            balance_loss: balance_total,
            lr,
            grad_norm,
            tokens,
            targets,
        })
    }

    /// Mean target-token loss over the eval split (no gradients, fast kernels).
    pub fn eval_loss(&mut self) -> Result<Option<f64>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let refs: Vec<&Sample> = self.eval.iter().collect();
        self.model.set_differentiable(false);
        let loss = mean_loss(&self.model, None, &refs, self.cfg.batch * self.cfg.seq_len);
        self.model.set_differentiable(true);
        let loss = loss?;
        if !loss.is_finite() {
            return Err(Failure::NonFinite {
                quantity: "eval loss",
                value: loss,
                step: self.opt.step,
            }
            .into());
        }
        Ok(Some(loss))
    }

    /// Records `loss` as the eval loss of the current weights; keeps a copy of them if it is
    /// the best so far. Returns whether it was.
    pub fn note_eval(&mut self, loss: f64) -> Result<bool> {
        if self.best.as_ref().is_some_and(|b| b.loss <= loss) {
            return Ok(false);
        }
        self.best = Some(Best {
            loss,
            step: self.opt.step,
            values: self
                .weights
                .iter()
                .map(|w| w.var.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
        });
        Ok(true)
    }

    pub fn best(&self) -> Option<(f64, u64)> {
        self.best.as_ref().map(|b| (b.loss, b.step))
    }

    /// The result under checkpoint names (fused weights split): the best eval checkpoint if
    /// there is one, else the current weights.
    pub fn result_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, w) in self.weights.iter().enumerate() {
            let t = match &self.best {
                Some(b) => b.values[i].clone(),
                None => w.var.as_tensor().detach(),
            };
            out.extend(esft::model::decoder::split_fused(&w.name, &t)?);
        }
        Ok(out)
    }
}

/// Writes the run's result to `out` atomically: an adapter for ESFT (named after `out`),
/// a full checkpoint of `model_dir` with every weight replaced for [`Trainable::All`].
pub fn write_result(
    run: &Run,
    what: &Trainable,
    base: &BaseModel,
    model_dir: &Path,
    out: &Path,
    mut training: Provenance,
) -> Result<()> {
    let tensors = run.result_tensors()?;
    match what {
        Trainable::Experts(ec) => {
            let name = out
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("{}: the output needs a directory name", out.display()))?;
            let names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
            if let Some((loss, step)) = run.best() {
                training.extra.insert("best_eval_loss".into(), loss.into());
                training.extra.insert("best_step".into(), step.into());
            }
            training
                .extra
                .insert("trainable_params".into(), run.trainable_params().into());
            let manifest = new_manifest(name, base, ec.clone(), training, &names)?;
            write_adapter(out, &manifest, &tensors)
                .with_context(|| format!("writing {}", out.display()))?;
        }
        Trainable::All => {
            let replaced = tensors.into_iter().collect();
            esft::adapter::merge::write_checkpoint(model_dir, base, &replaced, out)
                .with_context(|| format!("writing {}", out.display()))?;
        }
    }
    Ok(())
}

/// Mean target-token loss of `samples`, forwarded in groups of about `batch_tokens`.
pub fn mean_loss(
    model: &Decoder,
    experts: Option<&ExpertMap>,
    samples: &[&Sample],
    batch_tokens: usize,
) -> Result<f64> {
    let (mut sum, mut count) = (0.0, 0usize);
    let lens: Vec<usize> = samples.iter().map(|s| s.len()).collect();
    for range in crate::data::token_groups(&lens, batch_tokens) {
        let l = group_loss(model, experts, &samples[range], false)?;
        sum += l.nll.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        count += l.targets;
    }
    Ok(sum / count.max(1) as f64)
}

// ---- saving and resuming -------------------------------------------------------------

const STATE_FILE: &str = "state.json";
const WEIGHTS_FILE: &str = "weights.safetensors";
const MOMENTS_FILE: &str = "moments.safetensors";
const BEST_FILE: &str = "best.safetensors";

#[derive(Debug, Serialize, Deserialize)]
struct SavedState {
    /// What must match for a resume to continue the same run.
    identity: serde_json::Value,
    step: u64,
    cursor: DataCursor,
    best: Option<(f64, u64)>,
    /// [`Run::trained_tokens`] (recomputed for a state saved without it).
    #[serde(default)]
    trained_tokens: Option<u64>,
}

impl Run {
    /// Saves everything a resume needs into `dir`, atomically (a crash mid-save leaves the
    /// previous save intact). `identity` describes the run (base, data, settings).
    pub fn save(&self, dir: &Path, identity: &serde_json::Value) -> Result<()> {
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)?;
        let tmp = tempfile::Builder::new()
            .prefix(".train-state-")
            .tempdir_in(parent)?;
        let dev = candle_core::Device::Cpu;
        let mut weights = HashMap::new();
        let mut moments = HashMap::new();
        for (w, m) in self.weights.iter().zip(&self.opt.moments) {
            weights.insert(w.name.clone(), w.var.as_tensor().detach());
            let shape = w.var.shape().clone();
            moments.insert(
                format!("{}.m", w.name),
                Tensor::from_slice(&m.m, &shape, &dev)?,
            );
            moments.insert(
                format!("{}.v", w.name),
                Tensor::from_slice(&m.v, &shape, &dev)?,
            );
        }
        candle_core::safetensors::save(&weights, tmp.path().join(WEIGHTS_FILE))?;
        candle_core::safetensors::save(&moments, tmp.path().join(MOMENTS_FILE))?;
        if let Some(b) = &self.best {
            let best: HashMap<String, Tensor> = self
                .weights
                .iter()
                .zip(&b.values)
                .map(|(w, t)| (w.name.clone(), t.clone()))
                .collect();
            candle_core::safetensors::save(&best, tmp.path().join(BEST_FILE))?;
        }
        let state = SavedState {
            identity: identity.clone(),
            step: self.opt.step,
            cursor: self.feed.cursor,
            best: self.best(),
            trained_tokens: Some(self.trained_tokens),
        };
        std::fs::write(
            tmp.path().join(STATE_FILE),
            serde_json::to_vec_pretty(&state)?,
        )?;
        for entry in std::fs::read_dir(tmp.path())? {
            std::fs::File::open(entry?.path())?.sync_all()?;
        }
        esft::util::replace_dir(tmp.keep(), dir)?;
        Ok(())
    }

    /// Restores a save made by [`Run::save`] of the same run (same `identity`).
    pub fn restore(&mut self, dir: &Path, identity: &serde_json::Value) -> Result<()> {
        let text = std::fs::read_to_string(dir.join(STATE_FILE))
            .with_context(|| format!("reading {}", dir.join(STATE_FILE).display()))?;
        let state: SavedState = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a saved training state", dir.display()))?;
        if &state.identity != identity {
            bail!(
                "the saved run in {} was made with different settings: {}",
                dir.display(),
                differences(&state.identity, identity).join(", ")
            );
        }
        let dev = candle_core::Device::Cpu;
        let weights = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &dev)?;
        let moments = candle_core::safetensors::load(dir.join(MOMENTS_FILE), &dev)?;
        let get = |map: &HashMap<String, Tensor>, name: &str, shape: &candle_core::Shape| {
            let t = map
                .get(name)
                .with_context(|| format!("the saved state lacks {name}"))?;
            if t.shape() != shape {
                bail!(
                    "the saved {name} has shape {:?}, expected {shape:?}",
                    t.shape()
                );
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        let mut restored_moments = Vec::with_capacity(self.weights.len());
        for w in &self.weights {
            let shape = w.var.shape().clone();
            w.var
                .set(&get(&weights, &w.name, &shape)?.to_dtype(w.var.dtype())?)?;
            let flat = |n: String| -> Result<Vec<f32>> {
                Ok(get(&moments, &n, &shape)?.flatten_all()?.to_vec1::<f32>()?)
            };
            restored_moments.push(Moments {
                m: flat(format!("{}.m", w.name))?,
                v: flat(format!("{}.v", w.name))?,
            });
        }
        self.opt.moments = restored_moments;
        self.opt.step = state.step;
        self.best = match state.best {
            Some((loss, step)) => {
                let best = candle_core::safetensors::load(dir.join(BEST_FILE), &dev)?;
                let values = self
                    .weights
                    .iter()
                    .map(|w| Ok(get(&best, &w.name, w.var.shape())?.to_dtype(w.var.dtype())?))
                    .collect::<Result<_>>()?;
                Some(Best { loss, step, values })
            }
            None => None,
        };
        self.feed = Feed::new(&self.cfg, self.train.len(), state.cursor);
        self.trained_tokens = state
            .trained_tokens
            .unwrap_or_else(|| tokens_of_steps(&self.train, state.step, &self.cfg));
        self.model.refresh_derived()?;
        Ok(())
    }
}

/// Top-level keys whose values differ.
fn differences(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return vec!["(unreadable)".into()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k} was {} now {}",
                a.get(k).unwrap_or(&serde_json::Value::Null),
                b.get(k).unwrap_or(&serde_json::Value::Null)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(schedule: Schedule) -> TrainConfig {
        TrainConfig {
            steps: 10,
            lr: 1.0,
            batch: 1,
            grad_accum: 1,
            seq_len: 8,
            warmup: 2,
            schedule,
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.1,
            max_grad_norm: 1.0,
            seed: 0,
            eval_split: 0.0,
            aux_loss_alpha: 0.0,
        }
    }

    #[test]
    fn learning_rate_schedules() {
        let c = cfg(Schedule::Linear);
        assert_eq!(c.lr_at(0), 0.5);
        assert_eq!(c.lr_at(1), 1.0);
        assert_eq!(c.lr_at(2), 1.0);
        assert!((c.lr_at(6) - 0.5).abs() < 1e-12);
        assert_eq!(cfg(Schedule::Constant).lr_at(9), 1.0);
        let cos = cfg(Schedule::Cosine);
        assert!((cos.lr_at(6) - 0.5).abs() < 1e-12);
        assert!(cos.lr_at(9) < 0.05);
    }

    #[test]
    fn epochs_become_steps_that_see_every_sample_that_often() {
        // Lengths 2..=9 over a budget of 16 tokens: micro-batches of one to several samples.
        let train: Vec<Sample> = (0..37)
            .map(|i| Sample {
                line: i + 1,
                tokens: vec![0; 2 + i % 8],
                trained: vec![true; 2 + i % 8],
            })
            .collect();
        let total: u64 = train.iter().map(|s| s.len() as u64).sum();
        for (grad_accum, epochs) in [(1, 1), (1, 3), (2, 2), (3, 1), (4, 5)] {
            let c = TrainConfig {
                batch: 2,
                grad_accum,
                ..cfg(Schedule::Linear)
            };
            let steps = steps_for_epochs(&train, epochs, &c);
            let ga = grad_accum as u64;
            // How often each sample is trained on in the first `steps` steps.
            let seen = |steps: u64| {
                let mut feed = Feed::new(&c, train.len(), DataCursor { epoch: 0, next: 0 });
                let mut seen = vec![0u64; train.len()];
                for _ in 0..steps * ga {
                    for i in feed.next_micro(|i| train[i].len()) {
                        seen[i] += 1;
                    }
                }
                seen
            };
            let all = seen(steps);
            assert!(all.iter().all(|&n| n >= epochs), "{all:?}");
            if grad_accum == 1 {
                assert!(all.iter().all(|&n| n == epochs), "{all:?}");
                assert_eq!(tokens_of_steps(&train, steps, &c), epochs * total);
            } else {
                // Rounding up to whole steps adds less than a step of the next epoch.
                let extra: u64 = all.iter().map(|&n| n - epochs).sum();
                assert!(extra < ga * 8, "{extra}");
            }
            // One step fewer misses a sample.
            assert!(
                seen(steps - 1).iter().any(|&n| n < epochs),
                "accum {grad_accum}, {epochs} epochs: {steps} steps are more than needed"
            );
        }
        assert_eq!(steps_for_epochs(&train[..1], 2, &cfg(Schedule::Linear)), 2);
    }

    #[test]
    fn eval_split_is_seeded_and_disjoint() {
        let samples: Vec<Sample> = (0..10)
            .map(|i| Sample {
                line: i + 1,
                tokens: vec![0, 1],
                trained: vec![false, true],
            })
            .collect();
        let (t, e) = split_eval(samples.clone(), 0.2, 3);
        assert_eq!((t.len(), e.len()), (8, 2));
        let (t2, e2) = split_eval(samples.clone(), 0.2, 3);
        assert_eq!((t, e), (t2, e2));
        let (t, e) = split_eval(samples.clone(), 0.0, 3);
        assert_eq!((t.len(), e.len()), (10, 0));
        let (_, e) = split_eval(samples, 0.01, 3);
        assert_eq!(e.len(), 1);
    }
}
