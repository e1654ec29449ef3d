//! Users, API keys and refresh tokens in PostgreSQL.
//!
//! Each statement lives in `sql/queries/` and is prepared once per pooled connection.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;
use uuid::Uuid;

const INSERT_USER: &str = include_str!("../sql/queries/insert_user.sql");
const FIND_USER_BY_USERNAME: &str = include_str!("../sql/queries/find_user_by_username.sql");
const INSERT_API_KEY: &str = include_str!("../sql/queries/insert_api_key.sql");
const LIST_API_KEYS: &str = include_str!("../sql/queries/list_api_keys.sql");
const FIND_API_KEY: &str = include_str!("../sql/queries/find_api_key.sql");
const TOUCH_API_KEY: &str = include_str!("../sql/queries/touch_api_key.sql");
const UPDATE_API_KEY_LIMIT: &str = include_str!("../sql/queries/update_api_key_limit.sql");
const REVOKE_API_KEY: &str = include_str!("../sql/queries/revoke_api_key.sql");
const INSERT_REFRESH_TOKEN: &str = include_str!("../sql/queries/insert_refresh_token.sql");
const USE_REFRESH_TOKEN: &str = include_str!("../sql/queries/use_refresh_token.sql");
const REVOKE_USER_REFRESH_TOKENS: &str =
    include_str!("../sql/queries/revoke_user_refresh_tokens.sql");

/// A failed account operation.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("username is already taken")]
    UsernameTaken,
    #[error("email is already registered")]
    EmailTaken,
    #[error("cannot get a PostgreSQL connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("PostgreSQL error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

impl AccountError {
    /// True when PostgreSQL could not be reached or the connection broke, as opposed to
    /// PostgreSQL rejecting the statement.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Pool(_) => true,
            Self::Postgres(err) => err.as_db_error().is_none(),
            Self::UsernameTaken | Self::EmailTaken => false,
        }
    }

    /// True when a row names a user that does not exist (SQLSTATE 23503).
    pub fn is_missing_user(&self) -> bool {
        let Self::Postgres(err) = self else {
            return false;
        };
        err.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION)
    }
}

/// A stored user, as needed to check a login.
pub struct UserCredentials {
    pub id: i64,
    pub password_hash: String,
}

/// An API key as its owner sees it in listings: never the secret.
#[derive(Debug, Clone, Serialize)]
pub struct ApiKeyInfo {
    pub id: i64,
    pub name: String,
    pub prefix: String,
    pub active: bool,
    pub rate_limit_per_minute: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// An API key as the ingest path needs it.
#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    pub id: i64,
    pub user_id: i64,
    pub key_hash: Vec<u8>,
    pub active: bool,
    pub rate_limit_per_minute: Option<i32>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// The account store.
#[derive(Clone)]
pub struct Accounts {
    pool: Pool,
}

impl Accounts {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Creates a user and returns its id and creation time.
    pub async fn create_user(
        &self,
        username: &str,
        email: &str,
        password_hash: &str,
    ) -> Result<(i64, DateTime<Utc>), AccountError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(INSERT_USER).await?;
        let row = client
            .query_one(&statement, &[&username, &email, &password_hash])
            .await
            .map_err(unique_violation)?;
        Ok((row.get(0), row.get(1)))
    }

