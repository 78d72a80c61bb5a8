//! Processes on other hosts, over the system `ssh` (key-based: `BatchMode=yes`).
//!
//! A start is one short ssh session: it makes a fresh directory on the host
//! (`mktemp -d /tmp/tandem-XXXXXXXX`) and starts the command in the background under a
//! small `sh` wrapper that starts the command under `setsid` (a session and process
//! group of its own, whose id is its pid), writes its pid to `DIR/NAME.pid`, its output
//! to `DIR/NAME.log` and, once it has exited, its status to `DIR/NAME.exit`; the
//! session prints the directory, the pid, the pid's start time and its process group,
//! and ends. The process needs no ssh connection after that. A cluster secret reaches
//! the command through that session's standard input and the wrapper's environment,
//! never a command line (which any user of the host may read). A second session follows
//! the log (`tail -F --pid`), so its lines reach this machine, and ends when the
//! process does.
//!
//! Stopping opens a fresh session that signals exactly that process group — the
//! command and whatever it started (vLLM's engine processes), even after the command
//! itself has exited — but only while the group's leader is gone or still has its
//! recorded start time, so a reused pid is never signalled: SIGTERM, then SIGKILL
//! after the grace period; then it removes the pid file. The log and the exit status
//! stay in the directory.

use std::io::{Read, Write};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::plan::{Launch, shell_quote};
use crate::secret::SECRET_ENV;

/// Deadline of one short ssh session (start, probe, log tail).
const CALL_LIMIT: Duration = Duration::from_secs(30);
/// `ConnectTimeout` when the options do not set one.
const CONNECT_TIMEOUT_SECS: u64 = 10;
/// How often a process whose log follower ended is probed.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// Extra time a stop session gets beyond the grace period.
const STOP_MARGIN: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("running ssh: {0}")]
    Spawn(std::io::Error),
    #[error("ssh {target} ({what}): no answer within {limit:?}")]
    TimedOut {
        target: String,
        what: &'static str,
        limit: Duration,
    },
    #[error("ssh {target} ({what}) failed ({status}): {stderr}")]
    Failed {
        target: String,
        what: &'static str,
        status: String,
        stderr: String,
    },
    #[error("ssh {target} ({what}): unexpected answer {output:?}")]
    Unexpected {
        target: String,
        what: &'static str,
        output: String,
    },
}

/// How to reach one host.
#[derive(Debug, Clone)]
pub struct Ssh {
    pub target: String,
    /// Options placed before the target (`-p 2222`, `-o Port=2222`, `-i KEY`, …).
    pub options: Vec<String>,
}

impl Ssh {
    pub fn new(target: &str, options: &[String]) -> Self {
        Self {
            target: target.to_owned(),
            options: options.to_vec(),
        }
    }

    /// `ssh … TARGET sh -c SCRIPT` (ssh takes the first value of each option, so
    /// `BatchMode` cannot be overridden and the options' `ConnectTimeout` wins).
    fn command(&self, script: &str, input: bool) -> Command {
        let mut ssh = Command::new("ssh");
        ssh.args(["-o", "BatchMode=yes"]).args(&self.options);
        if !self.options.iter().any(|o| o.contains("ConnectTimeout")) {
            ssh.args(["-o", &format!("ConnectTimeout={CONNECT_TIMEOUT_SECS}")]);
        }
        ssh.args(["--", &self.target])
            .arg(format!("sh -c {}", shell_quote(script)))
            .stdin(if input { Stdio::piped() } else { Stdio::null() });
        ssh
    }

    /// Starts `script` on the host, writing `input` (if any) to its standard input; its
    /// output is collected for [`Call::finish`].
    fn call(
        &self,
        script: &str,
        what: &'static str,
        input: Option<&str>,
    ) -> Result<Call, RemoteError> {
        let mut child = self
            .command(script, input.is_some())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(RemoteError::Spawn)?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            // A few bytes: they fit the pipe, so this does not wait for the host. A
            // failed write shows as the script's own failure.
            let _ = stdin.write_all(input.as_bytes());
        }
        let stdout = child.stdout.take().map(collect);
        let stderr = child.stderr.take().map(collect);
        Ok(Call {
            target: self.target.clone(),
            what,
            child,
            stdout,
            stderr,
        })
    }

    /// Runs `script` on the host within [`CALL_LIMIT`]; its standard output.
    pub fn run(&self, script: &str, what: &'static str) -> Result<String, RemoteError> {
        self.call(script, what, None)?
            .finish(Instant::now() + CALL_LIMIT, CALL_LIMIT)
    }

    /// [`Self::run`] with `input` on the script's standard input.
    fn run_with_input(
        &self,
        script: &str,
        what: &'static str,
        input: &str,
    ) -> Result<String, RemoteError> {
        self.call(script, what, Some(input))?
            .finish(Instant::now() + CALL_LIMIT, CALL_LIMIT)
    }
}

