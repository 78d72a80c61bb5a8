//! `tandem doctor`: checks that a topology can start, before starting it. Each check
//! says what it looked at, whether it passed, and for a failure, how to fix it: ports
//! free (on remote hosts read from `ss -ltn`, or `/proc/net/tcp` without it), SSH hosts
//! reachable (BatchMode, no prompts), the `tandem` binary on the hosts of built-in
//! workers, vLLM's command on the PATH and vLLM importable (with the worker's `env`,
//! venv and `python`, as `tandem up` runs it) with its version and CUDA build, NIXL
//! importable, enough free GPU memory for the `gpu_memory_utilization`s of all the
//! workers on each GPU together, the model present on its host, pinned cores this
//! process may use, and hand-off addresses that other hosts can reach.

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
    for (index, worker) in topology.workers.iter().enumerate() {
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
        let wants = gpu_wants(topology, index);
        if !wants.is_empty() {
            checks.push(gpu_memory_check(&shell, &wants, &target));
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
        let what = match spec.engine {
            Engine::Builtin => "kv port",
            // VLLM_NIXL_SIDE_CHANNEL_PORT: where the decode side asks for the KV's
            // NIXL metadata.
            Engine::Vllm => "nixl side-channel port",
        };
        ports.push((what, kv_port));
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
    let mut checks = Vec::new();
    let command = spec.vllm_command();
    let program = crate::plan::shell_quote(&command[0]);
    let prefix = vllm_prefix(worker);
    checks.push(match shell.run(&format!("{prefix}command -v {program}")) {
        Ok(path) => pass(
            "vllm command",
            target,
            format!("{} ({})", command.join(" "), path.trim()),
        ),
        Err(_) => fail(
            "vllm command",
            target,
            format!("{} is not a program there", command[0]),
            "install vLLM (`pip install vllm`) and set the worker's `venv`, or set its \
                 `command` to how vLLM is started there",
        ),
    });
    let python = spec.vllm_python();
    let fix = format!(
        "install vLLM where `{python}` finds it (`pip install vllm`, with the worker's `env` \
         and `venv`), or set the worker's `python`"
    );
    let import = vllm_import_script(&python, &command, spec.role != Role::Both);
    checks.push(match shell.run_slow(&format!("{prefix}{import}")) {
        Ok(version) => pass("vllm", target, version.trim().to_owned()),
        Err(err) => fail("vllm", target, err.to_string(), fix),
    });
    if let Some(model) = &spec.model {
        checks.push(model_in_hf_cache(shell, model, target));
    }
    checks
}

/// What comes before a vLLM worker's check commands: its venv activated and its `env`
/// exported (`PYTHONPATH` of an install vLLM runs from), as `tandem up` runs it.
fn vllm_prefix(worker: &NamedWorker) -> String {
    let spec = &worker.spec;
    let mut prefix = String::new();
    if let Some(venv) = &spec.venv {
        let activate = venv.join("bin/activate").display().to_string();
        prefix.push_str(&format!(". {} && ", crate::plan::shell_quote(&activate)));
    }
    for (key, value) in &spec.env {
        prefix.push_str(&format!(
            "export {key}={}; ",
            crate::plan::shell_quote(value)
        ));
    }
    prefix
}

/// `python -c …` that imports vLLM and torch (and NIXL for P/D), finds the module of a
/// `python -m MODULE` command, and prints vLLM's version and torch's CUDA.
fn vllm_import_script(python: &str, command: &[String], nixl: bool) -> String {
    let mut code = String::from("import vllm, torch\n");
    if nixl {
        code.push_str("import nixl\n");
    }
    let module = match command {
        [_, flag, module, ..] if flag == "-m" => Some(module.as_str()),
        _ => None,
    };
    if let Some(module) = module {
        code.push_str(&format!(
            "import importlib.util\nassert importlib.util.find_spec({module:?}), 'no module {module}'\n"
        ));
    }
    code.push_str(&format!(
        "print('vllm', vllm.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda{})\n",
        if nixl { ", 'nixl'" } else { "" }
    ));
    format!(
        "{} -c {}",
        crate::plan::shell_quote(python),
        crate::plan::shell_quote(&code)
    )
}

/// One GPU a worker runs on, and what every worker on it asks of its memory.
#[derive(Debug, Clone, PartialEq)]
struct GpuWant {
    gpu: usize,
    /// The `gpu_memory_utilization`s of the workers on it, together.
    share: f64,
    /// Those workers (this one included), in file order.
    workers: Vec<String>,
}

/// The GPUs worker `index` runs on, each with the share of its memory that all of
/// its workers on this machine take together: vLLM refuses to start unless the memory
/// it asks for is free when it starts, after its GPU's earlier workers took theirs.
fn gpu_wants(topology: &Checked, index: usize) -> Vec<GpuWant> {
    topology.workers[index]
        .spec
        .gpu_ids()
        .into_iter()
        .map(|gpu| {
            let neighbours = topology.gpu_neighbours(index, gpu);
            GpuWant {
                gpu,
                share: neighbours
                    .iter()
                    .map(|&i| topology.workers[i].spec.gpu_share())
                    .sum(),
                workers: neighbours
                    .iter()
                    .map(|&i| topology.workers[i].name.clone())
                    .collect(),
            }
        })
        .collect()
}

fn gpu_memory_check(shell: &Shell, wants: &[GpuWant], target: &str) -> Check {
    let query =
        "nvidia-smi --query-gpu=index,memory.free,memory.total --format=csv,noheader,nounits";
    match shell.run(query) {
        Ok(table) => gpu_memory(&table, wants, target),
        Err(err) => fail(
            "gpu memory",
            target,
            err.to_string(),
            "install the NVIDIA driver (nvidia-smi)",
        ),
    }
}

/// Whether the worker's GPUs have the memory their workers will ask for: each GPU
/// needs its workers' shares together × its total memory free. From `nvidia-smi` CSV
/// (`index, free MiB, total MiB`).
fn gpu_memory(table: &str, wants: &[GpuWant], target: &str) -> Check {
    let found: Vec<(usize, u64, u64)> = table
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(',').map(str::trim);
            Some((
                fields.next()?.parse().ok()?,
                fields.next()?.parse().ok()?,
                fields.next()?.parse().ok()?,
            ))
        })
        .collect();
    let mut detail = Vec::new();
    let mut short = false;
    for want in wants {
        let Some(&(_, free, total)) = found.iter().find(|(i, _, _)| *i == want.gpu) else {
            return fail(
                "gpu memory",
                target,
                format!("no GPU {} (nvidia-smi lists {})", want.gpu, found.len()),
                "check the worker's `gpus` and the driver",
            );
        };
        let needed = (total as f64 * want.share).ceil() as u64;
        short |= free < needed;
        let whose = if want.workers.len() > 1 {
            format!(
                " for {} (gpu_memory_utilization {:.2} together)",
                want.workers.join(" + "),
                want.share
            )
        } else {
            format!(" (gpu_memory_utilization {})", want.share)
        };
        detail.push(format!(
            "GPU {}: {free} of {total} MiB free, {needed} needed{whose}",
            want.gpu
        ));
    }
    let detail = detail.join(", ");
    if short {
        return fail(
            "gpu memory",
            target,
            detail,
            "stop the processes holding GPU memory (`nvidia-smi`), or lower the \
             `gpu_memory_utilization` of the workers on that GPU",
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
            Shell::Here => run_here(script, Duration::from_secs(20)),
            Shell::Remote(ssh) => Ok(ssh.run(script, "doctor check")?),
        }
    }

    /// As [`Shell::run`], with two minutes here: the first import of a fresh vLLM
    /// install compiles its bytecode.
    fn run_slow(&self, script: &str) -> Result<String, ShellError> {
        match self {
            Shell::Here => run_here(script, Duration::from_secs(120)),
            Shell::Remote(ssh) => Ok(ssh.run(script, "doctor check")?),
        }
    }
}

