//! Random checkpoints of any supported architecture in Hugging Face layout: `config.json` plus one
//! `model.safetensors` holding every tensor the loader expects, under the hub names.
//!
//! Used by the benchmark and by the trainer's `init` command. Weights are stored in the
//! config's `torch_dtype` (`float32` when absent, `bfloat16` or `float16`, each value the
//! f32 draw rounded to nearest) and fully determined by the seed: linear weights and embeddings are normal with std 0.02 (the
//! DeepSeek `initializer_range`), norm weights are 1. Each tensor draws from its own ChaCha8
//! stream, chosen by a stable hash of its name, so a tensor's values depend only on the seed,
//! its name and its shape. Tensors are generated one at a time while the file is written.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, View};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

use super::config::{AttentionConfig, Config, QkNorm, ScoringFunc};
// DeepSeek-V3's router bias is stored in float32 whatever the checkpoint's dtype (as
// published).
use super::error::{ModelError, Result};
use super::moe::SELECTION_BIAS;

/// Standard deviation of linear and embedding weights.
const INIT_STD: f32 = 0.02;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Fill {
    /// Normal with this standard deviation.
    Normal(f32),
    /// Every element this value.
    Const(f32),
}

impl Fill {
    /// A tensor of this fill drawn directly on `device` by its own generator (not
    /// reproducible from a seed, unlike the files this module writes): a full-size model
    /// for a benchmark without a checkpoint file the size of it.
    pub(crate) fn draw(
        self,
        shape: &[usize],
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        use candle_core::Tensor;
        match self {
            Fill::Const(v) => Tensor::full(v, shape, device)?.to_dtype(dtype),
            Fill::Normal(std) => Tensor::randn(0f32, std, shape, device)?.to_dtype(dtype),
        }
    }
}

/// A tensor whose bytes are generated only when the writer asks for them.
struct LazyTensor {
    shape: Vec<usize>,
    fill: Fill,
    seed: u64,
    stream: u64,
    dtype: Dtype,
}

impl LazyTensor {
    fn elems(&self) -> usize {
        self.shape.iter().product()
    }
}

impl View for LazyTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let n = self.elems();
        let mut bytes = Vec::with_capacity(self.data_len());
        let dtype = self.dtype;
        let mut put = |v: f32| match dtype {
            Dtype::BF16 => bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            Dtype::F16 => bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            _ => bytes.extend_from_slice(&v.to_le_bytes()),
        };
        match self.fill {
            Fill::Const(v) => {
                for _ in 0..n {
                    put(v);
                }
            }
            Fill::Normal(std) => {
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
                rng.set_stream(self.stream);
                let mut written = 0;
                while written < n {
                    let (a, b) = box_muller(&mut rng);
                    for z in [a, b].into_iter().take(n - written) {
                        put(z * std);
                        written += 1;
                    }
                }
            }
        }
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.elems() * self.dtype.bitsize() / 8
    }
}

/// Two independent standard normal samples from two uniforms (Box-Muller).
fn box_muller(rng: &mut ChaCha8Rng) -> (f32, f32) {
    // u1 in (0, 1] so that ln(u1) is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    let r = (-2.0 * u1.ln()).sqrt();
    let theta = 2.0 * std::f64::consts::PI * u2;
    ((r * theta.cos()) as f32, (r * theta.sin()) as f32)
}

/// FNV-1a: a hash that, unlike `DefaultHasher`, is stable across Rust releases.
fn stable_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The tensors of a checkpoint: name, shape and fill, in the order they are listed.
#[derive(Default)]
struct Plan {
    tensors: Vec<(String, Vec<usize>, Fill)>,
}

impl Plan {
    fn push(&mut self, name: String, shape: &[usize], fill: Fill) {
        self.tensors.push((name, shape.to_vec(), fill));
    }

    fn linear(&mut self, name: String, out_features: usize, in_features: usize) {
        self.push(name, &[out_features, in_features], Fill::Normal(INIT_STD));
    }

    fn norm(&mut self, name: String, size: usize) {
        self.push(name, &[size], Fill::Const(1.0));
    }

    /// A SwiGLU block `{prefix}{gate,up,down}_proj.weight`.
    fn mlp(&mut self, prefix: &str, hidden: usize, inter: usize) {
        self.linear(format!("{prefix}gate_proj.weight"), inter, hidden);
        self.linear(format!("{prefix}up_proj.weight"), inter, hidden);
        self.linear(format!("{prefix}down_proj.weight"), hidden, inter);
    }
}

