//! `tandem compare` end to end on the default model with a short suite: three real
//! topologies started, measured and torn down in turn, and a complete report folder —
//! every run accounted for, the figures real PNG and SVG files, the cores each layout
//! got stated, nothing left running.

mod common;

use common::{default_model_present, tandem};
use serde_json::Value;

const SUITE: &str = r#"
[[scenario]]
name = "seed-single"
workload = "seed-single"
output_len = 6
repeat = 2
concurrency = [1]

[[scenario]]
name = "long-prompts"
description = "Long prompts, short answers."
workload = "random"
num_prompts = 3
input_len = 60
output_len = 4
concurrency = [1, 3]
goodput = ["ttft:60000"]

[[scenario]]
name = "chat"
workload = "multi-turn"
num_prompts = 2
turns = 2
prefix_len = 20
input_len = 5
output_len = 3
"#;

#[test]
fn a_three_way_comparison_writes_a_complete_report() {
    if !default_model_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("suite.toml");
    std::fs::write(&suite, SUITE).unwrap();
    let out = dir.path().join("report");
    // Random prompts drawn in the model's own tokenizer: exact token counts.
    let model = tandem().args(["model", "path"]).output().unwrap();
    let gguf = String::from_utf8_lossy(&model.stdout).trim().to_owned();
    let output = tandem()
        .args(["compare", "--suite", suite.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap(), "--kv-cache-memory", "64MiB"])
        .args(["--tokenizer", &gguf])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");

    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let topologies: Vec<&str> = results["topologies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(topologies, ["single", "replicated", "disaggregated"]);
    assert_eq!(results["baseline"], "single");
    // Each layout's cores were timed before it started: the same cores for all three.
    let timed_cores: Vec<Vec<u64>> = results["topologies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|topology| {
            let speeds = topology["core_speeds"].as_array().unwrap();
            for speed in speeds {
                for rate in ["alone", "together", "read_alone", "read_together"] {
                    assert!(speed[rate].as_f64().unwrap() > 0.0, "{topology}");
                }
            }
            speeds.iter().map(|s| s["core"].as_u64().unwrap()).collect()
        })
        .collect();
    assert!(!timed_cores[0].is_empty());
    assert!(
        timed_cores.iter().all(|cores| *cores == timed_cores[0]),
        "{timed_cores:?}"
    );
    // (scenario, load points, requests per run, output tokens per run)
    let expected = [
        ("seed-single", 1, 2, None),
        ("long-prompts", 2, 3, Some(12)),
        ("chat", 1, 4, Some(12)),
    ];
    let scenarios = results["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), expected.len());
    for (scenario, (name, points, requests, tokens)) in scenarios.iter().zip(expected) {
        assert_eq!(scenario["scenario"]["name"], name);
        let runs = scenario["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 3 * points, "{name}");
        for run in runs {
            assert_eq!(run["completed"], requests, "{name}: {run}");
            assert_eq!(run["failed"], 0, "{name}: {run}");
            if let Some(tokens) = tokens {
                assert_eq!(run["total_output_tokens"], tokens, "{name}: {run}");
            }
            if name == "long-prompts" {
                assert_eq!(run["total_input_tokens"], 3 * 60, "{run}");
                assert_eq!(run["tokenizer_id"], gguf.as_str(), "{run}");
            }
            assert!(run["mean_ttft_ms"].as_f64().unwrap() > 0.0);
            // The hand-off as the decode worker counted it: only where there is one.
            let handoff = &run["handoff"];
            if run["topology"] == "disaggregated" {
                let transfers = handoff["transfers"].as_u64().unwrap();
                assert!(transfers >= 1 && transfers <= requests, "{name}: {run}");
                if name == "long-prompts" {
                    assert_eq!(transfers, requests, "fresh prompts: {run}");
                }
                assert!(handoff["bytes"].as_u64().unwrap() > 0, "{run}");
                assert!(handoff["transfer_seconds"].as_f64().unwrap() > 0.0, "{run}");
            } else {
                assert!(handoff.is_null(), "{name}: {run}");
            }
        }
    }
    let goodput = &scenarios[1]["runs"][0]["request_goodput"];
    assert!(goodput.as_f64().unwrap() > 0.0, "{goodput}");

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "# tandem compare: single vs replicated vs disaggregated",
        "## seed-single",
        "## long-prompts",
        "Long prompts, short answers.",
        "random, 3 prompts of 60 tokens, 4 tokens out",
        "| concurrency 3 | disaggregated |",
        "vs single",
        "its cores before it ran",
        "Percentiles at concurrency 3 (ms)",
        "KV hand-off (the pulling workers' own counters)",
        "![long-prompts throughput](long-prompts-throughput.svg)",
        "![long-prompts goodput](long-prompts-goodput.svg)",
        "![chat latency](chat-latency.svg)",
        // What each layout got, the same total for all.
        "cores in all for every layout (single: one worker on cores",
    ] {
        assert!(
            report.contains(needle),
            "{needle:?} missing from:\n{report}"
        );
    }
    for stem in [
        "seed-single-latency",
        "long-prompts-throughput",
        "long-prompts-goodput",
        "long-prompts-latency",
        "chat-latency",
    ] {
        let png = std::fs::read(out.join(format!("{stem}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{stem}.png");
        let svg = std::fs::read_to_string(out.join(format!("{stem}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("disaggregated"),
            "{stem}.svg"
        );
    }
    for topology in topologies {
        let logs = out.join("logs").join(topology);
        assert!(std::fs::read_dir(&logs).unwrap().count() >= 2, "{logs:?}");
    }

    // Every process was stopped: no worker or router port answers any more.
    for topology in results["topologies"].as_array().unwrap() {
        for command in topology["commands"].as_array().unwrap() {
            let command = command.as_str().unwrap();
            let port = port_of(command);
            assert!(
                std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
                "still listening on {port}: {command}"
            );
        }
    }
}

#[test]
fn rounds_are_run_one_after_the_other_and_merged() {
    if !default_model_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("suite.toml");
    std::fs::write(
        &suite,
        "[[scenario]]\nname = \"short\"\nworkload = \"random\"\nnum_prompts = 2\n\
         input_len = 20\noutput_len = 3\nrates = [4]\n",
    )
    .unwrap();
    let out = dir.path().join("report");
    let output = tandem()
        .args([
            "compare",
            "--suite",
            suite.to_str().unwrap(),
            "--rounds",
            "2",
        ])
        .args(["--out", out.to_str().unwrap(), "--kv-cache-memory", "64MiB"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    for round in ["round-1", "round-2"] {
        let results: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(round).join("results.json")).unwrap(),
        )
        .unwrap();
        let runs = results["scenarios"][0]["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 3, "{round}: one run per default topology");
    }
    let merged: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("rounds.json")).unwrap()).unwrap();
    let merged = merged.as_array().unwrap();
    assert_eq!(merged.len(), 3);
    for run in merged {
        assert_eq!(run["rounds"], 2, "{run}");
        let throughput = run["figures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "output_throughput")
            .unwrap();
        let (low, median, high) = (
            throughput["lowest"].as_f64().unwrap(),
            throughput["median"].as_f64().unwrap(),
            throughput["highest"].as_f64().unwrap(),
        );
        assert!(0.0 < low && low <= median && median <= high, "{throughput}");
    }
    let table = std::fs::read_to_string(out.join("rounds.md")).unwrap();
    for topology in ["single", "replicated", "disaggregated"] {
        assert!(
            table.contains(&format!("| rate 4 | {topology} | 2 |")),
            "{table}"
        );
    }
}

/// The `--port` of a command line.
fn port_of(command: &str) -> u16 {
    let words: Vec<&str> = command.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "--port").unwrap();
    words[at + 1].trim_matches('\'').parse().unwrap()
}

#[test]
fn bad_suites_and_unknown_scenarios_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("suite.toml");
    std::fs::write(
        &suite,
        "[[scenario]]\nname = \"x\"\nworkload = \"random\"\nrates = [0]\n",
    )
    .unwrap();
    let output = tandem()
        .args(["compare", "--suite", suite.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("scenario \"x\": rates must be positive"),
        "{stderr}"
    );

    let output = tandem()
        .args(["compare", "--scenario", "nope"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no scenario `nope`") && stderr.contains("seed-batch"),
        "{stderr}"
    );

    let output = tandem()
        .args(["compare", "--rounds", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--rounds"), "{stderr}");

    // More cores than this process may use.
    let output = tandem()
        .args(["compare", "--cores", "100000", "--out"])
        .arg(dir.path().join("never"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--cores 100000: this process may use"),
        "{stderr}"
    );
}
