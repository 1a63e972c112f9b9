//! Runs one store test case against a fresh database of each backend.

use gpufleet_store::Store;
use gpufleet_test_support::db::TestDb;
use std::future::Future;

/// What a test case gets: the store, and the URL of its database for raw SQL.
pub struct Ctx {
    pub store: Store,
    pub url: String,
}

pub async fn run_sqlite<F, Fut>(case: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    run(TestDb::sqlite(), case).await;
}

/// On a new PostgreSQL database (`gpufleet_test_support::db`), dropped
/// afterwards even when the case fails.
pub async fn run_postgres<F, Fut>(case: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    if std::env::var("GPUFLEET_TEST_SKIP_POSTGRES").is_ok_and(|v| v == "1") {
        eprintln!(
            "\n!!!!!!!!!! GPUFLEET_TEST_SKIP_POSTGRES=1: PostgreSQL store test SKIPPED, \
             PostgreSQL NOT TESTED !!!!!!!!!!\n"
        );
        return;
    }
    run(TestDb::postgres().await, case).await;
}

async fn run<F, Fut>(db: TestDb, case: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let store = Store::connect(db.url())
        .await
        .expect("connect to a fresh database");
    case(Ctx {
        store: store.clone(),
        url: db.url().to_string(),
    })
    .await;
    store.close().await;
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
