//! The workers' own metrics on the router's `/metrics` (`--federate-worker-metrics`),
//! for clients that scrape one endpoint (aiperf, a Prometheus without service
//! discovery). Each `/metrics` call fetches every listed worker's `/metrics` at once
//! (each within [`SCRAPE_TIMEOUT`] and [`MAX_EXPOSITION_BYTES`]), labels every sample
//! with `worker="<url>"` (a worker's own `worker` label becomes `exported_worker`), and
//! merges the families so each is declared once, as the text format requires.
//! Families the router exports itself are left out, and
//! `tandem_router_federated_up{worker}` says whose metrics came back.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use futures_util::StreamExt;
use tandem_protocol::exposition::{Sample, parse_sample};

/// One worker's `/metrics` must answer within this.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// A worker's exposition larger than this is dropped (and counted as not up).
pub const MAX_EXPOSITION_BYTES: usize = 8 << 20;
/// Whether each worker's metrics were fetched.
pub const FEDERATED_UP: &str = "tandem_router_federated_up";

/// One metric family of an exposition: its `# HELP` and `# TYPE` lines and samples.
#[derive(Debug, Default, Clone, PartialEq)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<Sample>,
}

/// The families of a text exposition, by name, in order of first appearance.
#[derive(Debug, Default)]
struct Exposition {
    order: Vec<String>,
    families: BTreeMap<String, Family>,
}

impl Exposition {
    fn family(&mut self, name: &str) -> &mut Family {
        if !self.families.contains_key(name) {
            self.order.push(name.to_owned());
        }
        self.families.entry(name.to_owned()).or_default()
    }

    /// Adds `worker`'s exposition, each sample labelled with it. Lines that do not
    /// parse are skipped.
    fn add(&mut self, worker: &str, text: &str) {
        let mut current: Option<String> = None;
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                self.family(name)
                    .help
                    .get_or_insert_with(|| help.to_owned());
                current = Some(name.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
                self.family(name)
                    .kind
                    .get_or_insert_with(|| kind.to_owned());
                current = Some(name.to_owned());
            } else if line.is_empty() || line.starts_with('#') {
                continue;
            } else if let Some(mut sample) = parse_sample(line) {
                for (key, _) in &mut sample.labels {
                    if key == "worker" {
                        *key = "exported_worker".into();
                    }
                }
                sample.labels.insert(0, ("worker".into(), quote(worker)));
                let family = match &current {
                    Some(name) if belongs_to(&sample.series, name) => name.clone(),
                    _ => sample.series.clone(),
                };
                self.family(&family).samples.push(sample);
            }
        }
    }

    /// The text format, each family once, leaving out `skip`.
    fn render(&self, skip: &HashSet<String>, out: &mut String) {
        for name in &self.order {
            if skip.contains(name) {
                continue;
            }
            let family = &self.families[name];
            if family.samples.is_empty() {
                continue;
            }
            if let Some(help) = &family.help {
                let _ = writeln!(out, "# HELP {name} {help}");
            }
            if let Some(kind) = &family.kind {
                let _ = writeln!(out, "# TYPE {name} {kind}");
            }
            for sample in &family.samples {
                let labels: Vec<String> = sample
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let _ = writeln!(
                    out,
                    "{}{{{}}} {}",
                    sample.series,
                    labels.join(","),
                    sample.value
                );
            }
        }
    }
}

/// Whether sample `series` belongs to family `name` (a histogram's or summary's
/// `_bucket`, `_sum`, `_count`, a counter's `_total`).
fn belongs_to(series: &str, name: &str) -> bool {
    series == name
        || series.strip_prefix(name).is_some_and(|suffix| {
            matches!(
                suffix,
                "_bucket" | "_sum" | "_count" | "_total" | "_created"
            )
        })
}

/// A value as a quoted label value.
fn quote(value: &str) -> String {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// Fetches one worker's `/metrics` text, bounded in time and size.
pub async fn scrape(client: &reqwest::Client, url: &str) -> Option<String> {
    let fetch = async {
        let response = client.get(format!("{url}/metrics")).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.ok()?;
            if body.len() + chunk.len() > MAX_EXPOSITION_BYTES {
                return None;
            }
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body).ok()
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
        .await
        .ok()
        .flatten()
}

/// The workers' metrics, labelled and merged, followed by whose came back; the
/// router's own families (`own`) are left out.
pub async fn worker_metrics(
    client: &reqwest::Client,
    workers: &[String],
    own: &HashSet<String>,
) -> String {
    let scrapes = workers.iter().map(|url| scrape(client, url));
    let texts = futures_util::future::join_all(scrapes).await;
    let mut merged = Exposition::default();
    let mut up = format!(
        "# HELP {FEDERATED_UP} Whether the worker's /metrics answered the last scrape.\n# TYPE {FEDERATED_UP} gauge\n"
    );
    for (url, text) in workers.iter().zip(&texts) {
        if let Some(text) = text {
            merged.add(url, text);
        }
        let _ = writeln!(
            up,
            "{FEDERATED_UP}{{worker={}}} {}",
            quote(url),
            u8::from(text.is_some())
        );
    }
    let mut out = String::new();
    merged.render(own, &mut out);
    out.push_str(&up);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="llama"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="llama"} 7.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="llama"} 7.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="llama"} 0.25
