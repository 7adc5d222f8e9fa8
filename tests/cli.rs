//! `esft-serve generate` end to end, as a newcomer runs it.

mod common;

use common::*;
use std::process::Command;

fn generate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_esft-serve"))
        .arg("generate")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_line(stdout: &str) -> serde_json::Value {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    serde_json::from_str(lines[0]).unwrap()
}

#[test]
fn prompt_ids_greedy_matches_reference() {
    for name in ["lite", "v2-grouped"] {
        let r = reference(name);
        for p in r["prompts"].as_array().unwrap() {
            let ids: Vec<String> = u32s(&p["ids"]).iter().map(u32::to_string).collect();
            let dir = fixture(name);
            let (ok, out, err) = generate(&[
                "--model",
                dir.to_str().unwrap(),
                "--prompt-ids",
                &ids.join(","),
                "--max-tokens",
                "16",
                "--ignore-eos",
                "--json",
            ]);
            assert!(ok, "{err}");
            let j = json_line(&out);
            assert_eq!(
                u32s(&j["prompt_ids"]),
                u32s(&p["ids"]),
                "ids are used verbatim"
            );
            assert_eq!(
                u32s(&j["new_ids"]),
                u32s(&p["greedy"]["new_ids"]),
                "{name} {}",
                p["name"]
            );
            assert!(j["text"].is_string());
        }
    }
}

#[test]
fn prompt_and_chat_tokenize_like_the_reference() {
    let r = reference("lite");
    let dir = fixture("lite");
    let text = r["prompts"][0]["text"].as_str().unwrap();
    let (ok, out, err) = generate(&[
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        text,
        "--max-tokens",
        "16",
        "--ignore-eos",
        "--json",
    ]);
    assert!(ok, "{err}");
    let j = json_line(&out);
    assert_eq!(u32s(&j["prompt_ids"]), u32s(&r["prompts"][0]["ids"]));
    assert_eq!(
        u32s(&j["new_ids"]),
        u32s(&r["prompts"][0]["greedy"]["new_ids"])
    );

    let ex = &r["tokenizer"]["chat_template_example"];
    let user = ex["messages"][0]["content"].as_str().unwrap();
    let (ok, out, err) = generate(&[
        "--model",
        dir.to_str().unwrap(),
        "--chat",
        user,
        "--max-tokens",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert_eq!(u32s(&json_line(&out)["prompt_ids"]), u32s(&ex["ids"]));
}

#[test]
fn seeded_sampling_is_reproducible() {
    let dir = fixture("lite");
    let args = [
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--max-tokens",
        "12",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "42",
        "--ignore-eos",
        "--json",
    ];
    let (ok, a, err) = generate(&args);
    assert!(ok, "{err}");
    let (_, b, _) = generate(&args);
    assert_eq!(a, b);
    assert_eq!(json_line(&a)["new_ids"].as_array().unwrap().len(), 12);
}

#[test]
fn bf16_checkpoint_with_bf16_matrices_generates_the_reference_tokens() {
    let name = "lite-bf16";
    let p = &reference(name)["prompts"][1];
    let ids: Vec<String> = u32s(&p["ids"]).iter().map(u32::to_string).collect();
    let dir = fixture(name);
    let (ok, out, err) = generate(&[
        "--model",
        dir.to_str().unwrap(),
        "--weight-dtype",
        "bf16",
        "--prompt-ids",
        &ids.join(","),
        "--max-tokens",
        "16",
        "--ignore-eos",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        u32s(&json_line(&out)["new_ids"]),
        u32s(&p["greedy"]["new_ids"])
    );
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let dir = fixture("lite");
    let d = dir.to_str().unwrap();
    let (ok, _, err) = generate(&["--model", d, "--prompt-ids", "1,99999"]);
    assert!(
        !ok && err.contains("99999") && err.contains("vocab"),
        "{err}"
    );
    let (ok, _, err) = generate(&["--model", d, "--prompt", "x", "--top-p", "0"]);
    assert!(!ok && err.contains("--top-p"), "{err}");
    let (ok, _, err) = generate(&["--model", d]);
    assert!(!ok && err.contains("required"), "{err}");
    let (ok, _, err) = generate(&["--model", "/nonexistent/model", "--prompt", "x"]);
    assert!(!ok && err.contains("config.json"), "{err}");
    let (ok, _, err) = generate(&["--model", d, "--prompt", "x", "--weight-dtype", "int4"]);
    assert!(!ok && err.contains("--weight-dtype int4"), "{err}");
    let (ok, _, err) = generate(&[
        "--model",
        d,
        "--prompt",
        "x",
        "--dtype",
        "f16",
        "--weight-dtype",
        "bf16",
    ]);
    assert!(!ok && err.contains("f32 compute"), "{err}");
}
