//! Broken checkpoints are refused with an error that names the problem.

mod common;

use common::*;
use esft::model::{LoadOptions, LoadedModel};
use std::collections::HashMap;
use std::path::Path;

fn load_err(dir: &Path) -> String {
    match LoadedModel::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites `model.safetensors` in `dir` after `edit` changed the tensor map.
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, (Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: HashMap<String, (Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut map);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = map
        .iter()
        .map(|(n, (shape, data))| {
            let v =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap();
            (n.clone(), v)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn missing_config_json() {
    let dir = copy_fixture("lite");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config") && e.contains("config.json"), "{e}");
}

#[test]
fn missing_tokenizer_json() {
    let dir = copy_fixture("lite");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("tokenizer") && e.contains("tokenizer.json"),
        "{e}"
    );
}

#[test]
fn unsupported_config_value_is_named() {
    let dir = copy_fixture("lite");
    let p = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["topk_method"] = "noaux_tc".into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("topk_method") && e.contains("noaux_tc"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("lite");
    let name = "model.layers.1.mlp.experts.3.up_proj.weight";
    rewrite_weights(dir.path(), |m| {
        m.remove(name).unwrap();
    });
    let e = load_err(dir.path());
    assert!(e.contains("missing tensor") && e.contains(name), "{e}");
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let dir = copy_fixture("lite");
    let name = "model.layers.2.self_attn.kv_b_proj.weight";
    rewrite_weights(dir.path(), |m| {
        let (shape, data) = m.get_mut(name).unwrap();
        // Same element count, different shape.
        *shape = vec![shape[1], shape[0]];
        let _ = data;
    });
    let e = load_err(dir.path());
    assert!(
        e.contains(name) && e.contains("[32, 256]") && e.contains("[256, 32]"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors_file() {
    let dir = copy_fixture("lite");
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("truncated") && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn truncated_shard_of_a_sharded_checkpoint() {
    let dir = copy_fixture("lite-yarn-sharded");
    let p = dir.path().join("model-00003-of-000004.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..100]).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("truncated") && e.contains("model-00003-of-000004"),
        "{e}"
    );
}

#[test]
fn missing_shard_is_named() {
    let dir = copy_fixture("lite-yarn-sharded");
    std::fs::remove_file(dir.path().join("model-00002-of-000004.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model-00002-of-000004.safetensors"), "{e}");
}
