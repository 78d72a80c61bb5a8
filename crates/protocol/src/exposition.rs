//! Prometheus's text exposition format as engines serve it on `/metrics` (vLLM's
//! `vllm:*` families, tandem's own): reading sample lines, one series' samples, a sum
//! over matching labels. No I/O: the router's federation and the benchmarks' hand-off
//! accounting fetch the text and read it with this.

use std::collections::HashSet;

/// One sample line: `series{labels} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub series: String,
    /// `(key, value still quoted)`, in order.
    pub labels: Vec<(String, String)>,
    /// The value and the timestamp, if any, as written.
    pub value: String,
}

/// `name{k="v",…} value [timestamp]`, if the line is one.
pub fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let rest = &line[name_end..];
    let Some(body) = rest.strip_prefix('{') else {
        return Some(Sample {
            series: name.to_owned(),
            labels: Vec::new(),
            value: rest.trim().to_owned(),
        });
    };
    let mut labels = Vec::new();
    let mut chars = body.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| *c == ',' || *c == ' ').is_some() {}
        let (start, c) = chars.next()?;
        if c == '}' {
            let value = body[start + 1..].trim();
            return (!value.is_empty()).then(|| Sample {
                series: name.to_owned(),
                labels,
                value: value.to_owned(),
            });
        }
        let eq = body[start..].find('=')? + start;
        let key = body[start..eq].trim().to_owned();
        while chars.next_if(|(i, _)| *i <= eq).is_some() {}
        let (open, quote_char) = chars.next()?;
        if quote_char != '"' {
            return None;
        }
        let mut escaped = false;
        let close = loop {
            let (i, c) = chars.next()?;
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => break i,
                _ => {}
            }
        };
        labels.push((key, body[open..=close].to_owned()));
    }
}

/// Every sample of series `name` in an exposition: its labels (values unquoted) and
/// value. Unparsable lines and values are skipped.
pub fn series(text: &str, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    text.lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .filter_map(parse_sample)
        .filter(|sample| sample.series == name)
        .filter_map(|sample| {
            let value = sample.value.split(' ').next()?.parse::<f64>().ok()?;
            let labels = sample
                .labels
                .into_iter()
                .map(|(key, quoted)| (key, unquote(&quoted)))
                .collect();
            Some((labels, value))
        })
        .collect()
}

/// The sum of series `name`'s samples whose labels include `with`; `None` if none.
pub fn sum(text: &str, name: &str, with: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = series(text, name)
        .into_iter()
        .filter(|(labels, _)| {
            with.iter()
                .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, value)| value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// A quoted label value, unescaped.
fn unquote(quoted: &str) -> String {
    let inner = quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or(quoted);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// The names of the metric families in an exposition (the router's own).
pub fn family_names(text: &str) -> HashSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="llama"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="llama"} 7.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="llama"} 7.0
odd{path="a,b \"c\"",worker="inner"} 1 1700000000000
plain 2
"#;

    fn fixture(role: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/vllm-0.26/vllm_metrics_{role}.txt",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn series_are_read_with_their_labels() {
        let text = fixture("d");
        assert!(sum(&text, "vllm:kv_cache_usage_perc", &[]).is_some());
        assert_eq!(
            sum(&text, "vllm:nixl_bytes_transferred_sum", &[]),
            Some(8_388_608.0)
        );
        let odd = series(TEXT, "odd");
        assert_eq!(odd.len(), 1);
        assert_eq!(odd[0].0[0], ("path".to_owned(), "a,b \"c\"".to_owned()));
        assert_eq!(odd[0].1, 1.0);
        assert_eq!(series(TEXT, "plain")[0].1, 2.0);
        assert_eq!(
            sum(
                TEXT,
                "vllm:time_to_first_token_seconds_bucket",
                &[("le", "+Inf")]
            ),
            Some(7.0)
        );
        assert_eq!(
            sum(TEXT, "vllm:num_requests_running", &[("engine", "1")]),
            None
        );
        // A series is not read as another whose name it begins.
        assert_eq!(sum(TEXT, "vllm:time_to_first_token_seconds", &[]), None);
    }

    #[test]
    fn family_names_come_from_type_lines() {
        let names = family_names(TEXT);
        assert!(names.contains("vllm:num_requests_running"));
        assert!(names.contains("vllm:time_to_first_token_seconds"));
        assert!(!names.contains("plain"));
    }

    #[test]
    fn broken_lines_are_skipped() {
        for line in [
            "{x=\"1\"} 2",
            "name{x=1} 2",
            "name{x=\"1\"",
            "name{x=\"1\"}",
            "name{x=\"unterminated} 3",
        ] {
            assert_eq!(parse_sample(line), None, "{line}");
        }
        assert!(series("name{x=1} 2\nname 3\n", "name").len() == 1);
    }
}