fn collect(mut stream: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// An ssh session in progress.
pub struct Call {
    target: String,
    what: &'static str,
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl Call {
    /// Waits until `deadline` (killing the session then); its standard output if it
    /// exited 0.
    pub fn finish(mut self, deadline: Instant, limit: Duration) -> Result<String, RemoteError> {
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(RemoteError::TimedOut {
                        target: self.target,
                        what: self.what,
                        limit,
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(err) => return Err(RemoteError::Spawn(err)),
            }
        };
        let join =
            |h: Option<JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
        let (stdout, stderr) = (join(self.stdout), join(self.stderr));
        if !status.success() {
            return Err(RemoteError::Failed {
                target: self.target,
                what: self.what,
                status: status.to_string(),
                stderr: stderr.trim().to_owned(),
            });
        }
        Ok(stdout)
    }
}

/// A name usable as a file name.
fn file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The command as the wrapper runs it: venv activated, then `exec` into the program
/// (pinned with `taskset` if it has cores), so its pid is the program's.
pub fn exec_line(launch: &Launch) -> String {
    launch.exec_line(true)
}

/// What a remote process is doing, as far as can be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Running (or not known otherwise: the host did not answer).
    Running,
    /// Running, but its log follower ended (the connection dropped).
    FollowerLost,
    /// Exited, with this status.
    Exited(String),
}

/// A process started on another host by [`launch`].
pub struct RemoteProcess {
    ssh: Ssh,
    file: String,
    /// The directory made for this start on the host.
    pub dir: String,
    pub pid: u32,
    /// The pid's start time (`/proc/PID/stat` field 22), `-` where unknown.
    start_time: String,
    /// Its process group (its pid, as `setsid` made it), if it has one of its own.
    pgid: Option<u32>,
    follower: Option<Child>,
    last_probe: Option<Instant>,
    exit: Option<String>,
}

/// Starts `launch` on its host (see the module doc).
pub fn launch(ssh: Ssh, launch: &Launch) -> Result<RemoteProcess, RemoteError> {
    let file = file_name(&launch.name);
    let script = start_script(&file, &exec_line(launch), launch.kv_secret.is_some());
    let output = match &launch.kv_secret {
        Some(secret) => ssh.run_with_input(&script, "start", &format!("{}\n", secret.expose()))?,
        None => ssh.run(&script, "start")?,
    };
    let fields: Vec<&str> = output.split_whitespace().collect();
    let unexpected = || RemoteError::Unexpected {
        target: ssh.target.clone(),
        what: "start",
        output: output.clone(),
    };
    let [dir, pid, start_time, pgid] = fields[..] else {
        return Err(unexpected());
    };
    let pid: u32 = pid.parse().map_err(|_| unexpected())?;
    if pgid != pid.to_string() {
        tracing::warn!(
            target = ssh.target,
            pid,
            pgid,
            "the process did not get a process group of its own: teardown signals its pid alone"
        );
    }
    Ok(RemoteProcess {
        dir: dir.to_owned(),
        start_time: start_time.to_owned(),
        pgid: (pgid == pid.to_string()).then_some(pid),
        pid,
        file,
        follower: None,
        last_probe: None,
        exit: None,
        ssh,
    })
}

/// The start session's script; with `reads_secret`, it first reads the cluster secret
/// from its standard input into the environment the command inherits.
fn start_script(file: &str, line: &str, reads_secret: bool) -> String {
    let secret = if reads_secret {
        format!("IFS= read -r {SECRET_ENV}\nexport {SECRET_ENV}\n")
    } else {
        String::new()
    };
    let line = shell_quote(line);
    let wrapper = format!(
        r#"d=$1
setsid sh -c {line} >"$d/{file}.log" 2>&1 </dev/null &
p=$!
echo $p >"$d/{file}.pid.tmp" && mv "$d/{file}.pid.tmp" "$d/{file}.pid"
wait $p
echo $? >"$d/{file}.exit""#
    );
    format!(
        r#"set -e
{secret}d=$(mktemp -d /tmp/tandem-XXXXXXXX)
nohup sh -c {wrapper} tandem-wrapper "$d" >/dev/null 2>&1 </dev/null &
i=0
while [ ! -s "$d/{file}.pid" ]; do
  i=$((i+1))
  if [ $i -gt 100 ]; then echo "no pid file in $d after 10 s" >&2; exit 1; fi
  sleep 0.1
done
pid=$(cat "$d/{file}.pid")
j=0
while :; do
  pg=$(sed 's/^.*) //' /proc/$pid/stat 2>/dev/null | cut -d' ' -f3)
  if [ "$pg" = "$pid" ] || [ ! -e /proc/$pid ] || [ $j -ge 50 ]; then break; fi
  j=$((j+1)); sleep 0.1
done
st=$(sed 's/^.*) //' /proc/$pid/stat 2>/dev/null | cut -d' ' -f20)
echo "$d $pid ${{st:--}} ${{pg:--}}""#,
        wrapper = shell_quote(&wrapper),
    )
}

impl RemoteProcess {
    pub fn target(&self) -> &str {
        &self.ssh.target
    }

    pub fn log_path(&self) -> String {
        format!("{}/{}.log", self.dir, self.file)
    }

    /// Shell definitions for scripts about this process: `alive` is true while the
    /// pid is still the process started (no exit status recorded, same start time);
    /// `group` while its process group has members and its leader is the process
    /// started or gone (not a stranger that reused the pid); `running` while either;
    /// `sig SIG` signals the group (or the pid alone, without a group of its own).
    fn prelude(&self) -> String {
        let pgid = self.pgid.map_or("-".to_owned(), |g| g.to_string());
        format!(
            r#"d={dir}; pid={pid}; start={start}; f={file}; g={pgid}
started() {{ sed 's/^.*) //' /proc/$1/stat 2>/dev/null | cut -d' ' -f20; }}
alive() {{
  [ ! -e "$d/$f.exit" ] && kill -0 $pid 2>/dev/null || return 1
  [ "$start" = - ] || [ "$(started $pid)" = "$start" ]
}}
group() {{
  [ "$g" != - ] || return 1
  if [ -e /proc/$g ] && [ "$start" != - ] && [ "$(started $g)" != "$start" ]; then return 1; fi
  kill -0 -$g 2>/dev/null
}}
running() {{ alive || group; }}
sig() {{ if group; then kill -$1 -$g 2>/dev/null; elif alive; then kill -$1 $pid; fi; }}
"#,
            dir = shell_quote(&self.dir),
            pid = self.pid,
            start = shell_quote(&self.start_time),
            file = shell_quote(&self.file),
        )
    }

    /// Starts following the log (from its first line, or only new lines); the
    /// session's stdout and stderr, for forwarding.
    pub fn follow(&mut self, from_start: bool) -> Result<(ChildStdout, ChildStderr), RemoteError> {
        let from = if from_start { "+1" } else { "0" };
        let script = format!(
            "exec tail -n {from} -F --pid={} {}",
            self.pid,
            shell_quote(&self.log_path())
        );
        let mut child = self
            .ssh
            .command(&script, false)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(RemoteError::Spawn)?;
        let streams = (child.stdout.take(), child.stderr.take());
        self.follower = Some(child);
        match streams {
            (Some(out), Some(err)) => Ok((out, err)),
            _ => Err(RemoteError::Spawn(std::io::Error::other(
                "the follower's output is not piped",
            ))),
        }
    }

    /// What the process is doing: the follower's end is the sign to ask the host
    /// (at most every [`PROBE_EVERY`]).
    pub fn status(&mut self) -> Status {
        if let Some(exit) = &self.exit {
            return Status::Exited(exit.clone());
        }
        if let Some(follower) = &mut self.follower
            && let Ok(None) = follower.try_wait()
        {
            return Status::Running;
        }
        if self.last_probe.is_some_and(|t| t.elapsed() < PROBE_EVERY) {
            return Status::Running;
        }
        self.last_probe = Some(Instant::now());
        match self.probe() {
            Ok(status) => {
                if let Status::Exited(exit) = &status {
                    self.exit = Some(exit.clone());
                }
                status
            }
            Err(err) => {
                tracing::warn!(target = self.ssh.target, pid = self.pid, %err, "cannot tell whether the process runs");
                Status::Running
            }
        }
    }

    fn probe(&self) -> Result<Status, RemoteError> {
        let answer = self.ssh.run(&self.probe_script(), "status")?;
        Ok(match answer.trim() {
            "alive" => Status::FollowerLost,
            exited => Status::Exited(exited.to_owned()),
        })
    }

    fn probe_script(&self) -> String {
        format!(
            r#"{prelude}if alive; then echo alive; exit 0; fi
i=0
while [ ! -e "$d/$f.exit" ] && [ $i -lt 10 ]; do sleep 0.1; i=$((i+1)); done
if [ -e "$d/$f.exit" ]; then echo "exit status: $(cat "$d/$f.exit")"; else echo "gone (no exit status recorded)"; fi"#,
            prelude = self.prelude()
        )
    }

    /// The last `lines` lines of the process's log on its host.
    pub fn log_tail(&self, lines: usize) -> Result<Vec<String>, RemoteError> {
        let script = format!("tail -n {lines} {}", shell_quote(&self.log_path()));
        let text = self.ssh.run(&script, "log tail")?;
        Ok(text.lines().map(str::to_owned).collect())
    }

    /// Starts stopping the process (SIGTERM, SIGKILL after `grace`, pid file
    /// removed), on a fresh session; [`Stopping::finish`] waits for it.
    pub fn stop(&mut self, grace: Duration) -> Result<Stopping, RemoteError> {
        let call = self.ssh.call(&self.stop_script(grace), "stop", None)?;
        Ok(Stopping {
            call,
            deadline: Instant::now() + grace + STOP_MARGIN,
            limit: grace + STOP_MARGIN,
            follower: self.follower.take(),
        })
    }

    fn stop_script(&self, grace: Duration) -> String {
        let ticks = grace.as_millis().div_ceil(100);
        format!(
            r#"{prelude}result=gone
if running; then
  sig TERM; result=stopped
  i=0
  while running; do
    if [ $i -ge {ticks} ]; then sig KILL; result=killed; break; fi
    sleep 0.1; i=$((i+1))
  done
  j=0
  while running && [ $j -lt 50 ]; do sleep 0.1; j=$((j+1)); done
  if running; then result=still-running; fi
fi
rm -f "$d/$f.pid"
echo $result"#,
            prelude = self.prelude()
        )
    }
}

impl Drop for RemoteProcess {
    fn drop(&mut self) {
        if let Some(mut follower) = self.follower.take() {
            let _ = follower.kill();
            let _ = follower.wait();
        }
    }
}

/// A stop in progress.
pub struct Stopping {
    call: Call,
    deadline: Instant,
    limit: Duration,
    follower: Option<Child>,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It had already exited.
    Gone,
    /// It exited on SIGTERM.
    Terminated,
    /// It needed SIGKILL.
    Killed,
}

impl Stopping {
    /// Waits for the stop session, then ends the log follower.
    pub fn finish(mut self) -> Result<Stopped, RemoteError> {
        let target = self.call.target.clone();
        let result = self.call.finish(self.deadline, self.limit);
        if let Some(mut follower) = self.follower.take() {
            // The remote `tail --pid` ends with the process; give it a moment.
            let until = Instant::now() + Duration::from_secs(2);
            while matches!(follower.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = follower.kill();
            let _ = follower.wait();
        }
        let output = result?;
        match output.trim() {
            "gone" => Ok(Stopped::Gone),
            "stopped" => Ok(Stopped::Terminated),
            "killed" => Ok(Stopped::Killed),
            other => Err(RemoteError::Unexpected {
                target,
                what: "stop",
                output: other.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch_of(env: Vec<(String, String)>, cores: Vec<usize>) -> Launch {
        Launch {
            name: "prefill 0".into(),
            host: crate::plan::Host::Ssh("me@h".into()),
            program: "/opt/tandem".into(),
            args: vec!["serve".into(), "--kv-host".into(), "a b".into()],
            env,
            cores,
            venv: None,
            kv_secret: None,
            url: "http://h:1".into(),
            ssh_options: Vec::new(),
            stop_last: false,
            start_after: Vec::new(),
        }
    }

    #[test]
    fn the_program_is_execed_so_the_pid_is_its_own() {
        let plain = launch_of(Vec::new(), Vec::new());
        assert_eq!(exec_line(&plain), "exec /opt/tandem serve --kv-host 'a b'");
        let pinned = launch_of(vec![("K".into(), "v w".into())], vec![0, 2]);
        assert_eq!(
            exec_line(&pinned),
            "exec taskset -c 0,2 env 'K=v w' /opt/tandem serve --kv-host 'a b'"
        );
        let mut venv = plain.clone();
        venv.venv = Some("/home/me/env".into());
        assert!(exec_line(&venv).starts_with(". /home/me/env/bin/activate && exec "));
    }

    #[test]
    fn names_become_file_names() {
        assert_eq!(file_name("prefill 0/x"), "prefill_0_x");
        assert_eq!(file_name("decode-1.a"), "decode-1.a");
    }

    fn valid_sh(script: &str) {
        let checked = Command::new("sh").args(["-n", "-c", script]).status();
        assert!(checked.is_ok_and(|s| s.success()), "{script}");
    }

    #[test]
    fn every_script_is_valid_sh() {
        for reads_secret in [false, true] {
            valid_sh(&start_script(
                "w",
                &exec_line(&launch_of(Vec::new(), Vec::new())),
                reads_secret,
            ));
        }
        let process = RemoteProcess {
            ssh: Ssh::new("me@h", &[]),
            file: "w".into(),
            dir: "/tmp/tandem-abc".into(),
            pid: 42,
            start_time: "-".into(),
            pgid: Some(42),
            follower: None,
            last_probe: None,
            exit: None,
        };
        valid_sh(&process.stop_script(Duration::from_secs(15)));
        valid_sh(&process.probe_script());
        assert!(
            process
                .stop_script(Duration::from_secs(15))
                .contains("-ge 150 ]")
        );
    }
}
