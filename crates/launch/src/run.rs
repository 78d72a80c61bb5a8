//! Running a plan: each local process started as our child (pinned to its cores, in a
//! process group of its own, and sent SIGTERM by the kernel if we die), each remote one
//! over ssh ([`crate::remote`]: in the background on its host, in a session of its own,
//! with a pid file); every process's output prefixed with its name (or written to
//! `--log-dir`), its `/health` awaited; and teardown that stops exactly the processes
//! started and whatever they started — their process groups, SIGTERM, then SIGKILL
//! after a grace period — never by name.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::plan::{Host, Launch};
use crate::remote::{self, RemoteError, RemoteProcess, Ssh, Status, Stopped};
use crate::secret::SECRET_ENV;

/// Lines of each process's output kept for error reports.
const TAIL_LINES: usize = 20;
/// Grace period of a remote process stopped because its log could not be followed.
const UNWATCHED_GRACE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("starting {name} on {host}: {error}")]
    Remote {
        name: String,
        host: String,
        error: Box<RemoteError>,
    },
    #[error("starting {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: String,
        source: std::io::Error,
    },
    #[error(
        "{name} is pinned to cores {cores}, but this process may only use cores {allowed} \
         (a cpuset or taskset limits them): change the worker's `cores` in the topology"
    )]
    Cores {
        name: String,
        cores: String,
        allowed: String,
    },
    #[error("{name} exited during start-up ({status}); its last lines:\n{tail}")]
    DiedStarting {
        name: String,
        status: String,
        tail: String,
    },
    #[error("{name} was not healthy at {url}/health after {waited:?}; its last lines:\n{tail}")]
    NotReady {
        name: String,
        url: String,
        waited: Duration,
        tail: String,
    },
    #[error("{name} exited ({status}) while serving; its last lines:\n{tail}")]
    Died {
        name: String,
        status: String,
        tail: String,
    },
    #[error("creating the log directory {path}: {source}")]
    LogDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("interrupted while starting")]
    Interrupted,
}

/// A process this runner started.
pub struct Running {
    pub name: String,
    pub url: String,
    stop_last: bool,
    process: Process,
    tail: Arc<Mutex<VecDeque<String>>>,
    sink: Sink,
    started: Instant,
}

/// Our child here, or a process on another host.
enum Process {
    Local(Local),
    Remote(RemoteProcess),
}

/// Our child, leader of its own process group (its pgid is its pid). It is not reaped
/// until teardown, so neither its pid nor its group id can be reused before then.
struct Local {
    child: Child,
    /// Its exit status, once seen (not reaped: see [`exit_status`]).
    exit: Option<String>,
}

impl Running {
    /// Time since it was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Its pid (on its own host).
    pub fn pid(&self) -> u32 {
        match &self.process {
            Process::Local(local) => local.child.id(),
            Process::Remote(remote) => remote.pid,
        }
    }

