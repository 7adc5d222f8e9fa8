//! Importing an adapter released in the reference layout (`expert_cfg.json` next to
//! safetensors holding the trained tensors) as a native adapter with a manifest that pins
//! it to the base it was checked against.

use anyhow::{Context, Result};
use candle_core::DType;
use std::path::Path;

use esft::adapter::format::{new_manifest, write_adapter, BaseModel, Provenance};
use esft::adapter::merge::adapter_tensors;

/// Validates the adapter in `from` against the base in `model_dir` and writes it to `out`
/// (atomically), named after `out`'s last component. Tensors keep the base's weight dtype.
pub fn import(from: &Path, model_dir: &Path, out: &Path) -> Result<usize> {
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: the output needs a directory name", out.display()))?;
    let base = BaseModel::open(model_dir)?;
    let dtype = base
        .store
        .names()
        .find(|n| n.contains(".mlp.experts."))
        .and_then(|n| base.store.file_of(n).and_then(|f| f.info(n)))
        .map(|info| match info.dtype {
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            _ => DType::F32,
        })
        .unwrap_or(DType::F32);
    let weights = esft::adapter::load_adapter(from, name, &base, dtype)?;
    let tensors = adapter_tensors(&weights)?;
    let names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    let mut training = Provenance::default();
    training
        .extra
        .insert("imported_from".into(), from.display().to_string().into());
    let manifest = new_manifest(
        name,
        &base,
        weights.manifest.expert_config.clone(),
        training,
        &names,
    )?;
    write_adapter(out, &manifest, &tensors)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(weights.manifest.expert_config.expert_count())
}