/// This machine's NVIDIA GPUs as a report names them (`1 × NVIDIA H200, 143771 MiB,
/// driver 580.159.04`); `None` where `nvidia-smi` is missing, fails or lists none.
pub fn local_gpus() -> Option<String> {
    let query = "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader";
    gpu_summary(&run_here(query, Duration::from_secs(10)).ok()?)
}

/// `nvidia-smi`'s `name, memory, driver` lines, identical cards counted together.
fn gpu_summary(csv: &str) -> Option<String> {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for line in csv.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [name, memory, driver] = fields[..] else {
            continue;
        };
        let kind = format!("{name}, {memory}, driver {driver}");
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, count)) => *count += 1,
            None => kinds.push((kind, 1)),
        }
    }
    let described: Vec<String> = kinds
        .into_iter()
        .map(|(kind, count)| format!("{count} × {kind}"))
        .collect();
    (!described.is_empty()).then(|| described.join("; "))
}

/// `bash -c script` here within `limit`: its stdout, or the last line of its stderr.
fn run_here(script: &str, limit: Duration) -> Result<String, ShellError> {
    let mut child = Command::new("bash")
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ShellError::Here(e.to_string()))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ShellError::Here(format!(
                    "no answer within {} s",
                    limit.as_secs()
                )));
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
    fn gpus_are_counted_by_kind() {
        let two = "NVIDIA H200, 143771 MiB, 580.159.04\nNVIDIA H200, 143771 MiB, 580.159.04\n";
        assert_eq!(
            gpu_summary(two).as_deref(),
            Some("2 × NVIDIA H200, 143771 MiB, driver 580.159.04")
        );
        let mixed = "NVIDIA H100 80GB HBM3, 81559 MiB, 580.1\nNVIDIA L4, 23034 MiB, 580.1\n";
        assert_eq!(
            gpu_summary(mixed).as_deref(),
            Some(
                "1 × NVIDIA H100 80GB HBM3, 81559 MiB, driver 580.1; 1 × NVIDIA L4, 23034 MiB, driver 580.1"
            )
        );
        assert_eq!(gpu_summary(""), None);
        assert_eq!(gpu_summary("No devices were found\n"), None);
    }

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

    fn want(gpu: usize, share: f64, workers: &[&str]) -> GpuWant {
        GpuWant {
            gpu,
            share,
            workers: workers.iter().map(|w| w.to_string()).collect(),
        }
    }

    #[test]
    fn gpu_memory_is_compared_with_the_utilization_asked_for() {
        let table = "0, 80000, 81559\n1, 60000, 81559\n";
        assert!(
            gpu_memory(table, &[want(0, 0.9, &["w"])], "w").ok,
            "73,404 MiB needed"
        );
        let check = gpu_memory(table, &[want(1, 0.9, &["w"])], "w");
        assert!(!check.ok, "60 GB free < 90% of 80 GB");
        assert_eq!(
            check.detail,
            "GPU 1: 60000 of 81559 MiB free, 73404 needed (gpu_memory_utilization 0.9)"
        );
        assert!(check.fix.contains("gpu_memory_utilization"));
        assert!(gpu_memory(table, &[want(1, 0.7, &["w"])], "w").ok);
        let both = gpu_memory(table, &[want(0, 0.3, &["a"]), want(1, 0.9, &["a"])], "a");
        assert!(!both.ok && both.detail.contains("GPU 0: 80000 of 81559 MiB free"));
        let missing = gpu_memory(table, &[want(7, 0.1, &["w"])], "w");
        assert!(
            !missing.ok && missing.detail.contains("no GPU 7"),
            "{missing:?}"
        );
    }

    #[test]
    fn workers_sharing_a_gpu_need_their_shares_together() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../topologies/gpu-vllm-1p1d.toml"
        ))
        .unwrap();
        let topology = crate::topology::parse(&text, "t").unwrap();
        let wants = gpu_wants(&topology, 1);
        assert_eq!(wants.len(), 1);
        assert_eq!(wants[0].gpu, 0);
        assert!((wants[0].share - 0.6).abs() < 1e-9);
        assert_eq!(wants[0].workers, ["prefill-0", "decode-0"]);
        // An H100: 0.6 of 81,559 MiB is 48,936.
        let check = gpu_memory("0, 50000, 81559\n", &wants, "decode-0");
        assert!(check.ok, "{check:?}");
        assert_eq!(
            check.detail,
            "GPU 0: 50000 of 81559 MiB free, 48936 needed for prefill-0 + decode-0 \
             (gpu_memory_utilization 0.60 together)"
        );
        assert!(!gpu_memory("0, 40000, 81559\n", &wants, "decode-0").ok);
        // Built-in workers on the CPU have no GPU to check.
        let cpu = crate::topology::parse(
            "[[worker]]\nengine = \"builtin\"\nrole = \"both\"\nport = 8100\n",
            "t",
        )
        .unwrap();
        assert!(gpu_wants(&cpu, 0).is_empty());
    }

    #[test]
    fn vllm_checks_run_with_the_workers_env_and_python() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../topologies/gpu-vllm-1p1d.toml"
        ))
        .unwrap();
        let topology = crate::topology::parse(&text, "t").unwrap();
        let prefill = &topology.workers[0];
        let prefix = vllm_prefix(prefill);
        assert!(prefix.contains("export PYTHONPATH=/tmp/site; "), "{prefix}");
        let seen = Shell::Here
            .run(&format!(
                "{prefix}echo \"$PYTHONPATH $VLLM_USE_FLASHINFER_SAMPLER\""
            ))
            .unwrap();
        assert_eq!(seen.trim(), "/tmp/site 0");

        let command = prefill.spec.vllm_command();
        let script = vllm_import_script("python3", &command, true);
        assert!(script.starts_with("python3 -c "), "{script}");
        assert!(script.contains("import nixl"), "{script}");
        assert!(
            script.contains(r#"find_spec("vllm.entrypoints.cli.main")"#),
            "{script}"
        );
        let plain = vllm_import_script("python3", &["vllm".into(), "serve".into()], false);
        assert!(
            !plain.contains("nixl") && !plain.contains("find_spec"),
            "{plain}"
        );

        // This machine has Python but no vLLM: the check says so, with Python's words.
        let checks = vllm_checks(prefill, &Shell::Here, "prefill-0 (local)");
        let command = checks.iter().find(|c| c.check == "vllm command").unwrap();
        assert!(command.ok, "{command:?}");
        let import = checks.iter().find(|c| c.check == "vllm").unwrap();
        assert!(!import.ok, "{import:?}");
        assert!(
            import.detail.contains("No module named 'vllm'"),
            "{import:?}"
        );
        assert!(import.fix.contains("python3"), "{import:?}");
        let mut missing = prefill.clone();
        missing.spec.command = vec!["/nonexistent/vllm".into(), "serve".into()];
        let checks = vllm_checks(&missing, &Shell::Here, "w");
        assert!(!checks[0].ok && checks[0].detail.contains("/nonexistent/vllm"));
    }

    #[test]
    fn vllm_side_channel_ports_are_checked() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../topologies/gpu-vllm-1p1d.toml"
        ))
        .unwrap();
        let topology = crate::topology::parse(&text, "t").unwrap();
        let checks = port_checks(&topology.workers[1], &Shell::Here, "decode-0");
        let names: Vec<&str> = checks.iter().map(|c| c.check.as_str()).collect();
        assert_eq!(names, ["port", "nixl side-channel port"]);
        assert!(checks[1].detail.contains("127.0.0.1:5601"), "{checks:?}");
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
        let has_ss = Command::new("ss").arg("-V").output().is_ok();
        let probes = |port| {
            let mut probes = vec![port_probe_proc(port), port_probe(port)];
            if has_ss {
                probes.push(port_probe_ss(port));
            }
            probes
        };
        for probe in probes(port) {
            let answer = probe_here(&probe);
            assert!(answer != "free" && !answer.is_empty(), "{probe}: {answer}");
        }
        drop(listener);
        let released_is_free = some_released_port_passes(|port| {
            probes(port).iter().all(|probe| probe_here(probe) == "free")
        });
        assert!(released_is_free);
    }

    /// Whether `check` passes for a port just bound and released. Another process on
    /// the machine may take a released port at once (an outgoing connection's
    /// ephemeral port, say), so a few fresh ports are tried before giving up.
    fn some_released_port_passes(check: impl Fn(u16) -> bool) -> bool {
        (0..5).any(|_| {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            check(port)
        })
    }

    #[test]
    fn a_taken_port_fails_with_a_fix() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = taken.local_addr().unwrap().to_string();
        let check = port_free_here("port", "w", &address);
        assert!(!check.ok);
        assert!(!check.fix.is_empty());
        drop(taken);
        let released_is_free = some_released_port_passes(|port| {
            port_free_here("port", "w", &format!("127.0.0.1:{port}")).ok
        });
        assert!(released_is_free);
    }

    #[test]
    fn local_commands_report_their_last_error_line() {
        assert_eq!(Shell::Here.run("echo hi").unwrap(), "hi\n");
        let err = Shell::Here.run("echo oops >&2; exit 3").unwrap_err();
        assert_eq!(err.to_string(), "oops");
    }
}
