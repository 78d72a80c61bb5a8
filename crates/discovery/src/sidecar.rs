//! Registering a worker that does not speak etcd (vLLM, any OpenAI-compatible
//! server): the key lives while the worker's health check passes. Registered after
//! `rise` passing checks in a row, deregistered after `fall` failing ones, and on
//! stop; a worker that hangs loses its key within `fall` checks, one that crashes
//! with the sidecar within the lease's TTL.

use std::future::Future;
use std::time::Duration;

use crate::DiscoveryError;
use crate::record::WorkerRecord;
use crate::registrar::{Registration, RegistrationSettings};

/// How the sidecar checks the worker.
#[derive(Debug, Clone, Copy)]
pub struct HealthPolicy {
    pub interval: Duration,
    /// Passing checks in a row before registering.
    pub rise: u32,
    /// Failing checks in a row before deregistering.
    pub fall: u32,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            rise: 1,
            fall: 3,
        }
    }
}

/// Keeps `record` registered while `probe` passes, until `stop` completes.
pub async fn register_while_healthy<P, F>(
    settings: RegistrationSettings,
    record: WorkerRecord,
    policy: HealthPolicy,
    mut probe: P,
    stop: impl Future<Output = ()>,
) -> Result<(), DiscoveryError>
where
    P: FnMut() -> F,
    F: Future<Output = bool>,
{
    tokio::pin!(stop);
    let mut registration: Option<Registration> = None;
    let (mut passed, mut failed) = (0u32, 0u32);
    loop {
        let healthy = tokio::select! {
            healthy = probe() => healthy,
            () = &mut stop => break,
        };
        if healthy {
            (passed, failed) = (passed.saturating_add(1), 0);
        } else {
            (passed, failed) = (0, failed.saturating_add(1));
        }
        if registration.is_none() && passed >= policy.rise {
            let started = Registration::start(settings.clone(), &record)?;
            tracing::info!(
                worker = record.url,
                key = started.key(),
                "worker healthy: registering"
            );
            registration = Some(started);
        } else if failed >= policy.fall
            && let Some(registered) = registration.take()
        {
            tracing::warn!(
                worker = record.url,
                failed,
                "worker unhealthy: deregistering"
            );
            registered.deregister().await;
        }
        tokio::select! {
            () = tokio::time::sleep(policy.interval) => {}
            () = &mut stop => break,
        }
    }
    if let Some(registered) = registration {
        registered.deregister().await;
    }
    Ok(())
}
