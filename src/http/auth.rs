//! `POST /api/auth/signup/`, `/login/` and `/refresh/`.

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::accounts::AccountError;
use crate::actors::call;
use crate::actors::rate_limiter::{login_addr_subject, login_user_subject, Check, Limit, Refund};
use crate::auth::{self, IssuedToken, TokenType};
use crate::error::ApiError;

const USERNAME_CHARS: std::ops::RangeInclusive<usize> = 3..=150;
const MIN_PASSWORD_CHARS: usize = 10;
/// Longer passwords are rejected so that hashing cost stays bounded.
const MAX_PASSWORD_BYTES: usize = 1024;
const MAX_EMAIL_CHARS: usize = 254;

/// Body of `POST /api/auth/signup/`.
#[derive(Debug, Deserialize)]
pub struct SignupRequest {
    username: Option<String>,
    email: Option<String>,
    password: Option<String>,
}

#[derive(Debug, Serialize)]
struct SignupResponse {
    id: i64,
    username: String,
    email: String,
    created_at: DateTime<Utc>,
}

/// Body of `POST /api/auth/login/`.
#[derive(Debug, Deserialize)]
pub struct LoginRequest {
    username: Option<String>,
    password: Option<String>,
}

/// Body of `POST /api/auth/refresh/`.
#[derive(Debug, Deserialize)]
pub struct RefreshRequest {
    refresh: Option<String>,
}

#[derive(Debug, Serialize)]
struct TokenPair {
    access: String,
    refresh: String,
}

/// Creates a user.
pub async fn signup(
    state: web::Data<AppState>,
    body: web::Json<SignupRequest>,
) -> Result<HttpResponse, ApiError> {
    let SignupRequest {
        username,
        email,
        password,
    } = body.into_inner();
    let username = required("username", username)?;
    let email = required("email", email)?;
    let password = required("password", password)?;
    validate_username(&username)?;
    validate_email(&email)?;
    validate_password(&password)?;

    let hash = web::block(move || auth::hash_password(&password))
        .await
        .map_err(|err| ApiError::internal("password hashing task failed", err))?
        .map_err(|err| ApiError::internal("password hashing failed", err))?;

    let (id, created_at) = state
        .accounts
        .create_user(&username, &email, &hash)
        .await
        .map_err(|err| match err {
            AccountError::UsernameTaken => ApiError::Conflict {
                field: "username",
                message: "is already taken".into(),
            },
            AccountError::EmailTaken => ApiError::Conflict {
                field: "email",
                message: "is already registered".into(),
            },
            other => state.account_error("cannot create user", other),
        })?;
    tracing::info!(user_id = id, "user signed up");

    Ok(HttpResponse::Created().json(SignupResponse {
        id,
        username,
        email,
        created_at,
    }))
}

/// Checks a username and password and returns an access and a refresh token. Failed
/// attempts are limited per username and per client address; successes do not count.
pub async fn login(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<LoginRequest>,
) -> Result<HttpResponse, ApiError> {
    let LoginRequest { username, password } = body.into_inner();
    let username = required("username", username)?;
    let password = required("password", password)?;
    let subjects = login_subjects(&req, &username);
    take_login_attempt(&state, &subjects).await?;
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::Unauthorized("invalid username or password"));
    }

    let user = state
        .accounts
        .find_user(&username)
        .await
        .map_err(|err| state.account_error("cannot look up user", err))?;
    // An unknown user is checked against a dummy hash so that both failures take the
    // same time and a caller cannot tell which usernames exist.
    let (user_id, phc) = match user {
        Some(user) => (Some(user.id), user.password_hash),
        None => (None, state.dummy_password_hash.clone()),
    };
    let valid = web::block(move || auth::verify_password(&password, &phc))
        .await
        .map_err(|err| ApiError::internal("password check task failed", err))?;
    let user_id = match (user_id, valid) {
        (Some(user_id), true) => user_id,
        _ => return Err(ApiError::Unauthorized("invalid username or password")),
    };
    refund_login_attempt(&state, subjects);

    let pair = issue_pair(&state, user_id).await?;
    Ok(HttpResponse::Ok().json(pair))
}

