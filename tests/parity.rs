//! Parity with the Hugging Face reference (transformers, f32, eager) for every fixture:
//! logits, greedy tokens, routing decisions, and batched == alone.

mod common;

use candle_core::DType;
use common::*;
use esft::engine::{generate_all, SamplingParams, Sequence};
use esft::model::tokenizer::TextTokenizer;
use esft::model::{Decoder, LoadOptions, LogitsWanted, RoutingRecord, SeqInput};

/// Loads a fixture with f32 compute and its weight matrices in `matrices` (`None`: f32).
fn load(name: &str, matrices: Option<DType>) -> Decoder {
    let opts = LoadOptions {
        matrix_dtype: matrices,
        ..load_options()
    };
    Decoder::load_dir(&fixture(name), &opts).unwrap()
}

fn full_logits(model: &Decoder, ids: &[u32], record: Option<&mut RoutingRecord>) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut batch = [SeqInput {
        tokens: ids,
        cache: &mut cache,
        experts: None,
        logits: LogitsWanted::All,
    }];
    let out = model.forward(&mut batch, record).unwrap();
    out.logits.unwrap().to_vec2().unwrap()
}

fn greedy_sequence(model: &Decoder, prompt: Vec<u32>, n: usize) -> Sequence {
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(n)
    };
    Sequence::new(
        prompt,
        params,
        model.new_cache(),
        &model.config().eos_token_ids,
        usize::MAX,
    )
}

fn check_logits(name: &str, matrices: Option<DType>) {
    let model = load(name, matrices);
    let r = reference(name);
    let mut worst = 0f32;
    for p in r["prompts"].as_array().unwrap() {
        let ids = u32s(&p["ids"]);
        let logits = full_logits(&model, &ids, None);
        let t = ids.len();
        for (j, want) in p["logits_last4"].as_array().unwrap().iter().enumerate() {
            let got = &logits[t - 4 + j];
            let d = max_abs_diff(got, &f32s(want));
            assert!(
                d <= 1e-4,
                "{name} {}: logits row {j} differ by {d}",
                p["name"]
            );
            worst = worst.max(d);
        }
    }
    eprintln!("{name} (matrices {matrices:?}): max abs logit diff {worst:e}");
}

fn check_greedy(name: &str, matrices: Option<DType>) {
    let model = load(name, matrices);
    let r = reference(name);
    for p in r["prompts"].as_array().unwrap() {
        let want = u32s(&p["greedy"]["new_ids"]);
        let mut seqs = [greedy_sequence(&model, u32s(&p["ids"]), want.len())];
        generate_all(&model, None, &mut seqs, 512).unwrap();
        assert_eq!(seqs[0].generated(), want.as_slice(), "{name} {}", p["name"]);
    }
}

fn check_routing(name: &str, matrices: Option<DType>) {
    let model = load(name, matrices);
    let r = reference(name);
    let ids = u32s(&r["prompts"][0]["ids"]);
    let mut record = RoutingRecord::default();
    full_logits(&model, &ids, Some(&mut record));
    let want_layers = r["routing_prompt0"].as_array().unwrap();
    assert_eq!(record.layers.len(), want_layers.len());
    for (got, want) in record.layers.iter().zip(want_layers) {
        assert_eq!(got.layer as u64, want["layer"].as_u64().unwrap());
        let k = got.top_k;
        for (t, (w_ids, w_weights)) in want["topk_ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(want["topk_weights"].as_array().unwrap())
            .enumerate()
        {
            assert_eq!(
                &got.ids[t * k..(t + 1) * k],
                u32s(w_ids).as_slice(),
                "{name} layer {} token {t}",
                got.layer
            );
            let d = max_abs_diff(&got.weights[t * k..(t + 1) * k], &f32s(w_weights));
            // Weights carry routed_scaling_factor (16 for v2-grouped): compare relatively.
            let scale = f32s(w_weights).iter().fold(1f32, |m, v| m.max(v.abs()));
            assert!(
                d <= 1e-5 * scale,
                "{name} layer {} token {t}: weights differ by {d}",
                got.layer
            );
        }
    }
}

fn check_batch_equals_alone(name: &str, matrices: Option<DType>) {
    let model = load(name, matrices);
    let r = reference(name);
    let prompts = prompt_ids(&r);
    let mut together: Vec<Sequence> = prompts
        .iter()
        .map(|p| greedy_sequence(&model, p.clone(), 16))
        .collect();
    // A small prefill budget also exercises chunked prefill next to decoding sequences.
    generate_all(&model, None, &mut together, 7).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let mut alone = [greedy_sequence(&model, p.clone(), 16)];
        generate_all(&model, None, &mut alone, 512).unwrap();
        assert_eq!(
            together[i].generated(),
            alone[0].generated(),
            "{name} prompt {i}"
        );
        let want = u32s(&r["prompts"][i]["greedy"]["new_ids"]);
        assert_eq!(alone[0].generated(), want.as_slice());
    }
}

