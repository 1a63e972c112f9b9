//! A fresh database per test.
//!
//! `GPUFLEET_TEST_DATABASE` picks the backend of [`TestDb::fresh`]:
//! - unset, empty or `sqlite`: a SQLite file in a new temporary directory;
//! - `postgres`: a new database (random name) on the PostgreSQL server at
//!   `GPUFLEET_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432`;
//!   any database in that URL is replaced), made with `CREATE DATABASE` and
//!   dropped when the [`TestDb`] drops. An unreachable server fails the test.
//!
//! The store suite, which runs every case on both backends, calls
//! [`TestDb::sqlite`] and [`TestDb::postgres`] directly.

use sqlx::{Connection, Executor, PgConnection};
use std::path::Path;
use std::time::Duration;

/// The environment variable that picks the backend of [`TestDb::fresh`].
pub const DATABASE_ENV: &str = "GPUFLEET_TEST_DATABASE";
/// The environment variable that points at the PostgreSQL server.
pub const PG_URL_ENV: &str = "GPUFLEET_TEST_PG_URL";
/// What older set-ups named the server (a URL with its `postgres` database);
/// read when [`PG_URL_ENV`] is unset.
const OLD_PG_URL_ENV: &str = "GPUFLEET_TEST_POSTGRES_URL";
const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432";
/// How long dropping a test database may take before it is left behind.
const DROP_TIMEOUT: Duration = Duration::from_secs(20);

/// The backend of a [`TestDb`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend `GPUFLEET_TEST_DATABASE` asks for.
    ///
    /// # Panics
    /// On a value other than `sqlite`, `postgres` or empty: a typo must not
    /// quietly test SQLite.
    pub fn from_env() -> Backend {
        match std::env::var(DATABASE_ENV).unwrap_or_default().as_str() {
            "" | "sqlite" => Backend::Sqlite,
            "postgres" => Backend::Postgres,
            other => panic!("{DATABASE_ENV}={other:?}: expected `sqlite` or `postgres`"),
        }
    }
}

/// A database that exists for one test: its URL, and the guard that removes
/// it (the temporary directory, or `DROP DATABASE`, best effort) on drop.
#[derive(Debug)]
pub struct TestDb {
    url: String,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// The temporary directory it owns (none when the caller owns it).
    Sqlite(#[allow(dead_code)] Option<tempfile::TempDir>),
    Postgres {
        admin_url: String,
        name: String,
    },
}

impl TestDb {
    /// A fresh database of the backend `GPUFLEET_TEST_DATABASE` names.
    pub async fn fresh() -> TestDb {
        match Backend::from_env() {
            Backend::Sqlite => TestDb::sqlite(),
            Backend::Postgres => TestDb::postgres().await,
        }
    }

    /// A fresh database of the backend `GPUFLEET_TEST_DATABASE` names; a
    /// SQLite one is `dir/gpufleet.db` (where `gpufleet up --data-dir dir`
    /// puts it by default), so whatever looks through `dir` sees it too.
    pub async fn fresh_in(dir: &Path) -> TestDb {
        match Backend::from_env() {
            Backend::Sqlite => TestDb {
                url: format!("sqlite://{}?mode=rwc", dir.join("gpufleet.db").display()),
                kind: Kind::Sqlite(None),
            },
            Backend::Postgres => TestDb::postgres().await,
        }
    }

    /// A SQLite file (created on first connect) in a new temporary directory.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::Builder::new()
            .prefix("gpufleet-test-db-")
            .tempdir()
            .expect("a temporary directory");
        let url = format!("sqlite://{}/test.db?mode=rwc", dir.path().display());
        TestDb {
            url,
            kind: Kind::Sqlite(Some(dir)),
        }
    }

    /// A new, empty PostgreSQL database.
    ///
    /// # Panics
    /// When the server cannot be reached or refuses `CREATE DATABASE`.
    pub async fn postgres() -> TestDb {
        let server = std::env::var(PG_URL_ENV)
            .or_else(|_| std::env::var(OLD_PG_URL_ENV))
            .unwrap_or_else(|_| DEFAULT_PG_URL.to_string());
        let admin_url = database_url(&server, "postgres");
        let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL tests need a server: could not connect to {admin_url} ({e}). \
                 Start PostgreSQL (scripts/test does) or point {PG_URL_ENV} at one."
            )
        });
        let name = format!("gpufleet_t_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = admin.close().await;
        TestDb {
            url: database_url(&server, &name),
            kind: Kind::Postgres { admin_url, name },
        }
    }

    /// The database's URL, for `Store::connect` or `gpufleet up --database`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn backend(&self) -> Backend {
        match self.kind {
            Kind::Sqlite(_) => Backend::Sqlite,
            Kind::Postgres { .. } => Backend::Postgres,
        }
    }
}

impl Drop for TestDb {
    /// Drops a PostgreSQL database, even with connections still open (a
    /// control plane the test left running): on its own thread and runtime,
    /// so it works inside and outside an async test, and during a panic.
    fn drop(&mut self) {
        let Kind::Postgres { admin_url, name } = &self.kind else {
            return;
        };
        let (admin_url, db) = (admin_url.clone(), name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                tokio::time::timeout(DROP_TIMEOUT, drop_database(&admin_url, &db))
                    .await
                    .map_err(|_| format!("no answer within {DROP_TIMEOUT:?}"))?
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: could not drop test database {name}: {e}"),
            Err(_) => eprintln!("warning: could not drop test database {name}: panicked"),
        }
    }
}

/// `DROP DATABASE`, closing its connections first: `WITH (FORCE)` on
/// PostgreSQL 13 and later, `pg_terminate_backend` before.
async fn drop_database(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    let mut admin = PgConnection::connect(admin_url).await?;
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&mut admin)
        .await?;
    if version >= 130_000 {
        admin
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await?;
    } else {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(name)
        .execute(&mut admin)
        .await?;
        admin
            .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
            .await?;
    }
    admin.close().await
}

/// `server_url` with its database replaced by `name` (query string kept).
fn database_url(server_url: &str, name: &str) -> String {
    let (base, query) = match server_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (server_url, None),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[after_scheme..]
        .find('/')
        .map(|i| after_scheme + i)
        .unwrap_or(base.len());
    let mut url = format!("{}/{name}", &base[..host_end]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_replaces_the_database() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(database_url("postgres://h", "x"), "postgres://h/x");
        assert_eq!(
            database_url("postgres://h/db?sslmode=disable", "x"),
            "postgres://h/x?sslmode=disable"
        );
    }

    #[test]
    fn a_sqlite_database_lives_as_long_as_its_handle() {
        let db = TestDb::sqlite();
        assert_eq!(db.backend(), Backend::Sqlite);
        let path = db
            .url()
            .strip_prefix("sqlite://")
            .and_then(|u| u.strip_suffix("/test.db?mode=rwc"))
            .map(std::path::PathBuf::from)
            .expect("a sqlite URL in a directory");
        assert!(path.is_dir());
        drop(db);
        assert!(!path.exists());
    }
}
