//! Turning per-request records into `vllm bench serve`'s metrics (reference §3.3):
//! TTFT, TPOT, ITL and end-to-end latency distributions (mean, median, std, and
//! percentiles interpolated as `numpy.percentile` does), throughputs and goodput.
//! Failed requests stay in the report's counts; they add no latencies.

use serde::Serialize;

/// What one request produced.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestRecord {
    pub ok: bool,
    pub error: Option<String>,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Seconds from sending to the first chunk with choices.
    pub ttft: f64,
    /// Seconds between consecutive chunks with choices.
    pub itls: Vec<f64>,
    /// Seconds from sending to the last chunk counted (vLLM's `latency`).
    pub latency: f64,
    /// Seconds from the start of the run to sending.
    pub start: f64,
    /// The generated text (what a conversation's next turn builds on).
    #[serde(skip)]
    pub text: String,
}

impl RequestRecord {
    /// vLLM's TPOT: `(latency − ttft) / (output_len − 1)`, for outputs of 2+ tokens.
    pub fn tpot(&self) -> Option<f64> {
        (self.output_tokens > 1)
            .then(|| (self.latency - self.ttft) / (self.output_tokens - 1) as f64)
    }
}

/// Mean, median, std and percentiles of one metric, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Distribution {
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    /// `(p, value)` for each requested percentile.
    pub percentiles: Vec<(f64, f64)>,
}

/// `numpy.percentile` with its default linear interpolation; `sorted` ascending.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64)
}

/// The distribution of `values` (seconds), reported in milliseconds; zeros when empty
/// (as numpy's `nan` would be unhelpful in a table).
pub fn distribution(values: &[f64], percentiles: &[f64]) -> Distribution {
    let mut sorted: Vec<f64> = values.iter().map(|v| v * 1e3).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mean = if sorted.is_empty() {
        0.0
    } else {
        sorted.iter().sum::<f64>() / n
    };
    let std = if sorted.is_empty() {
        0.0
    } else {
        (sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt()
    };
    Distribution {
        mean,
        median: percentile(&sorted, 50.0),
        std,
        percentiles: percentiles
            .iter()
            .map(|&p| (p, percentile(&sorted, p)))
            .collect(),
    }
}

/// Service-level objectives in milliseconds (`--goodput ttft:MS tpot:MS e2el:MS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2el_ms: Option<f64>,
}

/// A goodput SLO that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("goodput `{item}`: {problem}")]
pub struct SloError {
    item: String,
    problem: String,
}

impl Slo {
    /// Parses `ttft:500 tpot:50 …`.
    pub fn parse(items: &[String]) -> Result<Self, SloError> {
        let mut slo = Slo::default();
        for item in items {
            let error = |problem: String| SloError {
                item: item.clone(),
                problem,
            };
            let (key, value) = item
                .split_once(':')
                .ok_or_else(|| error("expected KEY:MILLISECONDS".into()))?;
            let ms: f64 = value
                .parse()
                .ok()
                .filter(|v: &f64| *v >= 0.0)
                .ok_or_else(|| error(format!("{value} is not a non-negative number")))?;
            match key {
                "ttft" => slo.ttft_ms = Some(ms),
                "tpot" => slo.tpot_ms = Some(ms),
                "e2el" => slo.e2el_ms = Some(ms),
                other => return Err(error(format!("`{other}`: the keys are ttft, tpot, e2el"))),
            }
        }
        Ok(slo)
    }

    /// vLLM's rule: good iff every given SLO ≥ the measured value (TPOT 0 for 1 token).
    pub fn met_by(&self, record: &RequestRecord) -> bool {
        let within = |slo: Option<f64>, seconds: f64| slo.is_none_or(|ms| ms >= seconds * 1e3);
        within(self.ttft_ms, record.ttft)
            && within(self.tpot_ms, record.tpot().unwrap_or(0.0))
            && within(self.e2el_ms, record.latency)
    }
}

/// A run's results, with `vllm bench serve`'s meanings.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub duration: f64,
    pub completed: usize,
    pub failed: usize,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub request_goodput: Option<f64>,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft: Distribution,
    pub tpot: Distribution,
    pub itl: Distribution,
    pub e2el: Distribution,
}

