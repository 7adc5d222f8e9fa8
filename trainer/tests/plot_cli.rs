//! `esft-train plot` draws the reference intent and law scores and configs, and its routing
//! summary holds what routing_stats computes from them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use esft_train::routing_stats::{self, RoutingSummary};
use esft_train::score::Scores;
use esft_train::select::ScoreFunction;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/esft")
        .join(path)
}

fn scores_of(task: &str) -> PathBuf {
    fixture(&format!("expert_scores/{task}/summary.json"))
}

fn config_of(task: &str) -> PathBuf {
    fixture(&format!("expert_configs/{task}.json"))
}

fn named(name: &str, path: &Path) -> String {
    format!("{name}={}", path.display())
}

fn plot(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_esft-train"))
        .arg("plot")
        .args(args)
        .output()
        .unwrap()
}

fn fixture_args(out: &Path) -> Vec<String> {
    vec![
        "--scores".into(),
        named("intent", &scores_of("intent")),
        "--scores".into(),
        named("law", &scores_of("law")),
        "--configs".into(),
        named("intent", &config_of("intent")),
        "--configs".into(),
        named("law", &config_of("law")),
        "--out".into(),
        out.display().to_string(),
    ]
}

fn read_svg(path: &Path) -> String {
    let svg = std::fs::read_to_string(path).unwrap();
    assert!(
        svg.starts_with("<svg"),
        "{}: {}",
        path.display(),
        &svg[..80]
    );
    assert!(svg.trim_end().ends_with("</svg>"), "{}", path.display());
    svg
}

fn close(a: f64, b: f64) -> bool {
    // serde_json's default float parsing may be off by an ulp.
    (a - b).abs() < 1e-12
}

#[test]
fn plots_the_reference_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("plots");
    let o = plot(&fixture_args(&out));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let heat = read_svg(&out.join("routing_heatmap.svg"));
    for text in [
        "intent",
        "law",
        "layer 1",
        "layer 13",
        "layer 26",
        "token selection ratio",
    ] {
        assert!(heat.contains(text), "routing_heatmap.svg lacks {text:?}");
    }
    // One cell per task, layer and expert.
    assert!(heat.matches("<rect").count() >= 2 * 26 * 64);

    let sel = read_svg(&out.join("selected_experts.svg"));
    for text in [
        "intent",
        "law",
        "layer",
        "selected experts",
        "Selected experts per layer",
    ] {
        assert!(sel.contains(text), "selected_experts.svg lacks {text:?}");
    }
    // The reference configs pick 124 (intent) and 153 (law) experts.
    assert!(sel.contains("intent (124 experts"), "{sel}");
    assert!(sel.contains("law (153 experts"), "{sel}");

    let json = std::fs::read_to_string(out.join("routing_summary.json")).unwrap();
    let got: RoutingSummary = serde_json::from_str(&json).unwrap();
    let tasks = vec![
        (
            "intent".to_string(),
            Scores::read(&scores_of("intent")).unwrap(),
        ),
        ("law".to_string(), Scores::read(&scores_of("law")).unwrap()),
    ];
    let want = routing_stats::summarize(&tasks, ScoreFunction::Token, 0.1).unwrap();
    assert_eq!(got.score_function, "token");
    assert_eq!((got.experts, got.top_experts), (64, 7));
    assert_eq!(got.layers, (1..=26).collect::<Vec<_>>());
    assert_eq!(got.layers, want.layers);
    assert_eq!(got.tasks.len(), 2);
    for (g, w) in got.tasks.iter().zip(&want.tasks) {
        assert_eq!(g.name, w.name);
        assert_eq!(g.top_experts, w.top_experts);
        assert!(close(g.mean_top_share, w.mean_top_share));
        assert_eq!(g.top_share.len(), 26);
        for (l, v) in &w.top_share {
            assert!(close(g.top_share[l], *v), "{} layer {l}", g.name);
        }
    }
    assert_eq!(got.pairs.len(), 1);
    let (g, w) = (&got.pairs[0], &want.pairs[0]);
    assert_eq!((g.a.as_str(), g.b.as_str()), ("intent", "law"));
    assert!(close(g.mean_overlap, w.mean_overlap));
    for (l, v) in &w.overlap {
        assert!(close(g.overlap[l], *v), "layer {l}");
    }
    // Routing on a task is concentrated: its top 10% take well over the uniform 7/64.
    assert!(got.tasks.iter().all(|t| t.mean_top_share > 0.2));

    let md = std::fs::read_to_string(out.join("routing_summary.md")).unwrap();
    assert!(md.contains("| layer | intent | law |"), "{md}");
    assert!(md.contains("| intent / law |"), "{md}");
    assert!(md.contains(&format!(
        "| intent | {:.1}% |",
        100.0 * want.tasks[0].mean_top_share
    )));
}

