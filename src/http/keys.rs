//! `POST /api/key/` and `GET /api/keys/list/`: a user's API keys.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::auth::required;
use super::{AppState, AuthUser};
use crate::auth;
use crate::error::ApiError;

const MAX_KEY_NAME_CHARS: usize = 100;

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
        .map_err(|err| ApiError::internal("cannot create API key", err))?;
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
        .map_err(|err| ApiError::internal("cannot list API keys", err))?;
    Ok(HttpResponse::Ok().json(keys))
}
