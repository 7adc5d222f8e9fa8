//! What an adapter is on disk, and turning one into validated expert weights.
//!
//! Two layouts are accepted:
//! - ours: `adapter.json` (the [`Manifest`]) + `adapter.safetensors` holding only the
//!   replaced tensors under the base checkpoint's names;
//! - the ESFT reference release: `expert_cfg.json` + `*.safetensors` with keys
//!   `layers.{L}.mlp.experts.{E}.*` (no `model.` prefix) or `model.layers...`.
//!
//! Nothing is trusted: names, the expert config, every tensor's name, shape and values, and
//! (for our layout) the base model's identity are checked before an adapter is usable.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::model::load::WeightStore;
use crate::model::moe::Mlp;
use crate::model::Config;

pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "adapter.json";
pub const WEIGHTS_FILE: &str = "adapter.safetensors";
pub const REFERENCE_CONFIG_FILE: &str = "expert_cfg.json";

/// Identifies one version of an adapter's weights within this process: caches and device
/// slots are keyed by it, never by name.
pub type VersionId = u64;

static NEXT_VERSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A version id no other version in this process has.
pub fn next_version_id() -> VersionId {
    NEXT_VERSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The ESFT reference expert config: which routed experts (per model layer) were trained,
/// and whether shared experts and non-expert modules were too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertConfig {
    pub experts: BTreeMap<usize, Vec<usize>>,
    #[serde(default)]
    pub shared_experts: bool,
    #[serde(default)]
    pub non_expert_modules: bool,
}

impl ExpertConfig {
    pub fn expert_count(&self) -> usize {
        self.experts.values().map(Vec::len).sum()
    }

    /// Parameters this config trains in `base`: the listed routed experts' weights, and
    /// the shared experts' and every other weight when those are set (read from the
    /// checkpoint's tensor shapes, so nothing is assumed about the architecture).
    pub fn trainable_params(&self, base: &BaseModel) -> u64 {
        let picks = |name: &str| -> bool {
            let Some(rest) = name.strip_prefix("model.layers.") else {
                return self.non_expert_modules;
            };
            let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
            let layer: Option<usize> = layer.parse().ok();
            if let Some(rest) = rest.strip_prefix("mlp.experts.") {
                let expert: Option<usize> = rest.split('.').next().and_then(|e| e.parse().ok());
                return match (layer, expert) {
                    (Some(l), Some(e)) => self.experts.get(&l).is_some_and(|v| v.contains(&e)),
                    _ => false,
                };
            }
            if rest.starts_with("mlp.shared_experts.") {
                return self.shared_experts;
            }
            self.non_expert_modules
        };
        base.store
            .names()
            .filter(|n| picks(n))
            .filter_map(|n| base.store.shape(n))
            .map(|shape| shape.iter().product::<usize>() as u64)
            .sum()
    }

    /// Checks the config against a model: MoE layers only, expert ids in range and listed
    /// once, shared experts only where the model has them.
    pub fn validate(&self, cfg: &Config) -> Result<(), String> {
        for (&layer, experts) in &self.experts {
            if !cfg.is_moe_layer(layer) {
                let moe: Vec<String> = cfg.moe_layers().map(|l| l.to_string()).collect();
                return Err(format!(
                    "expert config lists layer {layer}, which is not a MoE layer (MoE layers are {})",
                    moe.join(", ")
                ));
            }
            let mut seen = BTreeSet::new();
            for &e in experts {
                if e >= cfg.n_routed_experts {
                    return Err(format!(
                        "expert id {e} in layer {layer} is out of range (the model has {} routed experts)",
                        cfg.n_routed_experts
                    ));
                }
                if !seen.insert(e) {
                    return Err(format!("expert {e} is listed twice in layer {layer}"));
                }
            }
        }
        if self.shared_experts && cfg.n_shared_experts == 0 {
            return Err("shared_experts is set but the model has no shared experts".into());
        }
        Ok(())
    }
}

/// The base model an adapter was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseIdentity {
    pub architecture: String,
    /// [`Config::fingerprint`] of the base.
    pub config_fingerprint: String,
    /// Hash of the base's own values of every tensor the adapter replaces.
    pub tensors_fingerprint: String,
}