/// Exchanges a refresh token for a new pair; the old refresh token stops working.
pub async fn refresh(
    state: web::Data<AppState>,
    body: web::Json<RefreshRequest>,
) -> Result<HttpResponse, ApiError> {
    let token = required("refresh", body.into_inner().refresh)?;
    let invalid = ApiError::Unauthorized("invalid or expired refresh token");
    let claims = match state.tokens.verify(&token, TokenType::Refresh) {
        Ok(claims) => claims,
        Err(_) => return Err(invalid),
    };

    let stored = state
        .accounts
        .use_refresh_token(claims.jti)
        .await
        .map_err(|err| state.account_error("cannot use refresh token", err))?;
    let Some((user_id, stored_hash)) = stored else {
        // A validly signed token that is no longer usable was most likely used before:
        // end the whole family, since one of its copies is in the wrong hands.
        let revoked = state
            .accounts
            .revoke_refresh_family(claims.jti)
            .await
            .map_err(|err| state.account_error("cannot revoke refresh tokens", err))?;
        if revoked > 0 {
            tracing::warn!(
                user_id = claims.sub.as_str(),
                "refresh token reused; revoked the user's refresh tokens"
            );
        }
        return Err(invalid);
    };
    let hash_matches = auth::hashes_equal(&stored_hash, &auth::sha256(&token));
    if !hash_matches || claims.user_id() != Some(user_id) {
        return Err(invalid);
    }

    let pair = issue_pair(&state, user_id).await?;
    Ok(HttpResponse::Ok().json(pair))
}

/// Returns the failed-login subjects of a request: its username and its client address.
fn login_subjects(req: &HttpRequest, username: &str) -> [String; 2] {
    let addr = req
        .peer_addr()
        .map(|addr| addr.ip().to_string())
        .unwrap_or_else(|| "unknown".into());
    [login_user_subject(username), login_addr_subject(&addr)]
}

fn login_limit(state: &AppState) -> Limit {
    let per_minute = state.config.rate_limit.login_failures_per_minute;
    Limit {
        per_minute,
        burst: per_minute,
    }
}

/// Takes one attempt from each subject's budget of failed logins, or rejects the login
/// with 429 when either is used up. Taking before checking the password means parallel
/// attempts cannot all pass before the first failure is counted; a success gives the
/// attempts back ([`refund_login_attempt`]).
async fn take_login_attempt(state: &AppState, subjects: &[String; 2]) -> Result<(), ApiError> {
    let Some(limiter) = &state.rate_limiter else {
        return Ok(());
    };
    let limit = login_limit(state);
    for subject in subjects {
        let build = |reply| Check {
            subject: subject.clone(),
            limit,
            consume: true,
            reply,
        };
        match call(limiter, build, state.ingest_deadline()).await {
            Ok(Ok(decision)) if !decision.allowed => {
                return Err(ApiError::TooManyLogins {
                    retry_after: decision.retry_after,
                });
            }
            Ok(Ok(_)) => {}
            // Without a decision the attempt goes on: the password check still applies.
            Ok(Err(err)) => tracing::debug!(error = %err, "login limit check failed"),
            Err(err) => tracing::debug!(error = %err, "login limit check failed"),
        }
    }
    Ok(())
}

/// Gives back the attempt a successful login took, so that successes do not count.
fn refund_login_attempt(state: &AppState, subjects: [String; 2]) {
    let Some(limiter) = &state.rate_limiter else {
        return;
    };
    let limit = login_limit(state);
    for subject in subjects {
        if let Err(err) = limiter.try_send(Refund { subject, limit }) {
            tracing::debug!(error = %err, "cannot refund a login attempt");
        }
    }
}

async fn issue_pair(state: &AppState, user_id: i64) -> Result<TokenPair, ApiError> {
    let access = issue(state, user_id, TokenType::Access)?;
    let refresh = issue(state, user_id, TokenType::Refresh)?;
    let expires_at = DateTime::<Utc>::from_timestamp(refresh.claims.exp as i64, 0)
        .ok_or_else(|| ApiError::internal("cannot store refresh token", "expiry out of range"))?;
    state
        .accounts
        .store_refresh_token(
            refresh.claims.jti,
            user_id,
            &auth::sha256(&refresh.token),
            expires_at,
        )
        .await
        .map_err(|err| state.account_error("cannot store refresh token", err))?;
    Ok(TokenPair {
        access: access.token,
        refresh: refresh.token,
    })
}

