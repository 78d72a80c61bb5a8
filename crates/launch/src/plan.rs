//! From a checked topology to the exact commands that start it: `tandem serve` for
//! built-in workers, the seed notebooks' `vllm serve … --kv-transfer-config` with the
//! NIXL environment for vLLM workers, and `tandem route` in front; with `[discovery]`,
//! an etcd (unless one is given), registration flags for built-in workers, a `tandem
//! register` sidecar per vLLM worker, and a router that follows etcd instead of a
//! list. `--dry-run` prints these; the runner executes them.

use std::path::{Path, PathBuf};

use crate::secret::{ClusterSecret, SECRET_ENV};
use crate::topology::{Checked, DiscoverySpec, Engine, NamedWorker, Role, WorkerSpec};

/// Where a command runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Local,
    /// An SSH target.
    Ssh(String),
}

/// One process to start.
#[derive(Debug, Clone)]
pub struct Launch {
    pub name: String,
    pub host: Host,
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// CPU cores to pin the process to (local built-in workers).
    pub cores: Vec<usize>,
    /// A virtual environment to activate first.
    pub venv: Option<PathBuf>,
    /// The cluster secret, given in the environment ([`SECRET_ENV`]) and never on the
    /// command line (built-in workers).
    pub kv_secret: Option<ClusterSecret>,
    /// Base URL whose `/health` says it is ready.
    pub url: String,
    /// `ssh` options for an [`Host::Ssh`] launch (`[ssh]`, the worker's own, and
    /// `ConnectTimeout`); empty for local ones.
    pub ssh_options: Vec<String>,
    /// Stopped after every other process has exited (etcd, which the workers
    /// deregister from on their way out).
    pub stop_last: bool,
    /// Started only once these processes (earlier in the plan) are healthy: the
    /// workers before it on one of its GPUs. vLLM sizes its KV cache from the memory it
    /// sees in use while it profiles, so a neighbour loading at the same time on the
    /// same GPU would be counted against it (or make it refuse to start).
    pub start_after: Vec<String>,
}

impl Launch {
    /// A process run here as it is: no pinning, venv, secret, extra environment or ssh.
    fn local(name: String, program: String, args: Vec<String>, url: String) -> Self {
        Self {
            name,
            host: Host::Local,
            program,
            args,
            env: Vec::new(),
            cores: Vec::new(),
            venv: None,
            kv_secret: None,
            url,
            ssh_options: Vec::new(),
            stop_last: false,
            start_after: Vec::new(),
        }
    }
}

/// The processes of a topology, workers first, the router last; built-in workers get
/// `secret`.
pub fn plan(topology: &Checked, tandem: &Path, secret: &ClusterSecret) -> Vec<Launch> {
    let tandem = tandem.display().to_string();
    let discovery = topology.discovery.as_ref();
    let mut launches: Vec<Launch> = discovery
        .filter(|d| d.starts_etcd())
        .map(etcd)
        .into_iter()
        .collect();
    let started = topology.workers.iter().enumerate();
    for (index, worker) in started.filter(|(_, w)| !w.spec.standby) {
        let mut launch = worker_launch(topology, worker, &tandem, secret);
        launch.start_after = earlier_on_its_gpus(topology, index);
        if let Some(discovery) = discovery {
            match worker.spec.engine {
                Engine::Builtin => launch.args.extend(registration_args(worker, discovery)),
                Engine::Vllm => {
                    // Healthy when its worker is, so it waits for what its worker waits for.
                    let mut sidecar = register_sidecar(worker, discovery, &tandem);
                    sidecar.start_after = launch.start_after.clone();
                    launches.push(sidecar);
                }
            }
        }
        launches.push(launch);
    }
    launches.push(router(topology, &tandem));
    launches
}

/// How one worker is started, as [`plan`] starts it (without discovery's additions).
fn worker_launch(
    topology: &Checked,
    worker: &NamedWorker,
    tandem: &str,
    secret: &ClusterSecret,
) -> Launch {
    let mut launch = match worker.spec.engine {
        Engine::Builtin => builtin(worker, tandem, secret),
        Engine::Vllm => vllm(worker),
    };
    if pulls_kv_within_its_host(topology, worker)
        && !worker.spec.env.contains_key(UCX_GET_ZCOPY_ENV)
    {
        // NIXL pulls the KV with an RMA get. UCX leaves cuda_ipc's get off on GPUs
        // without active NVLinks (one GPU, PCIe boxes) and then emulates the get over
        // TCP loopback: 0.5 GB/s instead of 38-43 GB/s on one H200 (docs/benchmarks.md).
        // On NVLink systems UCX turns it on by itself. A topology's `env` overrides it.
        launch.env.push((UCX_GET_ZCOPY_ENV.into(), "y".into()));
    }
    launch.ssh_options = ssh_options(topology, worker);
    launch
}