    fn tail(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The exit status, if it has exited.
    fn exited(&mut self) -> Option<String> {
        let remote = match &mut self.process {
            Process::Local(local) => {
                if local.exit.is_none() {
                    local.exit = exit_status(local.child.id());
                }
                return local.exit.clone();
            }
            Process::Remote(remote) => remote,
        };
        match remote.status() {
            Status::Running => None,
            Status::FollowerLost => {
                // The connection dropped, not the process: follow its new lines again.
                match remote.follow(false) {
                    Ok((stdout, stderr)) => {
                        forward(stdout, self.sink.clone(), self.tail.clone());
                        forward(stderr, self.sink.clone(), self.tail.clone());
                    }
                    Err(err) => tracing::warn!(name = self.name, %err, "cannot follow the log"),
                }
                None
            }
            Status::Exited(status) => {
                // The log on its host is complete; the follower's lines may not be.
                if let Ok(lines) = remote.log_tail(TAIL_LINES) {
                    let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
                    *tail = lines.into();
                }
                Some(format!("{status}, on {}", remote.target()))
            }
        }
    }
}

/// Starts one process: here as our child, or on its SSH host.
pub fn start(launch: &Launch, log_dir: Option<&Path>) -> Result<Running, RunError> {
    let sink = sink_for(launch, log_dir)?;
    match &launch.host {
        Host::Local => start_local(launch, sink),
        Host::Ssh(target) => start_remote(launch, target, sink),
    }
}

fn sink_for(launch: &Launch, log_dir: Option<&Path>) -> Result<Sink, RunError> {
    Ok(match log_dir {
        Some(dir) => {
            let path = dir.join(format!("{}.log", launch.name));
            Sink::File(Arc::new(Mutex::new(
                File::create(&path).map_err(|source| RunError::LogDir { path, source })?,
            )))
        }
        None => Sink::Prefixed(launch.name.clone()),
    })
}

/// Starts it on its host in the background, then follows its log from here.
fn start_remote(launch: &Launch, target: &str, sink: Sink) -> Result<Running, RunError> {
    let failed = |source| RunError::Remote {
        name: launch.name.clone(),
        host: target.to_owned(),
        error: Box::new(source),
    };
    let ssh = Ssh::new(target, &launch.ssh_options);
    let mut process = remote::launch(ssh, launch).map_err(failed)?;
    print_line(&format!(
        "{} runs on {target} as pid {}; its log there: {}",
        launch.name,
        process.pid,
        process.log_path()
    ));
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let followed = match process.follow(true) {
        Ok((stdout, stderr)) => {
            forward(stdout, sink.clone(), tail.clone());
            forward(stderr, sink.clone(), tail.clone());
            Ok(())
        }
        Err(err) => Err(failed(err)),
    };
    let mut running = Running {
        name: launch.name.clone(),
        url: launch.url.clone(),
        stop_last: launch.stop_last,
        process: Process::Remote(process),
        tail,
        sink,
        started: Instant::now(),
    };
    if let Err(err) = followed {
        // Started but not followed: stop it rather than leave it unwatched.
        stop_all(std::slice::from_mut(&mut running), UNWATCHED_GRACE);
        return Err(err);
    }
    Ok(running)
}

fn start_local(launch: &Launch, sink: Sink) -> Result<Running, RunError> {
    let mut command = match &launch.venv {
        Some(_) => {
            // `exec`, so that the pid (and the process group) is the program's, whatever
            // the shell would do with its last command.
            let mut shell = Command::new("bash");
            shell.args(["-c", &launch.exec_line(false)]);
            shell
        }
        None => {
            let mut direct = Command::new(&launch.program);
            direct.args(&launch.args).envs(launch.env.iter().cloned());
            direct
        }
    };
    match &launch.kv_secret {
        Some(secret) => command.env(SECRET_ENV, secret.expose()),
        // Only the built-in workers get it, whatever our own environment holds.
        None => command.env_remove(SECRET_ENV),
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that teardown reaches whatever it starts (vLLM's
        // engine processes); a terminal's Ctrl-C reaches it only through us.
        .process_group(0);
    let cores = launch.cores.clone();
    if !cores.is_empty() {
        let allowed = allowed_cores();
        if cores.iter().any(|c| !allowed.contains(c)) {
            return Err(RunError::Cores {
                name: launch.name.clone(),
                cores: core_list(&cores),
                allowed: core_list(&allowed),
            });
        }
    }
    // SAFETY: getpid is async-signal-safe; called before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid,
    // sched_setaffinity) and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            // SIGTERM when we die, even by SIGKILL (the signal fires when the thread
            // that started it ends: `tandem up` and `tandem compare` start every
            // process from their main thread).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other("tandem exited while starting it"));
            }
            if cores.is_empty() {
                Ok(())
            } else {
                pin_to_cores(&cores)
            }
        });
    }
    let mut child = command.spawn().map_err(|source| RunError::Spawn {
        name: launch.name.clone(),
        program: launch.program.clone(),
        source,
    })?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    if let Some(stdout) = child.stdout.take() {
        forward(stdout, sink.clone(), tail.clone());
    }
    if let Some(stderr) = child.stderr.take() {
        forward(stderr, sink.clone(), tail.clone());
    }
    Ok(Running {
        name: launch.name.clone(),
        url: launch.url.clone(),
        stop_last: launch.stop_last,
        process: Process::Local(Local { child, exit: None }),
        tail,
        sink,
        started: Instant::now(),
    })
}

/// The CPU ids this process may run on, ascending: its affinity mask, which a cpuset
/// or `taskset` may have narrowed (every online core where it cannot be read).
pub fn allowed_cores() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set for sched_getaffinity to fill;
    // CPU_ISSET reads within it for ids below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let cores: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                .filter(|&core| libc::CPU_ISSET(core, &set))
                .collect();
            if !cores.is_empty() {
                return cores;
            }
        }
    }
    (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
}