/// How an adapter was made (all optional: imported adapters carry none of it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_function: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// `adapter.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub format_version: u32,
    /// `None` only for adapters read from the reference layout (nothing to verify against).
    pub base: Option<BaseIdentity>,
    pub expert_config: ExpertConfig,
    #[serde(default)]
    pub training: Provenance,
    /// RFC 3339 time the adapter was written.
    pub created_at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("invalid adapter name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("adapter {0:?} not found")]
    NotFound(String),
    #[error(
        "adapter {0}: not an adapter directory (neither adapter.json nor expert_cfg.json is there)"
    )]
    NotAnAdapter(String),
    #[error("the name {name:?} is reserved for tenant {tenant} by the configuration")]
    Reserved { name: String, tenant: String },
    #[error("adapter {name}: {message}")]
    Invalid { name: String, message: String },
    #[error("adapter {name} was made for a different base model: {reason}")]
    WrongBase { name: String, reason: String },
    #[error("the base model: {0}")]
    Base(#[source] crate::model::ModelError),
    #[error("adapter {0} is in use by running requests")]
    InUse(String),
    #[error("adapter {0} is already installed")]
    Exists(String),
    #[error("adapter {name} needs {needed} bytes of expert slots; the budget is {budget} bytes")]
    TooLarge {
        name: String,
        needed: usize,
        budget: usize,
    },
    #[error("adapter {0}: {1}")]
    Io(String, std::io::Error),
    /// The object-store registry did not answer; worth retrying later.
    #[error("the adapter registry is unavailable: {0}")]
    StoreUnavailable(String),
}