/// Whether `worker` is a vLLM P/D worker with a NIXL peer of the other role on its own
/// host, so that KV can move between GPUs of one machine (CUDA IPC).
fn pulls_kv_within_its_host(topology: &Checked, worker: &NamedWorker) -> bool {
    let nixl = |w: &NamedWorker| {
        w.spec.engine == Engine::Vllm && w.spec.role != Role::Both && w.spec.kv_port.is_some()
    };
    let same_host = |w: &NamedWorker| {
        (w.spec.is_local() && worker.spec.is_local()) || w.spec.host == worker.spec.host
    };
    nixl(worker)
        && topology.workers.iter().any(|w| {
            w.name != worker.name && nixl(w) && w.spec.role != worker.spec.role && same_host(w)
        })
}

/// A worker the online planner may have started or stopped: how to start it, and how
/// the router adds it.
#[derive(Debug, Clone)]
pub struct Slot {
    pub launch: Launch,
    /// Its base URL, as the router knows it.
    pub url: String,
    /// Its KV event streams (`tcp://…`), if it publishes them.
    pub kv_events: Option<String>,
    pub kv_replay: Option<String>,
    /// Started with the others (not on standby).
    pub started: bool,
}

/// Every P/D worker of a topology with standby workers, as the planner's slots
/// (static membership: [`check_standby`](crate::topology) refuses discovery).
pub fn slots(topology: &Checked, tandem: &Path, secret: &ClusterSecret) -> Vec<Slot> {
    let tandem = tandem.display().to_string();
    topology
        .workers
        .iter()
        .filter(|w| w.spec.role != Role::Both)
        .map(|worker| {
            let (kv_events, kv_replay) = kv_event_endpoints(&worker.spec);
            Slot {
                launch: worker_launch(topology, worker, &tandem, secret),
                url: worker.spec.url(),
                kv_events,
                kv_replay,
                started: !worker.spec.standby,
            }
        })
        .collect()
}

/// A worker's KV event stream and replay endpoints, as the router connects to them.
fn kv_event_endpoints(spec: &WorkerSpec) -> (Option<String>, Option<String>) {
    let address = spec.reach_address();
    let endpoint = |port: Option<u16>| port.map(|port| format!("tcp://{address}:{port}"));
    match spec.kv_events_port {
        Some(_) => (endpoint(spec.kv_events_port), endpoint(spec.kv_replay_port)),
        None => (None, None),
    }
}

/// The names of the started (not standby) workers before worker `index` in the file
/// that share one of its GPUs on its machine.
fn earlier_on_its_gpus(topology: &Checked, index: usize) -> Vec<String> {
    let mut earlier: Vec<usize> = topology.workers[index]
        .spec
        .gpu_ids()
        .into_iter()
        .flat_map(|gpu| topology.gpu_neighbours(index, gpu))
        .filter(|&other| other < index && !topology.workers[other].spec.standby)
        .collect();
    earlier.sort_unstable();
    earlier.dedup();
    earlier
        .into_iter()
        .map(|other| topology.workers[other].name.clone())
        .collect()
}

/// The etcd `tandem up` starts for `[discovery]` without `etcd`: loopback only, a
/// fresh data folder per run (so no worker of an earlier run lingers).
fn etcd(discovery: &DiscoverySpec) -> Launch {
    let client = format!("http://127.0.0.1:{}", discovery.etcd_port);
    let peer = format!("http://127.0.0.1:{}", discovery.etcd_port.wrapping_add(1));
    let data = std::env::temp_dir().join(format!(
        "tandem-etcd-{}-{}",
        discovery.etcd_port,
        std::process::id()
    ));
    let args = vec![
        "--name".into(),
        "tandem".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--listen-client-urls".into(),
        client.clone(),
        "--advertise-client-urls".into(),
        client.clone(),
        "--listen-peer-urls".into(),
        peer.clone(),
        "--initial-advertise-peer-urls".into(),
        peer.clone(),
        "--initial-cluster".into(),
        format!("tandem={peer}"),
    ];
    Launch {
        stop_last: true,
        ..Launch::local("etcd".into(), "etcd".into(), args, client)
    }
}

/// The flags `tandem serve` and `tandem register` share to register a worker.
fn discovery_flags(worker: &NamedWorker, discovery: &DiscoverySpec) -> Vec<String> {
    vec![
        "--discovery".into(),
        discovery.address(),
        "--discovery-namespace".into(),
        discovery.namespace.clone(),
        "--discovery-ttl-secs".into(),
        discovery.ttl_secs.to_string(),
        "--role".into(),
        role_name(worker.spec.role).into(),
    ]
}

/// `tandem serve`'s flags to register itself, at the address the router reaches.
fn registration_args(worker: &NamedWorker, discovery: &DiscoverySpec) -> Vec<String> {
    let mut args = discovery_flags(worker, discovery);
    args.extend(["--advertise-host".into(), worker.spec.reach_address()]);
    args
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Prefill => "prefill",
        Role::Decode => "decode",
        Role::Both => "both",
    }
}

/// `tandem register` for a vLLM worker, run here: it keeps the worker registered while
/// its `/health` answers.
fn register_sidecar(worker: &NamedWorker, discovery: &DiscoverySpec, tandem: &str) -> Launch {
    let spec = &worker.spec;
    let mut args = vec!["register".to_owned(), "--url".into(), spec.url()];
    args.extend(discovery_flags(worker, discovery));
    if let Some(port) = spec.kv_events_port {
        let host = spec.reach_address();
        args.extend(["--kv-events".into(), format!("tcp://{host}:{port}")]);
        if let Some(replay) = spec.kv_replay_port {
            args.extend(["--kv-replay".into(), format!("tcp://{host}:{replay}")]);
        }
    }
    // Ready once its worker is.
    let name = format!("register-{}", worker.name);
    Launch::local(name, tandem.to_owned(), args, spec.url())
}

