//! Opening the database: URL classification, pool settings, migrations.

use crate::{Backend, Store, StoreError};
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::Executor;
use std::time::Duration;

static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// How long a SQLite connection waits for the write lock before `SQLITE_BUSY`.
const SQLITE_BUSY_TIMEOUT_MS: u64 = 5_000;
/// Page cache per SQLite connection, in KiB (a ceiling, filled on demand).
const SQLITE_CACHE_KIB: u64 = 64 * 1024;
/// Pool sizes. SQLite has one writer at a time anyway (WAL lets readers run
/// beside it); PostgreSQL gets a modest pool.
const SQLITE_MAX_CONNECTIONS: u32 = 8;
const POSTGRES_MAX_CONNECTIONS: u32 = 16;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A database URL, classified.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// A `sqlite:` URL; `memory` when the database lives in this process only.
    Sqlite {
        url: String,
        memory: bool,
    },
    Postgres {
        url: String,
    },
}

fn classify(url: &str) -> Result<Target, StoreError> {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        return Ok(Target::Postgres {
            url: url.to_string(),
        });
    }
    if lower.starts_with("sqlite:") {
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (url, None),
        };
        let memory = path.ends_with(":memory:")
            || query.is_some_and(|q| q.split('&').any(|kv| kv == "mode=memory"));
        let has_mode = query.is_some_and(|q| q.split('&').any(|kv| kv.starts_with("mode=")));
        let url = match (memory || has_mode, query) {
            (true, _) => url.to_string(),
            // Create the file if missing unless the caller chose a mode.
            (false, Some(_)) => format!("{url}&mode=rwc"),
            (false, None) => format!("{url}?mode=rwc"),
        };
        return Ok(Target::Sqlite { url, memory });
    }
    if url.is_empty() || url.contains("://") {
        return Err(StoreError::UnsupportedUrl {
            url: url.to_string(),
        });
    }
    // A bare file path. sqlx percent-decodes the path of a sqlite: URL, so
    // escape what would otherwise end it or be decoded.
    let mut escaped = String::with_capacity(url.len());
    for c in url.chars() {
        match c {
            '%' => escaped.push_str("%25"),
            '?' => escaped.push_str("%3F"),
            '#' => escaped.push_str("%23"),
            c => escaped.push(c),
        }
    }
    Ok(Target::Sqlite {
        url: format!("sqlite://{escaped}?mode=rwc"),
        memory: false,
    })
}

