//! Checkpoint weights: one or many safetensors files, memory-mapped, looked up by name.
//!
//! Headers are parsed and validated once when a file is opened (a truncated file is refused
//! there); tensor bytes are only touched when a tensor is requested, and are converted to
//! the requested dtype on the requested device.

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{TensorInfo, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use super::error::{ModelError, Result};

/// The dtypes a model is loaded in: `compute` for activations and every vector weight
/// (norms), `matrices` for the weight matrices. A narrower `matrices` (bf16 or f16 under
/// f32 compute) keeps a bf16 checkpoint at its size in memory; the CPU kernels widen the
/// values as they read them, other devices widen a matrix for each product, so the products
/// are the same f32 products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    pub compute: DType,
    pub matrices: DType,
}

impl Precision {
    /// Both the same dtype.
    pub fn uniform(dtype: DType) -> Self {
        Self {
            compute: dtype,
            matrices: dtype,
        }
    }

    /// The dtype a weight of this shape is loaded in.
    pub fn of(&self, shape: &[usize]) -> DType {
        if shape.len() >= 2 {
            self.matrices
        } else {
            self.compute
        }
    }
}

/// One memory-mapped safetensors file with its parsed header.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::MissingFile {
            path: path.to_path_buf(),
            what: "safetensors file",
            source: e,
        })?;
        // SAFETY: the map is read-only; files are replaced by atomic rename, never rewritten
        // in place, so the mapped bytes do not change underneath us.
        let mmap = unsafe { Mmap::map(&file)? };
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                ModelError::BadSafetensors {
                    path: path.to_path_buf(),
                    message: describe_safetensors_error(&e),
                }
            })?;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The raw little-endian bytes of a tensor, straight from the map.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let info = self.tensors.get(name)?;
        let (start, end) = info.data_offsets;
        Some(&self.mmap[self.data_start + start..self.data_start + end])
    }

    /// Loads `name` as a tensor of `dtype` on `device` (shape as stored).
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
            })?;
        let bytes = self.bytes(name).unwrap_or_default();
        let view = TensorView::new(info.dtype, info.shape.clone(), bytes).map_err(|e| {
            ModelError::BadSafetensors {
                path: self.path.clone(),
                message: format!("{name}: {e}"),
            }
        })?;
        let t = view
            .load(&Device::Cpu)
            .map_err(|_| ModelError::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{:?}", info.dtype),
            })?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer | E::HeaderTooSmall | E::InvalidHeaderLength => {
            format!("file is truncated or its header is corrupt ({e})")
        }
        other => other.to_string(),
    }
}

/// All weight files of a checkpoint directory, with a name -> file index; or, for
/// benchmarks, weights drawn at random as they are loaded ([`WeightStore::drawn`]).
pub struct WeightStore {
    files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
    /// Weights with no file: name -> (shape, how its values are drawn).
    drawn: HashMap<String, (Vec<usize>, super::init::Fill)>,
}

impl WeightStore {
    /// Opens `model.safetensors.index.json` (sharded) or `model.safetensors`, or, failing
    /// both, every `*.safetensors` file of the directory.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.exists() {
            return Self::open_index(dir, &index_path);
        }
        let single = dir.join("model.safetensors");
        let paths = if single.exists() {
            vec![single]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| ModelError::MissingFile {
                    path: dir.to_path_buf(),
                    what: "model directory",
                    source: e,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            found
        };
        if paths.is_empty() {
            return Err(ModelError::NoWeights(dir.to_path_buf()));
        }
        Self::open_files(&paths)
    }

    fn open_index(dir: &Path, index_path: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let bad = |message: String| ModelError::BadIndex {
            path: index_path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(index_path)?;
        let index: Index = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut shard_names: Vec<&String> = index.weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        for s in &shard_names {
            if s.contains('/') || s.contains('\\') || s.contains("..") {
                return Err(bad(format!("shard name {s:?} must be a plain file name")));
            }
        }
        let paths: Vec<PathBuf> = shard_names.iter().map(|s| dir.join(s)).collect();
        let store = Self::open_files(&paths)?;
        for (name, shard) in &index.weight_map {
            let file = store.index.get(name).map(|&i| store.files[i].path());
            if file != Some(dir.join(shard).as_path()) {
                return Err(bad(format!(
                    "tensor {name} is not in its listed shard {shard}"
                )));
            }
        }
        Ok(store)
    }

    /// Opens the given files as one store; a name present in two files is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let f = SafetensorsFile::open(p)?;
            for name in f.names() {
                if index.insert(name.to_string(), i).is_some() {
                    return Err(ModelError::BadSafetensors {
                        path: p.clone(),
                        message: format!("tensor {name} appears in more than one file"),
                    });
                }
            }
            files.push(f);
        }
        Ok(Self {
            files,
            index,
            drawn: HashMap::new(),
        })
    }

    /// Every weight a checkpoint of `cfg` has, drawn on the device it is loaded to when it
    /// is loaded, as `esft-train init` would fill it (normal with std 0.02, norms 1) but
    /// from the device's own generator: a full-size model with no file behind it, for
    /// benchmarks. Not reproducible.
    pub fn drawn(cfg: &super::Config) -> Self {
        let drawn = super::init::checkpoint_tensors(cfg)
            .into_iter()
            .map(|(name, shape, fill)| (name, (shape, fill)))
            .collect();
        Self {
            files: Vec::new(),
            index: HashMap::new(),
            drawn,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name) || self.drawn.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index
            .keys()
            .chain(self.drawn.keys())
            .map(String::as_str)
    }

    pub fn file_of(&self, name: &str) -> Option<&SafetensorsFile> {
        self.index.get(name).map(|&i| &self.files[i])
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        if let Some((shape, _)) = self.drawn.get(name) {
            return Some(shape);
        }
        self.file_of(name)?.info(name).map(|i| i.shape.as_slice())
    }

    /// Loads the model weight `name`, checking that it has `shape`, in the dtype
    /// `precision` gives that shape.
    pub fn weight(
        &self,
        name: &str,
        shape: &[usize],
        precision: Precision,
        device: &Device,
    ) -> Result<Tensor> {
        self.get(name, shape, precision.of(shape), device)
    }

    /// Loads `name`, checking that it has `shape`, converted to `dtype` on `device`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let actual = self.shape(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
        })?;
        if actual != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: actual.to_vec(),
            });
        }
        match (self.drawn.get(name), self.file_of(name)) {
            (Some((_, fill)), _) => Ok(fill.draw(shape, dtype, device)?),
            (None, Some(file)) => file.load(name, dtype, device),
            (None, None) => Err(ModelError::MissingTensor {
                name: name.to_string(),
            }),
        }
    }
}