fn host_of(worker: &NamedWorker) -> Host {
    if worker.spec.is_local() {
        Host::Local
    } else {
        Host::Ssh(worker.spec.host.clone())
    }
}

/// The ssh options of a remote worker: the topology's, the worker's, then the
/// connect timeout (ssh keeps the first value of an option).
pub fn ssh_options(topology: &Checked, worker: &NamedWorker) -> Vec<String> {
    if worker.spec.is_local() {
        return Vec::new();
    }
    let mut options = topology.ssh.options.clone();
    options.extend(worker.spec.ssh_options.iter().cloned());
    options.extend([
        "-o".to_owned(),
        format!("ConnectTimeout={}", topology.ssh.connect_timeout),
    ]);
    options
}

/// Remote workers listen on every interface; local ones on loopback.
fn bind_address(worker: &NamedWorker) -> &'static str {
    if worker.spec.is_local() {
        "127.0.0.1"
    } else {
        "0.0.0.0"
    }
}

fn builtin(worker: &NamedWorker, tandem: &str, secret: &ClusterSecret) -> Launch {
    let spec = &worker.spec;
    let mut args = vec![
        "serve".to_owned(),
        "--host".into(),
        bind_address(worker).into(),
        "--port".into(),
        spec.port.to_string(),
    ];
    if let Some(model) = &spec.model {
        args.extend(["--model".into(), model.clone()]);
    }
    if let Some(kv_port) = spec.kv_port {
        args.extend(["--kv-port".into(), kv_port.to_string()]);
        args.extend(["--kv-host".into(), spec.reach_address()]);
    }
    if !spec.cores.is_empty() {
        args.extend(["--threads".into(), spec.cores.len().to_string()]);
    }
    args.extend(kv_events_args(spec));
    if let Some(memory) = &spec.kv_cache_memory {
        args.extend(["--kv-cache-memory".into(), memory.clone()]);
    }
    if let Some(gpu) = spec.gpus.first() {
        args.extend(["--device".into(), format!("cuda:{gpu}")]);
    }
    if let Some(u) = spec.gpu_memory_utilization {
        args.extend(["--gpu-memory-utilization".into(), u.to_string()]);
    }
    args.extend(spec.extra_args.iter().cloned());
    let program = match &spec.tandem {
        Some(path) => path.display().to_string(),
        None => tandem.to_owned(),
    };
    Launch {
        name: worker.name.clone(),
        host: host_of(worker),
        program,
        args,
        env: spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        cores: spec.cores.clone(),
        venv: None,
        kv_secret: Some(secret.clone()),
        url: spec.url(),
        ssh_options: Vec::new(),
        stop_last: false,
        start_after: Vec::new(),
    }
}

/// The topic of the KV events `tandem up` configures.
const KV_EVENTS_TOPIC: &str = "kv";

/// `--kv-events-config` (vLLM's flag, which built-in workers share) when the worker
/// has a KV-event port. vLLM's rule binds an endpoint with `*` and connects any other,
/// so the sockets listen on every interface.
fn kv_events_args(spec: &WorkerSpec) -> Vec<String> {
    let Some(port) = spec.kv_events_port else {
        return Vec::new();
    };
    let mut config = serde_json::json!({
        "enable_kv_cache_events": true,
        "publisher": "zmq",
        "endpoint": format!("tcp://*:{port}"),
        "topic": KV_EVENTS_TOPIC,
    });
    if let Some(replay) = spec.kv_replay_port {
        config["replay_endpoint"] = format!("tcp://*:{replay}").into();
    }
    vec!["--kv-events-config".into(), config.to_string()]
}

/// The router's `--kv-events`/`--kv-replay` for the workers that publish events.
fn router_kv_events_args(topology: &Checked) -> Vec<String> {
    let mut args = Vec::new();
    for worker in topology.started_workers() {
        let spec = &worker.spec;
        let (Some(events), replay) = kv_event_endpoints(spec) else {
            continue;
        };
        let url = spec.url();
        args.extend(["--kv-events".into(), format!("{url}={events}")]);
        if let Some(replay) = replay {
            args.extend(["--kv-replay".into(), format!("{url}={replay}")]);
        }
    }
    if !args.is_empty() {
        args.extend(["--kv-events-topic".into(), KV_EVENTS_TOPIC.into()]);
    }
    args
}

/// UCX's switch for GPU-to-GPU reads over CUDA IPC, which NIXL's KV pull needs.
const UCX_GET_ZCOPY_ENV: &str = "UCX_CUDA_IPC_ENABLE_GET_ZCOPY";

