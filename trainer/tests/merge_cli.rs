//! `esft-train merge` writes a checkpoint that loads and carries the adapter's tensors.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

#[test]
fn merge_writes_the_adapter_tensors_into_a_full_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("lite-bf16");
    // A reference-layout adapter replacing expert 4 of layer 2 with zeros.
    let adapter = tmp.path().join("zeros");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("expert_cfg.json"),
        r#"{"experts": {"2": [4]}, "shared_experts": false, "non_expert_modules": false}"#,
    )
    .unwrap();
    let mut map = std::collections::HashMap::new();
    for (p, shape) in [
        ("gate_proj", (24, 64)),
        ("up_proj", (24, 64)),
        ("down_proj", (64, 24)),
    ] {
        let t =
            candle_core::Tensor::zeros(shape, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        map.insert(format!("layers.2.mlp.experts.4.{p}.weight"), t);
    }
    candle_core::safetensors::save(&map, adapter.join("adapter_model.safetensors")).unwrap();

    let out = tmp.path().join("merged");
    let o = Command::new(env!("CARGO_BIN_EXE_esft-train"))
        .args([
            "merge",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let merged = std::fs::read(out.join("model.safetensors")).unwrap();
    let merged = safetensors::SafeTensors::deserialize(&merged).unwrap();
    let original = std::fs::read(base.join("model.safetensors")).unwrap();
    let original = safetensors::SafeTensors::deserialize(&original).unwrap();
    assert_eq!(merged.len(), original.len());
    for (name, view) in original.tensors() {
        let m = merged.tensor(&name).unwrap();
        assert_eq!(m.dtype(), view.dtype(), "{name} keeps the base dtype");
        if name.starts_with("model.layers.2.mlp.experts.4.") {
            assert!(m.data().iter().all(|&b| b == 0), "{name} replaced");
        } else {
            assert_eq!(m.data(), view.data(), "{name} untouched");
        }
    }
    // A bad adapter path fails with a message, not a panic.
    let o = Command::new(env!("CARGO_BIN_EXE_esft-train"))
        .args([
            "merge",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            "/nonexistent",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an adapter directory"));
}
