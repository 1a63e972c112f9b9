//! Projects, users, roles, sessions, access tokens, the audit log, usage per
//! hour and billable instances, on every backend (see `main.rs`).

use crate::harness::Ctx;
use chrono::{DateTime, Duration, Utc};
use gpufleet_domain::{AccessTokenId, ActorKind, AuditOutcome, ProjectId, Role, UserId};
use gpufleet_store::{
    hour_of, AccessTokenRecord, ApiKeyId, AuditFilter, HourlyUsage, Membership, NewAuditEntry,
    SessionRecord, UserRecord,
};

fn t(offset_ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_750_000_000_000 + offset_ms).unwrap()
}

fn p(s: &str) -> ProjectId {
    s.parse().unwrap()
}

fn user(email: &str) -> UserRecord {
    UserRecord {
        id: UserId::new(),
        email: email.to_string(),
        display_name: email.to_string(),
        password_hash: Some("$argon2id$...".into()),
        oidc_issuer: None,
        oidc_subject: None,
        created_at: t(0),
        disabled_at: None,
    }
}

pub async fn projects_users_and_roles(ctx: Ctx) {
    let s = &ctx.store;
    // `default` owns what existed before projects.
    let all = s.list_projects().await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].id, ProjectId::default_project());
    assert!(s
        .insert_project(&p("research"), t(1))
        .await
        .unwrap()
        .is_some());
    assert!(s
        .insert_project(&p("research"), t(2))
        .await
        .unwrap()
        .is_none());
    assert_eq!(s.list_projects().await.unwrap().len(), 2);

    let ann = s
        .insert_user(&user("Ann@Example.com"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ann.email, "ann@example.com");
    // The same email, whatever its case, is taken.
    assert!(s
        .insert_user(&user("ANN@example.com"))
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        s.user_by_email("ann@EXAMPLE.com")
            .await
            .unwrap()
            .unwrap()
            .id,
        ann.id
    );
    s.link_user_oidc(ann.id, "https://idp", "sub-1")
        .await
        .unwrap();
    assert_eq!(
        s.user_by_oidc("https://idp", "sub-1")
            .await
            .unwrap()
            .unwrap()
            .id,
        ann.id
    );
    assert!(s
        .user_by_oidc("https://idp", "sub-2")
        .await
        .unwrap()
        .is_none());

    let m = |role| Membership {
        project_id: p("research"),
        user_id: ann.id,
        role,
        granted_at: t(3),
        granted_by: "admin token".into(),
    };
    s.upsert_member(&m(Role::Viewer)).await.unwrap();
    s.upsert_member(&m(Role::Operator)).await.unwrap();
    let mine = s.memberships_of(ann.id).await.unwrap();
    assert_eq!(mine, vec![m(Role::Operator)]);
    assert_eq!(s.members_of(&p("research")).await.unwrap().len(), 1);
    assert!(s.members_of(&p("default")).await.unwrap().is_empty());
    assert!(s.delete_member(&p("research"), ann.id).await.unwrap());
    assert!(!s.delete_member(&p("research"), ann.id).await.unwrap());
    assert!(s.memberships_of(ann.id).await.unwrap().is_empty());
}

pub async fn sessions_expire_and_tokens_revoke(ctx: Ctx) {
    let s = &ctx.store;
    let ann = s
        .insert_user(&user("ann@example.com"))
        .await
        .unwrap()
        .unwrap();
    let bob = s
        .insert_user(&user("bob@example.com"))
        .await
        .unwrap()
        .unwrap();
    let session = SessionRecord {
        token_hash: "h1".into(),
        user_id: ann.id,
        csrf_hash: "c1".into(),
        created_at: t(0),
        expires_at: t(1_000),
        last_seen_at: t(0),
    };
    s.insert_session(&session).await.unwrap();
    assert_eq!(
        s.session_by_hash("h1", t(999)).await.unwrap(),
        Some(session)
    );
    assert_eq!(s.session_by_hash("h1", t(1_000)).await.unwrap(), None);
    assert_eq!(s.delete_expired_sessions(t(1_000)).await.unwrap(), 1);

    let tok = AccessTokenRecord {
        id: AccessTokenId::new(),
        user_id: ann.id,
        name: "ci".into(),
        token_hash: "th".into(),
        created_at: t(0),
        expires_at: Some(t(10_000)),
        last_used_at: None,
        revoked_at: None,
    };
    s.insert_access_token(&tok).await.unwrap();
    assert_eq!(
        s.access_token_by_hash("th").await.unwrap(),
        Some(tok.clone())
    );
    s.touch_access_token(tok.id, t(5)).await.unwrap();
    // Another user cannot revoke it.
    assert!(!s.revoke_access_token(bob.id, tok.id, t(6)).await.unwrap());
    assert!(s.revoke_access_token(ann.id, tok.id, t(7)).await.unwrap());
    assert!(!s.revoke_access_token(ann.id, tok.id, t(8)).await.unwrap());
    let got = s.access_tokens_of(ann.id).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].revoked_at, Some(t(7)));
    assert_eq!(got[0].last_used_at, Some(t(5)));
}

