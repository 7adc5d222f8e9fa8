//! `esft-train synth` from the command line: help, a small run, the files and its summary.

use std::process::Command;

fn synth(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_esft-train"))
        .arg("synth")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn help_names_the_options() {
    let o = synth(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--out",
        "--seed",
        "--general-train",
        "--task-train",
        "--eval",
    ] {
        assert!(text.contains(opt), "{opt} missing from\n{text}");
    }
}

#[test]
fn small_run_writes_every_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("data");
    let o = synth(&[
        "--out",
        out.to_str().unwrap(),
        "--seed",
        "7",
        "--general-train",
        "50",
        "--task-train",
        "30",
        "--eval",
        "5",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("pretrain.jsonl: 200 samples"), "{err}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["seed"], 7);
    let domains = m["domains"].as_array().unwrap();
    assert_eq!(domains.len(), 7);
    for d in domains {
        let name = d["name"].as_str().unwrap();
        let lines = |f: &str| {
            std::fs::read_to_string(out.join(name).join(f))
                .unwrap()
                .lines()
                .count()
        };
        // General and auxiliary domains get --general-train samples, tasks --task-train.
        let want = if d["kind"] == "downstream" { 30 } else { 50 };
        assert_eq!(d["train"], want, "{name}");
        assert_eq!(lines("train.jsonl"), want, "{name}");
        assert_eq!(d["eval"], 5);
        assert_eq!(lines("eval.jsonl"), 5, "{name}");
    }
    let pretrain = std::fs::read_to_string(out.join("pretrain.jsonl")).unwrap();
    assert_eq!(pretrain.lines().count(), 200);

    let o = synth(&["--out", out.to_str().unwrap(), "--eval", "0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--eval must be at least 1"));
}
