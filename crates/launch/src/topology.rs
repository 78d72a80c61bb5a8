//! Topology files: which workers run where (built-in engine or vLLM, prefill, decode or
//! both, local or over SSH), with what model, ports, cores or GPUs and memory, and how
//! the router in front of them is set up. Parsed from TOML and checked as a whole;
//! every error names the line and the field.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

/// A whole topology, as written in its file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub router: Option<Spanned<RouterSpec>>,
    pub ssh: Option<Spanned<SshSpec>>,
    pub discovery: Option<Spanned<DiscoverySpec>>,
    #[serde(rename = "worker")]
    pub workers: Vec<Spanned<WorkerSpec>>,
}

/// `[router]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterSpec {
    /// Address the router listens on.
    pub host: String,
    pub port: u16,
    /// Policy of both pools (or of the one pool in replicated mode).
    pub policy: Option<String>,
    pub prefill_policy: Option<String>,
    pub decode_policy: Option<String>,
    pub local_prefill_threshold: Option<usize>,
    /// `[router.planner]`: the online planner (P/D topologies; docs/planner.md).
    pub planner: Option<PlannerSpec>,
    /// Extra `tandem route` arguments.
    pub extra_args: Vec<String>,
}

/// `[router.planner]`: the router runs with `--planner`, and each field becomes its
/// `--planner-…` flag of the same name (`ttft` and `tpot` in seconds); an empty table
/// runs the planner on its defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannerSpec {
    pub ttft: Option<f64>,
    pub tpot: Option<f64>,
    pub percentile: Option<f64>,
    pub interval_ms: Option<u64>,
    pub window_secs: Option<u64>,
    pub min_samples: Option<usize>,
    pub confirm: Option<u32>,
    pub cooldown_secs: Option<u64>,
    pub headroom: Option<f64>,
    pub kv_headroom: Option<f64>,
    pub drain_limit_secs: Option<u64>,
    /// With standby workers (the slot budget): see `--planner-stop-below`.
    pub stop_below: Option<f64>,
    pub start_limit_secs: Option<u64>,
}

impl PlannerSpec {
    /// The `tandem route` flags it stands for.
    pub fn router_args(&self) -> Vec<String> {
        let fields: [(&str, Option<String>); 13] = [
            ("ttft", self.ttft.map(|v| v.to_string())),
            ("tpot", self.tpot.map(|v| v.to_string())),
            ("percentile", self.percentile.map(|v| v.to_string())),
            ("interval-ms", self.interval_ms.map(|v| v.to_string())),
            ("window-secs", self.window_secs.map(|v| v.to_string())),
            ("min-samples", self.min_samples.map(|v| v.to_string())),
            ("confirm", self.confirm.map(|v| v.to_string())),
            ("cooldown-secs", self.cooldown_secs.map(|v| v.to_string())),
            ("headroom", self.headroom.map(|v| v.to_string())),
            ("kv-headroom", self.kv_headroom.map(|v| v.to_string())),
            (
                "drain-limit-secs",
                self.drain_limit_secs.map(|v| v.to_string()),
            ),
            ("stop-below", self.stop_below.map(|v| v.to_string())),
            (
                "start-limit-secs",
                self.start_limit_secs.map(|v| v.to_string()),
            ),
        ];
        let set = fields
            .into_iter()
            .filter_map(|(name, value)| Some([format!("--planner-{name}"), value?]))
            .flatten();
        std::iter::once("--planner".to_owned()).chain(set).collect()
    }
}

impl Default for RouterSpec {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8192,
            policy: None,
            prefill_policy: None,
            decode_policy: None,
            local_prefill_threshold: None,
            planner: None,
            extra_args: Vec::new(),
        }
    }
}

/// `[ssh]`: how `tandem up` reaches remote hosts (always `BatchMode=yes`).
/// `[discovery]`: the workers register in etcd and the router follows them, instead
/// of a static list (docs/discovery.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoverySpec {
    /// `etcd://HOST:PORT[,…]` of an etcd to use; without it `tandem up` starts one on
    /// this machine (client port `etcd_port`, peer port `etcd_port + 1`, a fresh data
    /// folder per run).
    pub etcd: Option<String>,
    pub etcd_port: u16,
    pub namespace: String,
    /// The workers' lease TTL, seconds.
    pub ttl_secs: u64,
}

impl Default for DiscoverySpec {
    fn default() -> Self {
        Self {
            etcd: None,
            etcd_port: 2379,
            namespace: "default".into(),
            ttl_secs: 10,
        }
    }
}

impl DiscoverySpec {
    /// The etcd everything registers in and follows.
    pub fn address(&self) -> String {
        match &self.etcd {
            Some(etcd) => etcd.clone(),
            None => format!("etcd://127.0.0.1:{}", self.etcd_port),
        }
    }

