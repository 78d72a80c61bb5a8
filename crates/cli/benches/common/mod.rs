//! What the CLI's benches share: worker and router processes they start and stop, free
//! ports, and reading a Prometheus exposition.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A `tandem serve` process on a port of its own choosing, killed when dropped.
pub struct WorkerProcess {
    child: Child,
    pub base: String,
}

impl WorkerProcess {
    /// Starts `tandem serve` with `args` (and `--port 0`) and waits until it listens.
    /// The binary is `TANDEM_BENCH_BIN`, default the `tandem` built with the bench
    /// (another build's binary, for an A/B comparison).
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let binary = std::env::var("TANDEM_BENCH_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_tandem").to_owned());
        let mut child = Command::new(binary)
            .args(["serve", "--port", "0"])
            .args(args)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tandem serve starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("http://") {
                    let _ = tx.send(line[at..].trim().to_owned());
                }
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the worker reports its address (is the default model fetched?)");
        Self { child, base }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A router process, killed when dropped.
pub struct RouterProcess {
    pub name: &'static str,
    pub child: Child,
    pub base: String,
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `command` (a router listening on `port`); its stderr is echoed only with
/// `BENCH_VERBOSE` set.
pub fn spawn(name: &'static str, mut command: Command, port: u16) -> RouterProcess {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if std::env::var_os("BENCH_VERBOSE").is_some() {
                eprintln!("[{name}] {line}");
            }
        }
    });
    RouterProcess {
        name,
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

/// The Prometheus text at `url`.
pub async fn metrics_text(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// The sum of series `name` carrying all of `labels` in `text` (0 before its first
/// increment), whatever other labels (`model_name`) it has: the router's own reader.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    tandem_protocol::exposition::sum(text, name, labels).unwrap_or(0.0)
}