/// Adapter names become directory names and URL path segments: keep them plain.
pub fn validate_name(name: &str) -> Result<(), AdapterError> {
    let bad = |reason| {
        Err(AdapterError::BadName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("must not start with '.' or '-'");
    }
    if name.contains('/') || name.contains('\\') {
        return bad("must not contain path separators");
    }
    if name.starts_with(':') {
        return bad("must not start with ':'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c))
    {
        return bad("may only contain ASCII letters, digits, '.', '_', '-' and ':'");
    }
    Ok(())
}

/// The base model adapters are checked against: its config and its weight files, with the
/// per-tensor hashes computed so far (adapters of one base share most of them).
pub struct BaseModel {
    pub config: Config,
    pub store: Arc<WeightStore>,
    config_fingerprint: String,
    tensor_hashes: Mutex<HashMap<String, String>>,
}

impl BaseModel {
    pub fn open(dir: &Path) -> crate::model::Result<Self> {
        let config = Config::from_dir(dir)?;
        let store = Arc::new(WeightStore::open_dir(dir)?);
        Ok(Self::new(config, store))
    }

    pub fn new(config: Config, store: Arc<WeightStore>) -> Self {
        Self {
            config_fingerprint: config.fingerprint(),
            config,
            store,
            tensor_hashes: Mutex::new(HashMap::new()),
        }
    }

    pub fn config_fingerprint(&self) -> &str {
        &self.config_fingerprint
    }

    /// Hash over the base's stored bytes (with dtype and shape) of each named tensor.
    pub fn tensors_fingerprint<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<String, String> {
        use sha2::{Digest, Sha256};
        let names: BTreeSet<&str> = names.into_iter().collect();
        let mut total = Sha256::new();
        for name in names {
            let h = self.tensor_hash(name)?;
            total.update(name.as_bytes());
            total.update(b":");
            total.update(h.as_bytes());
            total.update(b"\n");
        }
        Ok(hex::encode(total.finalize()))
    }

    fn tensor_hash(&self, name: &str) -> Result<String, String> {
        use sha2::{Digest, Sha256};
        if let Some(h) = self
            .tensor_hashes
            .lock()
            .ok()
            .and_then(|m| m.get(name).cloned())
        {
            return Ok(h);
        }
        let file = self
            .store
            .file_of(name)
            .ok_or_else(|| format!("the base has no tensor {name}"))?;
        let info = file
            .info(name)
            .ok_or_else(|| format!("the base has no tensor {name}"))?;
        let mut h = Sha256::new();
        h.update(format!("{:?}{:?}", info.dtype, info.shape).as_bytes());
        h.update(file.bytes(name).unwrap_or_default());
        let h = hex::encode(h.finalize());
        if let Ok(mut m) = self.tensor_hashes.lock() {
            m.insert(name.to_string(), h.clone());
        }
        Ok(h)
    }
}

/// A validated adapter in host memory, in the dtype it was loaded in (when served, the
/// dtype of the base model's weight matrices).
pub struct AdapterWeights {
    /// The version these weights are of (a fresh id when read outside a store).
    pub version: VersionId,
    pub name: String,
    pub manifest: Manifest,
    /// `(layer, expert, weights)` for every replaced routed expert.
    pub experts: Vec<(usize, usize, Mlp)>,
    /// `(layer, weights)` for every replaced shared-expert block.
    pub shared: Vec<(usize, Mlp)>,
    /// Replaced non-expert tensors under their checkpoint names.
    pub others: Vec<(String, Tensor)>,
    /// Bytes of all tensors held.
    pub bytes: usize,
    /// Bytes read from disk.
    pub file_bytes: u64,
}

impl AdapterWeights {
    /// Bytes the routed and shared experts take in expert slots.
    pub fn slot_bytes(&self) -> usize {
        self.experts.iter().map(|e| e.2.size_bytes()).sum::<usize>()
            + self.shared.iter().map(|s| s.1.size_bytes()).sum::<usize>()
    }
}

/// What a checkpoint tensor name is, as far as adapters are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorRole {
    Expert {
        layer: usize,
        expert: usize,
        part: String,
    },
    Shared {
        layer: usize,
        part: String,
    },
    Other,
}

pub fn classify(name: &str) -> TensorRole {
    let parse = || -> Option<TensorRole> {
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        if let Some(rest) = rest.strip_prefix("mlp.experts.") {
            let (expert, part) = rest.split_once('.')?;
            return Some(TensorRole::Expert {
                layer,
                expert: expert.parse().ok()?,
                part: part.to_string(),
            });
        }
        let part = rest.strip_prefix("mlp.shared_experts.")?;
        Some(TensorRole::Shared {
            layer,
            part: part.to_string(),
        })
    };
    parse().unwrap_or(TensorRole::Other)
}

/// Reference releases name tensors without the `model.` prefix.
fn canonical_name(name: &str) -> String {
    if name.starts_with("layers.") {
        format!("model.{name}")
    } else {
        name.to_string()
    }
}

const MLP_PARTS: [&str; 3] = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"];

/// Reads, validates and converts the adapter in `dir`, to be served under `name`.
pub fn load_adapter(
    dir: &Path,
    name: &str,
    base: &BaseModel,
    dtype: DType,
) -> Result<AdapterWeights, AdapterError> {
    validate_name(name)?;
    let invalid = |message: String| AdapterError::Invalid {
        name: name.to_string(),
        message,
    };
    let io = |e: std::io::Error| AdapterError::Io(name.to_string(), e);
    let (manifest, weight_files) = if dir.join(MANIFEST_FILE).exists() {
        let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).map_err(io)?;
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| invalid(format!("{MANIFEST_FILE}: {e}")))?;
        if m.format_version != FORMAT_VERSION {
            return Err(invalid(format!(
                "format_version {} is not supported (expected {FORMAT_VERSION})",
                m.format_version
            )));
        }
        (m, vec![dir.join(WEIGHTS_FILE)])
    } else if dir.join(REFERENCE_CONFIG_FILE).exists() {
        let text = std::fs::read_to_string(dir.join(REFERENCE_CONFIG_FILE)).map_err(io)?;
        let expert_config: ExpertConfig = serde_json::from_str(&text)
            .map_err(|e| invalid(format!("{REFERENCE_CONFIG_FILE}: {e}")))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(invalid(
                "no *.safetensors file next to expert_cfg.json".into(),
            ));
        }
        let manifest = Manifest {
            name: name.to_string(),
            format_version: FORMAT_VERSION,
            base: None,
            expert_config,
            training: Provenance::default(),
            created_at: String::new(),
        };
        (manifest, files)
    } else {
        return Err(AdapterError::NotAnAdapter(name.to_string()));
    };

    let cfg = &base.config;
    if let Some(id) = &manifest.base {
        if id.architecture != cfg.architecture.class_name() {
            return Err(AdapterError::WrongBase {
                name: name.into(),
                reason: format!("architecture {}", id.architecture),
            });
        }
        if id.config_fingerprint != base.config_fingerprint() {
            return Err(AdapterError::WrongBase {
                name: name.into(),
                reason: "its base config fingerprint differs from this model's".into(),
            });
        }
    }
    let ec = &manifest.expert_config;
    ec.validate(cfg).map_err(invalid)?;

    let store = WeightStore::open_files(&weight_files).map_err(|e| weights_error(name, e))?;
    check_dtypes(&store).map_err(invalid)?;
    let file_bytes: u64 = weight_files
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    // Canonical name -> stored name.
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for stored in store.names() {
        let canon = canonical_name(stored);
        if names.insert(canon.clone(), stored.to_string()).is_some() {
            return Err(invalid(format!("tensor {canon} appears twice")));
        }
    }
    for canon in names.keys() {
        let covered = match classify(canon) {
            TensorRole::Expert { layer, expert, .. } => ec
                .experts
                .get(&layer)
                .is_some_and(|list| list.contains(&expert)),
            TensorRole::Shared { .. } => ec.shared_experts,
            TensorRole::Other => ec.non_expert_modules,
        };
        if !covered {
            return Err(invalid(format!(
                "tensor {canon} is not covered by the expert config"
            )));
        }
        let Some(base_shape) = base.store.shape(canon) else {
            return Err(invalid(format!(
                "tensor {canon} does not exist in the base model"
            )));
        };
        let shape = store.shape(names[canon].as_str()).unwrap_or_default();
        if shape != base_shape {
            return Err(invalid(format!(
                "tensor {canon} has shape {shape:?}, the base has {base_shape:?}"
            )));
        }
    }

    let load = |canon: &str| -> Result<Tensor, AdapterError> {
        let stored = names
            .get(canon)
            .ok_or_else(|| invalid(format!("missing tensor {canon}")))?;
        let shape = base.store.shape(canon).unwrap_or_default().to_vec();
        let t = store
            .get(stored, &shape, DType::F32, &Device::Cpu)
            .map_err(|e| weights_error(name, e))?;
        let values = t
            .flatten_all()
            .and_then(|f| f.to_vec1::<f32>())
            .map_err(|e| invalid(format!("tensor {canon}: {e}")))?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(invalid(format!(
                "tensor {canon} holds a non-finite value ({}) at flat index {i}",
                values[i]
            )));
        }
        t.to_dtype(dtype)
            .map_err(|e| invalid(format!("tensor {canon}: {e}")))
    };
    let mlp = |prefix: &str| -> Result<Mlp, AdapterError> {
        let [g, u, d] = MLP_PARTS.map(|p| load(&format!("{prefix}{p}")));
        Mlp::from_parts(&g?, &u?, d?).map_err(|e| invalid(e.to_string()))
    };
    let mut experts = Vec::new();
    for (&layer, list) in &ec.experts {
        for &e in list {
            experts.push((
                layer,
                e,
                mlp(&format!("model.layers.{layer}.mlp.experts.{e}."))?,
            ));
        }
    }
    let mut shared = Vec::new();
    if ec.shared_experts {
        for layer in cfg.moe_layers() {
            let prefix = format!("model.layers.{layer}.mlp.shared_experts.");
            if MLP_PARTS
                .iter()
                .any(|p| names.contains_key(&format!("{prefix}{p}")))
            {
                shared.push((layer, mlp(&prefix)?));
            }
        }
    }
    let mut others = Vec::new();
    for canon in names.keys() {
        if classify(canon) == TensorRole::Other {
            others.push((canon.clone(), load(canon)?));
        }
    }
    if let Some(id) = &manifest.base {
        let fp = base
            .tensors_fingerprint(names.keys().map(String::as_str))
            .map_err(invalid)?;
        if fp != id.tensors_fingerprint {
            return Err(AdapterError::WrongBase {
                name: name.into(),
                reason: "the base tensors it replaces differ from this model's".into(),
            });
        }
    }
    let bytes = experts.iter().map(|e| e.2.size_bytes()).sum::<usize>()
        + shared.iter().map(|s| s.1.size_bytes()).sum::<usize>()
        + others
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum::<usize>();
    Ok(AdapterWeights {
        version: next_version_id(),
        name: name.to_string(),
        manifest,
        experts,
        shared,
        others,
        bytes,
        file_bytes,
    })
}

