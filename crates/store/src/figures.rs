//! The figures kept in metric history, and the SQL that aggregates them.
//!
//! One list per table family drives the rollup upserts and the series
//! queries, so a figure is aggregated the same way everywhere:
//! - from raw samples: `AVG`, `MAX`, `COUNT` over the bucket;
//! - from rollup rows: a count-weighted mean of means, a max of maxes, a sum
//!   of counts. Combining is exact (up to float rounding), so an hour built
//!   from minutes equals an hour built from raw samples.
//!
//! Every aggregate is a DOUBLE PRECISION (or a BIGINT count): PostgreSQL's
//! `SUM`/`AVG` of a BIGINT is NUMERIC, which the Any driver cannot decode, so
//! integer columns are cast first.

use crate::Backend;

/// How a figure is aggregated over a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Agg {
    /// `<col>_avg`.
    Avg,
    /// `<col>_avg` and `<col>_max`.
    AvgMax,
    /// `<col>`: a capacity (a total or a limit), the maximum seen.
    Cap,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Figure {
    /// Stem of the rollup (and result) column names.
    pub col: &'static str,
    /// The value in a raw sample row, as a DOUBLE PRECISION expression.
    pub raw: &'static str,
    pub agg: Agg,
    /// The raw value may be NULL: the rollup keeps `<col>_n`, how many
    /// samples had one, and the mean is over those only.
    pub optional: bool,
}

const fn fig(col: &'static str, raw: &'static str, agg: Agg, optional: bool) -> Figure {
    Figure {
        col,
        raw,
        agg,
        optional,
    }
}

/// Per instance: `samples` → `samples_1m` → `samples_1h`.
pub(crate) const SYSTEM: &[Figure] = &[
    fig("cpu_pct", "cpu_pct", Agg::AvgMax, false),
    fig("load1", "load1", Agg::Avg, false),
    fig(
        "mem_used",
        "CAST(mem_used_bytes AS DOUBLE PRECISION)",
        Agg::Avg,
        false,
    ),
    fig(
        "mem_total",
        "CAST(mem_total_bytes AS DOUBLE PRECISION)",
        Agg::Cap,
        false,
    ),
    fig(
        "disk_used",
        "CAST(disk_used_bytes AS DOUBLE PRECISION)",
        Agg::Avg,
        false,
    ),
    fig(
        "disk_total",
        "CAST(disk_total_bytes AS DOUBLE PRECISION)",
        Agg::Cap,
        false,
    ),
    fig("net_rx", "net_rx_bps", Agg::Avg, false),
    fig("net_tx", "net_tx_bps", Agg::Avg, false),
    fig("running", "requests_running", Agg::Avg, false),
    fig("waiting", "requests_waiting", Agg::Avg, false),
    fig("kv_cache", "kv_cache_usage", Agg::AvgMax, true),
    fig("prompt_tps", "prompt_tokens_per_s", Agg::Avg, true),
    fig("gen_tps", "generation_tokens_per_s", Agg::Avg, true),
    fig("ttft", "ttft_mean_s", Agg::AvgMax, true),
];

/// Per instance and GPU: `gpu_samples` → `gpu_samples_1m` → `gpu_samples_1h`.
pub(crate) const GPU: &[Figure] = &[
    fig("util", "util_pct", Agg::AvgMax, true),
    fig(
        "mem_used",
        "CAST(mem_used_mib AS DOUBLE PRECISION)",
        Agg::AvgMax,
        false,
    ),
    fig(
        "mem_total",
        "CAST(mem_total_mib AS DOUBLE PRECISION)",
        Agg::Cap,
        false,
    ),
    fig("temp", "temp_c", Agg::AvgMax, true),
    fig("power", "power_w", Agg::AvgMax, true),
    fig("power_limit", "power_limit_w", Agg::Cap, true),
];

/// Where aggregated rows come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// `samples` / `gpu_samples`, timed by `at`.
    Raw,
    /// A rollup table, timed by `bucket`.
    Rollup,
}

impl Source {
    pub(crate) fn time_col(self) -> &'static str {
        match self {
            Source::Raw => "at",
            Source::Rollup => "bucket",
        }
    }
}