/// `0,2,5`.
pub fn core_list(cores: &[usize]) -> String {
    let ids: Vec<String> = cores.iter().map(usize::to_string).collect();
    ids.join(",")
}

/// Keeps the calling thread (in `pre_exec`, the new process) on `cores`.
pub fn pin_to_cores(cores: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in bounds for
    // core ids below CPU_SETSIZE (checked).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &core in cores {
            if core < libc::CPU_SETSIZE as usize {
                libc::CPU_SET(core, &mut set);
            }
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The exit status of our child `pid` if it has exited, read without reaping it
/// (`waitid` with `WNOWAIT`): until teardown reaps it, its pid and process group id
/// stay reserved, so signalling its group never reaches a stranger.
fn exit_status(pid: u32) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    // SAFETY: waitid fills a zeroed siginfo_t for our own child; WNOHANG never blocks.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        if libc::waitid(libc::P_PID, pid, &mut info, flags) != 0 {
            return Some(std::io::Error::last_os_error().to_string());
        }
        if info.si_pid() == 0 {
            return None;
        }
        // Back to a wait(2) status word, for std's wording ("exit status: 1",
        // "signal: 9 (SIGKILL)").
        let raw = match info.si_code {
            libc::CLD_EXITED => (info.si_status() & 0xff) << 8,
            libc::CLD_DUMPED => info.si_status() | 0x80,
            _ => info.si_status(),
        };
        Some(std::process::ExitStatus::from_raw(raw).to_string())
    }
}

/// Live (not zombie) processes in process group `pgid`, from `/proc`.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // After the command name: state, ppid, pgrp, …
            let mut fields = stat.rsplit_once(") ")?.1.split(' ');
            let state = fields.next()?;
            let pgrp: u32 = fields.nth(1)?.parse().ok()?;
            (pgrp == pgid && state != "Z").then_some(pid)
        })
        .collect()
}

/// Where a process's output lines go.
#[derive(Clone)]
enum Sink {
    Prefixed(String),
    File(Arc<Mutex<File>>),
}

fn forward(stream: impl Read + Send + 'static, sink: Sink, tail: Arc<Mutex<VecDeque<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            match &sink {
                Sink::Prefixed(name) => print_line(&format!("[{name}] {line}")),
                Sink::File(file) => {
                    let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = writeln!(file, "{line}");
                }
            }
            let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    });
}

/// Waits until `running` answers `/health` with 200, it exits, `limit` passes, or
/// `stop` is set.
pub fn wait_healthy(
    running: &mut Running,
    limit: Duration,
    stop: &AtomicBool,
) -> Result<(), RunError> {
    let agent = http_agent(Duration::from_secs(2));
    let started = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(RunError::Interrupted);
        }
        if is_healthy(running, &agent)? {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(not_ready(running, limit));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `running` answers `/health` with 200 now; an error if it has exited.
pub fn is_healthy(running: &mut Running, agent: &ureq::Agent) -> Result<bool, RunError> {
    if let Some(status) = running.exited() {
        return Err(RunError::DiedStarting {
            name: running.name.clone(),
            status,
            tail: running.tail(),
        });
    }
    let url = format!("{}/health", running.url);
    Ok(agent
        .get(&url)
        .call()
        .is_ok_and(|response| response.status().is_success()))
}

/// The error of a process not healthy after `waited`.
pub fn not_ready(running: &Running, waited: Duration) -> RunError {
    RunError::NotReady {
        name: running.name.clone(),
        url: running.url.clone(),
        waited,
        tail: running.tail(),
    }
}

/// The status line drawn below the log lines while processes start (on a terminal).
static STATUS: Mutex<String> = Mutex::new(String::new());

/// Prints one line on stderr, above the status line if one is drawn.
pub fn print_line(line: &str) {
    let status = STATUS.lock().unwrap_or_else(|e| e.into_inner());
    let mut err = std::io::stderr().lock();
    let _ = if status.is_empty() {
        writeln!(err, "{line}")
    } else {
        write!(err, "\r\x1b[K{line}\n{status}")
    };
    let _ = err.flush();
}

/// Draws `text` as the status line below the log lines (cut to the terminal's width;
/// empty: clears it). For terminals only.
pub fn set_status_line(text: &str) {
    let width = terminal_width().saturating_sub(1).max(20);
    let text: String = text.chars().take(width).collect();
    let mut status = STATUS.lock().unwrap_or_else(|e| e.into_inner());
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r\x1b[K{text}");
    let _ = err.flush();
    *status = text;
}

/// Columns of the terminal on stderr (80 where unknown).
fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ fills a zeroed winsize; stderr's descriptor stays open.
    unsafe {
        let mut size: libc::winsize = std::mem::zeroed();
        if libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) == 0 && size.ws_col > 0 {
            return usize::from(size.ws_col);
        }
    }
    80
}

