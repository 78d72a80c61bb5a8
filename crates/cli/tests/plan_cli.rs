//! `tandem plan`: a profile measured against a real `tandem serve` (and the hand-off
//! through a real P/D router), then ranked; profiles for another model or machine are
//! refused with the reason.

mod common;

use common::{Server, default_model_present, tandem};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// Measurements small enough for a test: a few short prompts, small batches, one run
/// each.
const SMALL_MEASUREMENTS: &[&str] = &[
    "--prompt-lengths",
    "8,32,96",
    "--batches",
    "1,2,4",
    "--contexts",
    "8,48",
    "--decode-tokens",
    "8",
    "--repeats",
    "1",
    "--steps",
    "2x32,3x16,2x32+3",
    "--step-decode-context",
    "8",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_is_measured_then_ranked_and_refused_elsewhere() {
    if !default_model_present() {
        return;
    }
    let worker = Server::start(&["--threads", "1", "--max-model-len", "512"]);
    let prefill = Server::start(&["--threads", "1", "--kv-port", "0", "--max-model-len", "512"]);
    let decode = Server::start(&["--threads", "1", "--max-model-len", "512"]);
    let neighbour = Server::start(&["--threads", "1", "--max-model-len", "512"]);
    let router =
        Server::start_router(&["--prefill", &prefill.url(""), "--decode", &decode.url("")]);
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.toml");
    let (url, split, alongside) = (worker.url(""), router.url(""), neighbour.url(""));
    let profile_arg = profile.to_str().unwrap().to_owned();
    let measured = tokio::task::spawn_blocking(move || {
        tandem()
            .args([
                "plan", "profile", "--url", &url, "--cores", "1", "--model", MODEL,
            ])
            .args(SMALL_MEASUREMENTS)
            .args(["--split-url", &split, "--out", &profile_arg])
            .args(["--alongside", &alongside])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(measured.status.success(), "{measured:?}");
    let text = std::fs::read_to_string(&profile).unwrap();
    assert!(text.contains(MODEL), "{text}");
    let parsed = tandem_planner::Profile::from_toml(&text).unwrap();
    let worker_profile = parsed.worker(1).unwrap().crowded;
    // Measured with the neighbour given the same load at the same time: the same
    // prompts reached it (the measured worker also served the hand-off's).
    assert_eq!(parsed.workers[0].measured_alongside, 1, "{text}");
    let prompt_tokens = |metrics: &str| {
        metrics
            .lines()
            .find(|line| line.starts_with("vllm:prompt_tokens_total"))
            .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (beside, measured) = (
        prompt_tokens(&neighbour.metrics().await),
        prompt_tokens(&worker.metrics().await),
    );
    assert!(beside > 0.0 && beside <= measured, "{beside} vs {measured}");
    // Longer prompts take longer; a bigger batch's step does not take less.
    assert!(worker_profile.prefill_seconds(0, 96) > worker_profile.prefill_seconds(0, 8));
    assert_eq!(parsed.workers[0].decode.len(), 6);
    // Steps of several prompts, the last beside three decoding streams.
    let steps = &parsed.workers[0].steps;
    assert_eq!(steps.len(), 3, "{text}");
    assert_eq!((steps[1].prompts, steps[2].decode_batch), (3, 3));
    assert!(
        steps
            .iter()
            .all(|s| s.tokens >= s.prompts * 16 && s.seconds > 0.0)
    );
    assert!(steps[2].decode_context >= 8, "{:?}", steps[2]);

    let rank = |extra: &[&str]| {
        let mut command = tandem();
        command
            .args([
                "plan",
                "rank",
                "--profile",
                profile.to_str().unwrap(),
                "--cores",
                "2",
            ])
            .args(["--input-len", "64", "--output-len", "16", "--rate", "1"])
            .args(["--ttft", "2", "--tpot", "0.5", "--requests", "200"])
            .args(extra);
        command.output().unwrap()
    };
    let ranked = rank(&[]);
    let table = String::from_utf8_lossy(&ranked.stdout);
    assert!(ranked.status.success(), "{ranked:?}");
    // Two 1-core workers: replicas, or one prefill and one decode worker.
    assert!(table.contains("2 replicas (1 core each)"), "{table}");
    assert!(table.contains("1P1D (1-core P, 1-core D)"), "{table}");
    assert!(table.contains("recommended: "), "{table}");
    // No 2-core measurement: no single 2-core layout is claimed.
    assert!(!table.contains("single"), "{table}");

    let other_model = rank(&["--model", "Llama-3.1-8B"]);
    assert!(!other_model.status.success());
    assert!(String::from_utf8_lossy(&other_model.stderr).contains("profile this model"));
    let elsewhere = text.replace(&parsed.hardware, "Some Other CPU, 96 cores");
    std::fs::write(&profile, elsewhere).unwrap();
    let refused = rank(&[]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("profile this machine"),
        "{refused:?}"
    );
    assert!(rank(&["--other-hardware"]).status.success());
}

#[test]
fn rank_writes_the_recommended_layout_as_a_topology_up_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("recommended.toml");
    let profile = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/planner/xeon-2core-profile.toml"
    );
    let rank = |extra: &[&str]| {
        tandem()
            .args([
                "plan",
                "rank",
                "--profile",
                profile,
                "--cores",
                "2",
                "--other-hardware",
            ])
            .args(["--input-len", "512", "--output-len", "32", "--rate", "1"])
            .args(["--ttft", "2", "--tpot", "0.1", "--requests", "200"])
            .args(["--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let ranked = rank(&[]);
    let stdout = String::from_utf8_lossy(&ranked.stdout);
    assert!(ranked.status.success(), "{ranked:?}");
    let recommended = stdout
        .lines()
        .find_map(|l| l.strip_prefix("recommended: "))
        .unwrap()
        .to_owned();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.starts_with(&format!("# {recommended}: recommended by tandem plan rank")),
        "{text}"
    );
    let topology = tandem_launch::topology::load(&out).unwrap();
    let cores: usize = topology.workers.iter().map(|w| w.spec.cores.len()).sum();
    assert_eq!(cores, 2, "{text}");
    // Two replicas here (the measured order): no P/D pools for a planner.
    if recommended.contains("replicas") {
        assert!(!topology.is_disaggregated());
        let refused = rank(&["--with-planner"]);
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("has no P/D pools"), "{stderr}");
    }
}

#[test]
fn a_worker_cannot_be_measured_alongside_itself() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profile.toml");
    let refused = tandem()
        .args([
            "plan",
            "profile",
            "--url",
            "http://127.0.0.1:9",
            "--cores",
            "1",
        ])
        .args(["--model", MODEL, "--alongside", "http://127.0.0.1:9/"])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("is the measured worker itself"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn a_machine_is_profiled_with_the_workers_it_starts() {
    if !default_model_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("machine.toml");
    // A KV size no other test's worker has, to find leftover workers by.
    let kv = "67MiB";
    let profiled = tandem()
        .args(["plan", "profile", "--launch", "--cores", "2"])
        .args(["--kv-cache-memory", kv, "--max-batched-tokens", "512"])
        .args(SMALL_MEASUREMENTS)
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(profiled.status.success(), "{profiled:?}");
    let text = std::fs::read_to_string(&out).unwrap();
    let parsed = tandem_planner::Profile::from_toml(&text).unwrap();
    assert_eq!(parsed.model, MODEL);
    // A 1-core worker alone and beside its twin, a 2-core worker alone.
    let sizes: Vec<(usize, usize)> = parsed
        .workers
        .iter()
        .map(|w| (w.cores, w.measured_alongside))
        .collect();
    assert_eq!(sizes, vec![(1, 0), (1, 1), (2, 0)], "{text}");
    assert!(parsed.workers.iter().all(|w| w.max_batched_tokens == 512));
    // The hand-off through the 1P1D pair it started.
    assert!(parsed.handoff_seconds(96) > 0.0, "{text}");
    // The two cores it used, timed.
    assert_eq!(parsed.core_speeds.len(), 2, "{text}");
    assert!(
        parsed
            .core_speeds
            .iter()
            .all(|s| s.alone > 0.0 && s.together > 0.0),
        "{text}"
    );
    for set in ["1-core", "1-core-1p1d", "2x1-core", "2-core"] {
        assert!(dir.path().join("machine-logs").join(set).is_dir(), "{set}");
    }
    assert_eq!(workers_with_kv(kv), 0, "workers left running");

    let refused = |args: &[&str]| {
        let output = tandem()
            .args(["plan", "profile", "--launch"])
            .args(args)
            .args(["--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let too_big = refused(&["--cores", "1", "--worker-cores", "2"]);
    assert!(
        too_big.contains("a 2-core worker does not fit"),
        "{too_big}"
    );
    let both = refused(&["--cores", "1", "--url", "http://127.0.0.1:9"]);
    assert!(both.contains("cannot be used with"), "{both}");
}

/// Processes whose command line has `--kv-cache-memory <kv>`.
fn workers_with_kv(kv: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .filter(|cmdline| {
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.windows(2)
                .any(|pair| pair[0] == b"--kv-cache-memory" && pair[1] == kv.as_bytes())
        })
        .count()
}

/// `tandem plan validate --profile PROFILE --results R…`.
fn validate(profile: &std::path::Path, results: &[&std::path::Path]) -> std::process::Output {
    let mut command = tandem();
    command.args(["plan", "validate", "--profile"]).arg(profile);
    for report in results {
        command.arg("--results").arg(report);
    }
    command.output().unwrap()
}

#[test]
fn validate_merges_rounds_and_refuses_reports_of_other_loads() {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/planner");
    let round = |i: usize| {
        docs.join(format!(
            "emerald-2core-evening-long-prompt-60-round{i}-results.json"
        ))
    };
    let profile = docs.join("emerald-2core-evening-profile.toml");
    let output = validate(&profile, &[&round(1), &round(2), &round(3)]);
    assert!(output.status.success(), "{output:?}");
    let table = String::from_utf8_lossy(&output.stdout);
    // 3 layouts × 2 rates, each figure a median with its range.
    assert_eq!(
        table.matches("| long-prompt-short-output-60 |").count(),
        6,
        "{table}"
    );
    assert!(
        table.contains("inside the range of their 3 rounds"),
        "{table}"
    );

    // Different scenarios side by side are fine (no run in common); the same scenario
    // with different requests is not.
    let other_load = docs.join("emerald-2core-evening-long-prompt-round1-results.json");
    let mixed = validate(&profile, &[&round(1), &other_load]);
    assert!(mixed.status.success(), "{mixed:?}");
    let dir = tempfile::tempdir().unwrap();
    let mut changed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(round(2)).unwrap()).unwrap();
    changed["scenarios"][0]["runs"][0]["total_input_tokens"] = serde_json::json!(1);
    let changed_file = dir.path().join("changed.json");
    std::fs::write(&changed_file, changed.to_string()).unwrap();
    let refused = validate(&profile, &[&round(1), &changed_file]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("different requests"), "{stderr}");
}
