//! Following a namespace: list it once, then watch from the listing's revision, and
//! hand each added, changed or removed worker on as a [`Change`]. After a broken
//! connection the watch resumes from the revision after the last one seen, so no put
//! or delete is missed; when etcd has compacted that revision away, the namespace is
//! listed again and compared with what was known. While etcd is away nothing is
//! removed: workers keep serving, and their keys are still there when etcd is back
//! (etcd extends leases across its own restart).

use std::collections::HashMap;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::record::{WorkerRecord, namespace_prefix};
use crate::{DiscoveryError, EtcdAddress, validate_namespace, within};

/// A worker appeared, changed or went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new instance, or a known one whose record changed.
    Upsert {
        instance: String,
        record: WorkerRecord,
    },
    Remove {
        instance: String,
    },
}

/// The namespace's workers as last seen; turns listings and events into changes.
#[derive(Debug)]
pub struct Membership {
    prefix: String,
    known: HashMap<String, WorkerRecord>,
}

impl Membership {
    pub fn new(namespace: &str) -> Self {
        Self {
            prefix: namespace_prefix(namespace),
            known: HashMap::new(),
        }
    }

    /// The instance a key names, if it is one of this namespace's worker keys.
    fn instance<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        let key = std::str::from_utf8(key).ok()?;
        let instance = key.strip_prefix(self.prefix.as_str())?;
        let valid = !instance.is_empty()
            && instance.len() <= 64
            && instance
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        valid.then_some(instance)
    }

    fn record(key: &str, value: &[u8]) -> Option<WorkerRecord> {
        match serde_json::from_slice(value) {
            Ok(record) => Some(record),
            Err(err) => {
                tracing::warn!(key, %err, "ignoring a worker key whose value is not a record");
                None
            }
        }
    }

    /// A key was put: a change unless the record is the same as known.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Option<Change> {
        let instance = self.instance(key)?.to_owned();
        let Some(record) = Self::record(&instance, value) else {
            // An unreadable value replaces a readable one: the worker is gone as far
            // as routing goes.
            return self.delete(key);
        };
        if self.known.get(&instance) == Some(&record) {
            return None;
        }
        self.known.insert(instance.clone(), record.clone());
        Some(Change::Upsert { instance, record })
    }

    /// A key was deleted (or its lease expired).
    pub fn delete(&mut self, key: &[u8]) -> Option<Change> {
        let instance = self.instance(key)?.to_owned();
        self.known
            .remove(&instance)
            .map(|_| Change::Remove { instance })
    }

    /// A full listing: the changes that bring what was known to it.
    pub fn relist<'a>(
        &mut self,
        listing: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Vec<Change> {
        let mut seen = std::collections::HashSet::new();
        let mut changes = Vec::new();
        for (key, value) in listing {
            if let Some(instance) = self.instance(key) {
                seen.insert(instance.to_owned());
            }
            changes.extend(self.put(key, value));
        }
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|instance| !seen.contains(*instance))
            .cloned()
            .collect();
        for instance in gone {
            self.known.remove(&instance);
            changes.push(Change::Remove { instance });
        }
        changes
    }

    /// How many workers are known.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Follows `namespace` until `changes` is closed, sending every change in order.
pub fn watch_workers(
    address: EtcdAddress,
    namespace: &str,
    changes: mpsc::Sender<Change>,
) -> Result<JoinHandle<()>, DiscoveryError> {
    validate_namespace(namespace)?;
    let follower = Follower {
        address,
        prefix: namespace_prefix(namespace),
        membership: Membership::new(namespace),
        next_revision: None,
        changes,
        backoff: MIN_BACKOFF,
        warned: false,
    };
    Ok(tokio::spawn(follower.run()))
}

/// Why following stopped.
enum Stop {
    /// The receiver is gone: stop for good.
    Closed,
    /// Reconnect (and relist, when `next_revision` was cleared).
    Retry(DiscoveryError),
}

impl From<DiscoveryError> for Stop {
    fn from(err: DiscoveryError) -> Self {
        Stop::Retry(err)
    }
}

struct Follower {
    address: EtcdAddress,
    prefix: String,
    membership: Membership,
    /// The revision to watch from; `None`: list first.
    next_revision: Option<i64>,
    changes: mpsc::Sender<Change>,
    backoff: Duration,
    /// A lost watch was reported and not yet its return.
    warned: bool,
}

impl Follower {
    async fn run(mut self) {
        loop {
            match self.follow().await {
                Stop::Closed => return,
                Stop::Retry(err) => {
                    if !self.warned {
                        tracing::warn!(%err, "lost the etcd watch; reconnecting");
                        self.warned = true;
                    }
                }
            }
            if self.next_revision.is_none() {
                // Compacted: relist at once.
                continue;
            }
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            if self.changes.is_closed() {
                return;
            }
        }
    }

    /// The watch works again: short backoff next time, and say so once.
    fn restored(&mut self) {
        self.backoff = MIN_BACKOFF;
        if std::mem::take(&mut self.warned) {
            tracing::info!(prefix = self.prefix, "etcd watch restored");
        }
    }

    async fn send(&self, changes: Vec<Change>) -> Result<(), Stop> {
        for change in changes {
            self.changes.send(change).await.map_err(|_| Stop::Closed)?;
        }
        Ok(())
    }

