//! `tandem up` as a user runs it: the embedded default and every built-in example
//! topology start, serve a request through the router, stop on SIGTERM and leave no
//! process behind (checked by pid) — nor do the children a worker starts, nor the
//! workers of a `tandem up` killed with SIGKILL; a slow worker's wait is shown; a
//! worker that dies during start-up is reported with its last lines; cores outside
//! the allowed set are refused by name; bad files name the line and field; `--dry-run`
//! of the vLLM topologies matches the golden commands.

mod common;

use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::{alive, chat_once, default_model_present, free_port, tandem, tee_lines};

/// The example topologies use fixed ports: one `tandem up` at a time.
static PORTS: Mutex<()> = Mutex::new(());

fn repo_file(path: &str) -> String {
    format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"))
}

/// A running `tandem up`, its pids and its router URL once it is up.
struct Up {
    child: Child,
    pids: Vec<u32>,
}

impl Drop for Up {
    /// A test that failed half-way still leaves nothing behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
        let _ = self.child.wait();
    }
}

fn start_up(args: &[&str]) -> (Up, String) {
    let mut up = Up {
        child: tandem()
            .arg("up")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tandem up starts"),
        pids: Vec::new(),
    };
    let rx = tee_lines(up.child.stderr.take().unwrap(), "up");
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("tandem up reports progress");
        if let Some(pid) = line.split("(pid ").nth(1) {
            up.pids.push(pid.trim_end_matches(')').parse().unwrap());
        }
        if let Some(rest) = line.strip_prefix("tandem is up: ") {
            let url = rest.split_whitespace().next().unwrap().to_owned();
            return (up, url);
        }
    }
}

fn serve_and_stop(args: &[&str]) {
    let (mut up, url) = start_up(args);
    assert!(up.pids.len() >= 2, "workers and router: {:?}", up.pids);
    chat_once(&url);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &up.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = up.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    for pid in &up.pids {
        assert!(!alive(*pid), "process {pid} outlived tandem up");
    }
}

#[test]
fn the_embedded_default_serves_and_stops_cleanly() {
    if !default_model_present() {
        return;
    }
    let _ports = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    serve_and_stop(&[]);
}

#[test]
fn every_builtin_example_topology_serves_and_stops_cleanly() {
    if !default_model_present() {
        return;
    }
    let _ports = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    for topology in ["builtin-single", "builtin-replicated-2", "builtin-1p1d"] {
        serve_and_stop(&[&repo_file(&format!("topologies/{topology}.toml"))]);
    }
}

#[test]
fn a_discovery_topology_starts_etcd_and_the_router_follows_it() {
    if !default_model_present() || !common::etcd::etcd_present() {
        return;
    }
    let _ports = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    // etcd is one of the processes started and stopped (its pid is checked too).
    serve_and_stop(&[&repo_file("topologies/builtin-1p1d-discovery.toml")]);
}

