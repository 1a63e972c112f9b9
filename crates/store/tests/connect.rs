//! Connection handling that is specific to SQLite URLs and paths.

use gpufleet_store::{Backend, InstanceFilter, Store, StoreError};

#[tokio::test]
async fn bare_path_creates_the_file_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet db #1.sqlite");
    assert!(!path.exists());
    let store = Store::connect(path.to_str().unwrap()).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    assert!(path.exists(), "the database file is created");
    let id = store.cluster_id().await.unwrap();
    store.close().await;

    // Same file through a sqlite: URL (percent-encoded as sqlx expects).
    let url = format!(
        "sqlite://{}",
        path.to_str()
            .unwrap()
            .replace(' ', "%20")
            .replace('#', "%23")
    );
    let again = Store::connect(&url).await.unwrap();
    assert_eq!(again.cluster_id().await.unwrap(), id);
    again.close().await;

    sqlx::any::install_default_drivers();
    let raw = sqlx::AnyPool::connect(&url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&raw)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    raw.close().await;
}

#[tokio::test]
async fn in_memory_database_keeps_its_data() {
    let store = Store::connect("sqlite::memory:").await.unwrap();
    let id = store.cluster_id().await.unwrap();
    assert_eq!(store.cluster_id().await.unwrap(), id);
    assert!(store
        .list_instances(&InstanceFilter::default())
        .await
        .unwrap()
        .is_empty());
    store.close().await;
}

#[tokio::test]
async fn ingest_session_shares_an_in_memory_database() {
    // Its single connection: the session gives it back after each call.
    let store = Store::connect("sqlite::memory:").await.unwrap();
    let mut session = gpufleet_store::IngestSession::new(store.clone());
    session.compact_staging_part(0).await.unwrap();
    let staged = tokio::time::timeout(std::time::Duration::from_secs(5), store.staged_heartbeats())
        .await
        .expect("the pool's only connection came back")
        .unwrap();
    assert_eq!(staged, 0);
    session.close().await;
    store.close().await;
}

#[tokio::test]
async fn unsupported_urls_are_refused() {
    for url in ["mysql://root@localhost/db", "", "http://example.com"] {
        match Store::connect(url).await {
            Err(StoreError::UnsupportedUrl { .. }) => {}
            other => panic!(
                "{url:?}: expected UnsupportedUrl, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}

#[tokio::test]
async fn unreachable_postgres_is_a_connect_error() {
    // Port 1 on localhost: nothing listens there.
    match Store::connect("postgres://postgres@127.0.0.1:1/none?connect_timeout=2").await {
        Err(StoreError::Connect(_)) => {}
        other => panic!("expected Connect, got {:?}", other.map(|_| ())),
    }
}