fn vllm(worker: &NamedWorker) -> Launch {
    let spec = &worker.spec;
    let model = spec.model.clone().unwrap_or_default();
    let mut command = spec.vllm_command().into_iter();
    let program = command.next().unwrap_or_else(|| "vllm".into());
    let mut args: Vec<String> = command.collect();
    args.extend([
        model,
        "--host".into(),
        bind_address(worker).into(),
        "--port".into(),
        spec.port.to_string(),
        "--gpu-memory-utilization".into(),
        spec.gpu_share().to_string(),
        "--tensor-parallel-size".into(),
        spec.tensor_parallel_size.unwrap_or(1).to_string(),
    ]);
    let mut env: Vec<(String, String)> = vec![("HF_HUB_OFFLINE".into(), "1".into())];
    if spec.role != Role::Both
        && let Some(kv_port) = spec.kv_port
    {
        let address = spec.reach_address();
        let config = serde_json::json!({
            "kv_connector": "NixlConnector",
            "kv_role": "kv_both",
            "kv_ip": address,
            "kv_port": kv_port,
        });
        args.extend(["--kv-transfer-config".into(), config.to_string()]);
        env.push(("VLLM_NIXL_SIDE_CHANNEL_HOST".into(), address));
        env.push(("VLLM_NIXL_SIDE_CHANNEL_PORT".into(), kv_port.to_string()));
    }
    args.extend(kv_events_args(spec));
    if let Some(cuda_home) = &spec.cuda_home {
        env.push(("CUDA_HOME".into(), cuda_home.display().to_string()));
    }
    if !spec.gpus.is_empty() {
        let ids: Vec<String> = spec.gpus.iter().map(usize::to_string).collect();
        env.push(("CUDA_VISIBLE_DEVICES".into(), ids.join(",")));
    }
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    args.extend(spec.extra_args.iter().cloned());
    Launch {
        name: worker.name.clone(),
        host: host_of(worker),
        program,
        args,
        env,
        cores: Vec::new(),
        venv: spec.venv.clone(),
        kv_secret: None,
        url: spec.url(),
        ssh_options: Vec::new(),
        stop_last: false,
        start_after: Vec::new(),
    }
}

fn router(topology: &Checked, tandem: &str) -> Launch {
    let spec = &topology.router;
    let mut args = vec![
        "route".to_owned(),
        "--host".into(),
        spec.host.clone(),
        "--port".into(),
        spec.port.to_string(),
    ];
    match &topology.discovery {
        Some(discovery) => {
            args.extend(["--discovery".into(), discovery.address()]);
            args.extend(["--discovery-namespace".into(), discovery.namespace.clone()]);
            if topology.workers.iter().any(|w| w.spec.role != Role::Both) {
                args.push("--discovery-disaggregated".into());
            }
        }
        None => {
            for worker in topology.started_workers() {
                let flag = match worker.spec.role {
                    Role::Prefill => "--prefill",
                    Role::Decode => "--decode",
                    Role::Both => "--worker",
                };
                args.extend([flag.into(), worker.spec.url()]);
            }
        }
    }
    let policies = [
        ("--policy", &spec.policy),
        ("--prefill-policy", &spec.prefill_policy),
        ("--decode-policy", &spec.decode_policy),
    ];
    for (flag, value) in policies {
        if let Some(value) = value {
            args.extend([flag.into(), value.clone()]);
        }
    }
    if let Some(threshold) = spec.local_prefill_threshold {
        args.extend(["--local-prefill-threshold".into(), threshold.to_string()]);
    }
    if let Some(planner) = &spec.planner {
        args.extend(planner.router_args());
        if topology.has_standby() {
            let slots = topology.workers.len().to_string();
            args.extend(["--planner-max-workers".into(), slots]);
        }
    }
    if topology.discovery.is_none() {
        // With discovery the workers announce their streams themselves.
        args.extend(router_kv_events_args(topology));
    }
    args.extend(spec.extra_args.iter().cloned());
    let reach = if matches!(spec.host.as_str(), "0.0.0.0" | "::") {
        "127.0.0.1"
    } else {
        &spec.host
    };
    let url = format!("http://{reach}:{}", spec.port);
    Launch::local("router".into(), tandem.to_owned(), args, url)
}

