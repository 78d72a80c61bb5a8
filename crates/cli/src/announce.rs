//! The flags that put a worker in etcd (`tandem serve --discovery`, `tandem register`)
//! and the record `tandem serve` announces from what it bound.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tandem_discovery::{EtcdAddress, KvEventsEndpoints, RegistrationSettings, WorkerRole};

/// Where and how a worker registers.
#[derive(Debug, Clone, Args)]
pub struct DiscoveryFlags {
    /// Register in etcd, `etcd://HOST:PORT[,HOST:PORT…]`: routers that watch the
    /// namespace add this worker while its lease lives, and drop it when it stops
    /// (docs/discovery.md).
    #[arg(long, value_name = "etcd://HOST:PORT")]
    pub discovery: Option<String>,
    /// The namespace to register in (`/tandem/<namespace>/workers/…`).
    #[arg(long, default_value = "default")]
    pub discovery_namespace: String,
    /// The role announced: prefill, decode, or both (whole requests).
    #[arg(long, default_value = "both")]
    pub role: WorkerRole,
    /// Seconds etcd keeps the key after the worker's last keep-alive (a crashed
    /// worker leaves routers within this).
    #[arg(long, default_value_t = 10)]
    pub discovery_ttl_secs: u64,
}

impl DiscoveryFlags {
    /// The registration settings, when `--discovery` is given.
    pub fn settings(&self) -> Result<Option<RegistrationSettings>> {
        let Some(address) = &self.discovery else {
            return Ok(None);
        };
        let address = EtcdAddress::parse(address)?;
        tandem_discovery::validate_namespace(&self.discovery_namespace)?;
        Ok(Some(RegistrationSettings {
            address,
            namespace: self.discovery_namespace.clone(),
            ttl: Duration::from_secs(self.discovery_ttl_secs),
        }))
    }
}

/// The host others reach a worker at: `advertised` when given, else the address it
/// binds, or 127.0.0.1 for a wildcard one (the rule of `--kv-host` and
/// `--advertise-host` alike).
pub fn reachable_host(bind: &str, advertised: Option<&str>) -> String {
    let wildcard = bind == "[::]" || bind.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified());
    match advertised {
        Some(host) => host.to_owned(),
        None if wildcard => "127.0.0.1".to_owned(),
        None => bind.to_owned(),
    }
}

/// The KV event endpoints to announce for a `--kv-events-config`: a wildcard bind
/// address becomes `host`. A publisher that connects out (no wildcard: vLLM's rule)
/// is not announced: routers do not dial it.
pub fn kv_events_endpoints(
    endpoint: &str,
    replay: Option<&str>,
    host: &str,
) -> Result<Option<KvEventsEndpoints>> {
    let Some(endpoint) = with_wildcard_replaced(endpoint, host) else {
        return Ok(None);
    };
    let replay_endpoint = replay
        .map(|r| with_wildcard_replaced(r, host).unwrap_or_else(|| r.to_owned()))
        .filter(|r| !r.is_empty());
    Ok(Some(KvEventsEndpoints {
        endpoint,
        replay_endpoint,
    }))
}

/// `tcp://*:P` (or `0.0.0.0`, `[::]`) as `tcp://host:P`; `None` for another host.
fn with_wildcard_replaced(endpoint: &str, host: &str) -> Option<String> {
    let rest = endpoint.strip_prefix("tcp://")?;
    let (bind, port) = rest.rsplit_once(':')?;
    matches!(bind, "*" | "0.0.0.0" | "[::]" | "::").then(|| format!("tcp://{host}:{port}"))
}

/// `http://host:port` with `host` bracketed when it is an IPv6 address.
pub fn http_url(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    }
}

/// The worker's URL given on the command line, checked.
pub fn worker_url(url: &str) -> Result<String> {
    tandem_router::config::normalize_url(url).with_context(|| format!("--url {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_endpoints_are_announced_with_the_reachable_host() {
        let announced = kv_events_endpoints("tcp://*:5557", Some("tcp://*:5558"), "10.0.0.2")
            .unwrap()
            .unwrap();
        assert_eq!(announced.endpoint, "tcp://10.0.0.2:5557");
        assert_eq!(
            announced.replay_endpoint.as_deref(),
            Some("tcp://10.0.0.2:5558")
        );
        let fixed = kv_events_endpoints("tcp://0.0.0.0:1", Some("tcp://10.0.0.9:2"), "h")
            .unwrap()
            .unwrap();
        assert_eq!(fixed.replay_endpoint.as_deref(), Some("tcp://10.0.0.9:2"));
        assert!(
            kv_events_endpoints("tcp://10.0.0.1:5557", None, "h")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn hosts_and_urls() {
        assert_eq!(reachable_host("0.0.0.0", None), "127.0.0.1");
        assert_eq!(reachable_host("0.0.0.0", Some("w1")), "w1");
        assert_eq!(reachable_host("10.1.1.1", None), "10.1.1.1");
        assert_eq!(http_url("::1", 80), "http://[::1]:80");
        assert_eq!(http_url("h", 80), "http://h:80");
    }
}
