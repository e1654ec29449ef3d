//! A user's API keys: `POST /api/key/`, `GET /api/keys/list/`, and
//! `PATCH` / `DELETE /api/keys/{id}/`.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::auth::required;
use super::{AppState, AuthUser};
use crate::auth;
use crate::error::ApiError;

const MAX_KEY_NAME_CHARS: usize = 100;

/// Largest own limit a key may carry, in requests per minute (a million a second).
const MAX_KEY_LIMIT_PER_MINUTE: i64 = 60_000_000;

/// Body of `POST /api/key/`.
#[derive(Debug, Deserialize)]
pub struct CreateKeyRequest {
    name: Option<String>,
}

#[derive(Serialize)]
struct CreatedKey {
    id: i64,
    name: String,
    /// The whole key; this response is the only place it ever appears.
    api_key: String,
    prefix: String,
    created_at: DateTime<Utc>,
}

/// Creates an API key for the caller.
pub async fn create(
    state: web::Data<AppState>,
    user: AuthUser,
    body: web::Json<CreateKeyRequest>,
) -> Result<HttpResponse, ApiError> {
    let name = required("name", body.into_inner().name)?;
    let name_chars = name.trim().chars().count();
    if name_chars == 0 || name_chars > MAX_KEY_NAME_CHARS {
        return Err(ApiError::field(
            "name",
            format!("must be 1 to {MAX_KEY_NAME_CHARS} characters long"),
        ));
    }
    if name.contains('\0') {
        return Err(ApiError::field(
            "name",
            "must not contain the NUL character",
        ));
    }

    let key = auth::generate_api_key();
    let (id, created_at) = state
        .accounts
        .create_api_key(user.0, &name, &key.prefix, &key.hash)
        .await
        .map_err(|err| {
            // A valid token whose user was deleted names no user to own the key.
            if err.is_missing_user() {
                return ApiError::Unauthorized("invalid or expired access token");
            }
            state.account_error("cannot create API key", err)
        })?;
    tracing::info!(user_id = user.0, key_id = id, "API key created");

    Ok(HttpResponse::Created().json(CreatedKey {
        id,
        name,
        api_key: key.secret,
        prefix: key.prefix,
        created_at,
    }))
}

/// Lists the caller's keys, without their secrets.
pub async fn list(state: web::Data<AppState>, user: AuthUser) -> Result<HttpResponse, ApiError> {
    let keys = state
        .accounts
        .list_api_keys(user.0)
        .await
        .map_err(|err| state.account_error("cannot list API keys", err))?;
    Ok(HttpResponse::Ok().json(keys))
}

/// Sets or clears a key's own rate limit: `{"rate_limit_per_minute": n}` or `null` for
/// the configured default.
pub async fn update(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let key_id = key_id(&path)?;
    let limit = rate_limit_field(&body)?;

    let updated = state
        .accounts
        .set_api_key_limit(key_id, user.0, limit)
        .await
        .map_err(|err| state.account_error("cannot update API key", err))?;
    let key = updated.ok_or(ApiError::NotFound)?;
    tracing::info!(user_id = user.0, key_id, limit = ?limit, "API key limit changed");
    Ok(HttpResponse::Ok().json(key))
}

/// Revokes a key. It stops working on every instance within `auth.api_key_cache_ms`.
pub async fn revoke(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let key_id = key_id(&path)?;
    let revoked = state
        .accounts
        .revoke_api_key(key_id, user.0)
        .await
        .map_err(|err| state.account_error("cannot revoke API key", err))?;
    if !revoked {
        return Err(ApiError::NotFound);
    }
    tracing::info!(user_id = user.0, key_id, "API key revoked");
    Ok(HttpResponse::NoContent().finish())
}

/// Reads the key id of the path; an id that is not a number names no key.
fn key_id(path: &str) -> Result<i64, ApiError> {
    path.parse().map_err(|_| ApiError::NotFound)
}

fn rate_limit_field(body: &serde_json::Value) -> Result<Option<i32>, ApiError> {
    const FIELD: &str = "rate_limit_per_minute";
    let value = body
        .get(FIELD)
        .ok_or_else(|| ApiError::field(FIELD, "is required: a number of requests, or null"))?;
    if value.is_null() {
        return Ok(None);
    }
    let limit = value
        .as_i64()
        .filter(|limit| (1..=MAX_KEY_LIMIT_PER_MINUTE).contains(limit))
        .ok_or_else(|| {
            ApiError::field(
                FIELD,
                format!("must be a whole number from 1 to {MAX_KEY_LIMIT_PER_MINUTE}, or null"),
            )
        })?;
    Ok(Some(limit as i32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn limit_field_rules() {
        assert_eq!(
            rate_limit_field(&json!({"rate_limit_per_minute": 5})).ok(),
            Some(Some(5))
        );
        assert_eq!(
            rate_limit_field(&json!({"rate_limit_per_minute": null})).ok(),
            Some(None)
        );
        for bad in [
            json!({}),
            json!({"rate_limit_per_minute": 0}),
            json!({"rate_limit_per_minute": -1}),
            json!({"rate_limit_per_minute": 1.5}),
            json!({"rate_limit_per_minute": "5"}),
            json!({"rate_limit_per_minute": 60_000_001}),
            json!([]),
        ] {
            assert!(rate_limit_field(&bad).is_err(), "{bad}");
        }
    }
}
