//! Broken or mismatched adapters are refused with a clear message, and the base and the
//! other adapters keep serving.

mod common;

use common::*;
use esft::adapter::{
    AdapterError, AdapterKey, AdapterRegistry, AdapterStats, AdapterStore, AdapterWeights,
    BaseModel, DeviceSlots, Install,
};
use esft::model::{LoadOptions, LoadedModel};
use std::path::Path;
use std::sync::Arc;

fn good_spec() -> AdapterSpec {
    AdapterSpec {
        experts: vec![(1, vec![0, 3]), (2, vec![4])],
        shared: false,
        seed: 2,
    }
}

fn registry(root: &Path) -> AdapterRegistry {
    let base = Arc::new(BaseModel::open(&fixture("lite")).unwrap());
    AdapterRegistry::new(
        AdapterStore::open(root).unwrap(),
        base,
        candle_core::DType::F32,
        1 << 30,
        Arc::new(AdapterStats::default()),
    )
}

/// Reads and validates the current version of the shared adapter `name`.
fn load(reg: &AdapterRegistry, name: &str) -> Result<Arc<AdapterWeights>, AdapterError> {
    let key = AdapterKey::parse(name)?;
    let v = reg
        .resolve(&[key])
        .ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
    reg.load(&v)
}

/// Writes a good adapter named `name` into `root`, then lets `breakit` damage it.
fn broken(root: &Path, name: &str, breakit: impl FnOnce(&Path)) {
    let dir = root.join(name);
    write_native_adapter(&fixture("lite"), &dir, &good_spec());
    breakit(&dir);
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("adapter.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(p, m.to_string()).unwrap();
}

fn rewrite_tensor(dir: &Path, name: &str, t: candle_core::Tensor) {
    let p = dir.join("adapter.safetensors");
    let mut map = candle_core::safetensors::load(&p, &candle_core::Device::Cpu).unwrap();
    map.insert(name.to_string(), t);
    candle_core::safetensors::save(&map, &p).unwrap();
}

#[test]
fn each_broken_adapter_is_refused_with_a_clear_message_and_others_keep_working() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write_native_adapter(&fixture("lite"), &root.join("good"), &good_spec());
    let up = "model.layers.1.mlp.experts.0.up_proj.weight";

    type Case<'a> = (&'a str, Box<dyn FnOnce(&Path)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            // Same byte size as the F32 data it labels: only the declared dtype is wrong.
            "int-dtype",
            Box::new(|d: &Path| {
                let p = d.join("adapter.safetensors");
                let mut b = std::fs::read(&p).unwrap();
                let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                let header = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
                let edited = header.replacen("\"F32\"", "\"I32\"", 1);
                assert_ne!(header, edited);
                b[8..8 + n].copy_from_slice(edited.as_bytes());
                std::fs::write(&p, b).unwrap();
            }),
            "is declared I32; adapter weights must be F32, F16 or BF16",
        ),
        (
            "truncated",
            Box::new(|d: &Path| {
                let p = d.join("adapter.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            }),
            "truncated",
        ),
        (
            "wrong-shape",
            Box::new(move |d: &Path| {
                let t = candle_core::Tensor::zeros(
                    (12, 128),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .unwrap();
                rewrite_tensor(d, up, t);
            }),
            "shape [12, 128], the base has [24, 64]",
        ),
        (
            "expert-out-of-range",
            Box::new(|d: &Path| {
                edit_manifest(d, |m| {
                    m["expert_config"]["experts"]["1"] = serde_json::json!([0, 3, 16])
                });
            }),
            "expert id 16 in layer 1 is out of range",
        ),
        (
            "dense-layer",
            Box::new(|d: &Path| {
                edit_manifest(d, |m| {
                    m["expert_config"]["experts"]["0"] = serde_json::json!([1])
                });
            }),
            "layer 0, which is not a MoE layer",
        ),
        (
            "other-base",
            Box::new(|d: &Path| {
                edit_manifest(d, |m| m["base"]["config_fingerprint"] = "0123".into());
            }),
            "different base model",
        ),
        (
            "other-base-tensors",
            Box::new(|d: &Path| {
                edit_manifest(d, |m| m["base"]["tensors_fingerprint"] = "0123".into());
            }),
            "different base model",
        ),
        (
            "nan",
            Box::new(move |d: &Path| {
                let mut v = vec![0f32; 24 * 64];
                v[77] = f32::NAN;
                rewrite_tensor(
                    d,
                    up,
                    candle_core::Tensor::from_vec(v, (24, 64), &candle_core::Device::Cpu).unwrap(),
                );
            }),
            "non-finite value (NaN) at flat index 77",
        ),
        (
            "inf",
            Box::new(move |d: &Path| {
                let mut v = vec![0f32; 24 * 64];
                v[5] = f32::INFINITY;
                rewrite_tensor(
                    d,
                    up,
                    candle_core::Tensor::from_vec(v, (24, 64), &candle_core::Device::Cpu).unwrap(),
                );
            }),
            "non-finite value (inf)",
        ),
        (
            "uncovered-tensor",
            Box::new(|d: &Path| {
                let t = candle_core::Tensor::zeros(
                    (24, 64),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .unwrap();
                rewrite_tensor(d, "model.layers.2.mlp.experts.9.up_proj.weight", t);
            }),
            "not covered by the expert config",
        ),
        (
            "missing-tensor",
            Box::new(|d: &Path| {
                let p = d.join("adapter.safetensors");
                let mut map =
                    candle_core::safetensors::load(&p, &candle_core::Device::Cpu).unwrap();
                map.remove("model.layers.2.mlp.experts.4.down_proj.weight");
                candle_core::safetensors::save(&map, &p).unwrap();
            }),
            "missing tensor model.layers.2.mlp.experts.4.down_proj.weight",
        ),
    ];
    let reg = registry(root);
    for (name, breakit, expect) in cases {
        broken(root, name, breakit);
        let err = match load(&reg, name) {
            Ok(_) => panic!("{name} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(expect), "{name}: {err}");
        assert!(
            err.contains(name),
            "{name}: the message names the adapter: {err}"
        );
        assert!(
            !err.contains(&*root.to_string_lossy()),
            "{name}: no server paths: {err}"
        );
    }
    // The good adapter still loads, and serves next to the base.
    let good = load(&reg, "good").unwrap();
    assert!(reg.in_host(good.version));
    let mut loaded = LoadedModel::load(&fixture("lite"), &LoadOptions::default()).unwrap();
    let mut slots = DeviceSlots::new(&loaded.model, usize::MAX, Arc::new(AdapterStats::default()));
    assert!(matches!(
        slots.install(&mut loaded.model, &good).unwrap(),
        Install::Ready(_)
    ));
}

#[test]
fn names_with_path_separators_are_refused_before_touching_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry(tmp.path());
    for bad in ["../lite", "a/b/c", "..", "x\\y", "/etc", "a/.."] {
        let err = load(&reg, bad).err().unwrap().to_string();
        assert!(err.contains("invalid adapter name"), "{bad}: {err}");
    }
    let err = load(&reg, "absent").err().unwrap().to_string();
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn non_expert_adapters_are_refused_for_serving_but_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("attn");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("expert_cfg.json"),
        r#"{"experts": {}, "non_expert_modules": true}"#,
    )
    .unwrap();
    let base = BaseModel::open(&fixture("lite")).unwrap();
    let name = "model.layers.1.self_attn.o_proj.weight";
    let t = perturbed(&base, name, 3);
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(name.to_string(), t)]),
        dir.join("m.safetensors"),
    )
    .unwrap();
    let w = esft::adapter::load_adapter(&dir, "attn", &base, candle_core::DType::F32).unwrap();
    let mut loaded = LoadedModel::load(&fixture("lite"), &LoadOptions::default()).unwrap();
    let mut slots = DeviceSlots::new(&loaded.model, usize::MAX, Arc::new(AdapterStats::default()));
    let err = slots
        .install(&mut loaded.model, &w)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("esft-train merge"), "{err}");
    esft::adapter::merge::merge_checkpoint(&fixture("lite"), &dir, &tmp.path().join("merged"))
        .unwrap();
}

#[test]
fn an_adapter_of_another_architecture_is_refused_naming_it() {
    // Same expert layout (16 experts, MoE layers 1 and 2 in both), another architecture.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qwen");
    write_native_adapter(&fixture("qwen3-moe"), &dir, &good_spec());
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter.json")).unwrap()).unwrap();
    assert_eq!(manifest["base"]["architecture"], "Qwen3MoeForCausalLM");
    assert!(manifest["base"]["config_fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("qwen3_moe-"));
    for other in ["deepseek-v3", "olmoe", "lite"] {
        let base = BaseModel::open(&fixture(other)).unwrap();
        let err = esft::adapter::load_adapter(&dir, "qwen", &base, candle_core::DType::F32)
            .err()
            .unwrap_or_else(|| panic!("{other} accepted a Qwen3-MoE adapter"))
            .to_string();
        assert!(
            err.contains("architecture Qwen3MoeForCausalLM"),
            "{other}: {err}"
        );
    }
    // The same layout from its own base loads.
    let base = BaseModel::open(&fixture("qwen3-moe")).unwrap();
    assert!(esft::adapter::load_adapter(&dir, "qwen", &base, candle_core::DType::F32).is_ok());
}