#[test]
fn without_configs_there_is_no_selected_experts_figure() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("plots");
    let o = plot(&[
        "--scores".into(),
        named("law", &scores_of("law")),
        "--score-function".into(),
        "gate".into(),
        "--top-fraction".into(),
        "0.25".into(),
        "--out".into(),
        out.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(read_svg(&out.join("routing_heatmap.svg")).contains("average gate score"));
    assert!(!out.join("selected_experts.svg").exists());
    let got: RoutingSummary =
        serde_json::from_str(&std::fs::read_to_string(out.join("routing_summary.json")).unwrap())
            .unwrap();
    assert_eq!((got.score_function.as_str(), got.top_experts), ("gate", 16));
    assert!(got.pairs.is_empty());
}

fn failure(args: &[String]) -> String {
    let o = plot(args);
    assert!(!o.status.success(), "plot {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_inputs_are_refused_with_the_problem_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("plots").display().to_string();

    let e = failure(&[
        "--scores".into(),
        "intent".into(),
        "--out".into(),
        out.clone(),
    ]);
    assert!(e.contains("NAME=FILE"), "{e}");

    let missing = tmp.path().join("nope.json");
    let e = failure(&[
        "--scores".into(),
        named("intent", &missing),
        "--out".into(),
        out.clone(),
    ]);
    assert!(e.contains("nope.json"), "{e}");

    // The law scores without their last layer.
    let mut short = Scores::read(&scores_of("law")).unwrap();
    short.token_scores.remove(&26);
    let short_path = tmp.path().join("short.json");
    short.write(&short_path).unwrap();
    let e = failure(&[
        "--scores".into(),
        named("intent", &scores_of("intent")),
        "--scores".into(),
        named("law", &short_path),
        "--out".into(),
        out.clone(),
    ]);
    assert!(e.contains("different layers") && e.contains("[26]"), "{e}");

    let mut fewer = Scores::read(&scores_of("law")).unwrap();
    if let Some(l) = fewer.token_scores.get_mut(&3) {
        l.remove(&63);
    }
    let fewer_path = tmp.path().join("fewer.json");
    fewer.write(&fewer_path).unwrap();
    let e = failure(&[
        "--scores".into(),
        named("intent", &scores_of("intent")),
        "--scores".into(),
        named("law", &fewer_path),
        "--out".into(),
        out.clone(),
    ]);
    assert!(e.contains("layer 3") && e.contains("\"law\""), "{e}");

    let e = failure(&[
        "--scores".into(),
        named("intent", &scores_of("intent")),
        "--configs".into(),
        named("intent", &missing),
        "--out".into(),
        out.clone(),
    ]);
    assert!(e.contains("--configs intent="), "{e}");

    let e = failure(&[
        "--scores".into(),
        named("intent", &scores_of("intent")),
        "--top-fraction".into(),
        "0".into(),
        "--out".into(),
        out,
    ]);
    assert!(e.contains("--top-fraction"), "{e}");
}