fn entry(at: i64, action: &str, project: Option<&str>, outcome: AuditOutcome) -> NewAuditEntry {
    NewAuditEntry {
        at: t(at),
        actor_kind: ActorKind::User,
        actor_id: Some("us-1".into()),
        actor_name: "ann@example.com".into(),
        action: action.into(),
        target_kind: "instance".into(),
        target_id: Some(format!("target-{at}")),
        project_id: project.map(p),
        outcome,
        status: 200,
        message: "m".into(),
        source_ip: Some("127.0.0.1".into()),
    }
}

pub async fn audit_entries_filter_and_page(ctx: Ctx) {
    let s = &ctx.store;
    s.append_audit(&entry(
        0,
        "instance.create",
        Some("a"),
        AuditOutcome::Success,
    ))
    .await
    .unwrap();
    s.append_audit(&entry(
        10,
        "instance.terminate",
        Some("b"),
        AuditOutcome::Denied,
    ))
    .await
    .unwrap();
    s.append_audit(&entry(
        20,
        "api_key.create",
        Some("a"),
        AuditOutcome::Success,
    ))
    .await
    .unwrap();
    s.append_audit(&entry(30, "auth.sign_in", None, AuditOutcome::Failure))
        .await
        .unwrap();
    let f = |f: AuditFilter| async move {
        s.list_audit(&AuditFilter { limit: 100, ..f })
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.entry.at)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        f(AuditFilter::default()).await,
        vec![t(30), t(20), t(10), t(0)]
    );
    let prefix = AuditFilter {
        action: Some("instance.".into()),
        ..Default::default()
    };
    assert_eq!(f(prefix).await, vec![t(10), t(0)]);
    let projects = AuditFilter {
        projects: Some(vec![p("a")]),
        ..Default::default()
    };
    assert_eq!(f(projects).await, vec![t(20), t(0)]);
    let none = AuditFilter {
        projects: Some(vec![]),
        ..Default::default()
    };
    assert!(f(none).await.is_empty());
    // A user's own entries without a project (sign-ins), beside their
    // projects' or alone; never someone else's.
    let mut theirs = entry(40, "auth.sign_in", None, AuditOutcome::Success);
    theirs.actor_id = Some("us-2".into());
    theirs.actor_name = "bob@example.com".into();
    s.append_audit(&theirs).await.unwrap();
    // A refused sign-in with their email: made by nobody, aimed at them.
    let mut refused = entry(50, "auth.sign_in", None, AuditOutcome::Denied);
    refused.actor_kind = ActorKind::Anonymous;
    refused.actor_id = None;
    refused.actor_name = "bob@example.com".into();
    refused.target_id = Some("us-2".into());
    s.append_audit(&refused).await.unwrap();
    let own_and_a = AuditFilter {
        projects: Some(vec![p("a")]),
        own: Some("us-1".into()),
        ..Default::default()
    };
    assert_eq!(f(own_and_a).await, vec![t(30), t(20), t(0)]);
    let own_only = AuditFilter {
        projects: Some(vec![]),
        own: Some("us-2".into()),
        ..Default::default()
    };
    assert_eq!(f(own_only).await, vec![t(50), t(40)]);
    let own_signed_in = AuditFilter {
        projects: Some(vec![]),
        own: Some("us-1".into()),
        action: Some("auth.".into()),
        ..Default::default()
    };
    assert_eq!(f(own_signed_in).await, vec![t(30)]);
    let denied = AuditFilter {
        outcome: Some(AuditOutcome::Denied),
        actor: Some("ann@example.com".into()),
        ..Default::default()
    };
    assert_eq!(f(denied).await, vec![t(10)]);
    let window = AuditFilter {
        from: Some(t(10)),
        to: Some(t(30)),
        target: Some("target-20".into()),
        ..Default::default()
    };
    assert_eq!(f(window).await, vec![t(20)]);
    // Paging: two at a time, older with `before`.
    let page1 = s
        .list_audit(&AuditFilter {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let page2 = s
        .list_audit(&AuditFilter {
            limit: 2,
            before: Some(page1[1].id),
            ..Default::default()
        })
        .await
        .unwrap();
    let at: Vec<_> = page1.iter().chain(&page2).map(|e| e.entry.at).collect();
    assert_eq!(at, vec![t(50), t(40), t(30), t(20)]);
    assert_eq!(page1[0].entry, refused);
    assert_eq!(page1[1].entry, theirs);
    assert_eq!(
        page2[0].entry,
        entry(30, "auth.sign_in", None, AuditOutcome::Failure)
    );
}

pub async fn hourly_usage_adds_up_and_charges_keys(ctx: Ctx) {
    let s = &ctx.store;
    let rec = s
        .insert_instances(&[crate::cases::new_instance(0)])
        .await
        .unwrap()
        .remove(0);
    let key = ApiKeyId::new();
    let row = |at: DateTime<Utc>, key: Option<ApiKeyId>, tokens: u64, cost: f64| HourlyUsage {
        hour: at,
        key_id: key,
        instance_id: rec.id,
        project_id: ProjectId::default_project(),
        model: rec.model.clone(),
        deployment_id: None,
        requests: 1,
        errors: 0,
        prompt_tokens: tokens,
        completion_tokens: 2 * tokens,
        cost,
    };
    let h = hour_of(t(0));
    // Two flushes in one hour add up; the hour is aligned whatever was given.
    s.add_hourly_usage(&[row(h + Duration::minutes(5), Some(key), 10, 0.25)])
        .await
        .unwrap();
    s.add_hourly_usage(&[
        row(h + Duration::minutes(50), Some(key), 5, 0.5),
        row(h + Duration::minutes(50), None, 7, 0.0),
        row(h + Duration::hours(1), Some(key), 1, 1.0),
    ])
    .await
    .unwrap();
    let rows = s.hourly_usage(h, h + Duration::hours(2)).await.unwrap();
    assert_eq!(rows.len(), 3);
    let first = rows
        .iter()
        .find(|r| r.key_id == Some(key) && r.hour == h)
        .unwrap();
    assert_eq!(
        (first.requests, first.prompt_tokens, first.completion_tokens),
        (2, 15, 30)
    );
    assert!((first.cost - 0.75).abs() < 1e-12);
    let none = rows.iter().find(|r| r.key_id.is_none()).unwrap();
    assert_eq!(none.prompt_tokens, 7);
    // Only the first hour.
    assert_eq!(
        s.hourly_usage(h, h + Duration::hours(1))
            .await
            .unwrap()
            .len(),
        2
    );
    let charges = s.key_charges_since(h).await.unwrap();
    assert!((charges[&key] - 1.75).abs() < 1e-12);
    let later = s.key_charges_since(h + Duration::hours(1)).await.unwrap();
    assert!((later[&key] - 1.0).abs() < 1e-12);
    // The same split in two: the first hour alone, then from the second.
    let first_hour = s
        .key_charges_between(h, Some(h + Duration::hours(1)))
        .await
        .unwrap();
    assert!((first_hour[&key] - 0.75).abs() < 1e-12);
    let from_second = s
        .key_charges_between(h + Duration::hours(1), None)
        .await
        .unwrap();
    assert_eq!(from_second, later);
    assert!(s.key_charges_between(h, Some(h)).await.unwrap().is_empty());

    // Billable: from the provider's machine to its deletion.
    let mut billed = rec.clone();
    billed.billing_started_at = Some(t(1_000));
    billed.billing_ended_at = Some(t(5_000));
    s.update_instance(&billed, &[]).await.unwrap();
    let overlap =
        |a: i64, b: i64| async move { s.billable_instances(t(a), t(b)).await.unwrap().len() };
    assert_eq!(overlap(0, 1_000).await, 0);
    assert_eq!(overlap(0, 1_001).await, 1);
    assert_eq!(overlap(4_999, 9_000).await, 1);
    assert_eq!(overlap(5_000, 9_000).await, 0);
    let got = s.get_instance(rec.id).await.unwrap().unwrap();
    assert_eq!(got.billing_started_at, Some(t(1_000)));
    assert_eq!(got.billing_ended_at, Some(t(5_000)));
}
