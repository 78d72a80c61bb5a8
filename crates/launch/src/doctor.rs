//! `tandem doctor`: checks that a topology can start, before starting it. Each check
//! says what it looked at, whether it passed, and for a failure, how to fix it: ports
//! free (on remote hosts read from `ss -ltn`, or `/proc/net/tcp` without it), SSH hosts
//! reachable (BatchMode, no prompts), the `tandem` binary on the hosts of built-in
//! workers, vLLM importable with its version and CUDA build, NIXL importable, enough
//! free GPU memory for the worker's `gpu_memory_utilization`, the model present on its
//! host, pinned cores this process may use, and hand-off addresses that other hosts can
//! reach.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::remote::{RemoteError, Ssh};
use crate::topology::{Checked, Engine, NamedWorker, Role};

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub check: String,
    pub target: String,
    pub ok: bool,
    pub detail: String,
    /// What to do when it failed.
    pub fix: String,
}

fn pass(check: &str, target: &str, detail: impl Into<String>) -> Check {
    Check {
        check: check.into(),
        target: target.into(),
        ok: true,
        detail: detail.into(),
        fix: String::new(),
    }
}

fn fail(check: &str, target: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        check: check.into(),
        target: target.into(),
        ok: false,
        detail: detail.into(),
        fix: fix.into(),
    }
}

/// Every check of `topology`.
pub fn run_checks(topology: &Checked) -> Vec<Check> {
    let mut checks = vec![router_port(topology)];
    let cores = crate::run::allowed_cores();
    let mut reached = std::collections::BTreeMap::new();
    for worker in &topology.workers {
        let spec = &worker.spec;
        let target = format!("{} ({})", worker.name, spec.host);
        let shell = Shell::of(topology, worker);
        if !spec.is_local() {
            let ok = *reached
                .entry(spec.host.clone())
                .or_insert_with(|| shell.run("true").is_ok());
            if !ok {
                checks.push(fail(
                    "ssh",
                    &target,
                    "not reachable with ssh -o BatchMode=yes",
                    format!("set up key-based login: ssh-copy-id {}", spec.host),
                ));
                continue;
            }
            checks.push(pass("ssh", &target, "reachable"));
        }
        checks.extend(port_checks(worker, &shell, &target));
        match spec.engine {
            Engine::Builtin => checks.extend(builtin_checks(worker, &shell, &target, &cores)),
            Engine::Vllm => checks.extend(vllm_checks(worker, &shell, &target)),
        }
    }
    checks.extend(address_checks(topology));
    checks.extend(discovery_checks(topology));
    checks
}

/// The etcd `tandem up` would start: its binary here and its two ports free.
fn discovery_checks(topology: &Checked) -> Vec<Check> {
    let Some(discovery) = topology.discovery.as_ref().filter(|d| d.starts_etcd()) else {
        return Vec::new();
    };
    let binary = match std::process::Command::new("etcd").arg("--version").output() {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout);
            let first = version.lines().next().unwrap_or("").trim().to_owned();
            pass("etcd", "discovery", first)
        }
        _ => fail(
            "etcd",
            "discovery",
            "no `etcd` on the PATH, which [discovery] without `etcd` starts",
            "install it (Debian: apt-get install etcd-server) or give `etcd = \"etcd://host:port\"`",
        ),
    };
    let port = discovery.etcd_port;
    vec![
        binary,
        port_free_here("etcd port", "discovery", &format!("127.0.0.1:{port}")),
        port_free_here(
            "etcd peer port",
            "discovery",
            &format!("127.0.0.1:{}", port.wrapping_add(1)),
        ),
    ]
}

fn router_port(topology: &Checked) -> Check {
    let address = format!("{}:{}", topology.router.host, topology.router.port);
    port_free_here("router port", "router", &address)
}

fn port_free_here(check: &str, target: &str, address: &str) -> Check {
    match TcpListener::bind(address) {
        Ok(_) => pass(check, target, format!("{address} is free")),
        Err(err) => fail(
            check,
            target,
            format!("{address}: {err}"),
            "stop what listens there (`ss -ltnp`), or change the port in the topology",
        ),
    }
}

