//! What the CLI's benches share: router processes they start and stop, and free ports.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

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