/// An error reading weight files, without the server's paths: files are named by their
/// name inside the adapter.
fn weights_error(name: &str, e: crate::model::ModelError) -> AdapterError {
    use crate::model::ModelError as M;
    let file = |p: &Path| {
        p.file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned())
    };
    let message = match e {
        M::BadSafetensors { path, message } => {
            format!("invalid safetensors file {}: {message}", file(&path))
        }
        M::MissingFile { path, what, .. } => format!("{what} {} is missing", file(&path)),
        M::Io(e) => format!("reading its weights: {}", e.kind()),
        other => other.to_string(),
    };
    AdapterError::Invalid {
        name: name.to_string(),
        message,
    }
}

/// Floating-point types weights may be stored in.
const WEIGHT_DTYPES: [safetensors::Dtype; 3] = [
    safetensors::Dtype::F32,
    safetensors::Dtype::F16,
    safetensors::Dtype::BF16,
];

/// Every tensor is declared in a float type the model can use, and holds exactly the bytes
/// its dtype and shape take.
fn check_dtypes(store: &WeightStore) -> Result<(), String> {
    for name in store.names() {
        let Some(info) = store.file_of(name).and_then(|f| f.info(name)) else {
            continue;
        };
        if !WEIGHT_DTYPES.contains(&info.dtype) {
            return Err(format!(
                "tensor {name} is declared {:?}; adapter weights must be F32, F16 or BF16",
                info.dtype
            ));
        }
        let elems = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("tensor {name} has an impossible shape {:?}", info.shape))?;
        let want = elems.checked_mul(info.dtype.bitsize() / 8);
        let (start, end) = info.data_offsets;
        if want != end.checked_sub(start) {
            return Err(format!(
                "tensor {name} holds {} bytes; {:?} of shape {:?} takes {}",
                end.saturating_sub(start),
                info.dtype,
                info.shape,
                want.map_or_else(|| "more".to_string(), |w| w.to_string())
            ));
        }
    }
    Ok(())
}