fn port_checks(worker: &NamedWorker, shell: &Shell, target: &str) -> Vec<Check> {
    let spec = &worker.spec;
    let mut ports = vec![("port", spec.port)];
    if let Some(kv_port) = spec.kv_port {
        ports.push(("kv port", kv_port));
    }
    if let Some(port) = spec.kv_events_port {
        ports.push(("kv events port", port));
    }
    if let Some(port) = spec.kv_replay_port {
        ports.push(("kv replay port", port));
    }
    ports
        .into_iter()
        .map(|(what, port)| {
            if spec.is_local() {
                return port_free_here(what, target, &format!("127.0.0.1:{port}"));
            }
            match shell
                .run(&port_probe(port))
                .map(|answer| answer.trim().to_owned())
            {
                Ok(answer) if answer == "free" => pass(what, target, format!("{port} is free")),
                Ok(answer) => fail(
                    what,
                    target,
                    format!("{port} is in use: {answer}"),
                    "stop what listens there (`ss -ltnp`), or change the port in the topology",
                ),
                Err(err) => fail(
                    what,
                    target,
                    format!("{port}: could not tell whether it is free: {err}"),
                    "check that `ss` (iproute2) or /proc/net/tcp is readable on the host",
                ),
            }
        })
        .collect()
}

/// A script that prints `free` when nothing listens on TCP `port` on this host, or the
/// listening socket: from `ss -ltn` where it exists, else `/proc/net/tcp{,6}`. Needs no
/// Python and binds nothing.
fn port_probe(port: u16) -> String {
    format!(
        "if command -v ss >/dev/null 2>&1; then {}; else {}; fi",
        port_probe_ss(port),
        port_probe_proc(port)
    )
}

/// `ss -ltn`: the local address is the 4th column (`0.0.0.0:8100`, `[::]:8100`, `*:8100`).
fn port_probe_ss(port: u16) -> String {
    format!(
        r#"ss -ltn | awk '$4 ~ /:{port}$/ {{ print "listening on " $4; found = 1; exit }} END {{ if (!found) print "free" }}'"#
    )
}

/// `/proc/net/tcp` and `tcp6`: listening sockets have state `0A`; the local address
/// ends with the port in hex.
fn port_probe_proc(port: u16) -> String {
    format!(
        r#"cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk '$4 == "0A" && $2 ~ /:{port:04X}$/ {{ print "a socket listens on it (/proc/net/tcp)"; found = 1; exit }} END {{ if (!found) print "free" }}'"#
    )
}

/// Whether a built-in worker's extra arguments ask for `--load-format dummy`, where the
/// model is a preset name, not a file.
fn loads_dummy(extra_args: &[String]) -> bool {
    extra_args.iter().enumerate().any(|(i, arg)| {
        arg == "--load-format=dummy"
            || (arg == "--load-format" && extra_args.get(i + 1).is_some_and(|v| v == "dummy"))
    })
}

fn builtin_checks(
    worker: &NamedWorker,
    shell: &Shell,
    target: &str,
    cores: &[usize],
) -> Vec<Check> {
    let spec = &worker.spec;
    let mut checks = Vec::new();
    if !spec.is_local() || spec.tandem.is_some() {
        checks.push(tandem_binary(worker, shell, target));
    }
    if let Some(model) = spec
        .model
        .as_ref()
        .filter(|_| loads_dummy(&spec.extra_args))
    {
        checks.push(pass(
            "model",
            target,
            format!("preset {model} with random weights (--load-format dummy)"),
        ));
    } else if let Some(model) = &spec.model {
        let present = if spec.is_local() {
            Path::new(model).exists()
        } else {
            shell
                .run(&format!("test -e {}", crate::plan::shell_quote(model)))
                .is_ok()
        };
        checks.push(if present {
            pass("model", target, model.clone())
        } else {
            fail(
                "model",
                target,
                format!("{model} not found"),
                "copy the model there, or `tandem model fetch` for the default model",
            )
        });
    }
    if spec.is_local() {
        let listed = crate::run::core_list(cores);
        if let Some(&core) = spec.cores.iter().find(|c| !cores.contains(c)) {
            checks.push(fail(
                "cores",
                target,
                format!("core {core} is not one this process may use ({listed})"),
                format!("pin to cores among {listed} (a cpuset or taskset may limit them)"),
            ));
        } else if !spec.cores.is_empty() {
            checks.push(pass(
                "cores",
                target,
                format!("{:?} of {listed}", spec.cores),
            ));
        }
    }
    checks
}

/// The `tandem` binary a built-in worker runs, executable on its host.
fn tandem_binary(worker: &NamedWorker, shell: &Shell, target: &str) -> Check {
    let program = match &worker.spec.tandem {
        Some(path) => path.display().to_string(),
        // `tandem up` runs the same path there as here; doctor is that binary.
        None => std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "tandem".into()),
    };
    let quoted = crate::plan::shell_quote(&program);
    match shell.run(&format!(
        "test -x {quoted} || command -v {quoted} >/dev/null 2>&1"
    )) {
        Ok(_) => pass("tandem", target, program),
        Err(_) => fail(
            "tandem",
            target,
            format!("{program} is not an executable there"),
            format!(
                "copy the binary there (`scp target/release/tandem {}:{program}`), or set the \
                 worker's `tandem` to where it is",
                worker.spec.host
            ),
        ),
    }
}

