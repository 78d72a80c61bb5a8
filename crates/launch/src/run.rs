//! Running a plan: each local process started as our child (pinned to its cores), each
//! remote one over ssh ([`crate::remote`]: in the background on its host, with a pid
//! file); every process's output prefixed with its name (or written to `--log-dir`),
//! its `/health` awaited; and teardown that stops exactly the processes started, by pid
//! — SIGTERM, then SIGKILL after a grace period — never by name.

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
    process: Process,
    tail: Arc<Mutex<VecDeque<String>>>,
    sink: Sink,
}

/// Our child here, or a process on another host.
enum Process {
    Local(Child),
    Remote(RemoteProcess),
}

impl Running {
    /// Its pid (on its own host).
    pub fn pid(&self) -> u32 {
        match &self.process {
            Process::Local(child) => child.id(),
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
            Process::Local(child) => {
                return match child.try_wait() {
                    Ok(Some(status)) => Some(status.to_string()),
                    Ok(None) => None,
                    Err(err) => Some(err.to_string()),
                };
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
    eprintln!(
        "{} runs on {target} as pid {}; its log there: {}",
        launch.name,
        process.pid,
        process.log_path()
    );
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
        process: Process::Remote(process),
        tail,
        sink,
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
            let mut shell = Command::new("bash");
            shell.args(["-c", &launch.shell_line()]);
            shell
        }
        None => {
            let mut direct = Command::new(&launch.program);
            direct.args(&launch.args).envs(launch.env.iter().cloned());
            direct
        }
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let cores = launch.cores.clone();
    if !cores.is_empty() {
        // SAFETY: only calls async-signal-safe functions (sched_setaffinity).
        unsafe {
            command.pre_exec(move || pin_to_cores(&cores));
        }
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
        process: Process::Local(child),
        tail,
        sink,
    })
}

fn pin_to_cores(cores: &[usize]) -> std::io::Result<()> {
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
                Sink::Prefixed(name) => eprintln!("[{name}] {line}"),
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
    let url = format!("{}/health", running.url);
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(RunError::Interrupted);
        }
        if let Some(status) = running.exited() {
            return Err(RunError::DiedStarting {
                name: running.name.clone(),
                status,
                tail: running.tail(),
            });
        }
        if let Ok(response) = agent.get(&url).call()
            && response.status().is_success()
        {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(RunError::NotReady {
                name: running.name.clone(),
                url: running.url.clone(),
                waited: limit,
                tail: running.tail(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
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
/// running after `grace`. Remote ones are stopped on their hosts, all at once.
pub fn teardown(processes: &mut Vec<Running>, grace: Duration) {
    stop_all(processes, grace);
    processes.clear();
}

fn stop_all(processes: &mut [Running], grace: Duration) {
    let mut stopping = Vec::new();
    for running in processes.iter_mut().rev() {
        match &mut running.process {
            Process::Local(child) => signal(child, libc::SIGTERM),
            Process::Remote(remote) => {
                let what = format!(
                    "{} (pid {} on {})",
                    running.name,
                    remote.pid,
                    remote.target()
                );
                let hint = format!("ssh {} kill {}", remote.target(), remote.pid);
                stopping.push((what, hint, remote.stop(grace)));
            }
        }
    }
    let deadline = Instant::now() + grace;
    for running in processes.iter_mut().rev() {
        if let Process::Local(child) = &mut running.process {
            wait_or_kill(&running.name, child, deadline, grace);
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

/// Waits for a signalled child until `deadline`, then kills it.
fn wait_or_kill(name: &str, child: &mut Child, deadline: Instant, grace: Duration) {
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                tracing::warn!(name, "still running after {grace:?}: killing it");
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    // Our own child, not yet reaped: its pid cannot have been reused.
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with a pid we own.
        unsafe {
            libc::kill(pid, signal);
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