/// Every tensor of a checkpoint with this config, under the names and with the shapes
/// [`super::Decoder::load`] expects.
pub(crate) fn checkpoint_tensors(cfg: &Config) -> Vec<(String, Vec<usize>, Fill)> {
    let h = cfg.hidden_size;
    let nh = cfg.num_attention_heads;
    let mut plan = Plan::default();
    plan.linear("model.embed_tokens.weight".into(), cfg.vocab_size, h);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}.");
        plan.norm(format!("{p}input_layernorm.weight"), h);
        plan.norm(format!("{p}post_attention_layernorm.weight"), h);
        let a = format!("{p}self_attn.");
        match &cfg.attention {
            AttentionConfig::Mla(m) => {
                let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
                let kvr = m.kv_lora_rank;
                match m.q_lora_rank {
                    None => plan.linear(format!("{a}q_proj.weight"), nh * qk, h),
                    Some(r) => {
                        plan.linear(format!("{a}q_a_proj.weight"), r, h);
                        plan.norm(format!("{a}q_a_layernorm.weight"), r);
                        plan.linear(format!("{a}q_b_proj.weight"), nh * qk, r);
                    }
                }
                plan.linear(
                    format!("{a}kv_a_proj_with_mqa.weight"),
                    kvr + m.qk_rope_head_dim,
                    h,
                );
                plan.norm(format!("{a}kv_a_layernorm.weight"), kvr);
                plan.linear(
                    format!("{a}kv_b_proj.weight"),
                    nh * (m.qk_nope_head_dim + m.v_head_dim),
                    kvr,
                );
                plan.linear(format!("{a}o_proj.weight"), h, nh * m.v_head_dim);
            }
            AttentionConfig::Gqa(g) => {
                let (hd, kvh) = (g.head_dim, g.num_key_value_heads);
                plan.linear(format!("{a}q_proj.weight"), nh * hd, h);
                plan.linear(format!("{a}k_proj.weight"), kvh * hd, h);
                plan.linear(format!("{a}v_proj.weight"), kvh * hd, h);
                plan.linear(format!("{a}o_proj.weight"), h, nh * hd);
                let (qn, kn) = match g.qk_norm {
                    QkNorm::PerHead => (hd, hd),
                    QkNorm::Full => (nh * hd, kvh * hd),
                };
                plan.norm(format!("{a}q_norm.weight"), qn);
                plan.norm(format!("{a}k_norm.weight"), kn);
            }
        }
        let m = format!("{p}mlp.");
        if cfg.is_moe_layer(i) {
            plan.linear(format!("{m}gate.weight"), cfg.n_routed_experts, h);
            if cfg.router.scoring == ScoringFunc::Sigmoid {
                let name = format!("{m}gate.{SELECTION_BIAS}");
                plan.push(name, &[cfg.n_routed_experts], Fill::Const(0.0));
            }
            for e in 0..cfg.n_routed_experts {
                plan.mlp(&format!("{m}experts.{e}."), h, cfg.moe_intermediate_size);
            }
            if cfg.n_shared_experts > 0 {
                let inter = cfg.moe_intermediate_size * cfg.n_shared_experts;
                plan.mlp(&format!("{m}shared_experts."), h, inter);
            }
        } else {
            plan.mlp(&m, h, cfg.intermediate_size);
        }
    }
    plan.norm("model.norm.weight".into(), h);
    if !cfg.tie_word_embeddings {
        plan.linear("lm_head.weight".into(), cfg.vocab_size, h);
    }
    plan.tensors
}

