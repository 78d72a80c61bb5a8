//! The clients users already have — the openai SDK (sync, async, streamed), LangChain
//! (`with_structured_output`, `bind_tools`), litellm and lm-eval (`local-completions`
//! log-likelihood and generation tasks, `local-chat-completions`) — against a P/D
//! router with client and worker keys, answering as llama.cpp's fixture says the
//! default model does (`tests/clients/clients.py`).
//!
//! Needs Python with `openai`, `langchain-openai`, `litellm` and `lm-eval[api]`
//! (`.ci/run` installs them); skipped without them unless `TANDEM_REQUIRE_CLIENTS=1`.

mod common;

use std::process::Command;

use common::{Server, default_model_present};

const CLIENT_KEY: &str = "client-key";
const WORKER_KEY: &str = "worker-key";
const MODULES: &str = "import openai, langchain_openai, litellm, lm_eval";

fn clients_installed() -> bool {
    let found = Command::new("python3")
        .args(["-c", MODULES])
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        assert!(
            std::env::var("TANDEM_REQUIRE_CLIENTS").as_deref() != Ok("1"),
            "the Python clients are required but not installed ({MODULES})"
        );
        eprintln!("skipping: the Python clients are not installed ({MODULES})");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_users_have_run_against_a_pd_router() {
    if !default_model_present() || !clients_installed() {
        return;
    }
    let worker = |extra: &[&str]| {
        let mut args = vec!["--threads", "1", "--max-model-len", "2048"];
        args.extend(["--api-key", WORKER_KEY]);
        args.extend(extra);
        Server::start(&args)
    };
    let prefill = worker(&["--kv-port", "0"]);
    let decode = worker(&[]);
    let router = Server::start_router(&[
        "--prefill",
        &prefill.url(""),
        "--decode",
        &decode.url(""),
        "--api-key",
        CLIENT_KEY,
        "--worker-api-key",
        WORKER_KEY,
    ]);
    let work = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/clients.py");
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../engine/tests/fixtures/smollm2-llamacpp-reference.json"
    );
    let base = router.url("");
    let work_path = work.path().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args([&base, CLIENT_KEY, fixture])
            .arg(&work_path)
            // Nothing outside loopback: datasets from the task files, litellm's price
            // list from its package.
            .env("HF_HOME", work_path.join("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_DATASETS_OFFLINE", "1")
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for check in ["openai", "langchain", "litellm", "lm_eval"] {
        assert!(stdout.contains(&format!("{check}: ok")), "{stdout}");
    }
    // Generation went through the hand-off; lm-eval's scoring ran on the decode worker.
    let metrics = router.metrics().await;
    let decided = |decision: &str, reason: &str| {
        common::disagg_decisions(&metrics, decision, reason).unwrap_or(0.0)
    };
    assert!(decided("remote", "always") >= 10.0, "{metrics}");
    assert!(decided("local", "prompt_logprobs") >= 13.0, "{metrics}");
}
