//! A topology's processes as one running whole: workers started together and each
//! awaited, then the router; stopped (in reverse order, by pid) when the stack is
//! dropped, so that no path out of `tandem up` or `tandem compare` leaves a process
//! behind.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::plan::Launch;
use crate::run::{self, RunError, Running};

/// How long each process has to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Where progress lines go while a stack starts.
pub trait StartObserver {
    fn started(&mut self, launch: &Launch, pid: u32);
    fn ready(&mut self, name: &str, after: Duration);
}

/// Progress lines on stderr, as `tandem up` prints them.
pub struct StderrObserver;

impl StartObserver for StderrObserver {
    fn started(&mut self, launch: &Launch, pid: u32) {
        eprintln!("starting {} on {} (pid {pid})", launch.name, launch.url);
    }

    fn ready(&mut self, name: &str, after: Duration) {
        eprintln!("  {name} ready ({:.1} s)", after.as_secs_f64());
    }
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
        // Workers start together, then each is awaited; the router needs them healthy.
        for launch in workers {
            stack.spawn(launch, options, observer)?;
        }
        let started = Instant::now();
        for running in &mut stack.processes {
            run::wait_healthy(running, options.limit, options.stop)?;
            observer.ready(&running.name, started.elapsed());
        }
        stack.spawn(router, options, observer)?;
        let started = Instant::now();
        if let Some(router) = stack.processes.last_mut() {
            run::wait_healthy(router, options.limit, options.stop)?;
            observer.ready(&router.name, started.elapsed());
        }
        Ok(stack)
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