/// A blocking HTTP client whose calls give up after `timeout` and return error
/// statuses as responses.
pub fn http_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .build(),
    )
}

/// The first process that exited, as an error.
pub fn check_alive(processes: &mut [Running]) -> Result<(), RunError> {
    for running in processes.iter_mut() {
        if let Some(status) = running.exited() {
            return Err(RunError::Died {
                name: running.name.clone(),
                status,
                tail: running.tail(),
            });
        }
    }
    Ok(())
}

/// Stops the processes in reverse order of start: SIGTERM, then SIGKILL for those still
/// running after `grace`. Remote ones are stopped on their hosts, all at once. Those
/// marked `stop_last` (etcd) go once the others have exited.
pub fn teardown(processes: &mut Vec<Running>, grace: Duration) {
    let (mut last, mut first): (Vec<Running>, Vec<Running>) =
        processes.drain(..).partition(|p| p.stop_last);
    stop_all(&mut first, grace);
    stop_all(&mut last, grace);
}

fn stop_all(processes: &mut [Running], grace: Duration) {
    let mut stopping = Vec::new();
    for running in processes.iter_mut().rev() {
        match &mut running.process {
            Process::Local(local) => signal_group(&local.child, libc::SIGTERM),
            Process::Remote(remote) => {
                let what = format!(
                    "{} (pid {} on {})",
                    running.name,
                    remote.pid,
                    remote.target()
                );
                let hint = format!("ssh {} kill -TERM -{}", remote.target(), remote.pid);
                stopping.push((what, hint, remote.stop(grace)));
            }
        }
    }
    let deadline = Instant::now() + grace;
    for running in processes.iter_mut().rev() {
        if let Process::Local(local) = &mut running.process {
            wait_or_kill(&running.name, &mut local.child, deadline, grace);
        }
    }
    for (what, hint, stop) in stopping {
        match stop.and_then(remote::Stopping::finish) {
            Ok(Stopped::Killed) => {
                tracing::warn!("{what} was still running after {grace:?}: killed it")
            }
            Ok(Stopped::Gone | Stopped::Terminated) => {}
            Err(err) => {
                tracing::error!("could not stop {what}: {err}; stop it there with `{hint}`")
            }
        }
    }
}

/// Waits until a signalled child and every process of its group have exited, until
/// `deadline`; then kills the group. Reaps the child last, so that its group id stays
/// reserved while the group is signalled.
fn wait_or_kill(name: &str, child: &mut Child, deadline: Instant, grace: Duration) {
    let pgid = child.id();
    loop {
        if group_members(pgid).is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                name,
                "still running after {grace:?}: killing its process group"
            );
            signal_group(child, libc::SIGKILL);
            let until = Instant::now() + Duration::from_secs(5);
            while !group_members(pgid).is_empty() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.wait();
}

/// Signals our child's process group (its pgid is its pid).
fn signal_group(child: &Child, signal: libc::c_int) {
    // Our own child, not yet reaped: its pid, and so its group id, cannot have been
    // reused.
    if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on a process group we created.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// Sets `flag` on SIGINT or SIGTERM (the handler only stores an atomic).
pub fn stop_on_signals(flag: &'static AtomicBool) {
    static FLAG: std::sync::OnceLock<&'static AtomicBool> = std::sync::OnceLock::new();
    let _ = FLAG.set(flag);
    extern "C" fn on_signal(_: libc::c_int) {
        if let Some(flag) = FLAG.get() {
            flag.store(true, Ordering::Relaxed);
        }
    }
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: installs a handler that only does an atomic store.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}