pub fn summarize(
    records: &[RequestRecord],
    duration: f64,
    percentiles: &[f64],
    slo: Option<&Slo>,
) -> Summary {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok).collect();
    let input: usize = ok.iter().map(|r| r.prompt_tokens).sum();
    let output: usize = ok.iter().map(|r| r.output_tokens).sum();
    let per_second = |count: f64| {
        if duration > 0.0 {
            count / duration
        } else {
            0.0
        }
    };
    let ttfts: Vec<f64> = ok.iter().map(|r| r.ttft).collect();
    let tpots: Vec<f64> = ok.iter().filter_map(|r| r.tpot()).collect();
    let itls: Vec<f64> = ok.iter().flat_map(|r| r.itls.iter().copied()).collect();
    let latencies: Vec<f64> = ok.iter().map(|r| r.latency).collect();
    Summary {
        duration,
        completed: ok.len(),
        failed: records.len() - ok.len(),
        total_input_tokens: input,
        total_output_tokens: output,
        request_throughput: per_second(ok.len() as f64),
        request_goodput: slo
            .map(|slo| per_second(ok.iter().filter(|r| slo.met_by(r)).count() as f64)),
        output_throughput: per_second(output as f64),
        total_token_throughput: per_second((input + output) as f64),
        ttft: distribution(&ttfts, percentiles),
        tpot: distribution(&tpots, percentiles),
        itl: distribution(&itls, percentiles),
        e2el: distribution(&latencies, percentiles),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_as_numpy() {
        // numpy.percentile([1, 2, 3, 4, 10], [50, 90, 99]) = [3.0, 7.6, 9.76]
        let sorted = [1.0, 2.0, 3.0, 4.0, 10.0];
        assert_eq!(percentile(&sorted, 50.0), 3.0);
        assert!((percentile(&sorted, 90.0) - 7.6).abs() < 1e-12);
        assert!((percentile(&sorted, 99.0) - 9.76).abs() < 1e-12);
        // numpy.std([1, 2, 3, 4, 10]) = 3.1622776601683795 (population std)
        let d = distribution(&[0.001, 0.002, 0.003, 0.004, 0.010], &[99.0]);
        assert!((d.std - 3.1622776601683795).abs() < 1e-9);
        assert!((d.mean - 4.0).abs() < 1e-12);
    }

    fn record(ttft: f64, latency: f64, output: usize) -> RequestRecord {
        RequestRecord {
            ok: true,
            prompt_tokens: 10,
            output_tokens: output,
            ttft,
            latency,
            itls: vec![(latency - ttft) / output.max(2) as f64; output.saturating_sub(1)],
            ..Default::default()
        }
    }

    #[test]
    fn failures_count_but_add_no_latency_and_goodput_follows_slos() {
        let records = vec![
            record(0.1, 1.1, 11), // tpot 100 ms
            record(0.3, 0.8, 6),  // tpot 100 ms, ttft 300 ms
            record(0.1, 0.1, 1),  // one token: tpot counts as 0 for goodput
            RequestRecord {
                error: Some("503".into()),
                ..Default::default()
            },
        ];
        let slo = Slo::parse(&["ttft:200".into(), "tpot:100".into()]).unwrap();
        let s = summarize(&records, 2.0, &[99.0], Some(&slo));
        assert_eq!((s.completed, s.failed), (3, 1));
        assert_eq!(s.total_output_tokens, 18);
        assert_eq!(s.request_throughput, 1.5);
        assert_eq!(s.request_goodput, Some(1.0), "the 300 ms TTFT misses");
        assert_eq!(s.tpot.median, 100.0);
        assert!((s.ttft.mean - 500.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn bad_goodput_specs_are_explained() {
        assert!(
            Slo::parse(&["ttft".into()])
                .unwrap_err()
                .to_string()
                .contains("KEY:MILLISECONDS")
        );
        assert!(
            Slo::parse(&["itl:5".into()])
                .unwrap_err()
                .to_string()
                .contains("ttft, tpot, e2el")
        );
        assert!(Slo::parse(&["ttft:-1".into()]).is_err());
    }
}