    /// Lists if needed, then watches; returns when the watch breaks.
    async fn follow(&mut self) -> Stop {
        match self.list_and_watch().await {
            Ok(never) => match never {},
            Err(stop) => stop,
        }
    }

    async fn list_and_watch(&mut self) -> Result<std::convert::Infallible, Stop> {
        let mut client = self.address.connect().await?;
        let next = match self.next_revision {
            Some(next) => next,
            None => {
                let options = GetOptions::new().with_prefix();
                let listing = within(client.get(self.prefix.clone(), Some(options))).await?;
                let revision = listing.header().map_or(0, |h| h.revision());
                let pairs = listing.kvs().iter().map(|kv| (kv.key(), kv.value()));
                let changes = self.membership.relist(pairs);
                self.send(changes).await?;
                self.next_revision = Some(revision + 1);
                revision + 1
            }
        };
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(next)
            .with_progress_notify();
        let mut stream = within(client.watch(self.prefix.clone(), Some(options))).await?;
        tracing::info!(prefix = self.prefix, revision = next, "watching etcd");
        loop {
            let response = stream
                .message()
                .await
                .map_err(DiscoveryError::from)?
                .ok_or_else(|| DiscoveryError::Protocol("the watch stream ended".into()))?;
            if response.compact_revision() > 0 {
                self.next_revision = None;
                return Err(Stop::Retry(DiscoveryError::Protocol(format!(
                    "revision {next} was compacted (now {}): listing again",
                    response.compact_revision()
                ))));
            }
            if response.canceled() {
                return Err(Stop::Retry(DiscoveryError::Protocol(format!(
                    "etcd cancelled the watch: {}",
                    response.cancel_reason()
                ))));
            }
            self.restored();
            let mut changes = Vec::new();
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                changes.extend(match event.event_type() {
                    EventType::Put => self.membership.put(kv.key(), kv.value()),
                    EventType::Delete => self.membership.delete(kv.key()),
                });
                self.next_revision = Some(kv.mod_revision() + 1);
            }
            if response.events().is_empty()
                && let Some(header) = response.header()
            {
                // A progress notification: everything up to here has been sent.
                let seen = header.revision() + 1;
                self.next_revision = self.next_revision.map(|n| n.max(seen));
            }
            self.send(changes).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{WorkerRole, worker_key};

    fn record(url: &str, role: WorkerRole) -> Vec<u8> {
        serde_json::to_vec(&WorkerRecord {
            url: url.into(),
            role,
            model: "m".into(),
            engine: "tandem".into(),
            engine_id: None,
            kv_handoff: None,
            kv_events: None,
            capacity: None,
        })
        .unwrap()
    }

    #[test]
    fn puts_and_deletes_become_changes_once() {
        let mut m = Membership::new("ns");
        let key = worker_key("ns", "a1");
        let a = record("http://a:1", WorkerRole::Both);
        assert!(matches!(
            m.put(key.as_bytes(), &a),
            Some(Change::Upsert { .. })
        ));
        assert_eq!(m.put(key.as_bytes(), &a), None, "the same record again");
        let moved = record("http://a:1", WorkerRole::Decode);
        assert!(matches!(
            m.put(key.as_bytes(), &moved),
            Some(Change::Upsert { .. })
        ));
        assert_eq!(
            m.delete(key.as_bytes()),
            Some(Change::Remove {
                instance: "a1".into()
            })
        );
        assert_eq!(m.delete(key.as_bytes()), None);
    }

    #[test]
    fn foreign_keys_and_bad_values_are_ignored() {
        let mut m = Membership::new("ns");
        let a = record("http://a:1", WorkerRole::Both);
        assert_eq!(m.put(worker_key("other", "a1").as_bytes(), &a), None);
        assert_eq!(m.put(b"/tandem/ns/workers/a/b", &a), None);
        assert_eq!(m.put(b"/tandem/ns/workers/", &a), None);
        let key = worker_key("ns", "a1");
        assert_eq!(m.put(key.as_bytes(), b"{not json"), None);
        m.put(key.as_bytes(), &a).unwrap();
        // A readable record turned unreadable is a removal.
        assert!(matches!(
            m.put(key.as_bytes(), b"[]"),
            Some(Change::Remove { .. })
        ));
        assert!(m.is_empty());
    }

    #[test]
    fn a_relisting_adds_updates_and_removes() {
        let mut m = Membership::new("ns");
        let (ka, kb, kc) = (
            worker_key("ns", "a"),
            worker_key("ns", "b"),
            worker_key("ns", "c"),
        );
        let a = record("http://a:1", WorkerRole::Prefill);
        let b = record("http://b:1", WorkerRole::Decode);
        m.put(ka.as_bytes(), &a);
        m.put(kb.as_bytes(), &b);
        let b2 = record("http://b:2", WorkerRole::Decode);
        let c = record("http://c:1", WorkerRole::Decode);
        let changes = m.relist([
            (kb.as_bytes(), b2.as_slice()),
            (kc.as_bytes(), c.as_slice()),
        ]);
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert!(changes.contains(&Change::Remove {
            instance: "a".into()
        }));
        assert_eq!(m.len(), 2);
        assert!(
            m.relist([
                (kb.as_bytes(), b2.as_slice()),
                (kc.as_bytes(), c.as_slice())
            ])
            .is_empty()
        );
    }
}
