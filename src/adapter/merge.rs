//! Writing an adapter into a full checkpoint: the base's files with the adapter's tensors
//! in place of the originals (stored in the base tensors' own dtypes).

use candle_core::{DType, Tensor};
use safetensors::tensor::TensorView;
use std::collections::BTreeMap;
use std::path::Path;

use super::format::{load_adapter, AdapterError, BaseModel};
use crate::model::moe::Mlp;

/// Tensor bytes in the little-endian layout of safetensors' `dtype`.
pub fn tensor_bytes(t: &Tensor, dtype: safetensors::Dtype) -> candle_core::Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match dtype {
        safetensors::Dtype::F32 => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        safetensors::Dtype::BF16 => flat
            .to_dtype(DType::BF16)?
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        safetensors::Dtype::F16 => flat
            .to_dtype(DType::F16)?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => candle_core::bail!("cannot write tensors of dtype {other:?}"),
    })
}

fn mlp_tensors(prefix: &str, mlp: &Mlp) -> candle_core::Result<Vec<(String, Tensor)>> {
    Ok(mlp
        .parts()?
        .into_iter()
        .map(|(part, t)| (format!("{prefix}{part}"), t))
        .collect())
}

/// Every tensor of an adapter under its checkpoint name.
pub fn adapter_tensors(a: &super::AdapterWeights) -> candle_core::Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (layer, expert, mlp) in &a.experts {
        out.extend(mlp_tensors(
            &format!("model.layers.{layer}.mlp.experts.{expert}."),
            mlp,
        )?);
    }
    for (layer, mlp) in &a.shared {
        out.extend(mlp_tensors(
            &format!("model.layers.{layer}.mlp.shared_experts."),
            mlp,
        )?);
    }
    out.extend(a.others.iter().cloned());
    Ok(out)
}

/// Writes `out_dir`: `model_dir`'s non-weight files plus one `model.safetensors` with the
/// adapter's tensors merged in (see [`write_checkpoint`]).
pub fn merge_checkpoint(
    model_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
) -> Result<(), AdapterError> {
    let io = |e: std::io::Error| AdapterError::Io("merge".into(), e);
    let base = BaseModel::open(model_dir).map_err(AdapterError::Base)?;
    let name = adapter_dir
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| super::format::validate_name(n).is_ok())
        .unwrap_or("adapter");
    let adapter = load_adapter(adapter_dir, name, &base, DType::F32)?;
    let replaced: BTreeMap<String, Tensor> = adapter_tensors(&adapter)
        .map_err(|e| AdapterError::Invalid {
            name: name.into(),
            message: e.to_string(),
        })?
        .into_iter()
        .collect();
    write_checkpoint(model_dir, &base, &replaced, out_dir).map_err(|e| match e {
        CheckpointError::Io(e) => io(e),
        CheckpointError::Tensor(message) => AdapterError::Invalid {
            name: name.into(),
            message,
        },
    })
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Tensor(String),
}

/// Writes `out_dir`: `model_dir`'s non-weight files plus one `model.safetensors` holding
/// every tensor of `base`, with those in `replaced` (by checkpoint name) swapped in, each
/// stored in the base tensor's dtype. The directory appears only when complete.
pub fn write_checkpoint(
    model_dir: &Path,
    base: &BaseModel,
    replaced: &BTreeMap<String, Tensor>,
    out_dir: &Path,
) -> Result<(), CheckpointError> {
    let bad = |m: String| CheckpointError::Tensor(m);
    if let Some(unknown) = replaced.keys().find(|n| base.store.shape(n).is_none()) {
        return Err(bad(format!("the base has no tensor {unknown}")));
    }
    let parent = out_dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = tempfile::Builder::new()
        .prefix(".checkpoint-")
        .tempdir_in(parent)?;
    for entry in std::fs::read_dir(model_dir)? {
        let p = entry?.path();
        let fname = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let is_weights = fname.ends_with(".safetensors") || fname == "model.safetensors.index.json";
        if p.is_file() && !is_weights {
            std::fs::copy(&p, tmp.path().join(fname))?;
        }
    }
    let mut names: Vec<&str> = base.store.names().collect();
    names.sort();
    let mut converted: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    for &n in &names {
        if let Some(t) = replaced.get(n) {
            let info = base
                .store
                .file_of(n)
                .and_then(|f| f.info(n))
                .ok_or_else(|| bad(format!("base lost tensor {n}")))?;
            if info.shape != t.dims() {
                return Err(bad(format!(
                    "{n}: shape {:?}, the base has {:?}",
                    t.dims(),
                    info.shape
                )));
            }
            let bytes = tensor_bytes(t, info.dtype).map_err(|e| bad(format!("{n}: {e}")))?;
            converted.insert(n, bytes);
        }
    }
    let mut views = Vec::with_capacity(names.len());
    for &n in &names {
        let file = base.store.file_of(n);
        let info = file.and_then(|f| f.info(n));
        let (Some(file), Some(info)) = (file, info) else {
            continue;
        };
        let data: &[u8] = match converted.get(n) {
            Some(b) => b,
            None => file.bytes(n).unwrap_or_default(),
        };
        let view = TensorView::new(info.dtype, info.shape.clone(), data)
            .map_err(|e| bad(format!("{n}: {e}")))?;
        views.push((n.to_string(), view));
    }
    safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors"))
        .map_err(std::io::Error::other)?;
    Ok(crate::util::replace_dir(tmp.keep(), out_dir)?)
}