macro_rules! parity_tests {
    ($($module:ident => $name:literal, $matrices:expr);* $(;)?) => {$(
        mod $module {
            use super::*;
            #[test] fn logits_last4() { check_logits($name, $matrices) }
            #[test] fn greedy_16() { check_greedy($name, $matrices) }
            #[test] fn routing_prompt0() { check_routing($name, $matrices) }
            #[test] fn batch_equals_alone() { check_batch_equals_alone($name, $matrices) }
        }
    )*};
}

parity_tests! {
    lite => "lite", None;
    lite_yarn => "lite-yarn", None;
    v2_grouped => "v2-grouped", None;
    lite_bf16 => "lite-bf16", None;
    // The bf16 checkpoint with its matrices kept in bf16 (widened by the CPU kernels).
    lite_bf16_matrices_in_bf16 => "lite-bf16", Some(DType::BF16);
    lite_yarn_sharded => "lite-yarn-sharded", None;
    deepseek_v3 => "deepseek-v3", None;
    deepseek_v3_noq => "deepseek-v3-noq", None;
    qwen3_moe => "qwen3-moe", None;
    qwen3_moe_dense0 => "qwen3-moe-dense0", None;
    olmoe => "olmoe", None;
}

#[test]
fn bf16_matrices_stay_bf16_and_give_the_logits_of_f32_matrices() {
    let (wide, narrow) = (
        load("lite-bf16", None),
        load("lite-bf16", Some(DType::BF16)),
    );
    assert_eq!(narrow.lm_head().dtype(), DType::BF16);
    assert_eq!(wide.lm_head().dtype(), DType::F32);
    let ids = u32s(&reference("lite-bf16")["prompts"][0]["ids"]);
    assert_narrow_matches_wide(&wide, &narrow, &ids);
}

/// Asserts that `narrow` (matrices kept narrow) gives the logits of `wide` (the same values
/// widened to f32 at load) on `ids`, and returns them. The same f32 products of the same
/// values: with AVX-512 every product of both runs in the same kernels, bit for bit; below
/// it the f32 model takes candle's matmul for prefill, another summation order.
fn assert_narrow_matches_wide(wide: &Decoder, narrow: &Decoder, ids: &[u32]) -> Vec<Vec<f32>> {
    let (a, b) = (full_logits(wide, ids, None), full_logits(narrow, ids, None));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0f32, f32::max);
    let limit = if esft::model::cpu_kernels::tiled() {
        0.0
    } else {
        1e-5
    };
    assert!(d <= limit, "narrow matrices change the logits by {d}");
    a
}

#[test]
fn bf16_weights_load_as_bf16_on_disk() {
    // The bf16 fixture really stores bf16 (so the parity above covers bf16 -> f32 loading).
    let w = esft::model::load::WeightStore::open_dir(&fixture("lite-bf16")).unwrap();
    let f = w.file_of("model.norm.weight").unwrap();
    assert_eq!(
        format!("{:?}", f.info("model.norm.weight").unwrap().dtype),
        "BF16"
    );
}