fn issue(state: &AppState, user_id: i64, typ: TokenType) -> Result<IssuedToken, ApiError> {
    state
        .tokens
        .issue(user_id, typ)
        .map_err(|err| ApiError::internal("cannot sign token", err))
}

/// Returns the value of a required string field.
pub(super) fn required(field: &'static str, value: Option<String>) -> Result<String, ApiError> {
    value.ok_or_else(|| ApiError::field(field, "is required"))
}

fn validate_username(username: &str) -> Result<(), ApiError> {
    let chars = username.chars().count();
    if !USERNAME_CHARS.contains(&chars) {
        return Err(ApiError::field(
            "username",
            format!("must be 3 to 150 characters long (got {chars})"),
        ));
    }
    let allowed = |c: char| c.is_alphanumeric() || matches!(c, '@' | '.' | '+' | '-' | '_');
    if !username.chars().all(allowed) {
        return Err(ApiError::field(
            "username",
            "may contain only letters, digits and @ . + - _",
        ));
    }
    Ok(())
}

fn validate_email(email: &str) -> Result<(), ApiError> {
    let invalid = || ApiError::field("email", "is not a valid email address");
    if email.chars().count() > MAX_EMAIL_CHARS {
        return Err(invalid());
    }
    let (local, domain) = email.rsplit_once('@').ok_or_else(invalid)?;
    let bad_char = |c: char| c.is_whitespace() || c.is_control() || c == '@';
    let labels_ok = domain
        .split('.')
        .all(|label| !label.is_empty() && !label.starts_with('-') && !label.ends_with('-'));
    let valid = !local.is_empty()
        && !local.chars().any(bad_char)
        && domain.contains('.')
        && labels_ok
        && !domain.chars().any(|c| bad_char(c) || c == '_');
    if !valid {
        return Err(invalid());
    }
    Ok(())
}

fn validate_password(password: &str) -> Result<(), ApiError> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(ApiError::field(
            "password",
            format!("must be at least {MIN_PASSWORD_CHARS} characters long"),
        ));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::field(
            "password",
            format!("must be at most {MAX_PASSWORD_BYTES} bytes long"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(result: Result<(), ApiError>) -> Option<String> {
        match result {
            Err(ApiError::InvalidField { field, .. }) => Some(field),
            _ => None,
        }
    }

    #[test]
    fn username_rules() {
        assert!(validate_username("alice").is_ok());
        assert!(validate_username("a.b+c-d_e@f").is_ok());
        assert!(validate_username("ünïcode").is_ok());
        assert_eq!(field_of(validate_username("ab")), Some("username".into()));
        assert_eq!(
            field_of(validate_username(&"a".repeat(151))),
            Some("username".into())
        );
        assert!(validate_username(&"a".repeat(150)).is_ok());
        assert_eq!(
            field_of(validate_username("has space")),
            Some("username".into())
        );
        assert_eq!(
            field_of(validate_username("semi;colon")),
            Some("username".into())
        );
    }

    #[test]
    fn email_rules() {
        assert!(validate_email("a@example.com").is_ok());
        assert!(validate_email("first.last+tag@sub.example.org").is_ok());
        for bad in [
            "",
            "plain",
            "@example.com",
            "a@",
            "a@localhost",
            "a b@example.com",
            "a@exa mple.com",
            "a@.com",
            "a@example..com",
            "a@@example.com",
        ] {
            assert_eq!(
                field_of(validate_email(bad)),
                Some("email".into()),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn password_rules() {
        assert!(validate_password("0123456789").is_ok());
        assert_eq!(
            field_of(validate_password("012345678")),
            Some("password".into())
        );
        assert_eq!(
            field_of(validate_password(&"x".repeat(1025))),
            Some("password".into())
        );
    }
}