#[test]
fn a_worker_that_dies_starting_is_reported_and_the_rest_stopped() {
    if !default_model_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.toml");
    std::fs::write(
        &file,
        r#"
[router]
port = 18192

[[worker]]
engine = "builtin"
role = "both"
port = 18100

[[worker]]
engine = "builtin"
role = "both"
port = 18200
model = "/nonexistent/model.gguf"
"#,
    )
    .unwrap();
    let output = tandem()
        .args(["up", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("worker-1 exited during start-up"),
        "{stderr}"
    );
    assert!(
        stderr.contains("/nonexistent/model.gguf"),
        "its log lines: {stderr}"
    );
    let pids: Vec<u32> = stderr
        .lines()
        .filter_map(|l| l.split("(pid ").nth(1))
        .map(|p| p.trim_end_matches(')').parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{stderr}");
    for pid in pids {
        assert!(!alive(pid), "process {pid} was left running");
    }
}

#[test]
fn bad_topology_files_name_the_line_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let worker = |port: u16, extra: &str| {
        format!("[[worker]]\nengine = \"builtin\"\nrole = \"both\"\nport = {port}\n{extra}\n")
    };
    // (file, what the error must say: its line and its field)
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            "[[worker]]\nengine = \"builtin\"\nrole = \"both\"\nport = 1\ncorez = [0]\n".into(),
            vec!["line ", "corez"],
        ),
        (
            "[[worker]]\nengine = \"vllm\"\nrole = \"both\"\nport = 8000\n".into(),
            vec!["line ", "`model`"],
        ),
        (
            "[[worker]]\nengine = \"builtin\"\nrole = \"prefill\"\nport = 8000\n".into(),
            vec!["line ", "`kv_port`"],
        ),
        // The second worker (line 6) repeats the first one's port.
        (
            worker(8100, "") + &worker(8100, ""),
            vec!["line 6", "`port`", "worker-0"],
        ),
        // Its hand-off port is the other's HTTP port.
        (
            worker(8100, "") + &worker(8200, "kv_port = 8100"),
            vec!["line 6", "`kv_port`"],
        ),
        // The router's port, on the third worker (line 14, after [router]).
        (
            "[router]\nport = 9000\n\n".to_owned()
                + &worker(8100, "")
                + &worker(8200, "")
                + &worker(9000, ""),
            vec!["line 14", "`port`", "router's port"],
        ),
        (
            worker(8100, "name = \"a\"") + &worker(8200, "name = \"a\""),
            vec!["line 6", "`name`"],
        ),
        (
            "\n[router]\nport = 0\n\n".to_owned() + &worker(8100, ""),
            vec!["line 2", "[router]", "`port`"],
        ),
        // A replica among P/D workers: the line of the one that mixes.
        (
            "[[worker]]\nengine = \"builtin\"\nrole = \"prefill\"\nport = 8100\nkv_port = 5600\n\n\
             [[worker]]\nengine = \"builtin\"\nrole = \"decode\"\nport = 8200\n\n"
                .to_owned()
                + &worker(8300, ""),
            vec!["line 12", "`role`", "cannot be mixed"],
        ),
    ];
    for (text, needles) in cases {
        let file = dir.path().join("t.toml");
        std::fs::write(&file, &text).unwrap();
        let output = tandem()
            .args(["up", "--dry-run", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{text}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        for needle in needles {
            assert!(stderr.contains(needle), "{needle}: {stderr}\n{text}");
        }
    }
    // `--port` may not take a worker's port either.
    let output = tandem()
        .args(["up", "--dry-run", "--port", "8200"])
        .arg(repo_file("topologies/builtin-1p1d.toml"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--port") && stderr.contains("router's port"),
        "{stderr}"
    );
}

/// The CPU ids the test may run on (`Cpus_allowed_list` of /proc/self/status).
fn allowed_cores() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    list.split(',')
        .flat_map(|range| {
            let (low, high) = range.split_once('-').unwrap_or((range, range));
            low.parse::<usize>().unwrap()..=high.parse::<usize>().unwrap()
        })
        .collect()
}

#[test]
fn cores_outside_the_allowed_set_are_refused_by_name() {
    let allowed = allowed_cores();
    if allowed.len() < 2 || !std::path::Path::new("/usr/bin/taskset").exists() {
        eprintln!("skipping: needs taskset and two cores");
        return;
    }
    // Run as under a cpuset without the first core, pinning a worker to it.
    let (excluded, kept) = (allowed[0], *allowed.last().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pinned.toml");
    std::fs::write(
        &file,
        format!(
            "[router]\nport = {}\n\n[[worker]]\nengine = \"builtin\"\nrole = \"both\"\n\
             port = {}\ncores = [{excluded}]\nmodel = \"/nonexistent/model.gguf\"\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let output = std::process::Command::new("taskset")
        .args(["-c", &kept.to_string(), env!("CARGO_BIN_EXE_tandem"), "up"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("pinned to cores {excluded}"))
            && stderr.contains(&format!("may only use cores {kept}")),
        "{stderr}"
    );
    // The embedded default pins its two workers to the first two cores it may use.
    if allowed.len() >= 3 {
        let rest = &allowed[1..];
        let list: Vec<String> = rest.iter().map(usize::to_string).collect();
        let dry = std::process::Command::new("taskset")
            .args(["-c", &list.join(","), env!("CARGO_BIN_EXE_tandem"), "up"])
            .arg("--dry-run")
            .output()
            .unwrap();
        assert!(dry.status.success(), "{dry:?}");
        let commands = String::from_utf8_lossy(&dry.stdout);
        for core in &rest[..2] {
            assert!(
                commands.contains(&format!("pinned to cores {core})")),
                "{commands}"
            );
        }
    }
}

/// The default model's path.
fn default_model_path() -> String {
    let output = tandem().args(["model", "path"]).output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A stand-in for `vllm serve MODEL … --port P …` in a venv: it starts a child of its
/// own (as vLLM starts its engine processes), takes a few seconds, then `exec`s a real
/// built-in worker on that port.
const FAKE_VLLM: &str = r#"#!/bin/sh
port=
while [ $# -gt 0 ]; do
  if [ "$1" = --port ]; then port=$2; fi
  shift
done
sleep 1000 >/dev/null 2>&1 </dev/null &
echo $! >"$FAKE_DIR/child.pid"
sleep 6
exec "$TANDEM" serve --host 127.0.0.1 --port "$port" --model "$MODEL" --threads 1 --kv-cache-memory 64MiB
"#;

/// A topology of one fake vLLM worker (see [`FAKE_VLLM`]) behind the router, in `dir`.
fn fake_vllm_topology(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("venv/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        bin.join("activate"),
        format!("PATH={}:$PATH\nexport PATH\n", bin.display()),
    )
    .unwrap();
    let vllm = bin.join("vllm");
    std::fs::write(&vllm, FAKE_VLLM).unwrap();
    std::fs::set_permissions(&vllm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = dir.join("fake-vllm.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[router]
port = {router}

[[worker]]
engine = "vllm"
role = "both"
port = {port}
model = "fake/model"
venv = "{venv}"
env = {{ TANDEM = "{tandem}", MODEL = "{model}", FAKE_DIR = "{dir}" }}
"#,
            router = free_port(),
            port = free_port(),
            venv = dir.join("venv").display(),
            tandem = env!("CARGO_BIN_EXE_tandem"),
            model = default_model_path(),
            dir = dir.display(),
        ),
    )
    .unwrap();
    file
}

/// Kills a leftover process of a failed test by its pid.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.filter(|&p| alive(p)) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

#[test]
fn a_workers_own_children_are_stopped_with_it_and_its_wait_is_shown() {
    if !default_model_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = fake_vllm_topology(dir.path());
    let mut up = Up {
        child: tandem()
            .arg("up")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        pids: Vec::new(),
    };
    let rx = tee_lines(up.child.stderr.take().unwrap(), "up");
    let mut seen = Vec::new();
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("not up:\n{}", seen.join("\n")));
        if let Some(pid) = line.split("(pid ").nth(1) {
            up.pids.push(pid.trim_end_matches(')').parse().unwrap());
        }
        seen.push(line.clone());
        if let Some(rest) = line.strip_prefix("tandem is up: ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let grandchild: u32 = std::fs::read_to_string(dir.path().join("child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _leftover = KillOnDrop(Some(grandchild));
    // Stderr is not a terminal: a line names the worker still loading, with its time.
    assert!(
        seen.iter()
            .any(|l| l.starts_with("  waiting for worker-0 (") && l.ends_with(" s)")),
        "{seen:#?}"
    );
    // The venv line `exec`s: the pid reported is the worker's own.
    let [worker, router] = up.pids[..] else {
        panic!("{seen:#?}");
    };
    let cmdline = std::fs::read(format!("/proc/{worker}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(" serve ") && cmdline.contains("--kv-cache-memory 64MiB"),
        "pid {worker} is {cmdline:?}"
    );
    assert!(alive(grandchild));
    chat_once(&url);

    std::process::Command::new("kill")
        .args(["-TERM", &up.child.id().to_string()])
        .status()
        .unwrap();
    let exit = up.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    for pid in [worker, router, grandchild] {
        assert!(!alive(pid), "process {pid} outlived tandem up");
    }
}

#[test]
fn workers_stop_when_tandem_up_is_killed() {
    if !default_model_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("one.toml");
    std::fs::write(
        &file,
        format!(
            "[router]\nport = {}\n\n[[worker]]\nengine = \"builtin\"\nrole = \"both\"\n\
             port = {}\nkv_cache_memory = \"64MiB\"\nextra_args = [\"--threads\", \"1\"]\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let (mut up, _url) = start_up(&[file.to_str().unwrap()]);
    assert_eq!(up.pids.len(), 2, "{:?}", up.pids);
    let _leftovers: Vec<KillOnDrop> = up.pids.iter().map(|&p| KillOnDrop(Some(p))).collect();
    std::process::Command::new("kill")
        .args(["-KILL", &up.child.id().to_string()])
        .status()
        .unwrap();
    up.child.wait().unwrap();
    // No teardown ran: the kernel's parent-death signal (SIGTERM) stops them.
    for pid in &up.pids {
        let mut waited = 0;
        while alive(*pid) && waited < 600 {
            std::thread::sleep(Duration::from_millis(100));
            waited += 1;
        }
        assert!(!alive(*pid), "process {pid} outlived a killed tandem up");
    }
}

#[test]
fn vllm_dry_runs_print_the_seed_commands() {
    for topology in ["vllm-spark-replicated", "vllm-spark-disaggregated"] {
        let output = tandem()
            .args([
                "up",
                "--dry-run",
                &repo_file(&format!("topologies/{topology}.toml")),
            ])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let golden = std::fs::read_to_string(repo_file(&format!(
            "crates/cli/tests/golden/{topology}.txt"
        )))
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            golden,
            "{topology}"
        );
    }
}

#[test]
fn doctor_passes_on_the_default_and_names_a_taken_port_with_a_fix() {
    if !default_model_present() {
        return;
    }
    let _ports = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let healthy = tandem().arg("doctor").output().unwrap();
    assert!(healthy.status.success(), "{healthy:?}");
    let taken = std::net::TcpListener::bind("127.0.0.1:8200").unwrap();
    let report = tandem().arg("doctor").output().unwrap();
    drop(taken);
    assert!(!report.status.success());
    let stdout = String::from_utf8_lossy(&report.stdout);
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(failed.len(), 1, "{stdout}");
    assert!(
        failed[0].contains("decode-0") && failed[0].contains("8200"),
        "{stdout}"
    );
    assert!(stdout.contains("fix:"), "{stdout}");
}