/// `(expression, alias)` pairs: the sample count `n`, then each figure's
/// columns, named as in the rollup tables.
pub(crate) fn aggregates(figures: &[Figure], source: Source) -> Vec<(String, String)> {
    let mut out = Vec::new();
    out.push((
        match source {
            Source::Raw => "COUNT(*)".to_string(),
            Source::Rollup => "CAST(SUM(n) AS BIGINT)".to_string(),
        },
        "n".to_string(),
    ));
    for f in figures {
        let c = f.col;
        let raw = f.raw;
        let (avg, max, cap, count) = match source {
            Source::Raw => (
                format!("AVG({raw})"),
                format!("MAX({raw})"),
                format!("MAX({raw})"),
                format!("COUNT({raw})"),
            ),
            Source::Rollup => (
                if f.optional {
                    format!(
                        "SUM({c}_avg * {c}_n) / CAST(NULLIF(SUM({c}_n), 0) AS DOUBLE PRECISION)"
                    )
                } else {
                    format!("SUM({c}_avg * n) / CAST(SUM(n) AS DOUBLE PRECISION)")
                },
                format!("MAX({c}_max)"),
                format!("MAX({c})"),
                format!("CAST(SUM({c}_n) AS BIGINT)"),
            ),
        };
        if f.optional {
            out.push((count, format!("{c}_n")));
        }
        match f.agg {
            Agg::Avg => out.push((avg, format!("{c}_avg"))),
            Agg::AvgMax => {
                out.push((avg, format!("{c}_avg")));
                out.push((max, format!("{c}_max")));
            }
            Agg::Cap => out.push((cap, c.to_string())),
        }
    }
    out
}

/// `expr AS alias, ...`.
pub(crate) fn select_list(aggs: &[(String, String)]) -> String {
    aggs.iter()
        .map(|(e, a)| format!("{e} AS {a}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `(a, b, c), (…)` with `$N` placeholders numbered from `first`, `rows` rows
/// of `cols` columns. On SQLite they are anonymous `?` (bound in order, so
/// `first` must be 1 there): binding a numbered `$N` costs SQLite a walk of
/// the statement's parameter list (`sqlite3_bind_parameter_name`), which
/// makes a statement's binding cost grow with the square of its parameters.
pub(crate) fn values_placeholders(
    backend: Backend,
    rows: usize,
    cols: usize,
    first: usize,
) -> String {
    debug_assert!(backend == Backend::Postgres || first == 1);
    let mut s = String::with_capacity(rows * cols * 6);
    let mut n = first;
    for r in 0..rows {
        if r > 0 {
            s.push_str(", ");
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push_str(", ");
            }
            match backend {
                Backend::Sqlite => s.push('?'),
                Backend::Postgres => {
                    s.push('$');
                    s.push_str(&n.to_string());
                }
            }
            n += 1;
        }
        s.push(')');
    }
    s
}

/// `count` placeholders from `$1` (PostgreSQL) or `?` (SQLite), comma-separated.
pub(crate) fn list_placeholders(backend: Backend, count: usize) -> String {
    (1..=count)
        .map(|i| match backend {
            Backend::Sqlite => "?".to_string(),
            Backend::Postgres => format!("${i}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rows per multi-row statement, largest first. A batch is split greedily
/// into these sizes so each table sees at most this many distinct statement
/// texts (each is prepared once per connection and cached). PostgreSQL takes
/// at most 65,535 parameters per statement: 64 rows × 23 columns is far below.
pub(crate) const CHUNK_SIZES: [usize; 4] = [64, 16, 4, 1];

/// Split `len` items into consecutive chunk lengths from [`CHUNK_SIZES`].
pub(crate) fn chunk_lengths(mut len: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for size in CHUNK_SIZES {
        while len >= size {
            out.push(size);
            len -= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_everything() {
        for len in [0, 1, 3, 4, 255, 256, 257, 500, 1000] {
            let c = chunk_lengths(len);
            assert_eq!(c.iter().sum::<usize>(), len);
            assert!(c.windows(2).all(|w| w[0] >= w[1]));
        }
        assert_eq!(chunk_lengths(150), vec![64, 64, 16, 4, 1, 1]);
    }

    #[test]
    fn placeholders_are_numbered() {
        assert_eq!(
            values_placeholders(Backend::Postgres, 2, 2, 3),
            "($3, $4), ($5, $6)"
        );
        assert_eq!(
            values_placeholders(Backend::Sqlite, 2, 2, 1),
            "(?, ?), (?, ?)"
        );
        assert_eq!(list_placeholders(Backend::Postgres, 3), "$1, $2, $3");
        assert_eq!(list_placeholders(Backend::Sqlite, 2), "?, ?");
    }

    #[test]
    fn aggregate_names_match_the_rollup_columns() {
        let names: Vec<String> = aggregates(GPU, Source::Raw)
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        assert_eq!(
            names.join(","),
            "n,util_n,util_avg,util_max,mem_used_avg,mem_used_max,mem_total,temp_n,temp_avg,\
             temp_max,power_n,power_avg,power_max,power_limit_n,power_limit"
        );
        let sys = aggregates(SYSTEM, Source::Rollup);
        assert!(sys.iter().any(|(_, a)| a == "kv_cache_n"));
        assert!(sys.iter().any(|(_, a)| a == "ttft_max"));
    }
}
