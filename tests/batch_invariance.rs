//! On a CPU whose products run in register tiles (AVX-512, or AVX2 with FMA), every f32
//! inference product sums each output in a fixed order: a sequence's logits are then the
//! same bits whether it runs alone or in a batch, and whether its prompt is prefilled at
//! once or in chunks beside other sequences' decode steps.

mod common;

use common::*;
use esft::model::cpu_kernels;
use esft::model::{Decoder, LogitsWanted, SeqCache, SeqInput};

#[test]
fn logits_do_not_depend_on_batch_or_chunking() {
    if !cpu_kernels::tiled() {
        eprintln!("skipped: this CPU has no register tiles, so products change with batch size");
        return;
    }
    for name in [
        "lite-yarn",
        "v2-grouped",
        "deepseek-v3-noq",
        "qwen3-moe",
        "qwen3-moe-dense0",
        "olmoe",
    ] {
        let model = Decoder::load_dir(&fixture(name), &load_options()).unwrap();
        let r = reference(name);
        let prompts = prompt_ids(&r);
        let target = &prompts[0];
        let want = logits_all(&model, target, None);

        // The target prefilled in chunks of 5 while the others prefill, then decode.
        let mut caches: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
        let mut got: Vec<Vec<f32>> = Vec::new();
        let mut done = vec![0usize; prompts.len()];
        while done[0] < target.len() {
            let mut batch: Vec<SeqInput<'_>> = Vec::new();
            let mut target_rows = None;
            for (i, (p, cache)) in prompts.iter().zip(caches.iter_mut()).enumerate() {
                let take = if i == 0 { 5 } else { 3 + i };
                let end = (done[i] + take).min(p.len());
                let tokens = if done[i] < p.len() {
                    &p[done[i]..end]
                } else {
                    &p[p.len() - 1..]
                };
                if i == 0 {
                    target_rows = Some(tokens.len());
                }
                done[i] = end;
                batch.push(SeqInput {
                    tokens,
                    cache,
                    experts: None,
                    logits: LogitsWanted::All,
                });
            }
            let out = model.forward(&mut batch, None).unwrap();
            let logits: Vec<Vec<f32>> = out.logits.unwrap().to_vec2().unwrap();
            assert_eq!(out.rows[0].len(), target_rows.unwrap());
            got.extend(logits[out.rows[0].clone()].iter().cloned());
        }
        assert_eq!(got.len(), want.len());
        for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g == w,
                "{name}: position {pos} differs by {}",
                max_abs_diff(g, w)
            );
        }
    }
}