#[test]
fn tokenizer_and_chat_template_match_reference() {
    for name in FIXTURES {
        let r = reference(name);
        let dir = fixture(name);
        let tok = TextTokenizer::from_dir(&dir, &[1]).unwrap();
        for s in r["tokenizer"]["samples"].as_array().unwrap() {
            let text = s["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text, true).unwrap(),
                u32s(&s["ids_with_special"]),
                "{text}"
            );
            assert_eq!(
                tok.encode(text, false).unwrap(),
                u32s(&s["ids_no_special"]),
                "{text}"
            );
        }
        let ex = &r["tokenizer"]["chat_template_example"];
        let messages: Vec<esft::model::tokenizer::ChatMessage> =
            serde_json::from_value(ex["messages"].clone()).unwrap();
        let rendered = tok.render_chat(&messages, true).unwrap();
        assert_eq!(rendered, ex["rendered"].as_str().unwrap());
        assert_eq!(tok.encode_chat(&messages, true).unwrap(), u32s(&ex["ids"]));
    }
}

#[test]
fn differentiable_forward_matches_the_reference_too() {
    // The trainer runs the model with autograd-friendly ops; they must compute the same.
    for name in [
        "v2-grouped",
        "lite-yarn",
        "deepseek-v3",
        "deepseek-v3-noq",
        "qwen3-moe",
        "qwen3-moe-dense0",
        "olmoe",
    ] {
        let mut model = load(name, None);
        model.set_differentiable(true);
        let r = reference(name);
        let p = &r["prompts"][0];
        let ids = u32s(&p["ids"]);
        let logits = full_logits(&model, &ids, None);
        let t = ids.len();
        for (j, want) in p["logits_last4"].as_array().unwrap().iter().enumerate() {
            let d = max_abs_diff(&logits[t - 4 + j], &f32s(want));
            assert!(
                d <= 1e-4,
                "{name}: differentiable logits row {j} differ by {d}"
            );
        }
    }
}

/// `name` rewritten with every tensor in `dtype`, loaded with its matrices kept in `dtype`
/// and widened to f32 at load: the same f32 products of the same values. Returns the
/// logits of prompt 1 and the directory.
fn narrow_copy_matches_wide(name: &str, dtype: DType) -> (Vec<Vec<f32>>, tempfile::TempDir) {
    let dir = copy_fixture(name);
    let w = esft::model::load::WeightStore::open_dir(dir.path()).unwrap();
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = w
        .names()
        .map(|n| {
            let shape = w.shape(n).unwrap().to_vec();
            let t = w.get(n, &shape, dtype, &candle_core::Device::Cpu);
            (n.to_string(), t.unwrap())
        })
        .collect();
    drop(w);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let load_with = |matrices: Option<DType>| {
        let opts = LoadOptions {
            matrix_dtype: matrices,
            ..load_options()
        };
        Decoder::load_dir(dir.path(), &opts).unwrap()
    };
    let (wide, narrow) = (load_with(None), load_with(Some(dtype)));
    assert_eq!(narrow.lm_head().dtype(), dtype);
    let ids = u32s(&reference(name)["prompts"][1]["ids"]);
    let a = assert_narrow_matches_wide(&wide, &narrow, &ids);
    // And the rounding really moved the model off the f32 reference (so the equality above
    // is between two narrow models, not two copies of the f32 one).
    let f32_model = load(name, None);
    let c = full_logits(&f32_model, &ids, None);
    assert!(max_abs_diff(a.last().unwrap(), c.last().unwrap()) > 0.0);
    (a, dir)
}

#[test]
fn f16_matrices_give_the_logits_of_their_f32_values() {
    narrow_copy_matches_wide("lite", DType::F16);
}

#[test]
fn bf16_matrices_work_for_every_architecture() {
    for name in ["deepseek-v3", "qwen3-moe-dense0", "olmoe"] {
        let (logits, dir) = narrow_copy_matches_wide(name, DType::BF16);
        // bf16 weights stay close to the f32 reference (greedy decisions have >= 1e-3
        // margins; bf16 rounding of these tiny models moves logits by ~1e-2).
        let want = f32s(&reference(name)["prompts"][1]["logits_last4"][3]);
        let d = max_abs_diff(logits.last().unwrap(), &want);
        assert!(d < 0.1, "{name}: bf16 weights move the last logits by {d}");
        drop(dir);
    }
}
