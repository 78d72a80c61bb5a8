//! A topology's Prometheus scrape configuration (`tandem up --prometheus-config`):
//! the router and every worker as targets (standby workers too: Prometheus shows
//! them down until the planner starts them), each worker labelled with its name,
//! role and engine so dashboards can split by pool. Workers are scraped directly,
//! which costs the router nothing; `deploy/grafana/tandem.json` reads these series.

use std::fmt::Write as _;

use crate::topology::{Checked, Engine, Role};

/// How often Prometheus scrapes, seconds (short: the dashboards show the last minutes).
pub const SCRAPE_INTERVAL_SECS: u64 = 5;

/// The YAML of a Prometheus configuration that scrapes `topology`.
pub fn scrape_config(topology: &Checked) -> String {
    let mut out = String::from(
        "# Written by `tandem up --prometheus-config` for the topology it started.\n\
         # Run `prometheus --config.file=THIS`, or copy scrape_configs into your own.\n",
    );
    let _ = writeln!(out, "global:\n  scrape_interval: {SCRAPE_INTERVAL_SECS}s");
    out.push_str("scrape_configs:\n");
    let router = &topology.router;
    let router_host = match router.host.as_str() {
        "0.0.0.0" | "::" => "127.0.0.1",
        host => host,
    };
    push_job(
        &mut out,
        "tandem-router",
        &[(
            format!("{}:{}", host_for_target(router_host), router.port),
            Vec::new(),
        )],
    );
    let workers: Vec<(String, Vec<(&str, String)>)> = topology
        .workers
        .iter()
        .map(|worker| {
            let spec = &worker.spec;
            let target = format!("{}:{}", host_for_target(&spec.reach_address()), spec.port);
            let labels = vec![
                ("worker", worker.name.clone()),
                ("role", role_name(spec.role).to_owned()),
                ("engine", engine_name(spec.engine).to_owned()),
                ("standby", spec.standby.to_string()),
            ];
            (target, labels)
        })
        .collect();
    push_job(&mut out, "tandem-workers", &workers);
    out
}

fn push_job(out: &mut String, name: &str, targets: &[(String, Vec<(&str, String)>)]) {
    let _ = writeln!(out, "  - job_name: {}", quoted(name));
    out.push_str("    static_configs:\n");
    for (target, labels) in targets {
        let _ = writeln!(out, "      - targets: [{}]", quoted(target));
        if !labels.is_empty() {
            out.push_str("        labels:\n");
            for (key, value) in labels {
                let _ = writeln!(out, "          {key}: {}", quoted(value));
            }
        }
    }
}

/// An IPv6 address in brackets, as a `host:port` target needs.
fn host_for_target(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// A YAML double-quoted scalar (JSON's string syntax is one).
fn quoted(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Prefill => "prefill",
        Role::Decode => "decode",
        Role::Both => "both",
    }
}

fn engine_name(engine: Engine) -> &'static str {
    match engine {
        Engine::Builtin => "builtin",
        Engine::Vllm => "vllm",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_and_each_worker_are_targets_with_their_roles() {
        let topology = crate::topology::parse(
            r#"
[router]
host = "0.0.0.0"
port = 9000

[[worker]]
engine = "builtin"
role = "prefill"
port = 8100
kv_port = 8101

[[worker]]
name = "d\"0"
engine = "vllm"
role = "decode"
host = "gpu@10.0.0.7"
port = 8200
kv_port = 8201
model = "m"
"#,
            "t",
        )
        .unwrap();
        let yaml = scrape_config(&topology);
        assert!(yaml.contains("- targets: [\"127.0.0.1:9000\"]"), "{yaml}");
        assert!(yaml.contains("- targets: [\"127.0.0.1:8100\"]"), "{yaml}");
        assert!(yaml.contains("- targets: [\"10.0.0.7:8200\"]"), "{yaml}");
        assert!(yaml.contains("worker: \"d\\\"0\""), "{yaml}");
        assert!(
            yaml.contains("role: \"decode\"\n          engine: \"vllm\""),
            "{yaml}"
        );
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(host_for_target("::1"), "[::1]");
        assert_eq!(host_for_target("10.0.0.1"), "10.0.0.1");
    }

    /// The example in `deploy/` is this function's output for the 1P1D example.
    #[test]
    fn the_deploy_example_is_current() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
        let topology = crate::topology::load(std::path::Path::new(&format!(
            "{root}/topologies/builtin-1p1d.toml"
        )))
        .unwrap();
        let example = std::fs::read_to_string(format!("{root}/deploy/prometheus.yml")).unwrap();
        assert_eq!(
            example,
            scrape_config(&topology),
            "regenerate: tandem up topologies/builtin-1p1d.toml --prometheus-config deploy/prometheus.yml --dry-run"
        );
    }
}
