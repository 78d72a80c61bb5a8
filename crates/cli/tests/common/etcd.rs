//! A real etcd on loopback (Debian's `etcd-server`), in its own data folder, that a
//! test can kill and restart on the same ports and data.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub struct Etcd {
    child: Option<Child>,
    data: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

/// Whether an `etcd` binary is on the PATH; without one the test skips, unless
/// `TANDEM_REQUIRE_ETCD=1` (CI), when it fails.
pub fn etcd_present() -> bool {
    super::program_present(
        "etcd",
        "TANDEM_REQUIRE_ETCD",
        "install Debian's etcd-server",
    )
}

impl Etcd {
    pub fn start() -> Self {
        let mut etcd = Self {
            child: None,
            data: tempfile::tempdir().expect("a data folder"),
            client_port: free_port(),
            peer_port: free_port(),
        };
        etcd.restart();
        etcd
    }

    /// `etcd://127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    /// Starts it (again) on the same ports and data; waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(self.data.path())
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            let health = format!("{client}/health");
            if let Ok(response) = ureq::get(&health).call()
                && response.status() == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd did not become healthy on {client}");
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The keys under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let endpoint = format!("http://127.0.0.1:{}", self.client_port);
        let mut client = etcd_client::Client::connect([endpoint], None)
            .await
            .expect("etcd connects");
        let options = etcd_client::GetOptions::new()
            .with_prefix()
            .with_keys_only();
        let listed = client.get(prefix, Some(options)).await.expect("etcd lists");
        listed
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
