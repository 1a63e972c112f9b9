//! What several replicas on one database rely on (see `main.rs`): leases,
//! fenced writes, and (PostgreSQL) notifications of committed changes.

use crate::harness::Ctx;
use chrono::{DateTime, Utc};
use gpufleet_domain::{InstanceId, InstanceStatus};
use gpufleet_store::{
    ApiKeyId, Backend, DbChange, InstanceRecord, NewApiKey, NewInstance, Store, StoreError,
};
use std::time::{Duration, Instant};

fn t(offset_ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_750_000_000_000 + offset_ms).unwrap()
}

async fn insert_one(s: &Store) -> InstanceRecord {
    let id = InstanceId::new();
    let n = NewInstance {
        id,
        provider: "mock".parse().unwrap(),
        zone: "local".into(),
        instance_type: "mock-l4-1".into(),
        model: "gpufleet/sim-small".parse().unwrap(),
        idempotency_key: format!("key-{id}"),
        bootstrap_secret_hash: format!("secret-{id}"),
        startup_deadline_at: t(600_000),
        created_at: Utc::now(),
        deployment_id: None,
        engine_args: None,
        project_id: gpufleet_domain::ProjectId::default_project(),
        price_per_hour: None,
    };
    s.insert_instances(&[n]).await.unwrap().remove(0)
}

pub async fn leases_are_exclusive_and_change_hands(ctx: Ctx) {
    let s = &ctx.store;
    let ttl = Duration::from_secs(30);
    let a = s.acquire_lease("task", "a", ttl).await.unwrap().unwrap();
    assert!(s.acquire_lease("task", "b", ttl).await.unwrap().is_none());
    // Renewing keeps the token; another lease name is independent.
    let again = s.acquire_lease("task", "a", ttl).await.unwrap().unwrap();
    assert_eq!(again.token, a.token);
    assert!(again.expires_at_ms >= a.expires_at_ms);
    assert!(s.acquire_lease("other", "b", ttl).await.unwrap().is_some());
    // Released: the next holder gets a larger token.
    s.release_lease("task", "a").await.unwrap();
    let b = s.acquire_lease("task", "b", ttl).await.unwrap().unwrap();
    assert!(b.token > a.token);
    // Released by someone who does not hold it: nothing happens.
    s.release_lease("task", "a").await.unwrap();
    assert!(s.acquire_lease("task", "a", ttl).await.unwrap().is_none());
    let listed = s.leases().await.unwrap();
    let task = listed.iter().find(|l| l.name == "task").unwrap();
    assert_eq!(task.holder, "b");
    assert!(task.expires_at_ms > task.now_ms);
}

pub async fn an_expired_lease_is_taken_over(ctx: Ctx) {
    let s = &ctx.store;
    let a = s
        .acquire_lease("task", "a", Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let b = loop {
        if let Some(b) = s
            .acquire_lease("task", "b", Duration::from_secs(30))
            .await
            .unwrap()
        {
            break b;
        }
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(b.token > a.token);
    // The old holder renewing finds it gone.
    assert!(s
        .acquire_lease("task", "a", Duration::from_secs(30))
        .await
        .unwrap()
        .is_none());
}

pub async fn fenced_writes_need_the_current_lease(ctx: Ctx) {
    let s = &ctx.store;
    let rec = insert_one(s).await;
    let ttl = Duration::from_secs(30);
    let a = s
        .acquire_lease("provisioner", "a", ttl)
        .await
        .unwrap()
        .unwrap();
    let old_fence = a.fence();
    s.release_lease("provisioner", "a").await.unwrap();
    let b = s
        .acquire_lease("provisioner", "b", ttl)
        .await
        .unwrap()
        .unwrap();

    let mut next = rec.clone();
    next.status = InstanceStatus::Booting;
    next.provision_attempts = 1;
    let err = s
        .update_instance_fenced(&next, &[], Some(&old_fence))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Fenced { ref lease } if lease == "provisioner"),
        "{err}"
    );
    let unchanged = s.get_instance(rec.id).await.unwrap().unwrap();
    assert_eq!(unchanged.generation, rec.generation);
    assert_eq!(unchanged.status, InstanceStatus::Provisioning);

    let stored = s
        .update_instance_fenced(&next, &[], Some(&b.fence()))
        .await
        .unwrap();
    assert_eq!(stored.generation, rec.generation + 1);
    // A stale generation is still a conflict, fence or not.
    let err = s
        .update_instance_fenced(&next, &[], Some(&b.fence()))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
}

