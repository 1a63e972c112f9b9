//! The store test suite: every case runs on SQLite and on PostgreSQL.
//!
//! PostgreSQL: `GPUFLEET_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432`) must reach a server that lets us
//! create databases; each case gets its own (`gpufleet_test_support::db`). Set
//! `GPUFLEET_TEST_SKIP_POSTGRES=1` to skip (loudly) where there is none.

mod api_key_cases;
mod cases;
mod deployment_cases;
mod harness;
mod replica_cases;
mod team_cases;

macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    crate::harness::run_sqlite(crate::cases::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    crate::harness::run_postgres(crate::cases::$name).await;
                }
            )*
        }
    };
}

store_tests!(
    migrations_are_idempotent,
    cluster_id_is_stable,
    insert_and_get,
    an_instance_moves_to_another_project,
    insert_rejects_duplicate_id_atomically,
    an_idempotency_key_inserts_once,
    concurrent_uses_of_an_idempotency_key_insert_once,
    list_filters_and_orders,
    list_archived_handling,
    update_cas_succeeds_and_bumps_generation,
    update_stale_generation_conflicts_and_writes_nothing,
    update_missing_instance_is_not_found,
    concurrent_updates_one_wins,
    timeline_append_list_and_paging,
    register_agent_once,
    register_agent_wrong_secret_rejected,
    register_agent_concurrently_one_token_works,
    tokens_lookup_and_revoke,
    heartbeat_applied_then_stale_ignored,
    heartbeat_does_not_bump_generation_and_update_keeps_heartbeat_columns,
    heartbeat_for_unknown_instance_is_not_found,
    samples_with_gpus_round_trip,
    optional_floats_go_from_null_to_a_value,
    count_by_status_counts_everything,
    corrupt_status_is_an_error,
    corrupt_event_is_an_error,
    batch_ingestion_orders_and_guards,
    series_from_raw_is_aligned,
    rollups_match_raw_and_are_idempotent,
    retention_deletes_only_old_rows,
    fleet_now_and_series,
    out_of_range_values_round_trip,
    staged_samples_read_the_same_before_and_after_compaction,
    ingest_session_writes_moves_and_closes,
    moves_beside_concurrent_staging_keep_every_heartbeat,
    latest_samples_of_many_instances,
    unknown_gpu_figures_stay_unknown_through_rollups,
    engine_canary_of_the_latest_heartbeat,
);

macro_rules! api_key_store_tests {
    ($($name:ident),* $(,)?) => {
        mod api_keys_sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    crate::harness::run_sqlite(crate::api_key_cases::$name).await;
                }
            )*
        }
        mod api_keys_postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    crate::harness::run_postgres(crate::api_key_cases::$name).await;
                }
            )*
        }
    };
}

api_key_store_tests!(
    api_keys_insert_lookup_list_revoke,
    usage_counters_add_up,
    budgets_go_from_null_to_a_value,
);

macro_rules! replica_store_tests {
    ($($name:ident),* $(,)?) => {
        mod replicas_sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    crate::harness::run_sqlite(crate::replica_cases::$name).await;
                }
            )*
        }
        mod replicas_postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    crate::harness::run_postgres(crate::replica_cases::$name).await;
                }
            )*
        }
    };
}

replica_store_tests!(
    leases_are_exclusive_and_change_hands,
    an_expired_lease_is_taken_over,
    fenced_writes_need_the_current_lease,
    committed_changes_are_announced,
    rate_shares_add_up_across_replicas,
);

macro_rules! deployment_store_tests {
    ($($name:ident),* $(,)?) => {
        mod deployments_sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    crate::harness::run_sqlite(crate::deployment_cases::$name).await;
                }
            )*
        }
        mod deployments_postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    crate::harness::run_postgres(crate::deployment_cases::$name).await;
                }
            )*
        }
    };
}

deployment_store_tests!(
    deployments_insert_get_list_and_live_names,
    deployment_updates_are_compare_and_swap,
    deployment_timeline_appends_and_pages,
    instances_carry_their_deployment,
    model_demand_moves_forward_only_and_survives_updates,
);

/// `names` of module `cases` as tests on SQLite (module `$sqlite`) and on
/// PostgreSQL (module `$postgres`).
macro_rules! on_both_backends {
    ($sqlite:ident, $postgres:ident, $cases:ident: $($name:ident),* $(,)?) => {
        mod $sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    crate::harness::run_sqlite(crate::$cases::$name).await;
                }
            )*
        }
        mod $postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    crate::harness::run_postgres(crate::$cases::$name).await;
                }
            )*
        }
    };
}

on_both_backends!(
    teams_sqlite,
    teams_postgres,
    team_cases: projects_users_and_roles,
    sessions_expire_and_tokens_revoke,
    audit_entries_filter_and_page,
    hourly_usage_adds_up_and_charges_keys,
);
