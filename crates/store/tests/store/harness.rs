//! Runs one store test case against a fresh database of each backend.

use gpufleet_store::Store;
use sqlx::{Connection, Executor, PgConnection};
use std::future::Future;

/// What a test case gets: the store, and the URL of its database for raw SQL.
pub struct Ctx {
    pub store: Store,
    pub url: String,
}

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub async fn run_sqlite<F, Fut>(case: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let store = Store::connect(&url)
        .await
        .expect("connect to a fresh SQLite file");
    case(Ctx {
        store: store.clone(),
        url,
    })
    .await;
    store.close().await;
}

pub async fn run_postgres<F, Fut>(case: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    if std::env::var("GPUFLEET_TEST_SKIP_POSTGRES").is_ok_and(|v| v == "1") {
        eprintln!(
            "\n!!!!!!!!!! GPUFLEET_TEST_SKIP_POSTGRES=1: PostgreSQL store test SKIPPED, \
             PostgreSQL NOT TESTED !!!!!!!!!!\n"
        );
        return;
    }
    let admin_url = std::env::var("GPUFLEET_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string());
    let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL store tests need a server: could not connect to {admin_url} ({e}). \
             Start PostgreSQL, point GPUFLEET_TEST_POSTGRES_URL at one, or set \
             GPUFLEET_TEST_SKIP_POSTGRES=1 to skip these tests."
        )
    });
    let name = format!("gpufleet_t_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    let url = database_url(&admin_url, &name);
    let store = Store::connect(&url)
        .await
        .expect("connect to a fresh PostgreSQL database");
    // Run the case in its own task so a failing assertion still lets us drop the database.
    let result = tokio::spawn(case(Ctx {
        store: store.clone(),
        url,
    }))
    .await;
    store.close().await;
    if let Err(e) = admin
        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await
    {
        eprintln!("warning: could not drop test database {name}: {e}");
    }
    let _ = admin.close().await;
    if let Err(e) = result {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("test task failed: {e}"),
        }
    }
}

/// `admin_url` with its database replaced by `name` (query string kept).
fn database_url(admin_url: &str, name: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin_url, None),
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

#[test]
fn database_url_replaces_the_database() {
    assert_eq!(
        database_url("postgres://postgres@127.0.0.1:5432/postgres", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(database_url("postgres://h", "x"), "postgres://h/x");
    assert_eq!(
        database_url("postgres://h/db?sslmode=disable", "x"),
        "postgres://h/x?sslmode=disable"
    );
}

/// Raw access to the database behind a store, for writing rows the store never would.
pub async fn raw_pool(url: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("raw connection")
}