# HELP odd A label value with a comma, a quote and a worker label.
# TYPE odd gauge
odd{path="a,b \"c\"",worker="inner"} 1 1700000000000
plain 2
"#;

    #[test]
    fn samples_keep_their_families_and_gain_the_worker_label() {
        let mut merged = Exposition::default();
        merged.add("http://a:1", VLLM);
        merged.add("http://b:2", VLLM);
        let mut out = String::new();
        merged.render(&HashSet::new(), &mut out);
        assert_eq!(
            out.matches("# TYPE vllm:time_to_first_token_seconds histogram")
                .count(),
            1
        );
        assert_eq!(
            out.matches("# TYPE vllm:num_requests_running gauge")
                .count(),
            1
        );
        assert!(out.contains(
            "vllm:num_requests_running{worker=\"http://a:1\",engine=\"0\",model_name=\"llama\"} 3.0"
        ), "{out}");
        assert!(out.contains(
            "vllm:time_to_first_token_seconds_bucket{worker=\"http://b:2\",engine=\"0\",le=\"+Inf\",model_name=\"llama\"} 7.0"
        ), "{out}");
        assert!(out.contains(
            "odd{worker=\"http://a:1\",path=\"a,b \\\"c\\\"\",exported_worker=\"inner\"} 1 1700000000000"
        ), "{out}");
        assert!(out.contains("plain{worker=\"http://b:2\"} 2"), "{out}");
        // Both workers' samples of one family are contiguous, after its declaration.
        let family: Vec<&str> = out
            .lines()
            .skip_while(|l| !l.starts_with("# TYPE vllm:num_requests_running"))
            .skip(1)
            .take(2)
            .collect();
        assert!(
            family
                .iter()
                .all(|l| l.starts_with("vllm:num_requests_running{")),
            "{out}"
        );
    }

    #[test]
    fn the_routers_own_families_are_left_out() {
        let mut merged = Exposition::default();
        merged.add("http://a:1", VLLM);
        let own =
            tandem_protocol::exposition::family_names("# TYPE vllm:num_requests_running gauge\n");
        let mut out = String::new();
        merged.render(&own, &mut out);
        assert!(!out.contains("vllm:num_requests_running"), "{out}");
        assert!(
            out.contains("vllm:time_to_first_token_seconds_sum"),
            "{out}"
        );
    }

    fn fixture(role: &str) -> String {
        let path = format!(
            "{}/../protocol/tests/fixtures/vllm-0.26/vllm_metrics_{role}.txt",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(path).unwrap()
    }

    fn samples(text: &str) -> usize {
        text.lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count()
    }

    #[test]
    fn real_vllm_expositions_merge_into_a_valid_one() {
        let (prefill, decode) = (fixture("p"), fixture("d"));
        let mut merged = Exposition::default();
        merged.add("http://p:8100", &prefill);
        merged.add("http://d:8200", &decode);
        let mut out = String::new();
        merged.render(&HashSet::new(), &mut out);
        assert_eq!(samples(&out), samples(&prefill) + samples(&decode));
        // Each family declared once, its samples right after it and named after it.
        let mut declared = HashSet::new();
        let mut current = String::new();
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_owned();
                assert!(declared.insert(current.clone()), "{current} twice");
            } else if !line.starts_with('#') {
                let series = parse_sample(line).unwrap().series;
                assert!(belongs_to(&series, &current), "{series} under {current}");
                assert!(line.contains("{worker=\"http://"), "{line}");
            }
        }
        assert!(
            out.contains("vllm:kv_cache_usage_perc{worker=\"http://d:8200\""),
            "{out}"
        );
    }

    #[test]
    fn broken_lines_are_skipped() {
        let mut merged = Exposition::default();
        merged.add("w", "name{x=1} 2\nok 1\n");
        let mut out = String::new();
        merged.render(&HashSet::new(), &mut out);
        assert_eq!(out.trim(), "ok{worker=\"w\"} 1");
    }
}
