//! Helpers shared by the CLI's end-to-end tests.
#![allow(dead_code)]

pub mod etcd;
pub mod up;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

/// The cluster KV secret every process started by [`tandem`] holds (through
/// `TANDEM_KV_SECRET`), so that test workers hand KV off to each other.
pub const TEST_KV_SECRET: &str = "tandem-test-cluster-secret-0123456789";

/// The `tandem` binary under test, holding [`TEST_KV_SECRET`].
pub fn tandem() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tandem"));
    command.env("TANDEM_KV_SECRET", TEST_KV_SECRET);
    command
}

/// Whether the default model is cached. Without it the caller skips (with a notice),
/// unless `TANDEM_REQUIRE_MODEL=1` (CI), where a missing model fails the test.
pub fn default_model_present() -> bool {
    let output = tandem()
        .args(["model", "path"])
        .output()
        .expect("tandem runs");
    let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if std::path::Path::new(&path).is_file() {
        return true;
    }
    assert!(
        std::env::var("TANDEM_REQUIRE_MODEL").as_deref() != Ok("1"),
        "default model missing at {path}"
    );
    eprintln!("skipping: default model not found at {path}");
    false
}

/// Each line of `stream` (a child's stderr), echoed to this test's stderr after
/// `[label]` and sent to the receiver.
pub fn tee_lines(
    stream: impl std::io::Read + Send + 'static,
    label: &'static str,
) -> mpsc::Receiver<String> {
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("[{label}] {line}");
            let _ = tx.send(line);
        }
    });
    lines
}

/// llama.cpp's outputs for the default model (`../shared/fixtures`, kept in the
/// engine's tests): its tokenizations and greedy generations, the independent
/// reference.
pub fn llamacpp_fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../engine/tests/fixtures/smollm2-llamacpp-reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Whether `program --version` runs. Without it the caller skips (with a notice),
/// unless `require_env` is `1` (CI), where a missing program fails the test.
pub fn program_present(program: &str, require_env: &str, install: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var(require_env).as_deref() != Ok("1"),
            "{program} missing: {install}"
        );
        eprintln!("skipping: no {program} on the PATH");
    }
    found
}

/// `(url, role)` of each worker in an admin API `GET /workers` answer, sorted.
pub fn listed_roles(listed: &Value) -> Vec<(String, String)> {
    let mut roles: Vec<_> = listed["workers"]
        .as_array()
        .expect("a worker list")
        .iter()
        .map(|w| {
            (
                w["url"].as_str().unwrap().to_owned(),
                w["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    roles.sort();
    roles
}

/// A port free on loopback now, and never handed out before in this process: the OS
/// may give a just-closed port again, and a topology built from two equal "free" ports
/// is refused.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// How many P/D requests a router decided so (`decision`: `remote` or `local`) for
/// `reason`, from its metrics exposition.
pub fn disagg_decisions(exposition: &str, decision: &str, reason: &str) -> Option<f64> {
    metric_with(
        exposition,
        "tandem_router_disagg_decisions_total",
        &[("decision", decision), ("reason", reason)],
    )
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// One short chat request through the endpoint at `url`; asserts it is answered.
pub fn chat_once(url: &str) {
    let body = json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8});
    let answer = ureq::post(&format!("{url}/v1/chat/completions"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .expect("the router answers");
    assert_eq!(answer.status(), 200);
}

/// A running `tandem serve`, killed when dropped.
pub struct Server {
    pub child: Child,
    base: String,
    pub client: reqwest::Client,
    /// Every line of its stderr so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// `tandem serve --port 0` with `args`; waits until it listens.
    pub fn start(args: &[&str]) -> Self {
        Self::spawn("serve", args, &[])
    }

    /// [`Self::start`] with `env` set in its environment.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn("serve", args, env)
    }

    /// `tandem route --port 0` with `args`; waits until it listens.
    pub fn start_router(args: &[&str]) -> Self {
        Self::spawn("route", args, &[])
    }

    /// [`Self::start_router`] with `env` set in its environment.
    pub fn start_router_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn("route", args, env)
    }

    /// `tandem serve --port 0` with `args` and no KV secret; waits until it listens.
    pub fn start_without_secret(args: &[&str]) -> Self {
        let mut command = tandem();
        command.env_remove("TANDEM_KV_SECRET");
        Self::spawn_command(command, "serve", args, &[])
    }

    fn spawn(subcommand: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_command(tandem(), subcommand, args, env)
    }

    fn spawn_command(
        mut command: Command,
        subcommand: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut child = command
            .args([subcommand, "--port", "0"])
            .args(args)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tandem starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (address_tx, address_rx) = mpsc::channel();
        let subcommand = subcommand.to_owned();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{subcommand}] {line}");
                lines.lock().unwrap().push(line.clone());
                if let Some(at) = line.find("http://") {
                    let _ = address_tx.send(line[at..].trim().to_owned());
                }
            }
        });
        let base = address_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the server reports its address");
        Self {
            child,
            base,
            client: reqwest::Client::new(),
            log,
        }
    }

    /// Its stderr so far, one line each.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string()).await
    }

    pub async fn post_raw(&self, path: &str, body: String) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("the server answers");
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, json)
    }

    /// The `data:` payloads of a streamed response, `[DONE]` included.
    pub async fn post_stream(&self, path: &str, body: &Value) -> Vec<String> {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("the server answers");
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        let mut bytes = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk.expect("the stream reads"));
        }
        sse_payloads(&String::from_utf8(bytes).expect("UTF-8 events"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sse_payloads(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"))
                .to_owned()
        })
        .collect()
}

