//! A topology's processes as one running whole: workers started together and each
//! awaited, then the router; stopped (in reverse order, by pid) when the stack is
//! dropped, so that no path out of `tandem up` or `tandem compare` leaves a process
//! behind.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::plan::Launch;
use crate::run::{self, RunError, Running};

/// How long each process has to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Where progress lines go while a stack starts.
pub trait StartObserver {
    fn started(&mut self, launch: &Launch, pid: u32);
    /// Called about every 100 ms while processes start: each one not yet healthy, with
    /// the time since it was started.
    fn waiting(&mut self, _pending: &[(&str, Duration)]) {}
    fn ready(&mut self, name: &str, after: Duration);
}

/// How often a plain (not a terminal) stderr gets a line naming what is still loading.
const WAITING_LINE_EVERY: Duration = Duration::from_secs(5);

/// Progress on stderr, as `tandem up` prints it: a line per start and per ready
/// process; while processes load, a status line with a spinner and each one's elapsed
/// time under the logs on a terminal, or else a `waiting for …` line every 5 s.
pub struct StderrObserver {
    terminal: bool,
    frame: usize,
    next_line: Option<Instant>,
}

impl StderrObserver {
    pub fn new() -> Self {
        use std::io::IsTerminal;
        Self {
            terminal: std::io::stderr().is_terminal(),
            frame: 0,
            next_line: None,
        }
    }
}

impl Default for StderrObserver {
    fn default() -> Self {
        Self::new()
    }
}

/// `prefill-0 (3.2 s), decode-0 (3.1 s)`.
fn elapsed_list(pending: &[(&str, Duration)]) -> String {
    let each: Vec<String> = pending
        .iter()
        .map(|(name, elapsed)| format!("{name} ({:.1} s)", elapsed.as_secs_f64()))
        .collect();
    each.join(", ")
}

impl StartObserver for StderrObserver {
    fn started(&mut self, launch: &Launch, pid: u32) {
        run::print_line(&format!(
            "starting {} on {} (pid {pid})",
            launch.name, launch.url
        ));
    }

    fn waiting(&mut self, pending: &[(&str, Duration)]) {
        if self.terminal {
            const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
            self.frame = (self.frame + 1) % FRAMES.len();
            run::set_status_line(&format!(
                "{} loading: {}",
                FRAMES[self.frame],
                elapsed_list(pending)
            ));
            return;
        }
        let now = Instant::now();
        let next = *self.next_line.get_or_insert(now + WAITING_LINE_EVERY);
        if now >= next {
            run::print_line(&format!("  waiting for {}", elapsed_list(pending)));
            self.next_line = Some(now + WAITING_LINE_EVERY);
        }
    }

    fn ready(&mut self, name: &str, after: Duration) {
        if self.terminal {
            run::set_status_line("");
        }
        run::print_line(&format!("  {name} ready ({:.1} s)", after.as_secs_f64()));
    }
}

impl Drop for StderrObserver {
    fn drop(&mut self) {
        if self.terminal {
            run::set_status_line("");
        }
    }
}

/// The wave each launch starts in: 0, or one more than the latest wave of the
/// processes it starts after (which come before it in the plan; names it does not
/// find are ignored).
pub fn start_waves(launches: &[Launch]) -> Vec<usize> {
    let mut waves: Vec<usize> = Vec::with_capacity(launches.len());
    for launch in launches {
        let wave = launches
            .iter()
            .zip(&waves)
            .filter(|(earlier, _)| launch.start_after.contains(&earlier.name))
            .map(|(_, wave)| wave + 1)
            .max()
            .unwrap_or(0);
        waves.push(wave);
    }
    waves
}

/// Running processes, stopped on drop.
pub struct Stack {
    processes: Vec<Running>,
    endpoint: String,
}

/// How a stack starts.
pub struct StartOptions<'a> {
    pub log_dir: Option<&'a Path>,
    /// How long each process may take to become healthy.
    pub limit: Duration,
    /// Set by a signal handler: starting stops early.
    pub stop: &'a AtomicBool,
}

