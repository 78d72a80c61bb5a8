//! A run's report: the terminal table (`vllm bench serve`'s layout) and the JSON
//! document (its key names: `request_throughput`, `mean_ttft_ms`, `p99_itl_ms`, …).

use serde_json::{Map, Value, json};

use crate::stats::{Distribution, RequestRecord, Summary};

/// What describes a run besides its results.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub url: String,
    pub endpoint: String,
    pub workload: String,
    pub num_prompts: usize,
    pub request_rate: Option<f64>,
    pub burstiness: f64,
    pub max_concurrency: Option<usize>,
    /// The tokenizer random prompts were drawn in (a path, or `server`), as vllm bench
    /// serve's `tokenizer_id`; `None` for word prompts or fixed datasets.
    pub tokenizer_id: Option<String>,
}

pub fn table(info: &RunInfo, summary: &Summary) -> String {
    let mut lines = vec![
        format!("{:=^60}", " Serving Benchmark Result "),
        row("Endpoint", &format!("{} ({})", info.url, info.endpoint)),
        row("Workload", &info.workload),
        row("Successful requests", &summary.completed.to_string()),
        row("Failed requests", &summary.failed.to_string()),
        row(
            "Benchmark duration (s)",
            &format!("{:.2}", summary.duration),
        ),
        row(
            "Total input tokens",
            &summary.total_input_tokens.to_string(),
        ),
        row(
            "Total generated tokens",
            &summary.total_output_tokens.to_string(),
        ),
        row(
            "Request throughput (req/s)",
            &format!("{:.2}", summary.request_throughput),
        ),
    ];
    if let Some(goodput) = summary.request_goodput {
        lines.push(row("Request goodput (req/s)", &format!("{goodput:.2}")));
    }
    lines.push(row(
        "Output token throughput (tok/s)",
        &format!("{:.2}", summary.output_throughput),
    ));
    lines.push(row(
        "Total token throughput (tok/s)",
        &format!("{:.2}", summary.total_token_throughput),
    ));
    for (title, short, d) in [
        ("Time to First Token", "TTFT", &summary.ttft),
        (
            "Time per Output Token (excl. 1st token)",
            "TPOT",
            &summary.tpot,
        ),
        ("Inter-token Latency", "ITL", &summary.itl),
        ("End-to-end Latency", "E2EL", &summary.e2el),
    ] {
        lines.push(format!("{:-^60}", format!(" {title} ")));
        lines.push(row(
            &format!("Mean {short} (ms)"),
            &format!("{:.2}", d.mean),
        ));
        lines.push(row(
            &format!("Median {short} (ms)"),
            &format!("{:.2}", d.median),
        ));
        lines.push(row(&format!("Std {short} (ms)"), &format!("{:.2}", d.std)));
        for (p, value) in &d.percentiles {
            lines.push(row(
                &format!("P{} {short} (ms)", percent_name(*p)),
                &format!("{value:.2}"),
            ));
        }
    }
    lines.push("=".repeat(60));
    lines.join("\n")
}

/// One run as markdown: the headline figures and the latency percentiles.
pub fn markdown(info: &RunInfo, summary: &Summary) -> String {
    let mut out = format!(
        "### {} against {} ({})\n\n| requests | failed | duration (s) | req/s | output tok/s | goodput (req/s) |\n|---|---|---|---|---|---|\n| {} | {} | {:.2} | {:.2} | {:.2} | {} |\n\n",
        info.workload,
        info.url,
        info.endpoint,
        summary.completed,
        summary.failed,
        summary.duration,
        summary.request_throughput,
        summary.output_throughput,
        summary
            .request_goodput
            .map_or("–".into(), |g| format!("{g:.2}")),
    );
    let header: Vec<String> = summary
        .ttft
        .percentiles
        .iter()
        .map(|(p, _)| format!("p{}", percent_name(*p)))
        .collect();
    out.push_str(&format!(
        "| ms | mean | median | {} |\n",
        header.join(" | ")
    ));
    out.push_str(&format!("|---|---|---|{}\n", "---|".repeat(header.len())));
    for (name, d) in [
        ("TTFT", &summary.ttft),
        ("TPOT", &summary.tpot),
        ("ITL", &summary.itl),
        ("E2EL", &summary.e2el),
    ] {
        let values: Vec<String> = d
            .percentiles
            .iter()
            .map(|(_, v)| format!("{v:.1}"))
            .collect();
        out.push_str(&format!(
            "| {name} | {:.1} | {:.1} | {} |\n",
            d.mean,
            d.median,
            values.join(" | ")
        ));
    }
    out
}

/// A sweep as one table: each point's load, throughput and latency.
pub fn sweep_table(axis: &str, points: &[(f64, Summary)]) -> String {
    let mut lines = vec![format!(
        "| {axis} | req/s | output tok/s | failed | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) |"
    )];
    lines.push("|---|---|---|---|---|---|---|---|".into());
    for (value, s) in points {
        let p = |d: &Distribution, q: f64| {
            d.percentiles
                .iter()
                .find(|(pp, _)| *pp == q)
                .map_or(crate::stats::percentile(&[], q), |(_, v)| *v)
        };
        lines.push(format!(
            "| {value} | {:.2} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            s.request_throughput,
            s.output_throughput,
            s.failed,
            s.ttft.median,
            p(&s.ttft, 99.0),
            s.tpot.median,
            p(&s.tpot, 99.0),
        ));
    }
    lines.join("\n")
}

