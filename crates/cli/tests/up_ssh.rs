//! `tandem up` with workers over SSH, against a real `sshd` on loopback that each test
//! starts for itself (its own host key, client key and config in a temporary folder):
//! a remote prefill worker serves through the router, survives a dropped log
//! connection, and is stopped by pid on SIGTERM with nothing left behind; a remote
//! worker's own children are stopped with its process group; a remote worker that dies
//! starting is reported with the last lines of its remote log; `tandem doctor` finds a
//! missing `tandem` binary and a taken port on the host.
//!
//! Without `/usr/sbin/sshd` these tests skip with a notice, unless
//! `TANDEM_REQUIRE_SSHD=1` (CI), where they fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{alive, chat_once, default_model_present, free_port, tandem, tee_lines};

const SSHD: &str = "/usr/sbin/sshd";

/// An `sshd` of this test on 127.0.0.1, stopped (by its pid) when dropped.
struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    user: String,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sshd {
    fn key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// The `ssh` options that reach it, as a TOML array.
    fn options_toml(&self) -> String {
        let options = [
            "-F".to_owned(),
            "/dev/null".into(),
            "-p".into(),
            self.port.to_string(),
            "-i".into(),
            self.key().display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ];
        let quoted: Vec<String> = options.iter().map(|o| format!("{o:?}")).collect();
        format!("[{}]", quoted.join(", "))
    }

    fn target(&self) -> String {
        format!("{}@127.0.0.1", self.user)
    }
}

/// Whether sshd can run here; without it the caller skips, or fails under
/// `TANDEM_REQUIRE_SSHD=1`.
fn sshd_usable() -> bool {
    let missing = [SSHD, "/usr/bin/ssh", "/usr/bin/ssh-keygen"]
        .into_iter()
        .find(|p| !Path::new(p).exists());
    let why = match missing {
        Some(missing) => {
            format!("{missing} is missing (apt-get install openssh-server openssh-client)")
        }
        // sshd refuses to start without its privilege separation directory.
        None => match std::fs::create_dir_all("/run/sshd") {
            Ok(()) => return true,
            Err(err) => format!("sshd needs /run/sshd, which cannot be created: {err}"),
        },
    };
    assert!(
        std::env::var("TANDEM_REQUIRE_SSHD").as_deref() != Ok("1"),
        "{why}"
    );
    eprintln!("skipping: {why}");
    false
}

fn run_ok(command: &mut Command) -> String {
    let output = command.output().expect("the command runs");
    assert!(output.status.success(), "{command:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn start_sshd() -> Sshd {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    for key in ["host_key", "client_key"] {
        run_ok(Command::new("ssh-keygen").args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            &path(key),
        ]));
    }
    std::fs::copy(path("client_key.pub"), path("authorized_keys")).unwrap();
    let port = free_port();
    let config = format!(
        "ListenAddress 127.0.0.1\nPort {port}\nHostKey {}\nAuthorizedKeysFile {}\n\
         PidFile {}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
        path("host_key"),
        path("authorized_keys"),
        path("sshd.pid"),
    );
    std::fs::write(path("sshd_config"), config).unwrap();
    let child = Command::new(SSHD)
        .args(["-D", "-f", &path("sshd_config"), "-E", &path("sshd.log")])
        .stdin(Stdio::null())
        .spawn()
        .expect("sshd starts");
    let user = run_ok(Command::new("id").arg("-un"));
    let sshd = Sshd {
        child,
        dir,
        port,
        user,
    };
    wait_for_login(&sshd);
    sshd
}