impl Stack {
    /// Starts `launches` (workers, then the router last, as `plan::plan` orders them)
    /// and waits until each is healthy; on any failure, stops what it started.
    pub fn start(
        launches: &[Launch],
        options: &StartOptions,
        observer: &mut dyn StartObserver,
    ) -> Result<Stack, RunError> {
        let Some((router, workers)) = launches.split_last() else {
            return Ok(Stack {
                processes: Vec::new(),
                endpoint: String::new(),
            });
        };
        let mut stack = Stack {
            processes: Vec::with_capacity(launches.len()),
            endpoint: router.url.clone(),
        };
        // Workers start together and are awaited together, except that one waits for
        // those it must start after (its GPU's earlier workers): wave by wave. The
        // router needs them all healthy.
        let waves = start_waves(workers);
        for wave in 0..=waves.iter().copied().max().unwrap_or(0) {
            let first = stack.processes.len();
            for (launch, _) in workers.iter().zip(&waves).filter(|(_, w)| **w == wave) {
                stack.spawn(launch, options, observer)?;
            }
            stack.await_healthy(first, options, observer)?;
        }
        stack.spawn(router, options, observer)?;
        stack.await_healthy(workers.len(), options, observer)?;
        Ok(stack)
    }

    /// Waits until every process from index `first` on is healthy, telling `observer`
    /// which ones it still waits for.
    fn await_healthy(
        &mut self,
        first: usize,
        options: &StartOptions,
        observer: &mut dyn StartObserver,
    ) -> Result<(), RunError> {
        let agent = run::http_agent(Duration::from_secs(2));
        let started = Instant::now();
        let mut pending: Vec<usize> = (first..self.processes.len()).collect();
        loop {
            if options.stop.load(Ordering::Relaxed) {
                return Err(RunError::Interrupted);
            }
            let mut still = Vec::with_capacity(pending.len());
            for index in pending {
                let running = &mut self.processes[index];
                if run::is_healthy(running, &agent)? {
                    observer.ready(&running.name, running.elapsed());
                } else {
                    still.push(index);
                }
            }
            pending = still;
            if pending.is_empty() {
                return Ok(());
            }
            if started.elapsed() > options.limit {
                return Err(run::not_ready(&self.processes[pending[0]], options.limit));
            }
            let names: Vec<(&str, Duration)> = pending
                .iter()
                .map(|&i| (self.processes[i].name.as_str(), self.processes[i].elapsed()))
                .collect();
            observer.waiting(&names);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn(
        &mut self,
        launch: &Launch,
        options: &StartOptions,
        observer: &mut dyn StartObserver,
    ) -> Result<(), RunError> {
        let running = run::start(launch, options.log_dir)?;
        observer.started(launch, running.pid());
        self.processes.push(running);
        Ok(())
    }

    /// Starts one more process (a worker the planner asked for) and waits until it is
    /// healthy; on failure it is stopped again.
    pub fn start_one(
        &mut self,
        launch: &Launch,
        options: &StartOptions,
        observer: &mut dyn StartObserver,
    ) -> Result<(), RunError> {
        let index = self.processes.len();
        self.spawn(launch, options, observer)?;
        let healthy = self.await_healthy(index, options, observer);
        if healthy.is_err() {
            let mut failed = vec![self.processes.remove(index)];
            run::teardown(&mut failed, STOP_GRACE);
        }
        healthy
    }

    /// Stops the process serving `url` (a worker the planner retired); whether there
    /// was one.
    pub fn stop_one(&mut self, url: &str) -> bool {
        let Some(index) = self.processes.iter().position(|p| p.url == url) else {
            return false;
        };
        let mut stopped = vec![self.processes.remove(index)];
        run::teardown(&mut stopped, STOP_GRACE);
        true
    }

    /// The router's base URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn len(&self) -> usize {
        self.processes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }

    /// The first process that has exited, as an error.
    pub fn check_alive(&mut self) -> Result<(), RunError> {
        run::check_alive(&mut self.processes)
    }

    /// Stops everything now (drop does the same).
    pub fn stop(mut self) {
        run::teardown(&mut self.processes, STOP_GRACE);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        run::teardown(&mut self.processes, STOP_GRACE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Host;

    fn launch(name: &str, after: &[&str]) -> Launch {
        Launch {
            name: name.into(),
            host: Host::Local,
            program: "true".into(),
            args: Vec::new(),
            env: Vec::new(),
            cores: Vec::new(),
            venv: None,
            kv_secret: None,
            url: String::new(),
            ssh_options: Vec::new(),
            stop_last: false,
            start_after: after.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn processes_start_in_waves_after_what_they_wait_for() {
        let launches = [
            launch("a", &[]),
            launch("b", &["a"]),
            launch("c", &[]),
            launch("d", &["a", "b"]),
            launch("e", &["c"]),
            launch("f", &["nobody"]),
        ];
        assert_eq!(start_waves(&launches), [0, 1, 0, 2, 1, 0]);
        assert!(start_waves(&[]).is_empty());
    }
}