pub async fn committed_changes_are_announced(ctx: Ctx) {
    let s = &ctx.store;
    if s.backend() == Backend::Sqlite {
        // One replica: nothing to listen to.
        assert!(matches!(
            s.listen().await,
            Err(StoreError::NeedsPostgres { .. })
        ));
        return;
    }
    let mut listener = s.listen().await.unwrap();
    let rec = insert_one(s).await;
    assert_eq!(
        next_change(&mut listener).await,
        DbChange::Instance {
            id: rec.id,
            generation: rec.generation
        }
    );
    // A lifecycle write is announced with its new generation...
    let mut next = rec.clone();
    next.status = InstanceStatus::Booting;
    let stored = s.update_instance(&next, &[]).await.unwrap();
    // ...and an API key's revocation with its digest.
    let key = s
        .insert_api_key(&NewApiKey {
            id: ApiKeyId::new(),
            name: "k".into(),
            key_hash: "digest-1".into(),
            models: None,
            created_at: t(0),
            project_id: gpufleet_domain::ProjectId::default_project(),
            limits: Default::default(),
        })
        .await
        .unwrap();
    s.revoke_api_key(key.id, t(5)).await.unwrap();
    assert_eq!(
        next_change(&mut listener).await,
        DbChange::Instance {
            id: rec.id,
            generation: stored.generation
        }
    );
    assert_eq!(
        next_change(&mut listener).await,
        DbChange::ApiKey {
            key_hash: "digest-1".into()
        }
    );
    // The catch-up read finds what changed since a time.
    let since = s.instances_updated_since(stored.updated_at).await.unwrap();
    assert!(since.iter().any(|r| r.id == rec.id));
    assert!(s
        .instances_updated_since(stored.updated_at + chrono::Duration::seconds(60))
        .await
        .unwrap()
        .is_empty());
}

async fn next_change(l: &mut gpufleet_store::ChangeListener) -> DbChange {
    tokio::time::timeout(Duration::from_secs(10), l.recv())
        .await
        .expect("a notification within 10 s")
}

pub async fn rate_shares_add_up_across_replicas(ctx: Ctx) {
    use gpufleet_store::RateShare;
    let s = &ctx.store;
    let (k1, k2) = (ApiKeyId::new(), ApiKeyId::new());
    let share = |requests, tokens| RateShare { requests, tokens };
    s.put_rate_shares("a", &[(k1, share(3, 300)), (k2, share(1, 0))])
        .await
        .unwrap();
    s.put_rate_shares("b", &[(k1, share(2, 50))]).await.unwrap();
    // Replica c sees both; each of a and b sees only the other.
    let c = s.other_rate_shares("c").await.unwrap();
    assert_eq!(c.get(&k1), Some(&share(5, 350)));
    assert_eq!(c.get(&k2), Some(&share(1, 0)));
    let a = s.other_rate_shares("a").await.unwrap();
    assert_eq!(a.get(&k1), Some(&share(2, 50)));
    assert_eq!(a.get(&k2), None);
    // A new value replaces the old; a zero share removes the row.
    s.put_rate_shares("a", &[(k1, share(4, 400)), (k2, share(0, 0))])
        .await
        .unwrap();
    let b = s.other_rate_shares("b").await.unwrap();
    assert_eq!(b.get(&k1), Some(&share(4, 400)));
    assert_eq!(b.get(&k2), None, "{b:?}");
    // Counts beyond i64 are refused, and nothing of that write lands.
    let err = s
        .put_rate_shares("a", &[(k2, share(7, 7)), (k1, share(u64::MAX, 0))])
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("requests"), "{err:?}");
    let b = s.other_rate_shares("b").await.unwrap();
    assert_eq!(b.get(&k1), Some(&share(4, 400)));
    assert_eq!(b.get(&k2), None);
}
