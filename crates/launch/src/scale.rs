//! The online planner's slots under `tandem up`. The router's planner decides; this
//! acts. When the planner asks for a worker (`GET /planner`'s `wanted`), the scaler
//! starts the process of a stopped slot, waits for its health, and adds it to the
//! wanted pool through the admin API (`POST /workers`). When the planner has retired a
//! worker (a `stop_…` verdict carried out: the router no longer sends it anything),
//! the scaler stops that worker's process a little later, and its slot is free again.
//! Slots are the topology's P/D workers, those on `standby` stopped at the start.

use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::plan::{Launch, Slot};
use crate::run;
use crate::secret::{ClusterSecret, SecretError};
use crate::stack::{Stack, StartObserver, StartOptions};
use crate::topology::Checked;

/// The environment variable `tandem route` reads its admin token from.
pub const ADMIN_TOKEN_ENV: &str = "TANDEM_ADMIN_TOKEN";
/// How often the router's planner is asked what it wants.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// A retired worker's process outlives its last request by this much: decode workers
/// may still be pulling the KV of the last prompts it prefilled.
const STOP_AFTER_RETIRED: Duration = Duration::from_secs(5);
/// Each admin API call gives up after this.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error("making the router's admin token: {0}")]
    Token(#[from] SecretError),
    #[error("the router is not among the launches")]
    NoRouter,
}

/// Why an admin API call failed.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{0}")]
    Http(#[from] ureq::Error),
    #[error("the router's answer: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the router answered {status}: {body}")]
    Refused { status: u16, body: String },
}

/// What became of a slot.
#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Stopped,
    Running,
    /// Out of the router since then; its process goes after [`STOP_AFTER_RETIRED`].
    Retired(Instant),
}

/// Starts and stops the topology's workers as the router's planner asks.
pub struct Scaler {
    router: String,
    token: String,
    agent: ureq::Agent,
    slots: Vec<(Slot, State)>,
    /// The journal's entries up to this time (Unix seconds) have been read.
    read_until: f64,
    /// The `since` of the last request for a worker that was answered.
    answered: Option<f64>,
    next_poll: Instant,
}

/// `GET /planner`, the parts the scaler reads.
#[derive(Debug, Deserialize)]
struct PlannerView {
    wanted: Option<Wanted>,
    decisions: Vec<Verdict>,
}

#[derive(Debug, Deserialize)]
struct Wanted {
    role: String,
    since: f64,
}

#[derive(Debug, Deserialize)]
struct Verdict {
    at: f64,
    action: String,
    worker: Option<String>,
    moved: Option<bool>,
}

impl Scaler {
    /// For a topology with standby workers: a scaler for its slots, after giving the
    /// router in `launches` the admin token the scaler calls it with (the one given in
    /// `[router] extra_args`, the router's launch environment or ours, or else a fresh
    /// one).
    pub fn prepare(
        topology: &Checked,
        launches: &mut [Launch],
        slots: Vec<Slot>,
    ) -> Result<Option<Scaler>, ScaleError> {
        if !topology.has_standby() {
            return Ok(None);
        }
        let router = launches
            .iter_mut()
            .find(|l| l.name == "router")
            .ok_or(ScaleError::NoRouter)?;
        let in_env =
            |(name, value): &(String, String)| (name == ADMIN_TOKEN_ENV).then(|| value.clone());
        let given = admin_token_flag(&router.args)
            .or_else(|| router.env.iter().find_map(in_env))
            .or_else(|| {
                std::env::var(ADMIN_TOKEN_ENV)
                    .ok()
                    .filter(|t| !t.is_empty())
            });
        let token = match given {
            Some(token) => token,
            None => {
                let token = ClusterSecret::generate()?.expose().to_owned();
                router.env.push((ADMIN_TOKEN_ENV.into(), token.clone()));
                token
            }
        };
        Ok(Some(Scaler {
            router: router.url.clone(),
            token,
            agent: run::http_agent(CALL_TIMEOUT),
            slots: slots
                .into_iter()
                .map(|slot| {
                    let state = if slot.started {
                        State::Running
                    } else {
                        State::Stopped
                    };
                    (slot, state)
                })
                .collect(),
            read_until: 0.0,
            answered: None,
            next_poll: Instant::now(),
        }))
    }

