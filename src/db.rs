//! The PostgreSQL pool and the migrations in `sql/`.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::NoTls;

use crate::config::PostgresConfig;

/// The numbered migrations, applied in order, each once.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../sql/0001_init.sql")),
    (
        2,
        "trace_context",
        include_str!("../sql/0002_trace_context.sql"),
    ),
];

/// Key of the advisory lock that lets one process at a time apply migrations.
const MIGRATION_LOCK_KEY: i64 = 0x6c6f_6770_6970_6531;

/// Builds the connection pool. Connections are opened on first use, so this does not
/// fail when the database is down.
pub fn pool(config: &PostgresConfig) -> anyhow::Result<Pool> {
    let mut pg_config =
        tokio_postgres::Config::from_str(&config.url).context("invalid setting postgres.url")?;
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    pg_config.connect_timeout(timeout);
    if pg_config.get_application_name().is_none() {
        pg_config.application_name("logpipe");
    }
    let manager = Manager::from_config(
        pg_config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(timeout),
            create: Some(timeout),
            recycle: Some(timeout),
        })
        .build()
        .context("cannot build the PostgreSQL pool")?;
    Ok(pool)
}

/// Applies the migrations not yet applied. Concurrent callers wait on an advisory lock,
/// so two instances starting together apply each migration once.
pub async fn migrate(pool: &Pool) -> anyhow::Result<Vec<i32>> {
    let mut client = pool.get().await.context("cannot connect to PostgreSQL")?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .context("cannot take the migration lock")?;
    let applied = apply_pending(&mut client).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let applied = applied?;
    unlock.context("cannot release the migration lock")?;
    Ok(applied)
}

async fn apply_pending(client: &mut deadpool_postgres::Client) -> anyhow::Result<Vec<i32>> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .context("cannot look for schema_migrations")?
        .get(0);
    if !exists {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
            )
            .await
            .context("cannot create schema_migrations")?;
    }
    let rows = client
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .context("cannot read schema_migrations")?;
    let done: Vec<i32> = rows.iter().map(|row| row.get(0)).collect();

    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if done.contains(&version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("migration {version} ({name}) failed"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied migration");
        applied.push(version);
    }
    Ok(applied)
}