impl Store {
    /// The file of a SQLite database URL (`None` for PostgreSQL, in-memory
    /// databases and URLs `connect` would refuse).
    pub fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
        match classify(url).ok()? {
            Target::Sqlite { memory: true, .. } | Target::Postgres { .. } => None,
            Target::Sqlite { url, .. } => {
                let rest = url
                    .strip_prefix("sqlite://")
                    .or_else(|| url.strip_prefix("sqlite:"))?;
                let path = rest.split('?').next()?;
                let mut out = Vec::with_capacity(path.len());
                let mut bytes = path.bytes();
                while let Some(b) = bytes.next() {
                    if b == b'%' {
                        let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                        let v = std::str::from_utf8(&hex)
                            .ok()
                            .and_then(|h| u8::from_str_radix(h, 16).ok())?;
                        out.push(v);
                    } else {
                        out.push(b);
                    }
                }
                String::from_utf8(out).ok().map(std::path::PathBuf::from)
            }
        }
    }

    /// Connect to `url` (`sqlite://path?mode=rwc`, `sqlite::memory:`, a bare
    /// file path, or `postgres://...`) and apply migrations.
    ///
    /// A SQLite file is created if missing (unless the URL sets `mode=`), and
    /// runs in WAL mode with a busy timeout and foreign keys on. An in-memory
    /// SQLite database lives in a single, never-recycled connection.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let target = classify(url)?;
        let mut pg_url = None;
        let (backend, pool) = match target {
            Target::Postgres { url } => {
                pg_url = Some(std::sync::Arc::from(url.as_str()));
                let pool = AnyPoolOptions::new()
                    .max_connections(POSTGRES_MAX_CONNECTIONS)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect(&url)
                    .await
                    .map_err(StoreError::Connect)?;
                (Backend::Postgres, pool)
            }
            Target::Sqlite { url, memory } => {
                let mut options = AnyPoolOptions::new().acquire_timeout(ACQUIRE_TIMEOUT);
                options = if memory {
                    // Each connection to `:memory:` is its own database: keep one, forever.
                    options
                        .max_connections(1)
                        .min_connections(1)
                        .idle_timeout(None)
                        .max_lifetime(None)
                } else {
                    options.max_connections(SQLITE_MAX_CONNECTIONS)
                };
                let pool = options
                    .after_connect(move |conn, _meta| {
                        Box::pin(async move {
                            conn.execute(
                                format!("PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}").as_str(),
                            )
                            .await?;
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                            // Sorts and temporary B-trees in memory, not in
                            // temporary files.
                            conn.execute("PRAGMA temp_store = MEMORY").await?;
                            if !memory {
                                conn.execute("PRAGMA journal_mode = WAL").await?;
                                conn.execute("PRAGMA synchronous = NORMAL").await?;
                                // No checkpoint inside a commit (it would
                                // stall that writer for the copy and the
                                // fsync): `checkpoints` does it beside them.
                                conn.execute("PRAGMA wal_autocheckpoint = 0").await?;
                                // Heartbeats land on every instance's index
                                // pages: keep them cached (the default 2 MiB
                                // thrashes past a few hundred instances).
                                conn.execute(
                                    format!("PRAGMA cache_size = -{SQLITE_CACHE_KIB}").as_str(),
                                )
                                .await?;
                            }
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await
                    .map_err(StoreError::Connect)?;
                if !memory {
                    tokio::spawn(checkpoints(pool.clone()));
                }
                (Backend::Sqlite, pool)
            }
        };
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATOR,
            Backend::Postgres => &POSTGRES_MIGRATOR,
        };
        migrator.run(&pool).await.map_err(StoreError::Migrate)?;
        tracing::info!(?backend, "store connected, migrations applied");
        Ok(Store {
            pool,
            backend,
            pg_url,
        })
    }
}

/// How often the SQLite WAL is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Copy the WAL into the database file every [`CHECKPOINT_EVERY`], on a
/// pooled connection of its own, until the pool closes. PASSIVE: it never
/// waits for (or blocks) readers and writers; the WAL restarts from its
/// beginning once a checkpoint has caught up.
async fn checkpoints(pool: sqlx::AnyPool) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            if pool.is_closed() {
                return;
            }
            tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_urls() {
        assert_eq!(
            classify("postgres://u@h/db").unwrap(),
            Target::Postgres {
                url: "postgres://u@h/db".into()
            }
        );
        assert!(matches!(
            classify("postgresql://h/db").unwrap(),
            Target::Postgres { .. }
        ));
        assert_eq!(
            classify("sqlite::memory:").unwrap(),
            Target::Sqlite {
                url: "sqlite::memory:".into(),
                memory: true
            }
        );
        assert_eq!(
            classify("sqlite://a.db").unwrap(),
            Target::Sqlite {
                url: "sqlite://a.db?mode=rwc".into(),
                memory: false
            }
        );
        assert_eq!(
            classify("sqlite://a.db?mode=ro").unwrap(),
            Target::Sqlite {
                url: "sqlite://a.db?mode=ro".into(),
                memory: false
            }
        );
        assert_eq!(
            classify("sqlite://a.db?cache=shared").unwrap(),
            Target::Sqlite {
                url: "sqlite://a.db?cache=shared&mode=rwc".into(),
                memory: false
            }
        );
        assert_eq!(
            classify("/var/lib/gpufleet/db 1?.sqlite").unwrap(),
            Target::Sqlite {
                url: "sqlite:///var/lib/gpufleet/db 1%3F.sqlite?mode=rwc".into(),
                memory: false
            }
        );
        for bad in ["", "mysql://h/db", "http://x"] {
            assert!(
                matches!(classify(bad), Err(StoreError::UnsupportedUrl { .. })),
                "{bad}"
            );
        }
    }
}
