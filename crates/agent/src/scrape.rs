//! Reads the vLLM gauges the agent reports out of Prometheus text.

/// The engine gauges the agent reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineGauges {
    pub requests_running: f64,
    pub requests_waiting: f64,
    /// 0–1, from `vllm:kv_cache_usage_perc` or the older `vllm:gpu_cache_usage_perc`.
    pub kv_cache_usage: Option<f64>,
    /// Counters, turned into per-interval rates by [`EngineRates`].
    pub prompt_tokens_total: Option<f64>,
    pub generation_tokens_total: Option<f64>,
    pub ttft_sum: Option<f64>,
    pub ttft_count: Option<f64>,
}

/// Rates over the interval between two scrapes of the engine's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineRates {
    pub prompt_tokens_per_s: Option<f64>,
    pub generation_tokens_per_s: Option<f64>,
    /// Mean time to first token of the requests that got their first token in the interval.
    pub ttft_mean_s: Option<f64>,
}

impl EngineRates {
    /// Rates from `prev` to `now`, `secs` apart. A counter that went down
    /// (engine restart) gives no rate for that interval.
    pub fn between(prev: &EngineGauges, now: &EngineGauges, secs: f64) -> EngineRates {
        let delta = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b >= a => Some(b - a),
            _ => None,
        };
        let rate = |d: Option<f64>| d.filter(|_| secs > 0.0).map(|d| d / secs);
        let ttft = match (
            delta(prev.ttft_sum, now.ttft_sum),
            delta(prev.ttft_count, now.ttft_count),
        ) {
            (Some(sum), Some(count)) if count > 0.0 => Some(sum / count),
            _ => None,
        };
        EngineRates {
            prompt_tokens_per_s: rate(delta(prev.prompt_tokens_total, now.prompt_tokens_total)),
            generation_tokens_per_s: rate(delta(
                prev.generation_tokens_total,
                now.generation_tokens_total,
            )),
            ttft_mean_s: ttft,
        }
    }
}

fn add(slot: &mut Option<f64>, value: f64) {
    *slot = Some(slot.unwrap_or(0.0) + value);
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
            "vllm:prompt_tokens_total" => add(&mut g.prompt_tokens_total, value),
            "vllm:generation_tokens_total" => add(&mut g.generation_tokens_total, value),
            "vllm:time_to_first_token_seconds_sum" => add(&mut g.ttft_sum, value),
            "vllm:time_to_first_token_seconds_count" => add(&mut g.ttft_count, value),
            _ => {}
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_become_rates_and_resets_give_none() {
        let text = |p: f64, g: f64, s: f64, c: f64| {
            format!(
                "vllm:prompt_tokens_total{{model_name=\"m\"}} {p}\n\
                 vllm:generation_tokens_total{{model_name=\"m\"}} {g}\n\
                 vllm:time_to_first_token_seconds_sum{{model_name=\"m\"}} {s}\n\
                 vllm:time_to_first_token_seconds_count{{model_name=\"m\"}} {c}\n"
            )
        };
        let a = parse(&text(100.0, 1000.0, 1.0, 10.0));
        let b = parse(&text(300.0, 2000.0, 1.5, 15.0));
        let r = EngineRates::between(&a, &b, 2.0);
        assert_eq!(r.prompt_tokens_per_s, Some(100.0));
        assert_eq!(r.generation_tokens_per_s, Some(500.0));
        assert_eq!(r.ttft_mean_s, Some(0.1));
        let restarted = parse(&text(5.0, 10.0, 0.0, 0.0));
        let r = EngineRates::between(&b, &restarted, 2.0);
        assert_eq!(r, EngineRates::default());
        assert_eq!(EngineRates::between(&a, &a, 2.0).ttft_mean_s, None);
    }

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
