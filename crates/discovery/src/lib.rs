//! Membership in etcd: which workers exist, in which role, where their endpoints are.
//!
//! A worker (or `tandem register`, a sidecar for workers that do not speak etcd:
//! [`sidecar`]) writes one [`WorkerRecord`] under a lease it keeps alive
//! ([`registrar`]); when it
//! stops, crashes or loses etcd for longer than the lease's TTL, the key goes. A
//! router lists and watches the namespace ([`watcher`]) and turns the keys into
//! [`Change`]s for its registry. Key layout and semantics: `docs/discovery.md`.
//!
//! This crate owns the etcd side only (keys, leases, watches, reconnects); what a
//! router does with a worker is the router's business.

pub mod record;
pub mod registrar;
pub mod sidecar;
pub mod watcher;

use std::time::Duration;

pub use record::{Capacity, KvEventsEndpoints, WorkerRecord, WorkerRole};
pub use registrar::{Registration, RegistrationSettings};
pub use sidecar::{HealthPolicy, register_while_healthy};
pub use watcher::{Change, Membership, watch_workers};

/// Longest wait for one etcd call (a grant, a put, a list, a revoke).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 ping interval. etcd closes connections that ping more often than its
/// `--grpc-keepalive-min-time` (5 s by default) with "too many pings".
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Longest wait for a TCP connection to etcd.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What can go wrong with discovery settings or etcd.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("--discovery {0:?}: give etcd://HOST:PORT[,HOST:PORT…]")]
    BadAddress(String),
    #[error("discovery namespace {0:?}: use 1–64 of a-z, 0-9, '-' and '_'")]
    BadNamespace(String),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd: {0}")]
    Protocol(String),
}

/// Where etcd is: `etcd://HOST:PORT[,HOST:PORT…]`, as the client's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdAddress {
    endpoints: Vec<String>,
}

impl EtcdAddress {
    pub fn parse(address: &str) -> Result<Self, DiscoveryError> {
        let bad = || DiscoveryError::BadAddress(address.to_owned());
        let hosts = address.strip_prefix("etcd://").ok_or_else(bad)?;
        let endpoints = hosts
            .split(',')
            .map(|host| {
                let (name, port) = host.rsplit_once(':').ok_or_else(bad)?;
                let name_ok = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
                match port.parse::<u16>() {
                    Ok(port) if port != 0 && name_ok => Ok(format!("http://{name}:{port}")),
                    _ => Err(bad()),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { endpoints })
    }

    /// The client's endpoints (`http://HOST:PORT`).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A client with bounded connects and HTTP/2 keep-alive pings, so that a silent
    /// connection is noticed within [`KEEP_ALIVE`] plus its timeout (calls get their
    /// own [`CALL_TIMEOUT`]; a request timeout on the channel would also cut
    /// long-lived watches).
    pub async fn connect(&self) -> Result<etcd_client::Client, DiscoveryError> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE, Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        within(etcd_client::Client::connect(&self.endpoints, Some(options))).await
    }
}

impl std::fmt::Display for EtcdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://"))
            .collect();
        write!(f, "etcd://{}", hosts.join(","))
    }
}

/// Checks a namespace: it becomes a path segment of every key.
pub fn validate_namespace(namespace: &str) -> Result<(), DiscoveryError> {
    let ok = (1..=64).contains(&namespace.len())
        && namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(DiscoveryError::BadNamespace(namespace.to_owned()))
    }
}

/// `call`, bounded by [`CALL_TIMEOUT`].
async fn within<T>(
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, DiscoveryError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result.map_err(DiscoveryError::from),
        Err(_) => Err(DiscoveryError::Timeout(CALL_TIMEOUT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_name_hosts_and_ports() {
        let one = EtcdAddress::parse("etcd://127.0.0.1:2379").unwrap();
        assert_eq!(one.endpoints(), ["http://127.0.0.1:2379"]);
        assert_eq!(one.to_string(), "etcd://127.0.0.1:2379");
        let three = EtcdAddress::parse("etcd://a:1,b.example:2,[::1]:3").unwrap();
        assert_eq!(three.endpoints().len(), 3);
        for bad in [
            "http://a:1",
            "etcd://",
            "etcd://a",
            "etcd://a:0",
            "etcd://a:x",
            "etcd://a:1,",
            "etcd://a b:1",
            "etcd://u@a:1",
        ] {
            assert!(EtcdAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn namespaces_are_path_safe() {
        validate_namespace("default").unwrap();
        validate_namespace("team-a_2").unwrap();
        for bad in ["", "A", "a/b", "..", &"x".repeat(65)] {
            assert!(validate_namespace(bad).is_err(), "{bad}");
        }
    }
}