    pub async fn find_user(&self, username: &str) -> Result<Option<UserCredentials>, AccountError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(FIND_USER_BY_USERNAME).await?;
        let row = client.query_opt(&statement, &[&username]).await?;
        Ok(row.map(|row| UserCredentials {
            id: row.get(0),
            password_hash: row.get(1),
        }))
    }

    /// Stores a new API key (its hash and display prefix) and returns its id and time.
    pub async fn create_api_key(
        &self,
        user_id: i64,
        name: &str,
        prefix: &str,
        key_hash: &[u8],
    ) -> Result<(i64, DateTime<Utc>), AccountError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(INSERT_API_KEY).await?;
        let row = client
            .query_one(&statement, &[&user_id, &name, &prefix, &key_hash])
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    pub async fn list_api_keys(&self, user_id: i64) -> Result<Vec<ApiKeyInfo>, AccountError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(LIST_API_KEYS).await?;
        let rows = client.query(&statement, &[&user_id]).await?;
        Ok(rows.iter().map(api_key_info).collect())
    }

    pub async fn find_api_key(
        &self,
        key_hash: &[u8],
    ) -> Result<Option<ApiKeyRecord>, AccountError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(FIND_API_KEY).await?;
        let row = client.query_opt(&statement, &[&key_hash]).await?;
        Ok(row.map(|row| ApiKeyRecord {
            id: row.get(0),
            user_id: row.get(1),
            key_hash: row.get(2),
            active: row.get(3),
            rate_limit_per_minute: row.get(4),
            last_used_at: row.get(5),
        }))
    }

    /// Sets or clears (`None`) the own limit of a key of `user_id`; `None` when the user
    /// has no such key.
    pub async fn set_api_key_limit(
        &self,
        key_id: i64,
        user_id: i64,
        limit: Option<i32>,
    ) -> Result<Option<ApiKeyInfo>, AccountError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(UPDATE_API_KEY_LIMIT).await?;
        let row = client
            .query_opt(&statement, &[&key_id, &user_id, &limit])
            .await?;
        Ok(row.as_ref().map(api_key_info))
    }

    /// Revokes a key of `user_id`; false when the user has no such key.
    pub async fn revoke_api_key(&self, key_id: i64, user_id: i64) -> Result<bool, AccountError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(REVOKE_API_KEY).await?;
        Ok(client.execute(&statement, &[&key_id, &user_id]).await? == 1)
    }

    /// Records that a key was used now.
    pub async fn touch_api_key(&self, key_id: i64) -> Result<(), AccountError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(TOUCH_API_KEY).await?;
        client.execute(&statement, &[&key_id]).await?;
        Ok(())
    }

    pub async fn store_refresh_token(
        &self,
        jti: Uuid,
        user_id: i64,
        token_hash: &[u8],
        expires_at: DateTime<Utc>,
    ) -> Result<(), AccountError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(INSERT_REFRESH_TOKEN).await?;
        client
            .execute(&statement, &[&jti, &user_id, &token_hash, &expires_at])
            .await?;
        Ok(())
    }

    /// Marks refresh token `jti` used and returns its owner and hash, or `None` when it
    /// does not exist, has expired or was used before.
    pub async fn use_refresh_token(
        &self,
        jti: Uuid,
    ) -> Result<Option<(i64, Vec<u8>)>, AccountError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(USE_REFRESH_TOKEN).await?;
        let row = client.query_opt(&statement, &[&jti]).await?;
        Ok(row.map(|row| (row.get(0), row.get(1))))
    }

    /// Ends every refresh token of the user who owns `jti`: a reused token means it was
    /// copied, and neither copy may go on.
    pub async fn revoke_refresh_family(&self, jti: Uuid) -> Result<u64, AccountError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(REVOKE_USER_REFRESH_TOKENS).await?;
        Ok(client.execute(&statement, &[&jti]).await?)
    }
}

fn api_key_info(row: &Row) -> ApiKeyInfo {
    ApiKeyInfo {
        id: row.get(0),
        name: row.get(1),
        prefix: row.get(2),
        active: row.get(3),
        rate_limit_per_minute: row.get(4),
        created_at: row.get(5),
        last_used_at: row.get(6),
    }
}

/// Turns a unique violation on `users` into the field that collided.
fn unique_violation(err: tokio_postgres::Error) -> AccountError {
    let constraint = err
        .as_db_error()
        .filter(|db| *db.code() == SqlState::UNIQUE_VIOLATION)
        .and_then(|db| db.constraint());
    match constraint {
        Some("users_username_key") => AccountError::UsernameTaken,
        Some("users_email_key") => AccountError::EmailTaken,
        _ => AccountError::Postgres(err),
    }
}

/// Entries the API-key cache may contain before it drops expired ones, and all if none
/// expired.
const KEY_CACHE_MAX_ENTRIES: usize = 50_000;

/// API-key lookups by hash, each kept for a fixed time (`auth.api_key_cache_ms`), unknown
/// keys included, so that the ingest path does not query PostgreSQL on every request.
/// A revoked key or a changed limit takes effect on every instance once its entry expires.
pub struct ApiKeyCache {
    ttl: Duration,
    entries: Mutex<HashMap<Vec<u8>, CachedKey>>,
}

/// When a key was looked up, and what was found (`None`: no such key).
type CachedKey = (Instant, Option<ApiKeyRecord>);

impl ApiKeyCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Returns the key with this hash, from the cache while its entry is fresh. While
    /// PostgreSQL cannot be reached, an expired entry is used rather than failing, so
    /// known keys keep ingesting into Kafka during a database outage.
    pub async fn find(
        &self,
        accounts: &Accounts,
        key_hash: &[u8],
    ) -> Result<Option<ApiKeyRecord>, AccountError> {
        if let Some((true, cached)) = self.cached(key_hash) {
            return Ok(cached);
        }
        match accounts.find_api_key(key_hash).await {
            Ok(record) => {
                self.store(key_hash, record.clone());
                Ok(record)
            }
            Err(err) => match self.cached(key_hash) {
                Some((_, stale)) => {
                    tracing::debug!(error = %err, "API-key lookup failed; using the cached entry");
                    Ok(stale)
                }
                None => Err(err),
            },
        }
    }

    /// Returns whether the entry is fresh, and the entry.
    fn cached(&self, key_hash: &[u8]) -> Option<(bool, Option<ApiKeyRecord>)> {
        let entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (fetched, record) = entries.get(key_hash)?;
        Some((fetched.elapsed() < self.ttl, record.clone()))
    }

    fn store(&self, key_hash: &[u8], record: Option<ApiKeyRecord>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() >= KEY_CACHE_MAX_ENTRIES {
            let ttl = self.ttl;
            entries.retain(|_, (fetched, _)| fetched.elapsed() < ttl);
            if entries.len() >= KEY_CACHE_MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key_hash.to_vec(), (Instant::now(), record));
    }
}