/// A sibling of `path` to write before renaming over it.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Writes `out_dir/config.json` (the given config, pretty-printed) and
/// `out_dir/model.safetensors` with random weights determined by `seed`, in the config's
/// `torch_dtype`. The config is
/// validated first; an unsupported one is refused and nothing is written. Both files are
/// replaced atomically (written to a temporary file in `out_dir`, then renamed).
pub fn write_random_checkpoint(
    config_json: &serde_json::Value,
    seed: u64,
    out_dir: &Path,
) -> Result<()> {
    let cfg = Config::from_json(&config_json.to_string())?;
    let dtype = match config_json.get("torch_dtype").and_then(|v| v.as_str()) {
        None | Some("float32") => Dtype::F32,
        Some("bfloat16") => Dtype::BF16,
        Some("float16") => Dtype::F16,
        Some(other) => {
            return Err(ModelError::Invalid(format!(
                "torch_dtype {other}: random checkpoints are float32, bfloat16 or float16"
            )))
        }
    };
    std::fs::create_dir_all(out_dir)?;

    let tensors = checkpoint_tensors(&cfg)
        .into_iter()
        .map(|(name, shape, fill)| {
            let stream = stable_hash(&name);
            let dtype = if name.ends_with(SELECTION_BIAS) {
                Dtype::F32
            } else {
                dtype
            };
            (
                name,
                LazyTensor {
                    shape,
                    fill,
                    seed,
                    stream,
                    dtype,
                },
            )
        });
    let path = out_dir.join("model.safetensors");
    let tmp = temp_path(&path);
    let res = safetensors::serialize_to_file(tensors, None, &tmp)
        .map_err(|e| ModelError::BadSafetensors {
            path: path.clone(),
            message: format!("writing: {e}"),
        })
        .and_then(|()| Ok(std::fs::rename(&tmp, &path)?));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res?;

    let mut text = serde_json::to_string_pretty(config_json)
        .map_err(|e| ModelError::Invalid(format!("config.json: {e}")))?;
    text.push('\n');
    Ok(crate::util::write_atomic(
        &out_dir.join("config.json"),
        text.as_bytes(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Decoder, LoadOptions, LogitsWanted, SeqInput};

    fn lite_json() -> serde_json::Value {
        serde_json::from_str(include_str!("../../tests/fixtures/lite/config.json")).unwrap()
    }

    #[test]
    fn random_checkpoint_loads_and_runs() {
        let mut lora_tied = lite_json();
        lora_tied["q_lora_rank"] = 16.into();
        lora_tied["tie_word_embeddings"] = true.into();
        for config in [lite_json(), lora_tied] {
            let dir = tempfile::tempdir().unwrap();
            write_random_checkpoint(&config, 7, dir.path()).unwrap();
            let model = Decoder::load_dir(dir.path(), &LoadOptions::default()).unwrap();
            let mut cache = model.new_cache();
            let tokens = [1u32, 5, 9, 200, 511];
            let mut batch = [SeqInput {
                tokens: &tokens,
                cache: &mut cache,
                experts: None,
                logits: LogitsWanted::All,
            }];
            let out = model.forward(&mut batch, None).unwrap();
            let logits: Vec<Vec<f32>> = out.logits.unwrap().to_vec2().unwrap();
            assert_eq!(logits.len(), tokens.len());
            assert_eq!(logits[0].len(), 512);
            assert!(logits.iter().flatten().all(|v| v.is_finite()));
            assert!(logits.iter().flatten().any(|&v| v != 0.0));
        }
    }

    #[test]
    fn drawn_weights_have_every_name_shape_and_fill_of_a_written_checkpoint() {
        let config = lite_json();
        let dir = tempfile::tempdir().unwrap();
        write_random_checkpoint(&config, 1, dir.path()).unwrap();
        let written = crate::model::load::WeightStore::open_dir(dir.path()).unwrap();
        let cfg = Config::from_json(&config.to_string()).unwrap();
        let drawn = crate::model::load::WeightStore::drawn(&cfg);
        let mut names: Vec<&str> = drawn.names().collect();
        let mut want: Vec<&str> = written.names().collect();
        names.sort();
        want.sort();
        assert_eq!(names, want);
        let dev = candle_core::Device::Cpu;
        for name in names {
            assert_eq!(drawn.shape(name), written.shape(name), "{name}");
            let shape = drawn.shape(name).unwrap().to_vec();
            let v: Vec<f32> = drawn
                .get(name, &shape, candle_core::DType::BF16, &dev)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            if shape.len() == 1 {
                assert!(v.iter().all(|&x| x == 1.0), "{name} is a norm: ones");
            } else {
                let n = v.len() as f64;
                let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
                let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
                assert!(
                    mean.abs() < 0.01 && (std - 0.02).abs() < 0.004,
                    "{name}: {mean} {std}"
                );
            }
        }
        let wrong = drawn.get("model.norm.weight", &[3], candle_core::DType::F32, &dev);
        assert!(matches!(wrong, Err(ModelError::ShapeMismatch { .. })));
        let model = Decoder::load(cfg, &drawn, &LoadOptions::default()).unwrap();
        let mut cache = model.new_cache();
        let mut batch = [SeqInput {
            tokens: &[3, 4, 5],
            cache: &mut cache,
            experts: None,
            logits: LogitsWanted::Last,
        }];
        let logits = model.forward(&mut batch, None).unwrap().logits.unwrap();
        let logits: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        assert!(logits.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn random_checkpoints_of_every_architecture_load_and_run() {
        for name in [
            "deepseek-v3",
            "deepseek-v3-noq",
            "qwen3-moe",
            "qwen3-moe-dense0",
            "olmoe",
        ] {
            let path = format!(
                "{}/tests/fixtures/{name}/config.json",
                env!("CARGO_MANIFEST_DIR")
            );
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            config["torch_dtype"] = "bfloat16".into();
            let dir = tempfile::tempdir().unwrap();
            write_random_checkpoint(&config, 11, dir.path()).unwrap();
            let w = crate::model::load::WeightStore::open_dir(dir.path()).unwrap();
            for n in w.names() {
                let dtype = w.file_of(n).unwrap().info(n).unwrap().dtype;
                let want = if n.ends_with(SELECTION_BIAS) {
                    Dtype::F32
                } else {
                    Dtype::BF16
                };
                assert_eq!(dtype, want, "{name}: {n}");
            }
            let model = Decoder::load_dir(dir.path(), &LoadOptions::default()).unwrap();
            assert_eq!(
                model.config().architecture.model_type(),
                config["model_type"].as_str().unwrap()
            );
            let tokens = [0u32, 5, 9, 200, 511];
            let mut cache = model.new_cache();
            let mut batch = [SeqInput {
                tokens: &tokens,
                cache: &mut cache,
                experts: None,
                logits: LogitsWanted::All,
            }];
            let logits: Vec<Vec<f32>> = model
                .forward(&mut batch, None)
                .unwrap()
                .logits
                .unwrap()
                .to_vec2()
                .unwrap();
            assert!(logits.iter().flatten().all(|v| v.is_finite()), "{name}");
            assert!(logits.iter().flatten().any(|&v| v != 0.0), "{name}");
        }
    }

    #[test]
    fn torch_dtype_picks_the_stored_dtype_of_the_same_draws() {
        let load = |torch_dtype: &str| {
            let mut config = lite_json();
            config["torch_dtype"] = torch_dtype.into();
            let dir = tempfile::tempdir().unwrap();
            write_random_checkpoint(&config, 3, dir.path()).unwrap();
            let w = crate::model::load::WeightStore::open_dir(dir.path()).unwrap();
            let name = "model.layers.1.mlp.experts.2.up_proj.weight";
            let shape = w.shape(name).unwrap().to_vec();
            let info_dtype = w.file_of(name).unwrap().info(name).unwrap().dtype;
            let t = w
                .get(
                    name,
                    &shape,
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .unwrap();
            (
                info_dtype,
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        };
        let (d32, wide) = load("float32");
        let (d16, narrow) = load("bfloat16");
        assert_eq!((d32, d16), (Dtype::F32, Dtype::BF16));
        let rounded: Vec<f32> = wide
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(narrow, rounded);
        let mut bad = lite_json();
        bad["torch_dtype"] = "int8".into();
        let dir = tempfile::tempdir().unwrap();
        assert!(write_random_checkpoint(&bad, 3, dir.path()).is_err());
    }

    #[test]
    fn same_seed_same_bytes_other_seed_differs() {
        let read = |seed: u64| {
            let dir = tempfile::tempdir().unwrap();
            write_random_checkpoint(&lite_json(), seed, dir.path()).unwrap();
            let files: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(files.len(), 2, "no temporary files left behind: {files:?}");
            (
                std::fs::read(dir.path().join("model.safetensors")).unwrap(),
                std::fs::read(dir.path().join("config.json")).unwrap(),
            )
        };
        let (a, ca) = read(1);
        let (b, cb) = read(1);
        let (c, cc) = read(2);
        assert!(a == b, "same seed must write identical weights");
        assert_eq!(ca, cb);
        assert!(a != c, "another seed must write other weights");
        assert_eq!(a.len(), c.len());
        assert_eq!(ca, cc);
        let back: serde_json::Value = serde_json::from_slice(&ca).unwrap();
        assert_eq!(back, lite_json());
    }

    #[test]
    fn weights_have_the_requested_statistics() {
        let t = LazyTensor {
            shape: vec![256, 256],
            fill: Fill::Normal(INIT_STD),
            seed: 3,
            stream: stable_hash("x"),
            dtype: Dtype::F32,
        };
        let bytes = t.data();
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 5e-4, "std {}", var.sqrt());
    }

    #[test]
    fn invalid_config_is_refused_and_nothing_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = lite_json();
        j["scoring_func"] = "sigmoid".into();
        let err = write_random_checkpoint(&j, 0, dir.path()).unwrap_err();
        assert!(err.to_string().contains("scoring_func"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