    /// Does what the planner asked since the last call (at most once a second):
    /// stops retired workers' processes, starts a worker it wants. Problems are
    /// logged, not returned: the topology keeps serving as it is.
    pub fn tick(
        &mut self,
        stack: &mut Stack,
        options: &StartOptions,
        observer: &mut dyn StartObserver,
    ) {
        let now = Instant::now();
        if now < self.next_poll {
            return;
        }
        self.next_poll = now + POLL_EVERY;
        self.stop_retired(stack);
        let view = match self.planner_view() {
            Ok(view) => view,
            Err(err) => {
                tracing::warn!("reading the router's planner: {err}");
                return;
            }
        };
        self.note_retired(&view.decisions);
        if let Some(wanted) = view.wanted
            && self.answered != Some(wanted.since)
        {
            self.answered = Some(wanted.since);
            self.start(&wanted.role, stack, options, observer);
        }
    }

    fn planner_view(&self) -> Result<PlannerView, CallError> {
        let url = format!("{}/planner?since={}", self.router, self.read_until);
        let mut response = self
            .agent
            .get(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .call()?;
        refused(&mut response)?;
        let text = response.body_mut().read_to_string()?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Marks the workers of carried-out `stop_…` verdicts retired.
    fn note_retired(&mut self, decisions: &[Verdict]) {
        for verdict in decisions {
            self.read_until = self.read_until.max(verdict.at);
            let (Some(url), Some(true)) = (&verdict.worker, verdict.moved) else {
                continue;
            };
            if !verdict.action.starts_with("stop_") {
                continue;
            }
            if let Some((_, state)) = self.slots.iter_mut().find(|(s, _)| s.url == *url)
                && *state == State::Running
            {
                *state = State::Retired(Instant::now());
            }
        }
    }

    fn stop_retired(&mut self, stack: &mut Stack) {
        for (slot, state) in &mut self.slots {
            if let State::Retired(at) = *state
                && at.elapsed() >= STOP_AFTER_RETIRED
            {
                stack.stop_one(&slot.launch.url);
                run::print_line(&format!(
                    "{} stopped: the planner retired it",
                    slot.launch.name
                ));
                *state = State::Stopped;
            }
        }
    }

    /// Starts a stopped slot's worker and adds it to `role`'s pool.
    fn start(
        &mut self,
        role: &str,
        stack: &mut Stack,
        options: &StartOptions,
        observer: &mut dyn StartObserver,
    ) {
        let Some(index) = self.slots.iter().position(|(_, s)| *s == State::Stopped) else {
            tracing::warn!(
                role,
                "the planner wants a worker, but every slot's worker is running"
            );
            return;
        };
        let slot = &self.slots[index].0;
        if let Err(err) = stack.start_one(&slot.launch, options, observer) {
            tracing::warn!(
                worker = slot.launch.name,
                "starting a worker for the planner: {err}"
            );
            return;
        }
        match self.add_to_router(slot, role) {
            Ok(()) => {
                run::print_line(&format!(
                    "{} joined the {role} pool: the planner asked for it",
                    slot.launch.name
                ));
                self.slots[index].1 = State::Running;
            }
            Err(err) => {
                tracing::warn!(
                    worker = slot.launch.name,
                    "the router did not take it: {err}"
                );
                stack.stop_one(&slot.launch.url);
            }
        }
    }

    fn add_to_router(&self, slot: &Slot, role: &str) -> Result<(), CallError> {
        let mut body = serde_json::json!({"url": slot.url, "role": role});
        if let Some(endpoint) = &slot.kv_events {
            body["kv_events"] = serde_json::json!({
                "endpoint": endpoint,
                "replay_endpoint": slot.kv_replay,
            });
        }
        let mut response = self
            .agent
            .post(&format!("{}/workers", self.router))
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Content-Type", "application/json")
            .send(body.to_string())?;
        refused(&mut response)
    }
}

/// An unsuccessful answer as an error.
fn refused(response: &mut ureq::http::Response<ureq::Body>) -> Result<(), CallError> {
    if response.status().is_success() {
        return Ok(());
    }
    Err(CallError::Refused {
        status: response.status().as_u16(),
        body: response.body_mut().read_to_string().unwrap_or_default(),
    })
}

/// The value of `--admin-token V` or `--admin-token=V` among `args`.
fn admin_token_flag(args: &[String]) -> Option<String> {
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == "--admin-token" {
            return args.get(i + 1).cloned();
        }
        arg.strip_prefix("--admin-token=").map(str::to_owned)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_token_is_read_from_either_flag_form() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            admin_token_flag(&args(&["route", "--admin-token", "t1"])).as_deref(),
            Some("t1")
        );
        assert_eq!(
            admin_token_flag(&args(&["--admin-token=t2", "--port", "1"])).as_deref(),
            Some("t2")
        );
        assert_eq!(admin_token_flag(&args(&["--port", "1"])), None);
    }
}