fn row(label: &str, value: &str) -> String {
    format!("{:<42}{value:>18}", format!("{label}:"))
}

/// `99` → "99", `99.9` → "99.9" (vLLM's key style).
fn percent_name(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as i64)
    } else {
        format!("{p}")
    }
}

/// The JSON document; `detailed` adds the per-request arrays.
pub fn json(info: &RunInfo, summary: &Summary, records: &[RequestRecord], detailed: bool) -> Value {
    let mut doc = Map::new();
    let mut put = |key: &str, value: Value| {
        doc.insert(key.to_owned(), value);
    };
    put("backend", json!("openai"));
    put("base_url", json!(info.url));
    put("endpoint_type", json!(info.endpoint));
    put("workload", json!(info.workload));
    put("tokenizer_id", json!(info.tokenizer_id));
    put("num_prompts", json!(info.num_prompts));
    put(
        "request_rate",
        info.request_rate.map_or(json!("inf"), |r| json!(r)),
    );
    put("burstiness", json!(info.burstiness));
    put("max_concurrency", json!(info.max_concurrency));
    put("duration", json!(summary.duration));
    put("completed", json!(summary.completed));
    put("failed", json!(summary.failed));
    put("total_input_tokens", json!(summary.total_input_tokens));
    put("total_output_tokens", json!(summary.total_output_tokens));
    put("request_throughput", json!(summary.request_throughput));
    put("request_goodput", json!(summary.request_goodput));
    put("output_throughput", json!(summary.output_throughput));
    put(
        "total_token_throughput",
        json!(summary.total_token_throughput),
    );
    for (name, d) in [
        ("ttft", &summary.ttft),
        ("tpot", &summary.tpot),
        ("itl", &summary.itl),
        ("e2el", &summary.e2el),
    ] {
        put_distribution(&mut doc, name, d);
    }
    if detailed {
        doc.insert(
            "input_lens".into(),
            json!(records.iter().map(|r| r.prompt_tokens).collect::<Vec<_>>()),
        );
        doc.insert(
            "output_lens".into(),
            json!(records.iter().map(|r| r.output_tokens).collect::<Vec<_>>()),
        );
        doc.insert(
            "ttfts".into(),
            json!(records.iter().map(|r| r.ttft).collect::<Vec<_>>()),
        );
        doc.insert(
            "itls".into(),
            json!(records.iter().map(|r| r.itls.clone()).collect::<Vec<_>>()),
        );
        // With `ttfts`, `output_lens` and `errors`, what every latency figure is computed
        // from: E2EL is `e2els`, TPOT `(e2el - ttft) / (output_len - 1)` for outputs of
        // 2+ tokens, each over the requests whose `errors` entry is empty.
        doc.insert(
            "e2els".into(),
            json!(records.iter().map(|r| r.latency).collect::<Vec<_>>()),
        );
        doc.insert(
            "start_times".into(),
            json!(records.iter().map(|r| r.start).collect::<Vec<_>>()),
        );
        doc.insert(
            "errors".into(),
            json!(
                records
                    .iter()
                    .map(|r| r.error.clone().unwrap_or_default())
                    .collect::<Vec<_>>()
            ),
        );
    }
    Value::Object(doc)
}

fn put_distribution(doc: &mut Map<String, Value>, name: &str, d: &Distribution) {
    doc.insert(format!("mean_{name}_ms"), json!(d.mean));
    doc.insert(format!("median_{name}_ms"), json!(d.median));
    doc.insert(format!("std_{name}_ms"), json!(d.std));
    for (p, value) in &d.percentiles {
        doc.insert(format!("p{}_{name}_ms", percent_name(*p)), json!(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::summarize;

    #[test]
    fn json_keys_follow_vllm_bench_serve() {
        let records = vec![RequestRecord {
            ok: true,
            prompt_tokens: 5,
            output_tokens: 3,
            ttft: 0.1,
            itls: vec![0.01, 0.02],
            latency: 0.13,
            start: 0.0,
            error: None,
            text: String::new(),
        }];
        let summary = summarize(&records, 1.0, &[99.0, 99.9], None);
        let info = RunInfo {
            url: "http://x".into(),
            endpoint: "completions".into(),
            workload: "seed-single".into(),
            num_prompts: 1,
            request_rate: None,
            burstiness: 1.0,
            max_concurrency: None,
            tokenizer_id: None,
        };
        let doc = json(&info, &summary, &records, false);
        for key in [
            "request_throughput",
            "output_throughput",
            "mean_ttft_ms",
            "median_tpot_ms",
            "p99_itl_ms",
            "p99.9_e2el_ms",
            "request_goodput",
            "completed",
            "failed",
        ] {
            assert!(doc.get(key).is_some(), "{key}");
        }
        assert_eq!(doc["request_rate"], "inf");
        assert!(doc.get("ttfts").is_none());
        let detailed = json(&info, &summary, &records, true);
        for key in [
            "input_lens",
            "output_lens",
            "ttfts",
            "itls",
            "e2els",
            "start_times",
            "errors",
        ] {
            assert_eq!(detailed[key].as_array().map(Vec::len), Some(1), "{key}");
        }
        assert_eq!(detailed["e2els"][0], 0.13);
        assert!(table(&info, &summary).contains("P99.9 TTFT (ms)"));
    }
}
