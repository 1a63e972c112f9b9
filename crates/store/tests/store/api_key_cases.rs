//! API keys and usage counters, on every backend (see `main.rs`).

use crate::harness::Ctx;
use chrono::{DateTime, Utc};
use gpufleet_store::{ApiKeyId, NewApiKey, UsageCounts, UsageDelta, UsageScope};

fn t(offset_ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_750_000_000_000 + offset_ms).unwrap()
}

fn key(name: &str, hash: &str, models: Option<Vec<&str>>, at_ms: i64) -> NewApiKey {
    NewApiKey {
        id: ApiKeyId::new(),
        name: name.to_string(),
        key_hash: hash.to_string(),
        models: models.map(|m| m.into_iter().map(String::from).collect()),
        created_at: t(at_ms),
        project_id: gpufleet_domain::ProjectId::default_project(),
        limits: Default::default(),
    }
}

pub async fn api_keys_insert_lookup_list_revoke(ctx: Ctx) {
    let s = &ctx.store;
    let a = s
        .insert_api_key(&key("ci", "hash-a", None, 0))
        .await
        .unwrap();
    let b = s
        .insert_api_key(&key("team", "hash-b", Some(vec!["m1", "m2"]), 10))
        .await
        .unwrap();
    // Same digest twice is refused (unique).
    assert!(s
        .insert_api_key(&key("dup", "hash-a", None, 20))
        .await
        .is_err());

    let got = s.api_key_by_hash("hash-b").await.unwrap().unwrap();
    assert_eq!(got, b);
    assert_eq!(
        got.models.as_deref(),
        Some(&["m1".to_string(), "m2".to_string()][..])
    );
    assert!(s.api_key_by_hash("nope").await.unwrap().is_none());

    let list = s.list_api_keys().await.unwrap();
    assert_eq!(list, vec![a.clone(), b.clone()]);

    let revoked = s.revoke_api_key(a.id, t(100)).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(t(100)));
    // Idempotent: keeps the first time.
    let again = s.revoke_api_key(a.id, t(200)).await.unwrap().unwrap();
    assert_eq!(again.revoked_at, Some(t(100)));
    assert_eq!(
        s.api_key_by_hash("hash-a")
            .await
            .unwrap()
            .unwrap()
            .revoked_at,
        Some(t(100))
    );
    assert!(s
        .revoke_api_key(ApiKeyId::new(), t(1))
        .await
        .unwrap()
        .is_none());
}

pub async fn usage_counters_add_up(ctx: Ctx) {
    let s = &ctx.store;
    assert!(s.list_usage().await.unwrap().is_empty());
    let d = |scope, subject: &str, requests, errors, p, c| UsageDelta {
        scope,
        subject: subject.to_string(),
        counts: UsageCounts {
            requests,
            errors,
            prompt_tokens: p,
            completion_tokens: c,
            stalls: requests,
            failovers: errors,
            ..Default::default()
        },
    };
    s.add_usage(
        &[
            d(UsageScope::Key, "ak-1", 2, 1, 10, 20),
            d(UsageScope::Instance, "i-1", 2, 0, 10, 20),
        ],
        t(0),
    )
    .await
    .unwrap();
    s.add_usage(&[d(UsageScope::Key, "ak-1", 3, 0, 5, 6)], t(50))
        .await
        .unwrap();
    s.add_usage(&[], t(60)).await.unwrap();
    let all = s.list_usage().await.unwrap();
    assert_eq!(all.len(), 2);
    let k = all.iter().find(|u| u.scope == UsageScope::Key).unwrap();
    assert_eq!(k.subject, "ak-1");
    assert_eq!(
        k.counts,
        UsageCounts {
            requests: 5,
            errors: 1,
            prompt_tokens: 15,
            completion_tokens: 26,
            stalls: 5,
            failovers: 1,
            ..Default::default()
        }
    );
    assert_eq!(k.updated_at, t(50));
    let i = all
        .iter()
        .find(|u| u.scope == UsageScope::Instance)
        .unwrap();
    assert_eq!(i.counts.requests, 2);
    assert_eq!(i.updated_at, t(0));
}

/// sqlx 0.8's Any driver sends a NULL `f64` to PostgreSQL as a `float4`:
/// a statement first run with NULL then refused a value on the same
/// connection ("incorrect binary data format"). Budgets go from NULL to a
/// value several times, on insert and on update.
pub async fn budgets_go_from_null_to_a_value(ctx: Ctx) {
    let s = &ctx.store;
    let steps = [None, None, None, Some(12.5), Some(12.5), Some(12.5)];
    for (i, budget) in steps.into_iter().enumerate() {
        let mut k = key("b", &format!("hash-budget-{i}"), None, i as i64);
        k.limits.monthly_budget = budget;
        let rec = s.insert_api_key(&k).await.unwrap();
        assert_eq!(rec.limits.monthly_budget, budget);
        let got = s.api_key_by_hash(&k.key_hash).await.unwrap().unwrap();
        assert_eq!(got.limits.monthly_budget, budget);
    }
    let id = s
        .insert_api_key(&key("u", "hash-budget-u", None, 0))
        .await
        .unwrap()
        .id;
    for budget in steps {
        let limits = gpufleet_domain::KeyLimits {
            monthly_budget: budget,
            ..Default::default()
        };
        let rec = s.set_api_key_limits(id, limits).await.unwrap().unwrap();
        assert_eq!(rec.limits.monthly_budget, budget);
    }
}
