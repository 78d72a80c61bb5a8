//! Keeping one worker's key alive: a lease with a TTL, the record put under it, and
//! keep-alives every third of the TTL. When etcd goes away the worker keeps serving
//! and the registrar retries (with backoff) until it can grant a new lease and put the
//! record again; when the lease is found expired, likewise. Deregistering revokes the
//! lease, which deletes the key at once.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::record::{WorkerRecord, new_instance_id, worker_key};
use crate::{CALL_TIMEOUT, DiscoveryError, EtcdAddress, validate_namespace, within};

/// Where and how long a registration lives.
#[derive(Debug, Clone)]
pub struct RegistrationSettings {
    pub address: EtcdAddress,
    pub namespace: String,
    /// The lease's TTL: how long after the worker's last keep-alive its key goes.
    pub ttl: Duration,
}

/// Shortest TTL: keep-alives go every third of it, and etcd itself refuses less
/// than its minimum (a few seconds with default settings).
pub const MIN_TTL: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A worker's registration, kept alive by a background task until
/// [`Registration::deregister`] (or until dropped, when the key expires with the TTL).
#[derive(Debug)]
pub struct Registration {
    key: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<bool>,
}

impl Registration {
    /// Starts registering `record` (at once, then whenever the key is lost). Needs a
    /// tokio runtime; does not wait for etcd.
    pub fn start(
        settings: RegistrationSettings,
        record: &WorkerRecord,
    ) -> Result<Self, DiscoveryError> {
        validate_namespace(&settings.namespace)?;
        if settings.ttl < MIN_TTL {
            return Err(DiscoveryError::Protocol(format!(
                "a lease TTL of {:?} is below the minimum {MIN_TTL:?}",
                settings.ttl
            )));
        }
        let key = worker_key(&settings.namespace, &new_instance_id());
        let value =
            serde_json::to_vec(record).map_err(|e| DiscoveryError::Protocol(e.to_string()))?;
        let (stop, stop_rx) = watch::channel(false);
        let keeper = Keeper {
            settings,
            key: key.clone(),
            value,
            lease: AtomicI64::new(0),
        };
        let task = tokio::spawn(keeper.run(stop_rx));
        Ok(Self { key, stop, task })
    }

    /// The worker's key in etcd.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Stops the keep-alives and revokes the lease, so that routers drop the worker
    /// now rather than after the TTL; whether the key is gone now. Bounded: etcd being
    /// away costs at most a few seconds, after which the key expires on its own.
    pub async fn deregister(self) -> bool {
        let _ = self.stop.send(true);
        let limit = CALL_TIMEOUT * 2 + crate::CONNECT_TIMEOUT;
        match tokio::time::timeout(limit, self.task).await {
            Ok(Ok(revoked)) => revoked,
            Ok(Err(_)) => false,
            Err(_) => {
                tracing::warn!(
                    key = self.key,
                    "deregistration timed out; the key expires with its lease"
                );
                false
            }
        }
    }
}

/// The background task's state.
struct Keeper {
    settings: RegistrationSettings,
    key: String,
    value: Vec<u8>,
    /// The current lease (0: none).
    lease: AtomicI64,
}

impl Keeper {
    /// Registers until stopped; then whether the key is gone (revoked, or never put).
    async fn run(self, mut stop: watch::Receiver<bool>) -> bool {
        let mut backoff = Duration::from_millis(100);
        let mut warned = false;
        loop {
            // Set once the key is put: a later failure lost a key, not never had one.
            let mut registered = false;
            let attempt = tokio::select! {
                result = self.register_and_keep_alive(&mut registered) => result,
                _ = stop.wait_for(|s| *s) => break,
            };
            if registered {
                backoff = Duration::from_millis(100);
                warned = false;
            }
            if let Err(err) = attempt
                && !warned
            {
                tracing::warn!(key = self.key, %err, "not registered in etcd; retrying");
                warned = true;
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        self.revoke().await
    }

    /// Grants a lease, puts the record under it and keeps it alive; returns only on
    /// failure (etcd away, lease expired).
    async fn register_and_keep_alive(&self, registered: &mut bool) -> Result<(), DiscoveryError> {
        let mut client = self.settings.address.connect().await?;
        let ttl = i64::try_from(self.settings.ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = within(client.lease_grant(ttl, None)).await?.id();
        self.lease.store(lease, Ordering::Relaxed);
        let options = PutOptions::new().with_lease(lease);
        within(client.put(self.key.clone(), self.value.clone(), Some(options))).await?;
        let (mut keeper, mut responses) = within(client.lease_keep_alive(lease)).await?;
        *registered = true;
        tracing::info!(key = self.key, lease, "registered in etcd");
        let interval = self.settings.ttl / 3;
        loop {
            tokio::time::sleep(interval).await;
            within(keeper.keep_alive()).await?;
            let answer = within(responses.message())
                .await?
                .ok_or_else(|| DiscoveryError::Protocol("the keep-alive stream ended".into()))?;
            if answer.ttl() <= 0 {
                return Err(DiscoveryError::Protocol(format!("lease {lease} expired")));
            }
        }
    }

    /// Revokes the current lease, if any (its key goes with it); whether the key is
    /// gone.
    async fn revoke(&self) -> bool {
        let lease = self.lease.swap(0, Ordering::Relaxed);
        if lease == 0 {
            return true;
        }
        let revoked = async {
            let mut client: Client = self.settings.address.connect().await?;
            within(client.lease_revoke(lease)).await?;
            Ok::<_, DiscoveryError>(())
        }
        .await;
        match revoked {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(key = self.key, %err, "could not revoke the lease; the key expires with it");
                false
            }
        }
    }
}