fn vllm_checks(worker: &NamedWorker, shell: &Shell, target: &str) -> Vec<Check> {
    let spec = &worker.spec;
    let activate = spec
        .venv
        .as_ref()
        .map(|v| {
            format!(
                ". {} && ",
                crate::plan::shell_quote(&v.join("bin/activate").display().to_string())
            )
        })
        .unwrap_or_default();
    let python = |code: &str| format!("{activate}python3 -c {}", crate::plan::shell_quote(code));
    let mut checks = Vec::new();
    checks.push(
        match shell.run(&python(
            "import vllm, torch; print(vllm.__version__, 'cuda', torch.version.cuda)",
        )) {
            Ok(version) => pass("vllm", target, version.trim().to_owned()),
            Err(err) => fail(
                "vllm",
                target,
                err.to_string(),
                "install vLLM in the worker's venv (`pip install vllm`) and set `venv`",
            ),
        },
    );
    if spec.role != Role::Both {
        checks.push(match shell.run(&python("import nixl")) {
            Ok(_) => pass("nixl", target, "importable"),
            Err(err) => fail(
                "nixl",
                target,
                err.to_string(),
                "install NIXL in the worker's venv (`pip install nixl`)",
            ),
        });
    }
    let query =
        "nvidia-smi --query-gpu=index,memory.free,memory.total --format=csv,noheader,nounits";
    let utilization = spec
        .gpu_memory_utilization
        .unwrap_or(DEFAULT_GPU_MEMORY_UTILIZATION);
    checks.push(match shell.run(query) {
        Ok(table) => gpu_memory(&table, &spec.gpus, utilization, target),
        Err(err) => fail(
            "gpu memory",
            target,
            err.to_string(),
            "install the NVIDIA driver (nvidia-smi)",
        ),
    });
    if let Some(model) = &spec.model {
        checks.push(model_in_hf_cache(shell, model, target));
    }
    checks
}

/// vLLM's `--gpu-memory-utilization` when the topology gives none (as `plan` writes it).
const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;

/// Whether the worker's GPUs have the memory vLLM will ask for: it refuses to start
/// unless each GPU has `utilization` × its total memory free. From `nvidia-smi` CSV
/// (`index, free MiB, total MiB`).
fn gpu_memory(table: &str, gpus: &[usize], utilization: f64, target: &str) -> Check {
    let gpus_found: Vec<(usize, u64, u64)> = table
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(',').map(str::trim);
            Some((
                fields.next()?.parse().ok()?,
                fields.next()?.parse().ok()?,
                fields.next()?.parse().ok()?,
            ))
        })
        .filter(|(index, _, _)| gpus.is_empty() || gpus.contains(index))
        .collect();
    if gpus_found.is_empty() {
        return fail(
            "gpu memory",
            target,
            "no GPU found",
            "check `gpus` and the driver",
        );
    }
    let needed = |total: u64| (total as f64 * utilization).ceil() as u64;
    let detail: Vec<String> = gpus_found
        .iter()
        .map(|&(i, free, total)| {
            format!(
                "GPU {i}: {free} of {total} MiB free, {} needed",
                needed(total)
            )
        })
        .collect();
    let detail = format!(
        "{} (gpu_memory_utilization {utilization})",
        detail.join(", ")
    );
    if gpus_found
        .iter()
        .any(|&(_, free, total)| free < needed(total))
    {
        return fail(
            "gpu memory",
            target,
            detail,
            "stop the processes holding GPU memory (`nvidia-smi`), or lower the worker's \
             `gpu_memory_utilization`",
        );
    }
    pass("gpu memory", target, detail)
}

/// A Hugging Face model id is present in the host's HF cache (the workers run offline).
fn model_in_hf_cache(shell: &Shell, model: &str, target: &str) -> Check {
    let probe = if model.starts_with('/') {
        format!("test -e {}", crate::plan::shell_quote(model))
    } else {
        let dir = format!("models--{}", model.replace('/', "--"));
        format!(
            "test -d \"${{HF_HOME:-$HOME/.cache/huggingface}}/hub/{}\"",
            dir
        )
    };
    match shell.run(&probe) {
        Ok(_) => pass("model", target, model.to_owned()),
        Err(_) => fail(
            "model",
            target,
            format!("{model} is not in the Hugging Face cache (workers run with HF_HUB_OFFLINE=1)"),
            format!("download it there first: huggingface-cli download {model}"),
        ),
    }
}

