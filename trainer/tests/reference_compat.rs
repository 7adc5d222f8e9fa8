//! Compatibility with the ESFT reference implementation: its routing logs give its shipped
//! scores, and its selection rule on them gives its shipped expert configs.

use std::io::Read;
use std::path::{Path, PathBuf};

mod common;
use common::ok as esft_train;

fn reference(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/esft")
        .join(rel)
}

/// The task's logs, decompressed into `dir` under their reference names.
fn unpack_logs(task: &str, dir: &Path) {
    for entry in std::fs::read_dir(reference(&format!("expert_scores/{task}"))).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if let Some(txt) = name.strip_suffix(".gz") {
            let mut text = String::new();
            flate2::read::GzDecoder::new(std::fs::File::open(&p).unwrap())
                .read_to_string(&mut text)
                .unwrap();
            std::fs::write(dir.join(txt), text).unwrap();
        }
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn scores_from_reference_logs_and_selection_reproduce_the_shipped_files() {
    for task in ["intent", "law"] {
        let tmp = tempfile::tempdir().unwrap();
        let logs = tmp.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        unpack_logs(task, &logs);
        let ours = tmp.path().join("scores.json");
        esft_train(&[
            "score",
            "--from-logs",
            logs.to_str().unwrap(),
            "--out",
            ours.to_str().unwrap(),
        ]);
        let got = json(&ours);
        let want = json(&reference(&format!("expert_scores/{task}/summary.json")));
        let mut compared = 0;
        for table in ["token_scores", "gate_scores"] {
            let (g, w) = (&got[table], &want[table]);
            assert_eq!(g.as_object().unwrap().len(), 26, "{task} {table}: layers");
            for (layer, experts) in w.as_object().unwrap() {
                for (e, v) in experts.as_object().unwrap() {
                    let ours = g[layer][e]
                        .as_f64()
                        .unwrap_or_else(|| panic!("{layer}/{e}"));
                    let diff = (ours - v.as_f64().unwrap()).abs();
                    assert!(
                        diff <= 1e-4,
                        "{task} {table} layer {layer} expert {e}: {ours} vs {v}"
                    );
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, 2 * 26 * 64);

        // Selection on our scores and on the shipped ones both give the shipped config.
        let shipped_cfg = json(&reference(&format!("expert_configs/{task}.json")));
        for scores in [
            ours.clone(),
            reference(&format!("expert_scores/{task}/summary.json")),
        ] {
            let cfg = tmp.path().join("cfg.json");
            esft_train(&[
                "select",
                "--scores",
                scores.to_str().unwrap(),
                "--score-function",
                "token",
                "--top-p",
                "0.2",
                "--out",
                cfg.to_str().unwrap(),
            ]);
            assert_eq!(
                json(&cfg),
                shipped_cfg,
                "{task}: selection from {}",
                scores.display()
            );
        }
    }
}