/// Waits until a key login through the sshd works.
fn wait_for_login(sshd: &Sshd) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let login = Command::new("ssh")
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
            ])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "LogLevel=ERROR", "-p", &sshd.port.to_string(), "-i"])
            .arg(sshd.key())
            .args([&sshd.target(), "true"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if login.status.success() {
            return;
        }
        let log = std::fs::read_to_string(sshd.dir.path().join("sshd.log")).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "no ssh login to the test sshd: {login:?}\nsshd log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Pids of processes whose command line contains `needle` (sshd's own is loopback,
/// so "remote" processes are visible here).
fn pids_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A running `tandem up` and what its stderr said.
struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Up {
    /// A test that failed half-way still stops what it started.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
        let _ = self.child.wait();
    }
}

impl Up {
    fn start(file: &Path) -> Self {
        let mut child = tandem()
            .args(["up", file.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tandem up starts");
        let lines = tee_lines(child.stderr.take().unwrap(), "up");
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one starts with `prefix`; it, or None if `tandem up` ended.
    fn until(&mut self, prefix: &str) -> Option<String> {
        loop {
            let line = self.lines.recv_timeout(Duration::from_secs(120)).ok()?;
            self.seen.push(line.clone());
            if line.starts_with(prefix) {
                return Some(line);
            }
        }
    }

    fn rest(&mut self) -> String {
        self.seen.extend(self.lines.iter());
        self.seen.join("\n")
    }
}

/// `NAME runs on TARGET as pid N; its log there: PATH` → (pid, remote directory).
fn remote_start(line: &str) -> (u32, PathBuf) {
    let pid = line
        .split(" as pid ")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    let log = line.split("its log there: ").nth(1).unwrap();
    (
        pid.parse().unwrap(),
        Path::new(log).parent().unwrap().to_owned(),
    )
}

fn pids_in(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| l.split("(pid ").nth(1))
        .map(|p| p.trim_end_matches(')').parse().unwrap())
        .collect()
}

/// The log follower of `remote_pid`: the ssh child of `tandem up` running its tail.
fn follower_of(up_pid: u32, remote_pid: u32) -> Option<u32> {
    let needle = format!("--pid={remote_pid}");
    pids_mentioning(&needle).into_iter().find(|&pid| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after_name = stat.rsplit(") ").next().unwrap_or_default();
        after_name.split(' ').nth(1) == Some(&up_pid.to_string())
    })
}

#[test]
fn a_remote_worker_serves_survives_a_dropped_connection_and_stops_by_pid() {
    if !sshd_usable() || !default_model_present() {
        return;
    }
    let sshd = start_sshd();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ssh.toml");
    let (router, prefill, decode) = (free_port(), free_port(), free_port());
    let (kv_prefill, kv_decode) = (free_port(), free_port());
    std::fs::write(
        &file,
        format!(
            r#"
[router]
port = {router}

[ssh]
options = {options}

[[worker]]
engine = "builtin"
role = "prefill"
host = "{target}"
port = {prefill}
kv_port = {kv_prefill}

[[worker]]
engine = "builtin"
role = "decode"
port = {decode}
kv_port = {kv_decode}
"#,
            options = sshd.options_toml(),
            target = sshd.target(),
        ),
    )
    .unwrap();
    // `tandem doctor` reaches the host with the same ssh options as `tandem up`.
    let doctor = tandem()
        .args(["doctor", file.to_str().unwrap()])
        .output()
        .unwrap();
    let checks = String::from_utf8_lossy(&doctor.stdout);
    let ssh_row = checks
        .lines()
        .find(|l| l.contains(" ssh "))
        .unwrap_or_default();
    assert!(
        ssh_row.starts_with("ok") && ssh_row.contains("reachable"),
        "{checks}"
    );
    let model_row = checks
        .lines()
        .find(|l| l.contains(" model ") && l.contains("prefill"))
        .unwrap_or_default();
    assert!(model_row.starts_with("ok"), "checked on the host: {checks}");
    let tandem_row = checks
        .lines()
        .find(|l| l.contains(" tandem ") && l.contains("prefill"))
        .unwrap_or_default();
    assert!(tandem_row.starts_with("ok"), "the binary there: {checks}");
    assert!(doctor.status.success(), "{checks}");
    let mut up = Up::start(&file);
    let started = up
        .until("prefill-0 runs on ")
        .unwrap_or_else(|| panic!("no remote start:\n{}", up.rest()));
    let (remote_pid, remote_dir) = remote_start(&started);
    assert!(
        started.contains(&format!(" on {} ", sshd.target())),
        "{started}"
    );
    let ready = up.until("tandem is up: ");
    let url = ready
        .unwrap_or_else(|| panic!("not up:\n{}", up.rest()))
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_owned();
    assert!(alive(remote_pid), "the remote worker runs");
    assert!(remote_dir.join("prefill-0.pid").exists());

    // The log connection drops: the worker keeps running and is followed again.
    let up_pid = up.child.id();
    let follower = follower_of(up_pid, remote_pid).expect("a log follower runs");
    run_ok(Command::new("kill").args(["-KILL", &follower.to_string()]));
    wait_until("a new log follower", Duration::from_secs(15), || {
        follower_of(up_pid, remote_pid).is_some_and(|p| p != follower)
    });
    assert!(
        matches!(up.child.try_wait(), Ok(None)),
        "tandem up still runs"
    );

    chat_once(&url);

    run_ok(Command::new("kill").args(["-TERM", &up_pid.to_string()]));
    let exit = up.child.wait().unwrap();
    let said = up.rest();
    assert!(exit.success(), "{exit:?}\n{said}");
    let pids = pids_in(&said);
    assert_eq!(pids.len(), 3, "{said}");
    assert!(pids.contains(&remote_pid), "{said}");
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived tandem up");
    }
    assert!(
        !remote_dir.join("prefill-0.pid").exists(),
        "pid file removed"
    );
    let status = std::fs::read_to_string(remote_dir.join("prefill-0.exit")).unwrap();
    assert_eq!(status.trim(), "0", "the worker exited cleanly on SIGTERM");
    let needle = remote_dir.display().to_string();
    wait_until(
        "no process left on the host",
        Duration::from_secs(5),
        || pids_mentioning(&needle).is_empty(),
    );
    let _ = std::fs::remove_dir_all(&remote_dir);
}

#[test]
fn a_remote_worker_that_dies_starting_is_reported_with_its_remote_log() {
    if !sshd_usable() {
        return;
    }
    let sshd = start_sshd();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.toml");
    let (router, port) = (free_port(), free_port());
    std::fs::write(
        &file,
        format!(
            r#"
[router]
port = {router}

[ssh]
options = {options}

[[worker]]
engine = "builtin"
role = "both"
host = "{target}"
port = {port}
model = "/nonexistent/model.gguf"
"#,
            options = sshd.options_toml(),
            target = sshd.target(),
        ),
    )
    .unwrap();
    let mut up = Up::start(&file);
    let started = up
        .until("worker-0 runs on ")
        .unwrap_or_else(|| panic!("no remote start:\n{}", up.rest()));
    let (remote_pid, remote_dir) = remote_start(&started);
    let exit = up.child.wait().unwrap();
    let said = up.rest();
    assert!(!exit.success(), "{said}");
    assert!(said.contains("worker-0 exited during start-up"), "{said}");
    assert!(
        said.contains(&format!("on {}", sshd.target())),
        "names the host: {said}"
    );
    let report = said.split("exited during start-up").nth(1).unwrap();
    assert!(
        report.contains("/nonexistent/model.gguf"),
        "its remote log lines: {said}"
    );
    assert!(!alive(remote_pid), "pid {remote_pid} was left running");
    assert!(
        !remote_dir.join("worker-0.pid").exists(),
        "pid file removed"
    );
    let needle = remote_dir.display().to_string();
    wait_until(
        "no process left on the host",
        Duration::from_secs(5),
        || pids_mentioning(&needle).is_empty(),
    );
    let _ = std::fs::remove_dir_all(&remote_dir);
}

#[test]
fn an_unreachable_host_is_a_clear_error_naming_it() {
    // Needs only the ssh client: nothing listens on the port.
    if !Path::new("/usr/bin/ssh").exists() {
        eprintln!("skipping: no ssh client");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unreachable.toml");
    let closed = free_port();
    std::fs::write(
        &file,
        format!(
            r#"
[ssh]
options = ["-F", "/dev/null", "-p", "{closed}"]
connect_timeout = 3

[[worker]]
engine = "builtin"
role = "both"
host = "nobody@127.0.0.1"
port = {port}
model = "/m.gguf"
"#,
            port = free_port(),
        ),
    )
    .unwrap();
    let started = Instant::now();
    let output = tandem()
        .args(["up", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("starting worker-0 on nobody@127.0.0.1")
            && stderr.contains("(start) failed"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));

    let doctor = tandem()
        .args(["doctor", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!doctor.status.success());
    let checks = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        checks.contains("not reachable") && checks.contains("nobody@127.0.0.1"),
        "{checks}"
    );
}

#[test]
fn doctor_finds_a_missing_binary_and_a_taken_port_on_the_host() {
    if !sshd_usable() {
        return;
    }
    let sshd = start_sshd();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("doctor.toml");
    // Something listens on the worker's port on the host (loopback: this machine).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let kv_port = free_port();
    std::fs::write(
        &file,
        format!(
            r#"
[router]
port = {router}

[ssh]
options = {options}

[[worker]]
engine = "builtin"
role = "both"
host = "{target}"
port = {port}
kv_port = {kv_port}
model = "/nonexistent/model.gguf"
tandem = "/nonexistent/bin/tandem"
"#,
            router = free_port(),
            options = sshd.options_toml(),
            target = sshd.target(),
        ),
    )
    .unwrap();
    let doctor = tandem()
        .args(["doctor", file.to_str().unwrap()])
        .output()
        .unwrap();
    drop(taken);
    assert!(!doctor.status.success());
    let checks = String::from_utf8_lossy(&doctor.stdout);
    let row = |check: &str| {
        checks
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(check))
            .unwrap_or_else(|| panic!("no {check} row: {checks}"))
            .to_owned()
    };
    let binary = row("tandem");
    assert!(
        binary.starts_with("FAIL") && binary.contains("/nonexistent/bin/tandem"),
        "{checks}"
    );
    let port_row = row("port");
    assert!(
        port_row.starts_with("FAIL") && port_row.contains(&format!("{port} is in use")),
        "{checks}"
    );
    assert!(
        row("kv").starts_with("ok"),
        "the free hand-off port: {checks}"
    );
    assert!(checks.contains("fix: copy the binary there"), "{checks}");
}

/// A stand-in for `vllm serve … --port P …` in a venv on the host: it starts a child of
/// its own (as vLLM starts engine processes), then `exec`s a real built-in worker.
const FAKE_VLLM: &str = r#"#!/bin/sh
port=
while [ $# -gt 0 ]; do
  if [ "$1" = --port ]; then port=$2; fi
  shift
done
sleep 1000 >/dev/null 2>&1 </dev/null &
echo $! >"$FAKE_DIR/child.pid"
exec "$TANDEM" serve --host 127.0.0.1 --port "$port" --model "$MODEL" --threads 1 --kv-cache-memory 64MiB
"#;

#[test]
fn a_remote_workers_children_are_stopped_with_its_process_group() {
    use std::os::unix::fs::PermissionsExt;
    if !sshd_usable() || !default_model_present() {
        return;
    }
    let sshd = start_sshd();
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("venv/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        bin.join("activate"),
        format!("PATH={}:$PATH\nexport PATH\n", bin.display()),
    )
    .unwrap();
    std::fs::write(bin.join("vllm"), FAKE_VLLM).unwrap();
    std::fs::set_permissions(bin.join("vllm"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let model = tandem().args(["model", "path"]).output().unwrap();
    let file = dir.path().join("fake.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[router]
port = {router}

[ssh]
options = {options}

[[worker]]
engine = "vllm"
role = "both"
host = "{target}"
port = {port}
model = "fake/model"
venv = "{venv}"
env = {{ TANDEM = "{tandem}", MODEL = "{model}", FAKE_DIR = "{dir}" }}
"#,
            router = free_port(),
            port = free_port(),
            options = sshd.options_toml(),
            target = sshd.target(),
            venv = dir.path().join("venv").display(),
            tandem = env!("CARGO_BIN_EXE_tandem"),
            model = String::from_utf8_lossy(&model.stdout).trim(),
            dir = dir.path().display(),
        ),
    )
    .unwrap();
    let mut up = Up::start(&file);
    let started = up
        .until("worker-0 runs on ")
        .unwrap_or_else(|| panic!("no remote start:\n{}", up.rest()));
    let (remote_pid, remote_dir) = remote_start(&started);
    let url = up
        .until("tandem is up: ")
        .unwrap_or_else(|| panic!("not up:\n{}", up.rest()))
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_owned();
    let child: u32 = std::fs::read_to_string(dir.path().join("child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The worker leads a process group (and session) of its own, its child in it.
    let pgrp = |pid: u32| -> String {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit(") ")
            .next()
            .unwrap_or_default()
            .split(' ')
            .nth(2)
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(pgrp(remote_pid), remote_pid.to_string());
    assert_eq!(pgrp(child), remote_pid.to_string());
    chat_once(&url);

    run_ok(Command::new("kill").args(["-TERM", &up.child.id().to_string()]));
    let exit = up.child.wait().unwrap();
    let said = up.rest();
    assert!(exit.success(), "{exit:?}\n{said}");
    let stopped = !alive(child);
    if !stopped {
        let _ = Command::new("kill")
            .args(["-KILL", &child.to_string()])
            .status();
    }
    assert!(!alive(remote_pid), "the worker outlived tandem up");
    assert!(stopped, "the worker's child {child} outlived tandem up");
    let _ = std::fs::remove_dir_all(&remote_dir);
}
