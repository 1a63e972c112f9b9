//! Reads the vLLM gauges the agent reports out of Prometheus text.

/// The engine gauges the agent reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineGauges {
    pub requests_running: f64,
    pub requests_waiting: f64,
    /// 0–1, from `vllm:kv_cache_usage_perc` or the older `vllm:gpu_cache_usage_perc`.
    pub kv_cache_usage: Option<f64>,
}

/// Splits a sample line into its metric name and value, ignoring labels
/// and an optional timestamp.
fn sample(line: &str) -> Option<(&str, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, rest) = match line.find(['{', ' ', '\t']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let rest = if rest.starts_with('{') {
        // Label values may contain '}' only inside quotes.
        let mut in_quotes = false;
        let mut escaped = false;
        let mut end = None;
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                '}' if !in_quotes => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        &rest[end? + 1..]
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, value))
}

/// Sums each gauge over its series (one per model, usually just one).
pub fn parse(text: &str) -> EngineGauges {
    let mut g = EngineGauges::default();
    for (name, value) in text.lines().filter_map(sample) {
        if !value.is_finite() {
            continue;
        }
        match name {
            "vllm:num_requests_running" => g.requests_running += value,
            "vllm:num_requests_waiting" => g.requests_waiting += value,
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                g.kv_cache_usage = Some(g.kv_cache_usage.unwrap_or(0.0).max(value));
            }
            _ => {}
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_gauges_ignoring_labels() {
        let text = r#"
# HELP vllm:num_requests_running Number of requests.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m",engine="0"} 3.0
vllm:num_requests_waiting{model_name="we}ird \"x\""} 2 1712345678000
vllm:gpu_cache_usage_perc{model_name="m"} 0.25
vllm:num_requests_running_other 99
vllm:prompt_tokens_total{model_name="m"} 123
"#;
        let g = parse(text);
        assert_eq!(g.requests_running, 3.0);
        assert_eq!(g.requests_waiting, 2.0);
        assert_eq!(g.kv_cache_usage, Some(0.25));
    }

    #[test]
    fn accepts_the_new_kv_name_and_unlabelled_samples() {
        let g = parse("vllm:kv_cache_usage_perc 0.5\nvllm:num_requests_waiting 4\n");
        assert_eq!(g.kv_cache_usage, Some(0.5));
        assert_eq!(g.requests_waiting, 4.0);
        assert_eq!(
            parse("garbage{\nnot a metric line"),
            EngineGauges::default()
        );
    }
}
