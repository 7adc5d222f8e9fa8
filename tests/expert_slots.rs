//! The expert-map hook: a sequence whose map points an expert at another slot computes
//! exactly what a model with that expert's weights replaced computes, in a batch that
//! mixes it with base sequences.

mod common;

use candle_core::DType;
use common::*;
use esft::model::moe::Mlp;
use esft::model::{Decoder, ExpertMap, LoadOptions, LogitsWanted, SeqInput};

fn load() -> Decoder {
    load_fixture("v2-grouped", None)
}

fn load_fixture(name: &str, matrices: Option<DType>) -> Decoder {
    let opts = LoadOptions {
        matrix_dtype: matrices,
        ..load_options()
    };
    Decoder::load_dir(&fixture(name), &opts).unwrap()
}

#[test]
fn remapped_expert_equals_replaced_weights_in_a_mixed_batch() {
    remap_case("v2-grouped", None, None);
}

#[test]
fn f32_adapter_slots_beside_bf16_base_matrices() {
    // An adapter's experts are loaded in the compute dtype (f32) while the base keeps its
    // matrices in bf16: one forward multiplies both kinds.
    remap_case("lite-bf16", Some(DType::BF16), Some(DType::F32));
}

/// Model A gets extra slots holding copies of expert 3 (in `copy_dtype`, else as stored)
/// and a map sending every other expert to them; model B has every expert overwritten
/// with expert 3. A remapped sequence in a mixed batch on A must equal B.
fn remap_case(name: &str, matrices: Option<DType>, copy_dtype: Option<DType>) {
    let r = reference(name);
    let ids = u32s(&r["prompts"][0]["ids"]);
    let load = || load_fixture(name, matrices);
    let cfg_layers: Vec<usize> = load().config().moe_layers().collect();

    let mut a = load();
    let mut map = ExpertMap::identity(a.config());
    let cfg = a.config().clone();
    for &layer in &cfg_layers {
        let moe = a.moe_mut(layer).unwrap();
        let mut copy = moe.slot(3).unwrap().clone();
        if let Some(dt) = copy_dtype {
            copy = Mlp {
                gate_up: copy.gate_up.to_dtype(dt).unwrap(),
                down: copy.down.to_dtype(dt).unwrap(),
            };
            assert_ne!(Some(moe.slot(3).unwrap().down.dtype()), copy_dtype);
        }
        let slot = moe.slot_count();
        moe.set_slot(slot, Some(copy));
        let slot = slot as u32;
        // Every expert the prompt routes to in this layer would do; remap all of them.
        for e in 0..cfg.n_routed_experts {
            if e != 3 {
                map.set(layer, e, slot);
            }
        }
    }
    let mut b = load();
    for &layer in &cfg_layers {
        let moe = b.moe_mut(layer).unwrap();
        let three = moe.slot(3).unwrap().clone();
        for e in 0..cfg.n_routed_experts {
            moe.set_slot(e, Some(three.clone()));
        }
    }
    let want = logits_all(&b, &ids, None);
    let base = logits_all(&a, &ids, None);

    // Mixed batch in A: base, remapped, base.
    let (mut c0, mut c1, mut c2) = (a.new_cache(), a.new_cache(), a.new_cache());
    let mut batch = [
        SeqInput {
            tokens: &ids,
            cache: &mut c0,
            experts: None,
            logits: LogitsWanted::All,
        },
        SeqInput {
            tokens: &ids,
            cache: &mut c1,
            experts: Some(&map),
            logits: LogitsWanted::All,
        },
        SeqInput {
            tokens: &ids,
            cache: &mut c2,
            experts: None,
            logits: LogitsWanted::All,
        },
    ];
    let out = a.forward(&mut batch, None).unwrap();
    let all: Vec<Vec<f32>> = out.logits.unwrap().to_vec2().unwrap();
    let t = ids.len();
    for i in 0..t {
        assert!(max_abs_diff(&all[out.rows[1].start + i], &want[i]) < 1e-5);
        assert!(max_abs_diff(&all[out.rows[0].start + i], &base[i]) < 1e-5);
        assert!(max_abs_diff(&all[out.rows[2].start + i], &base[i]) < 1e-5);
    }
    // And the remap really changed something.
    assert!(max_abs_diff(&want[t - 1], &base[t - 1]) > 1e-3);
}

#[test]
fn a_map_pointing_at_a_missing_slot_is_an_error_not_a_crash() {
    let model = load();
    let cfg = model.config().clone();
    let mut map = ExpertMap::identity(&cfg);
    for e in 0..cfg.n_routed_experts {
        map.set(cfg.first_k_dense_replace, e, 999);
    }
    let mut cache = model.new_cache();
    let mut batch = [SeqInput {
        tokens: &[0, 5, 6],
        cache: &mut cache,
        experts: Some(&map),
        logits: LogitsWanted::Last,
    }];
    let err = model.forward(&mut batch, None).err().unwrap().to_string();
    assert!(err.contains("slot 999"), "{err}");
}
