//! Adapters: output equals the merged checkpoint's in both directory formats, and broken or
//! mismatched adapters are refused with a clear message.

mod common;

use common::*;
use esft::adapter::merge::merge_checkpoint;
use esft::adapter::{load_adapter, AdapterStats, BaseModel, DeviceSlots, Install};
use esft::model::{Decoder, ExpertMap, LoadedModel};
use std::path::Path;
use std::sync::Arc;

fn spec() -> AdapterSpec {
    // Experts the fixture prompts route to in both MoE layers of `lite`.
    AdapterSpec {
        experts: vec![(1, vec![0, 3, 5, 9, 12]), (2, vec![1, 4, 8, 15])],
        shared: false,
        seed: 1,
    }
}

fn install(loaded: &mut LoadedModel, dir: &Path) -> Arc<ExpertMap> {
    let base = BaseModel::new(loaded.model.config().clone(), loaded.store.clone());
    let w = load_adapter(dir, "t", &base, candle_core::DType::F32).unwrap();
    let mut slots = DeviceSlots::new(&loaded.model, usize::MAX, Arc::new(AdapterStats::default()));
    match slots.install(&mut loaded.model, &w).unwrap() {
        Install::Ready(m) => m,
        Install::NoRoom => panic!("no room"),
    }
}

fn greedy(model: &Decoder, ids: &[u32], map: Option<Arc<ExpertMap>>) -> Vec<u32> {
    use esft::engine::{generate_all, SamplingParams, Sequence};
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(16)
    };
    let mut s = [Sequence::new(
        ids.to_vec(),
        params,
        model.new_cache(),
        &[],
        usize::MAX,
    )];
    s[0].experts = map;
    generate_all(model, None, &mut s, 512).unwrap();
    s[0].generated().to_vec()
}

fn check_adapter_equals_merged(fixture_name: &str, spec: AdapterSpec, reference_layout: bool) {
    let base_dir = fixture(fixture_name);
    let tmp = tempfile::tempdir().unwrap();
    let adapter_dir = tmp.path().join("task-a");
    if reference_layout {
        write_reference_adapter(&base_dir, &adapter_dir, &spec);
    } else {
        write_native_adapter(&base_dir, &adapter_dir, &spec);
    }
    let merged_dir = tmp.path().join("merged");
    merge_checkpoint(&base_dir, &adapter_dir, &merged_dir).unwrap();

    let mut loaded = LoadedModel::load(&base_dir, &load_options()).unwrap();
    let map = install(&mut loaded, &adapter_dir);
    let merged = Decoder::load_dir(&merged_dir, &load_options()).unwrap();
    let r = reference(fixture_name);
    let mut changed = false;
    for p in r["prompts"].as_array().unwrap() {
        let ids = u32s(&p["ids"]);
        let a = logits_all(&loaded.model, &ids, Some(&map));
        let m = logits_all(&merged, &ids, None);
        let b = logits_all(&loaded.model, &ids, None);
        for (x, y) in a.iter().zip(&m) {
            let d = max_abs_diff(x, y);
            assert!(
                d <= 1e-5,
                "{fixture_name}: adapter vs merged logits differ by {d}"
            );
        }
        changed |= max_abs_diff(a.last().unwrap(), b.last().unwrap()) > 1e-3;
        assert_eq!(
            greedy(&loaded.model, &ids, Some(map.clone())),
            greedy(&merged, &ids, None)
        );
    }
    assert!(changed, "the adapter should change the output");
}

#[test]
fn native_adapter_equals_merged_checkpoint() {
    check_adapter_equals_merged("lite", spec(), false);
}

#[test]
fn reference_layout_adapter_equals_merged_checkpoint() {
    check_adapter_equals_merged("lite", spec(), true);
}

#[test]
fn adapter_with_shared_experts_equals_merged_checkpoint() {
    let s = AdapterSpec {
        experts: vec![(1, vec![2, 6]), (2, vec![11])],
        shared: true,
        seed: 5,
    };
    check_adapter_equals_merged("v2-grouped", s, false);
}

#[test]
fn adapters_equal_merged_checkpoints_for_every_architecture() {
    let cases = [
        // DeepSeek-V3: MoE layers 1 and 2, with its shared expert.
        (
            "deepseek-v3",
            vec![(1, vec![0, 5, 9, 14]), (2, vec![2, 3, 11])],
            true,
        ),
        // Qwen3-MoE: every layer MoE.
        (
            "qwen3-moe",
            vec![(0, vec![1, 7]), (3, vec![0, 4, 9, 15])],
            false,
        ),
        // Qwen3-MoE with a dense layer 0 (mlp_only_layers).
        (
            "qwen3-moe-dense0",
            vec![(1, vec![3, 6, 10]), (2, vec![0, 8])],
            false,
        ),
        (
            "olmoe",
            vec![(0, vec![2, 5, 13]), (2, vec![1, 6, 7, 12])],
            false,
        ),
    ];
    for (name, experts, shared) in cases {
        let spec = AdapterSpec {
            experts,
            shared,
            seed: 3,
        };
        check_adapter_equals_merged(name, spec, false);
    }
}

#[test]
fn generate_cli_with_adapter_prints_what_the_merged_checkpoint_prints() {
    let base_dir = fixture("lite");
    let tmp = tempfile::tempdir().unwrap();
    let adapter_dir = tmp.path().join("task-a");
    write_native_adapter(&base_dir, &adapter_dir, &spec());
    let out = tmp.path().join("merged");
    merge_checkpoint(&base_dir, &adapter_dir, &out).unwrap();
    let run = |model: &Path, adapter: Option<&Path>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_esft-serve"));
        c.args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "The quick brown fox",
        ]);
        c.args(["--max-tokens", "12", "--ignore-eos", "--json"]);
        if let Some(a) = adapter {
            c.args(["--adapter", a.to_str().unwrap()]);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let with_adapter = run(&base_dir, Some(&adapter_dir));
    assert_eq!(with_adapter, run(&out, None));
    assert_ne!(with_adapter, run(&base_dir, None));
}
