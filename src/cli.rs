//! `esft-serve` command line: argument types and the `generate` command.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

use crate::engine::{generate_all, SamplingParams, Sequence};
use crate::model::tokenizer::ChatMessage;
use crate::model::{LoadOptions, LoadedModel};

#[derive(Parser, Debug)]
#[command(
    name = "esft-serve",
    version,
    about = "Serve fine-grained MoE models (DeepSeek-V2/V3, Qwen3-MoE, OLMoE) with per-request \
             ESFT expert adapters"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a completion for one prompt and print it.
    Generate(Box<GenerateArgs>),
    /// Serve the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Read an API key on standard input and print its SHA-256 (for the config file).
    HashKey,
    /// Run fine-tuning jobs from the shared records database without serving (a training
    /// worker; see `[fine_tuning]` and `[store]` in the config file).
    Worker(WorkerArgs),
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The TOML config file the replicas use (`[fine_tuning]` database and data_dir,
    /// `[store]`, `model`, `adapters`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Hugging Face model directory (overrides `model` in the config file).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Adapters directory (overrides `adapters`).
    #[arg(long)]
    pub adapters: Option<PathBuf>,
    /// Jobs trained at once (default: `fine_tuning.max_concurrent_jobs`, at least 1).
    #[arg(long)]
    pub jobs: Option<usize>,
}

pub fn worker(args: &WorkerArgs) -> Result<()> {
    use crate::server::config::{Overrides, ServerConfig};
    let config = ServerConfig::load(
        args.config.as_deref(),
        &Overrides {
            model: args.model.clone(),
            adapters: args.adapters.clone(),
            host: None,
            port: None,
        },
    )
    .map_err(anyhow::Error::msg)?;
    let jobs = args
        .jobs
        .unwrap_or(config.fine_tuning.max_concurrent_jobs)
        .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("esft-worker")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(crate::server::worker::run(config, jobs))
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Hugging Face model directory (overrides `model` in the config file).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Adapters directory (default `adapters/`).
    #[arg(long)]
    pub adapters: Option<PathBuf>,
    /// A TOML config file (see config/default.toml); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on (default 8080; 0 picks a free one).
    #[arg(long)]
    pub port: Option<u16>,
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    use crate::server::config::{Overrides, ServerConfig};
    let config = ServerConfig::load(
        args.config.as_deref(),
        &Overrides {
            model: args.model.clone(),
            adapters: args.adapters.clone(),
            host: args.host.clone(),
            port: args.port,
        },
    )
    .map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("esft-http")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(crate::server::run(config))
}

pub fn hash_key() -> Result<()> {
    let mut key = String::new();
    std::io::stdin()
        .read_line(&mut key)
        .context("reading the key from standard input")?;
    let key = key.trim_end_matches(['\n', '\r']);
    if key.is_empty() {
        bail!("no key on standard input");
    }
    println!("{}", crate::server::auth::hash_key(key));
    Ok(())
}

/// Where the model runs and in which dtype.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Compute device: `cpu` or `cuda[:N]` (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, f16 or bf16 (weights are converted at load).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// The dtype the weight matrices stay in: bf16 or f16 under f32 compute on the CPU
    /// (half the memory and faster decoding; the products are still f32). Default: the
    /// compute dtype.
    #[arg(long)]
    pub weight_dtype: Option<String>,
}

impl DeviceArgs {
    pub fn load_options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions::named(
            &self.device,
            &self.dtype,
            self.weight_dtype.as_deref(),
        )?)
    }
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_ids", "chat"]))]
pub struct GenerateArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long, default_value = crate::server::config::DEMO_MODEL)]
    pub model: PathBuf,
    /// Prompt text, tokenized as the tokenizer says (BOS added).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Comma-separated token ids, used verbatim (no BOS added).
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    pub chat: Option<String>,
    /// An optional system message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Stop string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Stop token id (repeatable).
    #[arg(long)]
    pub stop_token_id: Vec<u32>,
    /// Keep generating after EOS.
    #[arg(long)]
    pub ignore_eos: bool,
    /// An adapter directory (ours or the ESFT reference layout) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Print one JSON line: {"prompt_ids", "new_ids", "text"}.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl GenerateArgs {
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            max_tokens: self.max_tokens,
            stop_token_ids: self.stop_token_id.clone(),
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: None,
        }
    }
}

pub fn generate(args: &GenerateArgs) -> Result<()> {
    let params = args.sampling();
    if let Err((name, msg)) = params.validate() {
        bail!("--{}: {msg}", name.replace('_', "-"));
    }
    let opts = args.device.load_options()?;
    let mut loaded = LoadedModel::load(&args.model, &opts)?;
    let experts = match &args.adapter {
        Some(dir) => Some(crate::adapter::apply_adapter_dir(
            &mut loaded,
            dir,
            opts.matrices(),
        )?),
        None => None,
    };
    let tok = &loaded.tokenizer;
    let prompt_ids = if let Some(ids) = &args.prompt_ids {
        ids.clone()
    } else if let Some(text) = &args.prompt {
        tok.encode(text, true)?
    } else if let Some(user) = &args.chat {
        let mut messages = Vec::new();
        if let Some(sys) = &args.system {
            messages.push(ChatMessage::new("system", sys));
        }
        messages.push(ChatMessage::new("user", user));
        tok.encode_chat(&messages, true)?
    } else {
        bail!("one of --prompt, --prompt-ids or --chat is required");
    };
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    let vocab = loaded.model.config().vocab_size;
    if let Some(bad) = prompt_ids.iter().find(|&&t| t as usize >= vocab) {
        bail!("--prompt-ids: token id {bad} is out of range (vocab size {vocab})");
    }
    let max_len = loaded.max_context();
    if prompt_ids.len() >= max_len {
        bail!(
            "the prompt has {} tokens; the model's context is {max_len}",
            prompt_ids.len()
        );
    }
    let mut seqs = [Sequence::new(
        prompt_ids.clone(),
        params,
        loaded.model.new_cache(),
        loaded.eos_ids(),
        max_len,
    )];
    seqs[0].experts = experts;
    generate_all(&loaded.model, Some(tok), &mut seqs, 512)?;
    let seq = &seqs[0];
    if args.json {
        let line = serde_json::json!({
            "prompt_ids": prompt_ids,
            "new_ids": seq.generated(),
            "text": seq.text(),
        });
        println!("{line}");
    } else {
        println!("{}", seq.text());
    }
    Ok(())
}