    /// Whether `tandem up` starts the etcd.
    pub fn starts_etcd(&self) -> bool {
        self.etcd.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SshSpec {
    /// `ssh` options for every remote worker (`["-p", "2222", "-i", "~/.ssh/key"]`).
    pub options: Vec<String>,
    /// Seconds to connect (`ConnectTimeout`).
    pub connect_timeout: u64,
}

impl Default for SshSpec {
    fn default() -> Self {
        Self {
            options: Vec::new(),
            connect_timeout: 10,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    Builtin,
    Vllm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Prefill,
    Decode,
    Both,
}

/// One `[[worker]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSpec {
    /// Its name in logs (default: role and index).
    pub name: Option<String>,
    pub engine: Engine,
    pub role: Role,
    /// `local`, or an SSH target (`user@host` or `host`).
    #[serde(default = "local")]
    pub host: String,
    /// The address the router and other workers use to reach it (default: `host`'s
    /// host name, or 127.0.0.1 for local workers).
    pub address: Option<String>,
    pub port: u16,
    /// The KV hand-off port (built-in: `--kv-port`; vLLM: the NIXL side channel).
    pub kv_port: Option<u16>,
    /// The KV-event PUB port (`--kv-events-config`, built-in and vLLM alike): the
    /// worker announces what enters and leaves its prefix cache there, and the router
    /// follows it (`--kv-events`) for the `kv_aware` policy.
    pub kv_events_port: Option<u16>,
    /// The KV-event replay port (`replay_endpoint`), from which the router refetches
    /// the events it missed.
    pub kv_replay_port: Option<u16>,
    /// Built-in: a `.gguf` or Hugging Face folder (default: the default model).
    /// vLLM: the model name or path given to `vllm serve` (required).
    pub model: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Built-in: CPU cores to pin the worker to (its thread count).
    #[serde(default)]
    pub cores: Vec<usize>,
    /// vLLM: GPU ids (`CUDA_VISIBLE_DEVICES`). Built-in: the one GPU the worker runs on
    /// (`--device cuda:N`; a build with the `cuda` feature).
    #[serde(default)]
    pub gpus: Vec<usize>,
    /// Built-in: KV cache bytes (`512MiB`, `2GiB`, …).
    pub kv_cache_memory: Option<String>,
    /// `--gpu-memory-utilization` (vLLM, and built-in workers on a GPU).
    pub gpu_memory_utilization: Option<f64>,
    /// vLLM: `--tensor-parallel-size` (default 1).
    pub tensor_parallel_size: Option<usize>,
    /// vLLM: a virtual environment to activate first.
    pub venv: Option<PathBuf>,
    /// vLLM: the command that starts the server, to which the model and the flags are
    /// appended (default `["vllm", "serve"]`). For a vLLM installed on `PYTHONPATH`
    /// (set in `env`): `["python3", "-m", "vllm.entrypoints.cli.main", "serve"]`.
    #[serde(default)]
    pub command: Vec<String>,
    /// vLLM: the Python that `tandem doctor` imports vLLM and NIXL with, in the
    /// worker's `env` and `venv` (default: the command's program when it is a Python,
    /// else `python3`).
    pub python: Option<String>,
    /// vLLM: `CUDA_HOME`.
    pub cuda_home: Option<PathBuf>,
    /// Built-in: the `tandem` binary on the worker's host (default: the path of the
    /// one running `tandem up`).
    pub tandem: Option<PathBuf>,
    /// More `ssh` options for this worker's host (after `[ssh] options`).
    #[serde(default)]
    pub ssh_options: Vec<String>,
    /// Extra arguments for the worker's command.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Not started with the others: a slot the online planner may start a worker in
    /// (in either pool) when no move can meet the SLO, as it may stop any worker the
    /// load leaves idle. Needs `[router.planner]`.
    #[serde(default)]
    pub standby: bool,
}

fn local() -> String {
    "local".into()
}

impl WorkerSpec {
    /// `local`, `localhost` and `127.0.0.1` run here; anything else is an SSH target,
    /// `user@127.0.0.1` included (started over ssh like any remote host).
    pub fn is_local(&self) -> bool {
        matches!(self.host.as_str(), "local" | "localhost" | "127.0.0.1")
    }

    /// The host part of an SSH target (`user@host` → `host`).
    pub fn ssh_host(&self) -> &str {
        self.host.rsplit('@').next().unwrap_or(&self.host)
    }

    /// The address others reach this worker at.
    pub fn reach_address(&self) -> String {
        match (&self.address, self.is_local()) {
            (Some(address), _) => address.clone(),
            (None, true) => "127.0.0.1".into(),
            (None, false) => self.ssh_host().to_owned(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.reach_address(), self.port)
    }

    /// The GPUs it runs on: `gpus`, or for a vLLM worker without them the first
    /// `tensor_parallel_size` GPUs (what vLLM takes when `CUDA_VISIBLE_DEVICES` is
    /// unset); none for a built-in worker on the CPU.
    pub fn gpu_ids(&self) -> Vec<usize> {
        match (self.engine, self.gpus.is_empty()) {
            (_, false) => self.gpus.clone(),
            (Engine::Vllm, true) => (0..self.tensor_parallel_size.unwrap_or(1)).collect(),
            (Engine::Builtin, true) => Vec::new(),
        }
    }

    /// The fraction of each of its GPUs' memory it takes (`gpu_memory_utilization`,
    /// default 0.9 as in vLLM and `tandem serve`).
    pub fn gpu_share(&self) -> f64 {
        self.gpu_memory_utilization
            .unwrap_or(DEFAULT_GPU_MEMORY_UTILIZATION)
    }

    /// vLLM: the program and leading arguments that start the server.
    pub fn vllm_command(&self) -> Vec<String> {
        if self.command.is_empty() {
            vec!["vllm".into(), "serve".into()]
        } else {
            self.command.clone()
        }
    }

    /// vLLM: the Python `tandem doctor` checks imports with.
    pub fn vllm_python(&self) -> String {
        if let Some(python) = &self.python {
            return python.clone();
        }
        match self.command.first() {
            Some(program) if is_python(program) => program.clone(),
            _ => "python3".into(),
        }
    }
}

/// `--gpu-memory-utilization` when the topology gives none (vLLM's and `tandem serve`'s
/// default).
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;

/// Whether `program` names a Python interpreter (`python3`, `/opt/venv/bin/python3.12`).
fn is_python(program: &str) -> bool {
    let name = program.rsplit('/').next().unwrap_or(program);
    name.strip_prefix("python")
        .is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// A topology that cannot be used, with where.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}, line {line}: {message}")]
    Invalid {
        path: String,
        line: usize,
        message: String,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// A checked topology: workers in file order, each with its name.
#[derive(Debug, Clone)]
pub struct Checked {
    pub router: RouterSpec,
    pub ssh: SshSpec,
    pub discovery: Option<DiscoverySpec>,
    pub workers: Vec<NamedWorker>,
}

#[derive(Debug, Clone)]
pub struct NamedWorker {
    pub name: String,
    pub spec: WorkerSpec,
}

impl Checked {
    pub fn is_disaggregated(&self) -> bool {
        self.workers.iter().any(|w| w.spec.role != Role::Both)
    }

    /// Moves the router to `port` (`tandem up --port`), checked as the file's
    /// `[router] port` is.
    pub fn set_router_port(&mut self, port: u16) -> Result<(), TopologyError> {
        let refuse = |message: String| TopologyError::Parse {
            path: "--port".into(),
            message,
        };
        if port == 0 {
            return Err(refuse("must be a port number, not 0".into()));
        }
        self.router.port = port;
        check_names_and_ports(self).map_err(|(_, message)| refuse(message))
    }

    /// Whether the workers are on more than one machine (an SSH target on loopback is
    /// this machine).
    pub fn is_multi_host(&self) -> bool {
        let machines: std::collections::BTreeSet<&str> =
            self.workers.iter().map(|w| machine_of(&w.spec)).collect();
        machines.len() > 1
    }

    /// The workers on the same GPU of the same machine as worker `index`, itself
    /// included, in file order (empty for a worker on no GPU).
    pub fn gpu_neighbours(&self, index: usize, gpu: usize) -> Vec<usize> {
        let machine = machine_of(&self.workers[index].spec);
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, w)| machine_of(&w.spec) == machine && w.spec.gpu_ids().contains(&gpu))
            .map(|(i, _)| i)
            .collect()
    }
}

/// Reads and checks a topology file.
pub fn load(path: &std::path::Path) -> Result<Checked, TopologyError> {
    let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses and checks topology text (`origin` names it in errors).
pub fn parse(text: &str, origin: &str) -> Result<Checked, TopologyError> {
    let topology: Topology = toml::from_str(text).map_err(|e| TopologyError::Parse {
        path: origin.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    check(topology, text, origin)
}

fn check(topology: Topology, text: &str, origin: &str) -> Result<Checked, TopologyError> {
    let invalid = |span: std::ops::Range<usize>, message: String| TopologyError::Invalid {
        path: origin.to_owned(),
        line: text[..span.start.min(text.len())].matches('\n').count() + 1,
        message,
    };
    if topology.workers.is_empty() {
        return Err(invalid(
            0..0,
            "no [[worker]]: a topology needs at least one".into(),
        ));
    }
    let (router, router_span) = match topology.router {
        Some(spanned) => (spanned.get_ref().clone(), spanned.span()),
        None => (RouterSpec::default(), 0..0),
    };
    let (ssh, ssh_span) = match topology.ssh {
        Some(spanned) => (spanned.get_ref().clone(), spanned.span()),
        None => (SshSpec::default(), 0..0),
    };
    if router.port == 0 {
        return Err(invalid(
            router_span,
            "[router]: field `port` must be a port number, not 0".into(),
        ));
    }
    let discovery = match topology.discovery {
        Some(spanned) => {
            let span = spanned.span();
            let spec = spanned.get_ref().clone();
            check_discovery(&spec, &router).map_err(|message| invalid(span, message))?;
            Some(spec)
        }
        None => None,
    };
    if ssh.connect_timeout == 0 {
        return Err(invalid(
            ssh_span,
            "[ssh]: field `connect_timeout` must be at least 1 (seconds)".into(),
        ));
    }
    let mut workers = Vec::new();
    let mut spans = Vec::new();
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for spanned in &topology.workers {
        let span = spanned.span();
        let spec = spanned.get_ref().clone();
        let role = match spec.role {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Both => "worker",
        };
        let index = counts.entry(role).or_default();
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| format!("{role}-{index}"));
        *index += 1;
        check_worker(&spec, &name).map_err(|message| invalid(span.clone(), message))?;
        workers.push(NamedWorker { name, spec });
        spans.push(span);
    }
    let checked = Checked {
        router,
        ssh,
        discovery,
        workers,
    };
    check_roles(&checked)
        .and_then(|()| check_names_and_ports(&checked))
        .and_then(|()| check_addresses(&checked))
        .and_then(|()| check_movable(&checked))
        .and_then(|()| check_standby(&checked))
        .map_err(|(index, message)| invalid(spans[index].clone(), message))?;
    if checked.router.planner.is_some() && !checked.is_disaggregated() {
        return Err(invalid(
            router_span,
            "[router.planner]: the planner moves workers between prefill and decode pools; \
             give workers of role \"prefill\" and \"decode\""
                .into(),
        ));
    }
    Ok(checked)
}

/// With the planner, a built-in decode worker may become a prefill worker: it needs
/// the KV port a prefill worker serves pulls on.
fn check_movable(topology: &Checked) -> Result<(), (usize, String)> {
    if topology.router.planner.is_none() {
        return Ok(());
    }
    let unmovable = topology.workers.iter().position(|w| {
        w.spec.engine == Engine::Builtin && w.spec.role == Role::Decode && w.spec.kv_port.is_none()
    });
    match unmovable {
        Some(index) => Err((
            index,
            format!(
                "worker `{}`: field `kv_port` is required with [router.planner] (the planner \
                 may move it to the prefill pool)",
                topology.workers[index].name
            ),
        )),
        None => Ok(()),
    }
}

/// Standby workers are the planner's slots: P/D workers of a planner's topology with
/// static membership, and each pool starts with a worker that is not one.
fn check_standby(topology: &Checked) -> Result<(), (usize, String)> {
    let Some(first) = topology.workers.iter().position(|w| w.spec.standby) else {
        return Ok(());
    };
    let name = &topology.workers[first].name;
    if topology.router.planner.is_none() {
        return Err((
            first,
            format!("worker `{name}`: `standby` needs [router.planner], which starts it"),
        ));
    }
    if topology.discovery.is_some() {
        return Err((
            first,
            format!(
                "worker `{name}`: `standby` workers are not supported with [discovery] yet \
                 (the planner adds them through the admin API of a static router)"
            ),
        ));
    }
    for (role, pool) in [(Role::Prefill, "prefill"), (Role::Decode, "decode")] {
        let starts = topology
            .workers
            .iter()
            .any(|w| w.spec.role == role && !w.spec.standby);
        if !starts {
            return Err((
                first,
                format!(
                    "worker `{name}`: the {pool} pool would start empty; give each pool a \
                     worker that is not `standby`"
                ),
            ));
        }
    }
    Ok(())
}

impl Checked {
    /// The workers `tandem up` starts (those not on standby).
    pub fn started_workers(&self) -> impl Iterator<Item = &NamedWorker> {
        self.workers.iter().filter(|w| !w.spec.standby)
    }

    /// Whether the planner has slots to start workers in.
    pub fn has_standby(&self) -> bool {
        self.workers.iter().any(|w| w.spec.standby)
    }
}

/// `[discovery]` fields that cannot work.
fn check_discovery(spec: &DiscoverySpec, router: &RouterSpec) -> Result<(), String> {
    let namespace_ok = (1..=64).contains(&spec.namespace.len())
        && spec
            .namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !namespace_ok {
        return Err("[discovery]: field `namespace`: use 1-64 of a-z, 0-9, '-' and '_'".into());
    }
    if spec.ttl_secs < 2 {
        return Err("[discovery]: field `ttl_secs` must be at least 2".into());
    }
    if let Some(etcd) = &spec.etcd
        && !etcd.starts_with("etcd://")
    {
        return Err(format!(
            "[discovery]: field `etcd`: {etcd:?} is not etcd://HOST:PORT"
        ));
    }
    let ports = [spec.etcd_port, spec.etcd_port.wrapping_add(1)];
    if spec.starts_etcd() && (spec.etcd_port == 0 || spec.etcd_port == u16::MAX) {
        return Err("[discovery]: field `etcd_port` must be a port number below 65535".into());
    }
    if spec.starts_etcd() && ports.contains(&router.port) {
        return Err(format!(
            "[discovery]: etcd's ports {} and {} clash with the router's",
            ports[0], ports[1]
        ));
    }
    Ok(())
}

/// A whole-topology problem: the index of the worker to point at, and what is wrong.
type Misfit = (usize, String);

/// Replicated (`both`) or disaggregated (prefill and decode), not a mix or a half.
fn check_roles(topology: &Checked) -> Result<(), Misfit> {
    let workers = &topology.workers;
    let first_pd = workers.iter().position(|w| w.spec.role != Role::Both);
    let first_both = workers.iter().position(|w| w.spec.role == Role::Both);
    if let (Some(pd), Some(both)) = (first_pd, first_both) {
        let later = pd.max(both);
        return Err((
            later,
            format!(
                "worker `{}`: field `role`: workers with role \"both\" cannot be mixed with \
                 prefill/decode workers",
                workers[later].name
            ),
        ));
    }
    if let Some(pd) = first_pd {
        let has = |role| workers.iter().any(|w| w.spec.role == role);
        if !(has(Role::Prefill) && has(Role::Decode)) {
            return Err((
                pd,
                format!(
                    "worker `{}`: field `role`: a disaggregated topology needs at least one \
                     prefill and one decode worker",
                    workers[pd].name
                ),
            ));
        }
    }
    Ok(())
}

/// The machine a worker's ports are on: `here` for local workers and SSH targets on
/// loopback (where the router runs too), else the SSH host.
fn machine_of(spec: &WorkerSpec) -> &str {
    if spec.is_local() || matches!(spec.ssh_host(), "127.0.0.1" | "localhost" | "::1") {
        "here"
    } else {
        spec.ssh_host()
    }
}

/// Names are unique; no two ports are the same on one machine; no worker takes the
/// router's port here.
fn check_names_and_ports(topology: &Checked) -> Result<(), Misfit> {
    let mut names = std::collections::BTreeSet::new();
    // (machine, port) → (worker, field)
    let mut ports: BTreeMap<(&str, u16), (&str, &str)> = BTreeMap::new();
    if let Some(discovery) = topology.discovery.as_ref().filter(|d| d.starts_etcd()) {
        ports.insert(("here", discovery.etcd_port), ("[discovery]", "etcd_port"));
        let peer = discovery.etcd_port.wrapping_add(1);
        ports.insert(("here", peer), ("[discovery]", "etcd_port + 1"));
    }
    for (index, worker) in topology.workers.iter().enumerate() {
        if !names.insert(worker.name.as_str()) {
            return Err((
                index,
                format!(
                    "worker `{}`: field `name`: another worker has this name (names must be \
                     unique: logs, pid files and errors are named after them)",
                    worker.name
                ),
            ));
        }
        let spec = &worker.spec;
        let machine = machine_of(spec);
        let mut own = vec![("port", spec.port)];
        own.extend(spec.kv_port.map(|p| ("kv_port", p)));
        own.extend(spec.kv_events_port.map(|p| ("kv_events_port", p)));
        own.extend(spec.kv_replay_port.map(|p| ("kv_replay_port", p)));
        for (field, port) in own {
            if machine == "here" && port == topology.router.port {
                return Err((
                    index,
                    format!(
                        "worker `{}`: field `{field}`: {port} is the router's port (set in \
                         [router] or by --port)",
                        worker.name
                    ),
                ));
            }
            if let Some((other, other_field)) = ports.insert((machine, port), (&worker.name, field))
            {
                let place = if machine == "here" {
                    "this machine".to_owned()
                } else {
                    machine.to_owned()
                };
                let whose = if other == worker.name {
                    format!("its own `{other_field}`")
                } else {
                    format!("worker `{other}`'s `{other_field}`")
                };
                return Err((
                    index,
                    format!(
                        "worker `{}`: field `{field}`: {port} is already {whose} on {place}",
                        worker.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_worker(spec: &WorkerSpec, name: &str) -> Result<(), String> {
    let field = |field: &str, why: &str| format!("worker `{name}`: field `{field}` {why}");
    if spec.port == 0 {
        return Err(field("port", "must be a port number, not 0"));
    }
    if spec.host.is_empty() || spec.host.starts_with('-') {
        return Err(field(
            "host",
            "must be \"local\" or an SSH target (`user@host` or `host`)",
        ));
    }
    if spec.is_local() && !spec.ssh_options.is_empty() {
        return Err(field("ssh_options", "is for workers on SSH hosts"));
    }
    match spec.engine {
        Engine::Builtin => {
            if spec.gpus.len() > 1 {
                return Err(field(
                    "gpus",
                    "names more than one GPU: a built-in worker runs on one (no tensor parallelism)",
                ));
            }
            if spec.gpu_memory_utilization.is_some() && spec.gpus.is_empty() {
                return Err(field(
                    "gpu_memory_utilization",
                    "is for workers on a GPU (set `gpus = [N]`)",
                ));
            }
            if let Some(u) = spec.gpu_memory_utilization
                && !(u > 0.0 && u <= 1.0)
            {
                return Err(field("gpu_memory_utilization", "must be in (0, 1]"));
            }
            if spec.role == Role::Prefill && spec.kv_port.is_none() {
                return Err(field(
                    "kv_port",
                    "is required for a built-in prefill worker",
                ));
            }
            if !spec.command.is_empty() || spec.python.is_some() {
                let which = if spec.command.is_empty() {
                    "python"
                } else {
                    "command"
                };
                return Err(field(
                    which,
                    "is for vLLM workers (built-in workers run `tandem serve`; see `tandem`)",
                ));
            }
        }
        Engine::Vllm => {
            if spec.model.is_none() {
                return Err(field("model", "is required for a vLLM worker"));
            }
            if spec.role != Role::Both && spec.kv_port.is_none() {
                return Err(field(
                    "kv_port",
                    "(the NIXL side channel port) is required for P/D",
                ));
            }
            if let Some(u) = spec.gpu_memory_utilization
                && !(u > 0.0 && u <= 1.0)
            {
                return Err(field("gpu_memory_utilization", "must be in (0, 1]"));
            }
            if !spec.cores.is_empty() || spec.kv_cache_memory.is_some() {
                return Err(field(
                    "cores",
                    "is for built-in workers (vLLM workers take `gpus`)",
                ));
            }
            if spec.tandem.is_some() {
                return Err(field(
                    "tandem",
                    "is for built-in workers (vLLM workers run `vllm serve`)",
                ));
            }
            if spec.command.first().is_some_and(|p| p.trim().is_empty()) {
                return Err(field(
                    "command",
                    "must start with a program (`[\"vllm\", \"serve\"]`)",
                ));
            }
            if spec.python.as_ref().is_some_and(|p| p.trim().is_empty()) {
                return Err(field("python", "must name a Python interpreter"));
            }
        }
    }
    Ok(())
}

/// Multi-host P/D with vLLM must advertise routable side-channel addresses.
fn check_addresses(topology: &Checked) -> Result<(), Misfit> {
    if !topology.is_multi_host() {
        return Ok(());
    }
    for (index, worker) in topology.workers.iter().enumerate() {
        let address = worker.spec.reach_address();
        if worker.spec.engine == Engine::Vllm
            && worker.spec.role != Role::Both
            && matches!(address.as_str(), "127.0.0.1" | "localhost")
        {
            return Err((
                index,
                format!(
                    "worker `{}`: field `address`: a multi-host topology needs its routable \
                     address; {address} would be advertised as VLLM_NIXL_SIDE_CHANNEL_HOST",
                    worker.name
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_P_ONE_D: &str = r#"
[router]
port = 9000

[[worker]]
engine = "builtin"
role = "prefill"
port = 8100
kv_port = 5600
cores = [0]

[[worker]]
engine = "builtin"
role = "decode"
port = 8200
cores = [1]
"#;

    #[test]
    fn a_disaggregated_topology_parses_with_defaults() {
        let topology = parse(ONE_P_ONE_D, "t.toml").unwrap();
        assert!(topology.is_disaggregated());
        assert_eq!(topology.router.port, 9000);
        assert_eq!(topology.workers[0].name, "prefill-0");
        assert_eq!(topology.workers[1].spec.url(), "http://127.0.0.1:8200");
        assert!(!topology.is_multi_host());
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let typo = ONE_P_ONE_D.replace("cores = [1]", "coress = [1]");
        let err = parse(&typo, "t.toml").unwrap_err().to_string();
        assert!(err.contains("line 16") && err.contains("coress"), "{err}");

        let no_kv_port = ONE_P_ONE_D.replace("kv_port = 5600\n", "");
        let err = parse(&no_kv_port, "t.toml").unwrap_err().to_string();
        assert!(err.contains("line 5") && err.contains("`kv_port`"), "{err}");

        let bad_role = ONE_P_ONE_D.replace("role = \"decode\"", "role = \"decoder\"");
        let err = parse(&bad_role, "t.toml").unwrap_err().to_string();
        assert!(err.contains("decoder") && err.contains("line 14"), "{err}");
    }

    fn error_of(text: &str) -> String {
        parse(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn modes_cannot_be_mixed_or_half_disaggregated() {
        let only_prefill =
            ONE_P_ONE_D.replace("role = \"decode\"", "role = \"prefill\"\nkv_port = 5601");
        let err = error_of(&only_prefill);
        assert!(
            err.contains("at least one prefill") && err.contains("line 5"),
            "the first P/D worker: {err}"
        );
        let mixed = ONE_P_ONE_D.replace("role = \"decode\"", "role = \"both\"");
        let err = error_of(&mixed);
        assert!(
            err.contains("cannot be mixed") && err.contains("line 12") && err.contains("`role`"),
            "the worker that mixes: {err}"
        );
    }

    #[test]
    fn ports_names_and_the_router_port_are_checked_at_their_worker() {
        // The decode worker (its table starts on line 12) repeats the prefill's port.
        let same_port = ONE_P_ONE_D.replace("port = 8200", "port = 8100");
        let err = error_of(&same_port);
        assert!(
            err.contains("line 12") && err.contains("`port`") && err.contains("`prefill-0`'s"),
            "{err}"
        );
        let same_kv_port = ONE_P_ONE_D.replace("cores = [1]", "kv_port = 5600");
        let err = error_of(&same_kv_port);
        assert!(
            err.contains("line 12") && err.contains("`kv_port`"),
            "{err}"
        );
        let own = ONE_P_ONE_D.replace("kv_port = 5600", "kv_port = 8100");
        let err = error_of(&own);
        assert!(
            err.contains("line 5") && err.contains("its own `port`"),
            "{err}"
        );
        // The same port on two different hosts is fine.
        let remote = same_port.replace(
            "role = \"decode\"",
            "role = \"decode\"\nhost = \"me@gpu-2\"",
        );
        assert!(parse(&remote, "t").is_ok());
        // ... but not on an SSH target on loopback: that is this machine.
        let loopback = same_port.replace(
            "role = \"decode\"",
            "role = \"decode\"\nhost = \"me@127.0.0.1\"",
        );
        assert!(error_of(&loopback).contains("on this machine"));

        let router_port = ONE_P_ONE_D.replace("port = 8200", "port = 9000");
        let err = error_of(&router_port);
        assert!(
            err.contains("line 12") && err.contains("router's port"),
            "{err}"
        );
        let mut topology = parse(ONE_P_ONE_D, "t").unwrap();
        let err = topology.set_router_port(8100).unwrap_err().to_string();
        assert!(
            err.contains("--port") && err.contains("router's port"),
            "{err}"
        );
        assert!(topology.set_router_port(0).is_err());
        topology.set_router_port(9100).unwrap();
        assert_eq!(topology.router.port, 9100);

        let names = ONE_P_ONE_D
            .replace("role = \"prefill\"", "role = \"prefill\"\nname = \"w\"")
            .replace("role = \"decode\"", "role = \"decode\"\nname = \"w\"");
        let err = error_of(&names);
        assert!(err.contains("line 13") && err.contains("`name`"), "{err}");
        // A generated name taken by an explicit one.
        let generated = ONE_P_ONE_D.replace(
            "role = \"decode\"",
            "role = \"decode\"\nname = \"prefill-0\"",
        );
        assert!(error_of(&generated).contains("`name`"));
    }

    #[test]
    fn router_and_ssh_errors_point_at_their_tables() {
        let zero = ONE_P_ONE_D.replace("port = 9000", "port = 0");
        let err = error_of(&zero);
        assert!(err.contains("line 2") && err.contains("[router]"), "{err}");
        let ssh = format!("{ONE_P_ONE_D}\n[ssh]\nconnect_timeout = 0\n");
        let err = error_of(&ssh);
        assert!(
            err.contains("line 18") && err.contains("connect_timeout"),
            "{err}"
        );
    }

    #[test]
    fn ssh_targets_and_their_options_parse() {
        let text = ONE_P_ONE_D.replace(
            "[[worker]]\nengine = \"builtin\"\nrole = \"prefill\"",
            "[ssh]\noptions = [\"-p\", \"2222\"]\nconnect_timeout = 3\n\n\
             [[worker]]\nengine = \"builtin\"\nrole = \"prefill\"\n\
             host = \"root@127.0.0.1\"\ntandem = \"/opt/tandem\"\n\
             ssh_options = [\"-i\", \"/k\"]",
        );
        let topology = parse(&text, "t").unwrap();
        assert_eq!(topology.ssh.options, ["-p", "2222"]);
        assert_eq!(topology.ssh.connect_timeout, 3);
        let prefill = &topology.workers[0].spec;
        assert!(!prefill.is_local(), "user@127.0.0.1 goes over ssh");
        assert_eq!(prefill.url(), "http://127.0.0.1:8100");
        assert_eq!(prefill.ssh_options, ["-i", "/k"]);
        assert!(topology.workers[1].spec.is_local());
        assert!(
            !topology.is_multi_host(),
            "loopback over ssh is this machine"
        );

        let local_options = ONE_P_ONE_D.replace("cores = [1]", "ssh_options = [\"-v\"]");
        let err = parse(&local_options, "t").unwrap_err().to_string();
        assert!(err.contains("`ssh_options`"), "{err}");
        let option_as_host = ONE_P_ONE_D.replace("cores = [1]", "host = \"-oProxyCommand=x\"");
        let err = parse(&option_as_host, "t").unwrap_err().to_string();
        assert!(err.contains("`host`"), "{err}");
    }

    #[test]
    fn vllm_commands_and_pythons_are_for_vllm_workers() {
        let text = r#"
[[worker]]
engine = "vllm"
role = "both"
port = 8100
model = "/m"
command = ["/opt/py/bin/python3.12", "-m", "vllm.entrypoints.cli.main", "serve"]

[[worker]]
engine = "vllm"
role = "both"
port = 8200
model = "/m"
"#;
        let topology = parse(text, "t").unwrap();
        let (custom, plain) = (&topology.workers[0].spec, &topology.workers[1].spec);
        assert_eq!(custom.vllm_command()[0], "/opt/py/bin/python3.12");
        assert_eq!(custom.vllm_python(), "/opt/py/bin/python3.12");
        assert_eq!(plain.vllm_command(), ["vllm", "serve"]);
        assert_eq!(plain.vllm_python(), "python3");
        let own_python = text.replacen(
            "command = [",
            "python = \"/usr/bin/python3\"\ncommand = [",
            1,
        );
        let topology = parse(&own_python, "t").unwrap();
        assert_eq!(topology.workers[0].spec.vllm_python(), "/usr/bin/python3");
        let wrapper = text.replace(
            "\"/opt/py/bin/python3.12\", \"-m\"",
            "\"/opt/vllm-wrapper\", \"-m\"",
        );
        let topology = parse(&wrapper, "t").unwrap();
        assert_eq!(
            topology.workers[0].spec.vllm_python(),
            "python3",
            "not a Python"
        );

        let empty = text.replace("\"/opt/py/bin/python3.12\"", "\"\"");
        assert!(
            error_of(&empty).contains("`command`"),
            "{}",
            error_of(&empty)
        );
        let builtin = ONE_P_ONE_D.replace("cores = [1]", "command = [\"vllm\", \"serve\"]");
        let err = error_of(&builtin);
        assert!(
            err.contains("`command`") && err.contains("vLLM workers"),
            "{err}"
        );
        let builtin = ONE_P_ONE_D.replace("cores = [1]", "python = \"python3\"");
        assert!(error_of(&builtin).contains("`python`"));
    }

    #[test]
    fn workers_on_one_gpu_are_neighbours() {
        let text = r#"
[[worker]]
engine = "vllm"
role = "both"
port = 8100
model = "/m"
gpus = [0]
gpu_memory_utilization = 0.3

[[worker]]
engine = "vllm"
role = "both"
port = 8200
model = "/m"
gpu_memory_utilization = 0.3

[[worker]]
engine = "vllm"
role = "both"
port = 8300
model = "/m"
gpus = [1]

[[worker]]
engine = "vllm"
role = "both"
host = "me@gpu-2"
port = 8400
model = "/m"
gpus = [0]
"#;
        let topology = parse(&text.replace("host = \"me@gpu-2\"\n", ""), "t").unwrap();
        // Without `gpus`, a vLLM worker is on GPU 0 (tensor_parallel_size 1).
        assert_eq!(topology.workers[1].spec.gpu_ids(), [0]);
        assert_eq!(topology.gpu_neighbours(0, 0), [0, 1, 3]);
        assert_eq!(topology.gpu_neighbours(2, 1), [2]);
        assert_eq!(topology.workers[2].spec.gpu_share(), 0.9);
        // GPU 0 of another machine is another GPU.
        let topology = parse(text, "t").unwrap();
        assert_eq!(topology.gpu_neighbours(0, 0), [0, 1]);
        assert_eq!(topology.gpu_neighbours(3, 0), [3]);
        let two = text.replacen(
            "gpu_memory_utilization = 0.3\n\n[[worker]]\nengine = \"vllm\"\nrole = \"both\"\nport = 8300",
            "tensor_parallel_size = 2\n\n[[worker]]\nengine = \"vllm\"\nrole = \"both\"\nport = 8300",
            1,
        );
        let topology = parse(&two, "t").unwrap();
        assert_eq!(topology.workers[1].spec.gpu_ids(), [0, 1]);
        assert_eq!(topology.gpu_neighbours(2, 1), [1, 2]);
        // A built-in worker without `gpus` is on the CPU.
        let cpu = parse(ONE_P_ONE_D, "t").unwrap();
        assert!(cpu.workers[0].spec.gpu_ids().is_empty());
    }

    #[test]
    fn multi_host_vllm_needs_routable_addresses() {
        let text = r#"
[[worker]]
engine = "vllm"
role = "prefill"
host = "me@spark-1"
address = "127.0.0.1"
port = 8100
kv_port = 5600
model = "m"

[[worker]]
engine = "vllm"
role = "decode"
host = "me@spark-2"
port = 8200
kv_port = 5600
model = "m"
"#;
        let err = parse(text, "t").unwrap_err().to_string();
        assert!(err.contains("routable"), "{err}");
        let fixed = text.replace("address = \"127.0.0.1\"", "address = \"10.0.0.1\"");
        let topology = parse(&fixed, "t").unwrap();
        assert!(topology.is_multi_host());
        assert_eq!(topology.workers[1].spec.url(), "http://spark-2:8200");
    }
}