/// Checks the `{"error":{message,type,param,code}}` body of an error answer.
pub fn assert_error(status: u16, body: &Value, expected_status: u16) {
    assert_eq!(status, expected_status, "{body}");
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(
        error["param"].is_string() || error["param"].is_null(),
        "{body}"
    );
    assert_eq!(error["code"], json!(expected_status), "{body}");
}

/// The value of the first series of metric `name` in a Prometheus text exposition,
/// whatever its labels.
pub fn metric_value(exposition: &str, name: &str) -> Option<f64> {
    metric_with(exposition, name, &[])
}

/// The value of the first series of metric `name` that carries all of `labels`.
pub fn metric_with(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let has = |(k, v): &(&str, &str)| {
            series_labels
                .split(',')
                .any(|pair| pair == format!("{k}=\"{v}\""))
        };
        (series_name == name && labels.iter().all(has))
            .then(|| value.parse().ok())
            .flatten()
    })
}

impl Server {
    /// The status of `GET /health` (0 when it does not answer).
    pub async fn health_status(&self) -> u16 {
        self.client
            .get(self.url("/health"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Waits (bounded, 15 s) until `GET /health` answers `status`.
    pub async fn wait_for_health(&self, status: u16) {
        for _ in 0..150 {
            if self.health_status().await == status {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("/health never answered {status}");
    }
}

impl Server {
    pub async fn metrics(&self) -> String {
        let response = self.client.get(self.url("/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// [`Self::metrics`] for tests without a runtime.
    pub fn metrics_blocking(&self) -> String {
        ureq::get(&self.url("/metrics"))
            .call()
            .expect("the server answers /metrics")
            .body_mut()
            .read_to_string()
            .unwrap()
    }

    /// Waits until no request runs and KV usage is back to `idle_usage`.
    pub async fn wait_until_idle(&self, idle_usage: f64) {
        for _ in 0..100 {
            let metrics = self.metrics().await;
            let running = metric_value(&metrics, "vllm:num_requests_running");
            let usage = metric_value(&metrics, "vllm:kv_cache_usage_perc");
            if running == Some(0.0) && usage == Some(idle_usage) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the engine did not go idle:\n{}", self.metrics().await);
    }
}

/// The text of a whole answer (completions or chat).
pub fn text_of(answer: &Value) -> String {
    let choice = &answer["choices"][0];
    choice["text"]
        .as_str()
        .or_else(|| choice["message"]["content"].as_str())
        .unwrap_or_else(|| panic!("no text in {answer}"))
        .to_owned()
}

/// The text of a streamed answer, from its `data:` payloads (ending with `[DONE]`).
pub fn streamed_text(payloads: &[String]) -> String {
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str::<Value>(p).unwrap())
        .filter_map(|chunk| {
            let choice = &chunk["choices"][0];
            choice["text"]
                .as_str()
                .or_else(|| choice["delta"]["content"].as_str())
                .map(str::to_owned)
        })
        .collect()
}

/// The KV hand-off as tests play its parts by hand: the test cluster's secret, params
/// signed as a prefill worker of the cluster signs them, and the server's side of the
/// handshake.
pub mod kv {
    use serde_json::{Value, json};
    use tandem_engine::transfer::auth::{self, ClusterSecret, SignedParams};
    use tandem_engine::transfer::handshake;
    use tandem_engine::transfer::wire::Fingerprint;
    use tokio::net::TcpStream;

    pub fn secret() -> ClusterSecret {
        ClusterSecret::new(super::TEST_KV_SECRET.as_bytes(), "the tests").unwrap()
    }

    /// A decode leg's `kv_transfer_params` naming `port` on loopback, signed with the
    /// test secret (valid for 30 s).
    pub fn signed_params(port: u16, engine_id: &str, blocks: &[u32], num_tokens: u64) -> Value {
        let lease_secret = auth::new_lease_secret();
        let expires_at = auth::now_unix() + 30;
        let request_id = "cmpl-x-0-00000000";
        let signed = SignedParams {
            engine_id,
            request_id,
            block_ids: blocks,
            host: "127.0.0.1",
            port,
            num_tokens,
            expires_at,
            lease_secret: &lease_secret,
        };
        json!({"do_remote_prefill": true, "do_remote_decode": false,
            "remote_block_ids": [blocks], "remote_engine_id": engine_id,
            "remote_request_id": request_id, "remote_host": "127.0.0.1",
            "remote_port": port, "tp_size": 1, "remote_num_tokens": num_tokens,
            "tandem_lease_secret": lease_secret, "tandem_expires_at": expires_at,
            "tandem_signature": signed.sign(&secret())})
    }

    /// The server's side of the handshake with the test secret: what the reader
    /// presented once it proved the secret, or `None`.
    pub async fn accept_reader(stream: &mut TcpStream) -> Option<(Fingerprint, String)> {
        let io = std::time::Duration::from_secs(10);
        let presented = handshake::accept(stream, &secret(), io).await.ok()??;
        Some((presented.fingerprint, presented.engine_id))
    }
}