/// Builds the manifest of a new adapter replacing `tensor_names` of `base`.
pub fn new_manifest(
    name: &str,
    base: &BaseModel,
    expert_config: ExpertConfig,
    training: Provenance,
    tensor_names: &[String],
) -> Result<Manifest, AdapterError> {
    validate_name(name)?;
    let tensors_fingerprint = base
        .tensors_fingerprint(tensor_names.iter().map(String::as_str))
        .map_err(|message| AdapterError::Invalid {
            name: name.into(),
            message,
        })?;
    Ok(Manifest {
        name: name.to_string(),
        format_version: FORMAT_VERSION,
        base: Some(BaseIdentity {
            architecture: base.config.architecture.class_name().into(),
            config_fingerprint: base.config_fingerprint().to_string(),
            tensors_fingerprint,
        }),
        expert_config,
        training,
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    })
}

/// Writes an adapter directory atomically: everything goes to a temporary directory beside
/// `dir`, which is renamed into place only when complete (an existing adapter of that name
/// is replaced in one step as seen by readers).
pub fn write_adapter(
    dir: &Path,
    manifest: &Manifest,
    tensors: &[(String, Tensor)],
) -> std::io::Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = tempfile::Builder::new()
        .prefix(".adapter-")
        .tempdir_in(parent)?;
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, tmp.path().join(WEIGHTS_FILE))
        .map_err(std::io::Error::other)?;
    let json = serde_json::to_string_pretty(manifest).map_err(std::io::Error::other)?;
    std::fs::write(tmp.path().join(MANIFEST_FILE), json)?;
    for f in [WEIGHTS_FILE, MANIFEST_FILE] {
        std::fs::File::open(tmp.path().join(f))?.sync_all()?;
    }
    crate::util::replace_dir(tmp.keep(), dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_separators_or_odd_characters_are_refused() {
        for bad in [
            "",
            "../x",
            "a/b",
            "a\\b",
            ".hidden",
            "x y",
            "-x",
            &"a".repeat(129),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        for good in ["intent", "law-v2", "A_1.0"] {
            assert!(validate_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn classifies_checkpoint_names() {
        assert_eq!(
            classify("model.layers.3.mlp.experts.17.up_proj.weight"),
            TensorRole::Expert {
                layer: 3,
                expert: 17,
                part: "up_proj.weight".into()
            }
        );
        assert_eq!(
            classify("model.layers.2.mlp.shared_experts.down_proj.weight"),
            TensorRole::Shared {
                layer: 2,
                part: "down_proj.weight".into()
            }
        );
        assert_eq!(
            classify("model.layers.2.self_attn.o_proj.weight"),
            TensorRole::Other
        );
        assert_eq!(
            canonical_name("layers.1.mlp.experts.0.gate_proj.weight"),
            "model.layers.1.mlp.experts.0.gate_proj.weight"
        );
    }

    #[test]
    fn reference_expert_config_round_trips() {
        let text = r#"{"experts": {"1": [5, 2], "10": [7]}, "shared_experts": false, "non_expert_modules": false}"#;
        let c: ExpertConfig = serde_json::from_str(text).unwrap();
        assert_eq!(c.experts[&1], vec![5, 2]);
        assert_eq!(c.expert_count(), 3);
        let back: ExpertConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
