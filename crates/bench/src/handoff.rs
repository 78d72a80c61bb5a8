//! What the KV hand-off moved during a run, as the workers that pull it count it on
//! their `/metrics`: tandem's `tandem:kv_transfer_*` and vLLM's NixlConnector
//! `vllm:nixl_*` alike, so a comparison reports both engines' hand-offs the same way.
//! The counters are read from every worker before and after a run; the difference is
//! the run's.

use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use tandem_protocol::exposition;

/// One worker's `/metrics` must answer within this.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// An exposition larger than this is refused.
const MAX_EXPOSITION_BYTES: usize = 8 << 20;

/// Where each engine counts its pulls: received bytes, and a histogram of one pull's
/// seconds (its `_count` is the number of pulls).
struct Series {
    bytes: &'static str,
    bytes_labels: &'static [(&'static str, &'static str)],
    seconds: &'static str,
}

const ENGINES: [Series; 2] = [
    Series {
        bytes: "tandem:kv_transfer_bytes_total",
        bytes_labels: &[("direction", "received")],
        seconds: "tandem:kv_transfer_seconds",
    },
    Series {
        bytes: "vllm:nixl_bytes_transferred_sum",
        bytes_labels: &[],
        seconds: "vllm:nixl_xfer_time_seconds",
    },
];

/// The hand-off counters of one or more workers at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    pub bytes: f64,
    pub transfers: f64,
    pub seconds: f64,
}

impl Counters {
    /// The counters in one worker's exposition (zero where it has none: a worker
    /// that never pulled, or a replica).
    pub fn read(text: &str) -> Counters {
        let value = |name: &str, labels: &[(&str, &str)]| {
            exposition::sum(text, name, labels).unwrap_or(0.0)
        };
        ENGINES.iter().fold(Counters::default(), |total, engine| {
            let (count, sum) = (
                format!("{}_count", engine.seconds),
                format!("{}_sum", engine.seconds),
            );
            Counters {
                bytes: total.bytes + value(engine.bytes, engine.bytes_labels),
                transfers: total.transfers + value(&count, &[]),
                seconds: total.seconds + value(&sum, &[]),
            }
        })
    }

    fn plus(self, other: Counters) -> Counters {
        Counters {
            bytes: self.bytes + other.bytes,
            transfers: self.transfers + other.transfers,
            seconds: self.seconds + other.seconds,
        }
    }
}

/// The hand-offs of one run, summed over the workers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Handoff {
    /// Pulls that finished (vLLM: NIXL transfers).
    pub transfers: u64,
    pub bytes: u64,
    /// The pulls' own durations added up (on the pulling side, from its start to done).
    pub transfer_seconds: f64,
}

impl Handoff {
    /// What happened between two readings; `None` if a counter went backwards (a
    /// worker restarted in between).
    pub fn between(before: Counters, after: Counters) -> Option<Handoff> {
        let grew = after.bytes >= before.bytes
            && after.transfers >= before.transfers
            && after.seconds >= before.seconds;
        grew.then(|| Handoff {
            transfers: (after.transfers - before.transfers).round() as u64,
            bytes: (after.bytes - before.bytes).round() as u64,
            transfer_seconds: after.seconds - before.seconds,
        })
    }

    /// Mean seconds of one transfer.
    pub fn mean_transfer_seconds(&self) -> Option<f64> {
        (self.transfers > 0).then(|| self.transfer_seconds / self.transfers as f64)
    }

    /// Bytes per second while transferring (bytes over the transfers' summed time).
    pub fn bytes_per_second(&self) -> Option<f64> {
        (self.transfer_seconds > 0.0).then(|| self.bytes as f64 / self.transfer_seconds)
    }
}

/// Why the workers' counters could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{url}/metrics: {reason}")]
pub struct ScrapeError {
    pub url: String,
    pub reason: String,
}

/// The summed counters of every worker at `urls` (base URLs); an error if any of them
/// does not answer, since a missing worker would make the run's figures too small.
pub async fn read_all(client: &reqwest::Client, urls: &[String]) -> Result<Counters, ScrapeError> {
    let texts = futures_util::future::join_all(urls.iter().map(|url| scrape(client, url))).await;
    let mut total = Counters::default();
    for text in texts {
        total = total.plus(Counters::read(&text?));
    }
    Ok(total)
}

async fn scrape(client: &reqwest::Client, url: &str) -> Result<String, ScrapeError> {
    let failed = |reason: String| ScrapeError {
        url: url.to_owned(),
        reason,
    };
    let fetch = async {
        let response = client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .map_err(|e| failed(e.to_string()))?;
        if !response.status().is_success() {
            return Err(failed(format!("status {}", response.status())));
        }
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| failed(e.to_string()))?;
            if body.len() + chunk.len() > MAX_EXPOSITION_BYTES {
                return Err(failed(format!("larger than {MAX_EXPOSITION_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body).map_err(|_| failed("not UTF-8".into()))
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
        .await
        .map_err(|_| failed(format!("no answer within {SCRAPE_TIMEOUT:?}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(role: &str) -> String {
        let path = format!(
            "{}/../protocol/tests/fixtures/vllm-0.26/vllm_metrics_{role}.txt",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn vllm_decode_workers_count_nixl_reads() {
        // Recorded from vLLM 0.26: the decode instance after one P/D request.
        let decode = Counters::read(&fixture("d"));
        assert_eq!(decode.bytes, 8_388_608.0);
        assert_eq!(decode.transfers, 1.0);
        assert!((decode.seconds - 0.026921).abs() < 1e-9);
        let prefill = Counters::read(&fixture("p"));
        assert_eq!(prefill.transfers, 0.0);
    }

    #[test]
    fn tandem_workers_count_received_bytes_only() {
        let text = "\
# TYPE tandem:kv_transfer_bytes_total counter
tandem:kv_transfer_bytes_total{direction=\"received\"} 1000
tandem:kv_transfer_bytes_total{direction=\"sent\"} 5000
# TYPE tandem:kv_transfer_seconds summary
tandem:kv_transfer_seconds{quantile=\"0.5\"} 0.01
tandem:kv_transfer_seconds_sum 0.5
tandem:kv_transfer_seconds_count 4
";
        let counters = Counters::read(text);
        assert_eq!(
            counters,
            Counters {
                bytes: 1000.0,
                transfers: 4.0,
                seconds: 0.5
            }
        );
    }

    #[test]
    fn a_run_is_the_difference_and_a_restart_voids_it() {
        let before = Counters {
            bytes: 100.0,
            transfers: 1.0,
            seconds: 0.1,
        };
        let after = Counters {
            bytes: 4_100.0,
            transfers: 3.0,
            seconds: 0.5,
        };
        let run = Handoff::between(before, after).unwrap();
        assert_eq!((run.transfers, run.bytes), (2, 4_000));
        assert!((run.mean_transfer_seconds().unwrap() - 0.2).abs() < 1e-9);
        assert!((run.bytes_per_second().unwrap() - 10_000.0).abs() < 1e-6);
        assert_eq!(Handoff::between(after, before), None);
        let idle = Handoff::between(before, before).unwrap();
        assert_eq!(idle.mean_transfer_seconds(), None);
        assert_eq!(idle.bytes_per_second(), None);
    }
}