/// `text` quoted for a POSIX shell when it needs it.
pub fn shell_quote(text: &str) -> String {
    let safe = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c));
    if safe {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

impl Launch {
    /// The command as one shell line: environment, venv activation, program, arguments
    /// (what runs on the worker's host).
    pub fn shell_line(&self) -> String {
        let mut parts = Vec::new();
        if let Some(venv) = &self.venv {
            parts.push(format!(
                ". {} &&",
                shell_quote(&venv.join("bin/activate").display().to_string())
            ));
        }
        for (key, value) in &self.env {
            parts.push(format!("{key}={}", shell_quote(value)));
        }
        if self.kv_secret.is_some() {
            // Whoever runs the line by hand supplies the secret from their environment.
            parts.push(format!("{SECRET_ENV}=\"${SECRET_ENV}\""));
        }
        parts.push(shell_quote(&self.program));
        parts.extend(self.args.iter().map(|a| shell_quote(a)));
        parts.join(" ")
    }

    /// The command as a shell runs it to start it: the venv activated, then `exec` into
    /// the program, so that the shell's pid becomes the program's (pinned with
    /// `taskset -c` when `taskset` and it has cores; local processes are pinned before
    /// they exec instead). The secret is not in it: the program inherits it from the
    /// shell's environment.
    pub fn exec_line(&self, taskset: bool) -> String {
        let mut parts = Vec::new();
        if let Some(venv) = &self.venv {
            let activate = venv.join("bin/activate").display().to_string();
            parts.push(format!(". {} &&", shell_quote(&activate)));
        }
        parts.push("exec".into());
        if taskset && !self.cores.is_empty() {
            let cores: Vec<String> = self.cores.iter().map(usize::to_string).collect();
            parts.push(format!("taskset -c {}", cores.join(",")));
        }
        if !self.env.is_empty() {
            parts.push("env".into());
            for (key, value) in &self.env {
                parts.push(shell_quote(&format!("{key}={value}")));
            }
        }
        parts.push(shell_quote(&self.program));
        parts.extend(self.args.iter().map(|a| shell_quote(a)));
        parts.join(" ")
    }

    /// What `--dry-run` prints for this process.
    pub fn describe(&self) -> String {
        let line = self.shell_line();
        let mut notes = match &self.host {
            Host::Local if self.cores.is_empty() => vec!["local".to_owned()],
            Host::Local => {
                let cores: Vec<String> = self.cores.iter().map(usize::to_string).collect();
                vec![format!("local, pinned to cores {}", cores.join(","))]
            }
            Host::Ssh(target) => vec![format!("on {target}: run there")],
        };
        if !self.start_after.is_empty() {
            notes.push(format!(
                "once {} is healthy: they share a GPU",
                self.start_after.join(", ")
            ));
        }
        format!("# {} ({})\n{line}", self.name, notes.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_builtin_workers_get_their_tandem_and_ssh_options() {
        let text = r#"
[ssh]
options = ["-p", "2222"]

[[worker]]
engine = "builtin"
role = "both"
host = "me@gpu-1"
port = 8100
model = "/m.gguf"
tandem = "/opt/tandem"
ssh_options = ["-i", "/k"]

[[worker]]
engine = "builtin"
role = "both"
port = 8200
model = "/m.gguf"
"#;
        let topology = crate::topology::parse(text, "t").unwrap();
        let launches = plan(&topology, Path::new("/here/tandem"), &test_secret());
        let remote = &launches[0];
        assert_eq!(remote.host, Host::Ssh("me@gpu-1".into()));
        assert_eq!(remote.program, "/opt/tandem");
        assert_eq!(
            remote.ssh_options,
            ["-p", "2222", "-i", "/k", "-o", "ConnectTimeout=10"]
        );
        assert!(remote.args.windows(2).any(|w| w == ["--host", "0.0.0.0"]));
        assert_eq!(remote.url, "http://gpu-1:8100");
        let local = &launches[1];
        assert_eq!(local.program, "/here/tandem");
        assert!(local.ssh_options.is_empty());
    }

    #[test]
    fn discovery_starts_etcd_registers_workers_and_lets_the_router_follow() {
        let text = r#"
[discovery]
etcd_port = 23790
namespace = "lab"

[[worker]]
engine = "builtin"
role = "prefill"
port = 8100
kv_port = 8101

[[worker]]
engine = "vllm"
role = "decode"
port = 8200
kv_events_port = 8201
kv_port = 8202
model = "m"
"#;
        let topology = crate::topology::parse(text, "t").unwrap();
        let launches = plan(&topology, Path::new("/here/tandem"), &test_secret());
        let names: Vec<&str> = launches.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "etcd",
                "prefill-0",
                "register-decode-0",
                "decode-0",
                "router"
            ]
        );
        assert_eq!(launches[0].program, "etcd");
        assert_eq!(launches[0].url, "http://127.0.0.1:23790");
        let joined = |l: &Launch| l.args.join(" ");
        let serve = joined(&launches[1]);
        assert!(
            serve.contains(
                "--discovery etcd://127.0.0.1:23790 --discovery-namespace lab \
                 --discovery-ttl-secs 10 --role prefill --advertise-host 127.0.0.1"
            ),
            "{serve}"
        );
        let sidecar = joined(&launches[2]);
        assert!(sidecar.starts_with("register --url http://127.0.0.1:8200 --discovery"));
        assert!(
            sidecar.contains("--role decode --kv-events tcp://127.0.0.1:8201"),
            "{sidecar}"
        );
        let router = joined(&launches[4]);
        assert!(router.contains("--discovery etcd://127.0.0.1:23790 --discovery-namespace lab"));
        assert!(router.contains("--discovery-disaggregated"), "{router}");
        assert!(
            !router.contains("--prefill") && !router.contains("--kv-events"),
            "{router}"
        );

        let given = text.replace("etcd_port = 23790", "etcd = \"etcd://10.0.0.9:2379\"");
        let launches = plan(
            &crate::topology::parse(&given, "t").unwrap(),
            Path::new("/here/tandem"),
            &test_secret(),
        );
        assert_ne!(launches[0].name, "etcd", "an etcd given is not started");
        let clash = text.replace("port = 8100", "port = 23791");
        let err = crate::topology::parse(&clash, "t").unwrap_err().to_string();
        assert!(err.contains("etcd_port + 1"), "{err}");
    }

    #[test]
    fn builtin_workers_on_a_gpu_get_their_device_and_memory_share() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../topologies/gpu/disaggregated.toml"
        ))
        .unwrap();
        let topology = crate::topology::parse(&text, "disaggregated.toml").unwrap();
        let launches = plan(&topology, Path::new("/here/tandem"), &test_secret());
        let args: Vec<String> = launches
            .iter()
            .filter(|l| l.args.first().is_some_and(|a| a == "serve"))
            .map(|l| l.args.join(" "))
            .collect();
        assert_eq!(args.len(), 2);
        for (arg, gpu) in args.iter().zip(["cuda:0", "cuda:1"]) {
            assert!(arg.contains(&format!("--device {gpu}")), "{arg}");
            assert!(arg.contains("--gpu-memory-utilization 0.9"), "{arg}");
            assert!(arg.contains("--load-format dummy"), "{arg}");
        }
        let two = text.replacen("gpus = [0]", "gpus = [0, 1]", 1);
        let err = crate::topology::parse(&two, "t").unwrap_err().to_string();
        assert!(err.contains("`gpus`") && err.contains("one"), "{err}");
        let no_gpu = text.replacen("gpus = [0]\n", "", 1);
        let err = crate::topology::parse(&no_gpu, "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`gpu_memory_utilization`"), "{err}");
    }

    #[test]
    fn kv_event_ports_configure_the_workers_and_the_router() {
        let text = r#"
[router]
policy = "kv_aware"

[[worker]]
engine = "builtin"
role = "both"
port = 8100
kv_events_port = 5700
kv_replay_port = 5701

[[worker]]
engine = "vllm"
role = "both"
port = 8200
kv_events_port = 5702
model = "/m"

[[worker]]
engine = "builtin"
role = "both"
port = 8300
"#;
        let topology = crate::topology::parse(text, "t").unwrap();
        let launches = plan(&topology, Path::new("/here/tandem"), &test_secret());
        let config_of = |launch: &Launch| -> Option<serde_json::Value> {
            let at = launch.args.iter().position(|a| a == "--kv-events-config")?;
            Some(serde_json::from_str(&launch.args[at + 1]).unwrap())
        };
        let builtin = config_of(&launches[0]).unwrap();
        assert_eq!(builtin["endpoint"], "tcp://*:5700");
        assert_eq!(builtin["replay_endpoint"], "tcp://*:5701");
        assert_eq!(builtin["enable_kv_cache_events"], true);
        let vllm = config_of(&launches[1]).unwrap();
        assert_eq!(vllm["endpoint"], "tcp://*:5702");
        assert!(vllm.get("replay_endpoint").is_none());
        assert!(config_of(&launches[2]).is_none());
        let router = launches.last().unwrap().args.join(" ");
        assert!(
            router.contains(
                "--kv-events http://127.0.0.1:8100=tcp://127.0.0.1:5700 \
             --kv-replay http://127.0.0.1:8100=tcp://127.0.0.1:5701 \
             --kv-events http://127.0.0.1:8200=tcp://127.0.0.1:5702 --kv-events-topic kv"
            ),
            "{router}"
        );
        let clash = text.replace("kv_replay_port = 5701", "kv_replay_port = 8100");
        let err = crate::topology::parse(&clash, "t").unwrap_err().to_string();
        assert!(err.contains("`kv_replay_port`"), "{err}");
    }

    #[test]
    fn a_planner_table_becomes_router_flags_and_needs_movable_pd_workers() {
        let text = r#"
[router.planner]
ttft = 1.5
tpot = 0.05
cooldown_secs = 20

[[worker]]
engine = "builtin"
role = "prefill"
port = 8100
kv_port = 8101

[[worker]]
engine = "builtin"
role = "decode"
port = 8200
kv_port = 8201
"#;
        let topology = crate::topology::parse(text, "t").unwrap();
        let launches = plan(&topology, Path::new("/here/tandem"), &test_secret());
        let router = launches.last().unwrap().args.join(" ");
        assert!(
            router.contains(
                "--planner --planner-ttft 1.5 --planner-tpot 0.05 --planner-cooldown-secs 20"
            ),
            "{router}"
        );
        let fixed = text.replace("kv_port = 8201\n", "");
        let err = crate::topology::parse(&fixed, "t").unwrap_err().to_string();
        assert!(
            err.contains("`kv_port` is required with [router.planner]"),
            "{err}"
        );
        let replicated = text
            .replace("\"prefill\"", "\"both\"")
            .replace("\"decode\"", "\"both\"");
        let err = crate::topology::parse(&replicated, "t")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[router.planner]: the planner moves workers"),
            "{err}"
        );
        let typo = text.replace("cooldown_secs", "cooldown");
        let err = crate::topology::parse(&typo, "t").unwrap_err().to_string();
        assert!(err.contains("cooldown"), "{err}");
    }

    #[test]
    fn standby_workers_are_slots_the_router_does_not_start_with() {
        let text = r#"
[router.planner]
tpot = 0.05

[[worker]]
engine = "builtin"
role = "prefill"
port = 8100
kv_port = 8101

[[worker]]
engine = "builtin"
role = "decode"
port = 8200
kv_port = 8201
kv_events_port = 8202

[[worker]]
engine = "builtin"
role = "decode"
port = 8300
kv_port = 8301
kv_events_port = 8302
standby = true
"#;
        let topology = crate::topology::parse(text, "t").unwrap();
        let secret = test_secret();
        let launches = plan(&topology, Path::new("/here/tandem"), &secret);
        let names: Vec<_> = launches.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["prefill-0", "decode-0", "router"]);
        let router = launches.last().unwrap().args.join(" ");
        assert!(router.contains("--planner-max-workers 3"), "{router}");
        assert!(!router.contains(":8300"), "standby is not listed: {router}");
        assert!(!router.contains(":8302"), "nor followed: {router}");
        let slots = slots(&topology, Path::new("/here/tandem"), &secret);
        let started: Vec<_> = slots.iter().map(|s| (s.url.as_str(), s.started)).collect();
        assert_eq!(
            started,
            [
                ("http://127.0.0.1:8100", true),
                ("http://127.0.0.1:8200", true),
                ("http://127.0.0.1:8300", false)
            ]
        );
        assert_eq!(slots[2].kv_events.as_deref(), Some("tcp://127.0.0.1:8302"));
        assert_eq!(slots[2].launch.name, "decode-1");
        assert!(slots[2].launch.args.join(" ").contains("--port 8300"));

        let without_planner = text.replace(
            "[router.planner]
tpot = 0.05
",
            "",
        );
        let err = crate::topology::parse(&without_planner, "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`standby` needs [router.planner]"), "{err}");
        let empty_pool = text.replacen(
            "role = \"decode\"\nport = 8200\nkv_port = 8201\nkv_events_port = 8202\n",
            "role = \"decode\"\nport = 8200\nkv_port = 8201\nkv_events_port = 8202\nstandby = true\n",
            1,
        );
        let err = crate::topology::parse(&empty_pool, "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("the decode pool would start empty"), "{err}");
    }

    fn test_secret() -> ClusterSecret {
        ClusterSecret::generate().unwrap()
    }

    #[test]
    fn only_builtin_workers_get_the_secret_and_no_line_shows_it() {
        let text = r#"
[[worker]]
engine = "builtin"
role = "prefill"
port = 8100
kv_port = 5600
model = "/m.gguf"

[[worker]]
engine = "vllm"
role = "decode"
port = 8200
kv_port = 5601
model = "/m"
"#;
        let topology = crate::topology::parse(text, "t").unwrap();
        let secret = test_secret();
        let launches = plan(&topology, Path::new("/here/tandem"), &secret);
        assert_eq!(launches[0].kv_secret.as_ref(), Some(&secret));
        assert!(launches[1].kv_secret.is_none(), "vLLM does not read it");
        assert!(
            launches[2].kv_secret.is_none(),
            "the router does not need it"
        );
        for launch in &launches {
            for shown in [
                launch.shell_line(),
                launch.exec_line(true),
                launch.describe(),
                format!("{launch:?}"),
            ] {
                assert!(!shown.contains(secret.expose()), "{shown}");
            }
        }
        assert!(
            launches[0]
                .shell_line()
                .contains(r#"TANDEM_KV_SECRET="$TANDEM_KV_SECRET""#)
        );
    }

    #[test]
    fn vllm_on_one_gpu_runs_from_its_command_with_nixl_and_starts_in_turn() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../topologies/gpu-vllm-1p1d.toml"
        ))
        .unwrap();
        let topology = crate::topology::parse(&text, "gpu-vllm-1p1d.toml").unwrap();
        let launches = plan(&topology, Path::new("/here/tandem"), &test_secret());
        let names: Vec<&str> = launches.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["prefill-0", "decode-0", "router"]);
        for (launch, side_channel) in launches.iter().zip(["5600", "5601"]) {
            assert_eq!(launch.host, Host::Local);
            assert_eq!(launch.program, "python3");
            let args = launch.args.join(" ");
            assert!(
                args.starts_with(
                    "-m vllm.entrypoints.cli.main serve /tmp/llama31-8b-dummy --host 127.0.0.1 \
                     --port 8"
                ),
                "{args}"
            );
            assert!(
                args.contains("--gpu-memory-utilization 0.3 --tensor-parallel-size 1"),
                "{args}"
            );
            assert!(
                args.ends_with(
                    "--load-format dummy --served-model-name llama --max-model-len 4096"
                ),
                "{args}"
            );
            let at = launch
                .args
                .iter()
                .position(|a| a == "--kv-transfer-config")
                .unwrap();
            let config: serde_json::Value = serde_json::from_str(&launch.args[at + 1]).unwrap();
            assert_eq!(config["kv_connector"], "NixlConnector");
            assert_eq!(config["kv_role"], "kv_both");
            let env = |key: &str| {
                launch
                    .env
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.as_str())
            };
            assert_eq!(env("PYTHONPATH"), Some("/tmp/site"));
            assert_eq!(env("CUDA_VISIBLE_DEVICES"), Some("0"));
            assert_eq!(env("VLLM_NIXL_SIDE_CHANNEL_PORT"), Some(side_channel));
            assert_eq!(env("VLLM_NIXL_SIDE_CHANNEL_HOST"), Some("127.0.0.1"));
            assert_eq!(env("VLLM_USE_FLASHINFER_SAMPLER"), Some("0"));
            assert_eq!(env("UCX_CUDA_IPC_ENABLE_GET_ZCOPY"), Some("y"));
            assert!(launch.kv_secret.is_none() && launch.venv.is_none());
        }
        // They share GPU 0: the decode instance starts once the prefill one is healthy.
        assert!(launches[0].start_after.is_empty());
        assert_eq!(launches[1].start_after, ["prefill-0"]);
        assert!(launches[2].start_after.is_empty());
        let shown = launches[1].describe();
        assert!(
            shown.starts_with("# decode-0 (local; once prefill-0 is healthy: they share a GPU)"),
            "{shown}"
        );
        assert!(
            shown.contains(" python3 -m vllm.entrypoints.cli.main serve "),
            "{shown}"
        );
        let router = launches[2].args.join(" ");
        assert!(
            router.contains("--prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200"),
            "{router}"
        );

        // Without `command`: `vllm serve`; on two GPUs: no waiting.
        let plain = text
            .replace(
                "command = [\"python3\", \"-m\", \"vllm.entrypoints.cli.main\", \"serve\"]\n",
                "",
            )
            .replacen("gpus = [0]", "gpus = [1]", 1);
        let launches = plan(
            &crate::topology::parse(&plain, "t").unwrap(),
            Path::new("/here/tandem"),
            &test_secret(),
        );
        assert_eq!(launches[0].program, "vllm");
        assert_eq!(launches[0].args[..2], ["serve", "/tmp/llama31-8b-dummy"]);
        assert!(launches[1].start_after.is_empty());
        assert!(!launches[1].describe().contains("once"));
    }

    #[test]
    fn nixl_on_one_machine_gets_cuda_ipc_reads_unless_the_topology_says_otherwise() {
        let text = r#"
[[worker]]
engine = "vllm"
role = "prefill"
port = 8100
kv_port = 5600
model = "/m"
env = { UCX_CUDA_IPC_ENABLE_GET_ZCOPY = "n" }

[[worker]]
engine = "vllm"
role = "decode"
port = 8200
kv_port = 5601
model = "/m"
"#;
        let values = |launch: &Launch| -> Vec<String> {
            let key = "UCX_CUDA_IPC_ENABLE_GET_ZCOPY";
            launch
                .env
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .collect()
        };
        let planned = |text: &str| {
            let topology = crate::topology::parse(text, "t").unwrap();
            plan(&topology, Path::new("/here/tandem"), &test_secret())
        };
        let launches = planned(text);
        assert_eq!(values(&launches[0]), ["n"], "the topology's value, once");
        assert_eq!(values(&launches[1]), ["y"]);
        let apart = text
            .replace(
                "env = { UCX_CUDA_IPC_ENABLE_GET_ZCOPY = \"n\" }\n",
                "host = \"gpu-a\"\n",
            )
            .replacen("port = 8200\n", "port = 8200\nhost = \"gpu-b\"\n", 1);
        let launches = planned(&apart);
        assert!(
            launches.iter().all(|l| values(l).is_empty()),
            "no CUDA IPC between two machines"
        );
        let single = planned(
            "[[worker]]\nengine = \"vllm\"\nrole = \"both\"\nport = 8300\nmodel = \"/m\"\n",
        );
        assert!(values(&single[0]).is_empty(), "no KV moves without NIXL");
    }

    #[test]
    fn a_register_sidecar_waits_with_its_worker() {
        let text = r#"
[discovery]
etcd_port = 23790

[[worker]]
engine = "vllm"
role = "prefill"
port = 8100
kv_port = 5600
model = "/m"
gpu_memory_utilization = 0.4

[[worker]]
engine = "vllm"
role = "decode"
port = 8200
kv_port = 5601
model = "/m"
gpu_memory_utilization = 0.4
"#;
        let topology = crate::topology::parse(text, "t").unwrap();
        let launches = plan(&topology, Path::new("/here/tandem"), &test_secret());
        let waits: Vec<(&str, &[String])> = launches
            .iter()
            .map(|l| (l.name.as_str(), l.start_after.as_slice()))
            .collect();
        let after = ["prefill-0".to_owned()];
        assert_eq!(
            waits,
            [
                ("etcd", &[][..]),
                ("register-prefill-0", &[][..]),
                ("prefill-0", &[][..]),
                ("register-decode-0", &after[..]),
                ("decode-0", &after[..]),
                ("router", &[][..]),
            ]
        );
        let waves = crate::stack::start_waves(&launches[..launches.len() - 1]);
        assert_eq!(waves, [0, 0, 0, 1, 1]);
    }

    #[test]
    fn quoting_leaves_plain_words_alone() {
        assert_eq!(shell_quote("--port"), "--port");
        assert_eq!(shell_quote(r#"{"a":1}"#), r#"'{"a":1}'"#);
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
