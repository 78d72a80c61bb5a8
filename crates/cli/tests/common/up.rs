//! A running `tandem up`, for tests that drive a whole topology.

use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{tandem, tee_lines};

/// A running `tandem up` and every line of its stderr so far.
pub struct Up {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// The router's base URL.
    pub url: String,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Up {
    /// `tandem up TOPOLOGY ARGS…`, once it says it is up.
    pub fn start(topology: &std::path::Path, args: &[&str]) -> Up {
        let mut child = tandem()
            .arg("up")
            .arg(topology)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tandem up starts");
        let rx = tee_lines(child.stderr.take().unwrap(), "up");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let url = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(120))
                .expect("tandem up reports progress");
            lines.lock().unwrap().push(line.clone());
            if let Some(rest) = line.strip_prefix("tandem is up: ") {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        let kept = lines.clone();
        std::thread::spawn(move || {
            while let Ok(line) = rx.recv() {
                kept.lock().unwrap().push(line);
            }
        });
        Up { child, lines, url }
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The pid `tandem up` reported for the process serving `url`.
    pub fn pid_of(&self, port: u16) -> Option<u32> {
        let needle = format!(":{port} (pid ");
        self.lines.lock().unwrap().iter().rev().find_map(|line| {
            let rest = line.split(&needle).nth(1)?;
            rest.trim_end_matches(')').parse().ok()
        })
    }
}