fn address_checks(topology: &Checked) -> Vec<Check> {
    if !topology.is_multi_host() {
        return Vec::new();
    }
    topology
        .workers
        .iter()
        .filter(|w| w.spec.role != Role::Both)
        .map(|w| {
            let address = w.spec.reach_address();
            let target = format!("{} ({})", w.name, w.spec.host);
            if matches!(address.as_str(), "127.0.0.1" | "localhost") {
                fail(
                    "hand-off address",
                    &target,
                    format!("{address} is loopback in a multi-host topology"),
                    "set the worker's `address` to its routable IP",
                )
            } else {
                pass("hand-off address", &target, address)
            }
        })
        .collect()
}

/// Where a worker's checks run: here, or on its host over ssh with the options
/// `tandem up` would use.
enum Shell {
    Here,
    Remote(Ssh),
}

/// A check command that failed.
#[derive(Debug, thiserror::Error)]
enum ShellError {
    /// The last line it wrote to stderr, or why it could not run.
    #[error("{0}")]
    Here(String),
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

impl Shell {
    fn of(topology: &Checked, worker: &NamedWorker) -> Shell {
        if worker.spec.is_local() {
            return Shell::Here;
        }
        let options = crate::plan::ssh_options(topology, worker);
        Shell::Remote(Ssh::new(&worker.spec.host, &options))
    }

    /// Runs `script` with a deadline; its stdout.
    fn run(&self, script: &str) -> Result<String, ShellError> {
        match self {
            Shell::Here => run_here(script),
            Shell::Remote(ssh) => Ok(ssh.run(script, "doctor check")?),
        }
    }
}

/// `bash -c script` here within 20 s: its stdout, or the last line of its stderr.
fn run_here(script: &str) -> Result<String, ShellError> {
    let mut child = Command::new("bash")
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ShellError::Here(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ShellError::Here("no answer within 20 s".into()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(err) => return Err(ShellError::Here(err.to_string())),
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|e| ShellError::Here(e.to_string()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or("failed").trim().to_owned();
        Err(ShellError::Here(last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dummy_workers_name_a_preset_not_a_file() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(loads_dummy(&args(&["--load-format", "dummy"])));
        assert!(loads_dummy(&args(&[
            "--threads",
            "2",
            "--load-format=dummy"
        ])));
        assert!(!loads_dummy(&args(&["--load-format", "auto"])));
        assert!(!loads_dummy(&args(&["dummy"])));
    }

    #[test]
    fn gpu_memory_is_compared_with_the_utilization_asked_for() {
        let table = "0, 80000, 81559\n1, 60000, 81559\n";
        assert!(gpu_memory(table, &[0], 0.9, "w").ok, "73,404 MiB needed");
        assert!(
            !gpu_memory(table, &[1], 0.9, "w").ok,
            "60 GB free < 90% of 80 GB"
        );
        assert!(gpu_memory(table, &[1], 0.7, "w").ok);
        let check = gpu_memory(table, &[], 0.9, "w");
        assert!(!check.ok && check.detail.contains("GPU 1: 60000 of 81559 MiB free"));
        assert!(!gpu_memory(table, &[7], 0.9, "w").ok, "no such GPU");
    }

    /// Runs a port probe here, as a remote host's `sh` would.
    fn probe_here(script: &str) -> String {
        let output = Command::new("sh").args(["-c", script]).output().unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    #[test]
    fn port_probes_see_listeners_without_python() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(!port_probe(port).contains("python"));
        let mut probes = vec![port_probe_proc(port), port_probe(port)];
        if Command::new("ss").arg("-V").output().is_ok() {
            probes.push(port_probe_ss(port));
        }
        for probe in &probes {
            let answer = probe_here(probe);
            assert!(answer != "free" && !answer.is_empty(), "{probe}: {answer}");
        }
        drop(listener);
        for probe in &probes {
            assert_eq!(probe_here(probe), "free", "{probe}");
        }
    }

    #[test]
    fn a_taken_port_fails_with_a_fix() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = taken.local_addr().unwrap().to_string();
        let check = port_free_here("port", "w", &address);
        assert!(!check.ok);
        assert!(!check.fix.is_empty());
        drop(taken);
        assert!(port_free_here("port", "w", &address).ok);
    }

    #[test]
    fn local_commands_report_their_last_error_line() {
        assert_eq!(Shell::Here.run("echo hi").unwrap(), "hi\n");
        let err = Shell::Here.run("echo oops >&2; exit 3").unwrap_err();
        assert_eq!(err.to_string(), "oops");
    }
}
