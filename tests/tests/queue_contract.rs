//! What the engine relies on in apalis-postgres' schema. The engine writes
//! and claims apalis jobs with its own statements and replaces
//! `apalis.get_jobs`, so an apalis-postgres upgrade that changes the jobs
//! table, the fetch function or the insert notification must fail here,
//! loudly, before it fails in production.

use std::time::Duration;

use harness::TestDb;
use sqlx::postgres::PgListener;

#[tokio::test]
async fn apalis_jobs_has_the_columns_the_engine_writes() -> anyhow::Result<()> {
    let db = TestDb::create_for_engine().await?;
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = 'apalis' AND table_name = 'jobs'",
    )
    .fetch_all(&db.pool)
    .await?;
    for (column, data_type) in [
        ("id", "text"),
        ("job_type", "text"),
        ("job", "bytea"),
        ("status", "text"),
        ("attempts", "integer"),
        ("max_attempts", "integer"),
        ("run_at", "timestamp with time zone"),
        ("lock_by", "text"),
        ("lock_at", "timestamp with time zone"),
        ("done_at", "timestamp with time zone"),
        ("priority", "integer"),
    ] {
        assert!(
            columns.iter().any(|(c, t)| c == column && t == data_type),
            "apalis.jobs.{column} {data_type} is gone or changed (found {columns:?}): \
             review shared/engine/src/queue.rs and the engine's migration"
        );
    }
    let workers: bool = sqlx::query_scalar("SELECT to_regclass('apalis.workers') IS NOT NULL")
        .fetch_one(&db.pool)
        .await?;
    assert!(workers, "apalis.workers is gone");
    Ok(())
}

#[tokio::test]
async fn the_engines_get_jobs_replaces_apalis_own() -> anyhow::Result<()> {
    let db = TestDb::create_for_engine().await?;
    let fetch: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT pg_get_function_identity_arguments(p.oid), l.lanname::text, p.prosrc
         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         JOIN pg_language l ON l.oid = p.prolang
         WHERE n.nspname = 'apalis' AND p.proname = 'get_jobs'",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        fetch.len(),
        1,
        "one apalis.get_jobs, the engine's: {fetch:?}"
    );
    let (arguments, language, source) = &fetch[0];
    assert_eq!(
        arguments, "worker_id text, v_job_type text, v_job_count integer",
        "apalis' fetch changed its signature: the engine's replacement no longer matches"
    );
    assert_eq!(
        language, "plpgsql",
        "the engine's PL/pgSQL fetch is in place"
    );
    assert!(
        source.contains("100 milliseconds"),
        "the engine's fetch (leaving notified jobs their first 100 ms) is in place"
    );
    let trigger: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'release_finished_job_lock')",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(trigger, "the engine's trigger on apalis.jobs is in place");
    Ok(())
}

#[tokio::test]
async fn a_started_workflow_announces_its_job_on_apalis_channel() -> anyhow::Result<()> {
    let db = TestDb::create_for_engine().await?;
    let mut listener = PgListener::connect_with(&db.pool).await?;
    listener.listen(engine::JOB_INSERT_CHANNEL).await?;
    let kind = engine::WorkflowKind {
        name: "contract",
        queue: "contract-queue",
    };
    engine::Engine::new(db.pool.clone())
        .start(kind, "announced", &serde_json::json!({}))
        .await?;
    let note = tokio::time::timeout(Duration::from_secs(30), listener.recv())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no notification on {}: apalis' insert trigger changed; workers would wait for their poll",
                engine::JOB_INSERT_CHANNEL
            )
        })??;
    let payload: serde_json::Value = serde_json::from_str(note.payload())?;
    assert_eq!(
        payload["job_type"], "contract-queue",
        "the notification names the queue: {payload}"
    );
    assert!(payload["id"].is_string(), "and the job: {payload}");
    Ok(())
}
