//! The HTTP API: routes, shared state and the extractors that authenticate requests.
//!
//! Each route states what it needs where it is built: a Bearer access JWT ([`AuthUser`]),
//! an `API-KEY` header (checked in the ingest handler), and its own body limit. Every
//! path is served with and without its trailing slash.

pub mod auth;
pub mod health;
pub mod keys;
pub mod logs;
pub mod metrics;
pub mod spans;

use std::future::{ready, Ready};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::dev::Payload;
use actix_web::error::JsonPayloadError;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::accounts::{AccountError, Accounts, ApiKeyCache};
use crate::actors::consumer_supervisor::ConsumerSupervisor;
use crate::actors::kafka_producer::KafkaProducer;
use crate::actors::rate_limiter::RateLimiter;
use crate::actors::{CallError, SharedStatus};
use crate::auth::{TokenKeys, TokenType};
use crate::config::Config;
use crate::error::ApiError;

/// Largest body of the account endpoints, in bytes.
const ACCOUNT_BODY_LIMIT: usize = 16 * 1024;

/// Shared state of every handler. An actor is `None` in a role that does not run it.
pub struct AppState {
    pub config: Arc<Config>,
    pub accounts: Accounts,
    pub api_keys: ApiKeyCache,
    pub tokens: TokenKeys,
    /// An argon2id hash checked when a login names an unknown user, so that a wrong
    /// username takes as long as a wrong password.
    pub dummy_password_hash: String,
    /// Set once a shutdown signal arrived: new ingest requests then get 503.
    pub draining: Arc<AtomicBool>,
    pub rate_limiter: Option<Addr<RateLimiter>>,
    pub producer: Option<Addr<KafkaProducer>>,
    pub supervisor: Option<Addr<ConsumerSupervisor>>,
    /// Statuses of the supervised actors this process runs, by name.
    pub actor_statuses: Vec<(&'static str, SharedStatus)>,
    pub request_slots: Arc<Semaphore>,
    pub body_budget_kib: Arc<Semaphore>,
    /// Requests rejected with 503 so far, and when that was last logged.
    pub shed: AtomicU64,
    pub shed_logged_at_ms: AtomicU64,
    pub started: std::time::Instant,
    pub metrics: crate::telemetry::Metrics,
    /// The registry `GET /metrics` renders; `None` when `telemetry.prometheus` is off.
    pub prometheus: Option<prometheus::Registry>,
}

impl AppState {
    pub fn retry_after(&self) -> Duration {
        Duration::from_secs(self.config.http.retry_after_secs)
    }

    pub fn ingest_deadline(&self) -> Duration {
        Duration::from_millis(self.config.http.ingest_deadline_ms)
    }

    /// Builds the 503 for an actor that did not reply. Logs at most one warning every
    /// `SHED_LOG_INTERVAL`, with the number of 503s since the last one.
    pub fn unavailable(&self, what: &'static str, err: CallError) -> ApiError {
        self.note_shed(what, &err.to_string());
        ApiError::Unavailable {
            what,
            retry_after: self.retry_after(),
        }
    }

    /// Maps a failed account operation: 503 when PostgreSQL is unreachable, 500 otherwise.
    /// The cause is logged and never reaches the client.
    pub fn account_error(&self, context: &'static str, err: AccountError) -> ApiError {
        if err.is_unavailable() {
            tracing::warn!(error = %err, "{context}");
            return ApiError::Unavailable {
                what: "database",
                retry_after: self.retry_after(),
            };
        }
        ApiError::internal(context, err)
    }

    /// Counts a request rejected with 503 and logs now and then.
    pub fn note_shed(&self, what: &'static str, reason: &str) {
        let shed = self.shed.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.shed_logged_at_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= SHED_LOG_INTERVAL.as_millis() as u64;
        if due
            && self
                .shed_logged_at_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                what,
                reason,
                rejected_total = shed,
                "requests rejected with 503"
            );
        }
    }

    /// Admits an ingest request within `http.max_in_flight_requests` and
    /// `http.max_in_flight_body_bytes`, or rejects it with 503 before its body is read.
    pub fn admit(&self, declared_length: Option<usize>) -> Result<Admission, ApiError> {
        let kib = declared_length
            .unwrap_or(self.config.http.body_limit_bytes)
            .min(self.config.http.body_limit_bytes)
            .div_ceil(1024)
            .max(1);
        let request = Arc::clone(&self.request_slots).try_acquire_owned();
        let bytes = Arc::clone(&self.body_budget_kib).try_acquire_many_owned(kib as u32);
        match (request, bytes) {
            (Ok(request), Ok(bytes)) => Ok(Admission {
                _request: request,
                _bytes: bytes,
            }),
            _ => {
                self.note_shed("logpipe", "too many requests in flight");
                Err(ApiError::Unavailable {
                    what: "logpipe (at capacity)",
                    retry_after: self.retry_after(),
                })
            }
        }
    }
}

/// How often the warning about requests rejected with 503 may repeat.
const SHED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The room a request holds while in flight; released on drop.
pub struct Admission {
    _request: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// Limits on the ingest requests in flight, shared by every worker.
pub struct InFlightLimits {
    pub request_slots: Arc<Semaphore>,
    pub body_budget_kib: Arc<Semaphore>,
}

impl InFlightLimits {
    pub fn new(config: &crate::config::HttpConfig) -> Self {
        let kib = config.max_in_flight_body_bytes.div_ceil(1024);
        Self {
            request_slots: Arc::new(Semaphore::new(config.max_in_flight_requests)),
            body_budget_kib: Arc::new(Semaphore::new(kib.min(Semaphore::MAX_PERMITS))),
        }
    }
}

/// Registers every route of the API (`ingest` false: only the health routes).
pub fn routes(cfg: &mut web::ServiceConfig, ingest: bool) {
    // HEAD as well as GET, for load balancers and uptime checks that probe with HEAD.
    cfg.service(
        resource(&["/healthz", "/healthz/"], "GET, HEAD")
            .route(web::get().to(health::healthz))
            .route(web::head().to(health::healthz)),
    )
    .service(
        resource(&["/readyz", "/readyz/"], "GET, HEAD")
            .route(web::get().to(health::readyz))
            .route(web::head().to(health::readyz)),
    )
    .service(resource(&["/metrics", "/metrics/"], "GET").route(web::get().to(metrics::prometheus)));
    if ingest {
        api_routes(cfg);
    }
    cfg.default_service(web::to(not_found));
}

fn api_routes(cfg: &mut web::ServiceConfig) {
    let account_json = web::JsonConfig::default()
        .limit(ACCOUNT_BODY_LIMIT)
        .error_handler(json_error);
    cfg.service(
        web::scope("/api/auth")
            .app_data(account_json.clone())
            .service(resource(&["/signup/", "/signup"], "POST").route(web::post().to(auth::signup)))
            .service(resource(&["/login/", "/login"], "POST").route(web::post().to(auth::login)))
            .service(
                resource(&["/refresh/", "/refresh"], "POST").route(web::post().to(auth::refresh)),
            ),
    )
    .service(
        resource(&["/api/key/", "/api/key"], "POST")
            .app_data(account_json.clone())
            .route(web::post().to(keys::create)),
    )
    .service(
        resource(&["/api/keys/list/", "/api/keys/list"], "GET").route(web::get().to(keys::list)),
    )
    .service(
        resource(&["/api/keys/{id}/", "/api/keys/{id}"], "PATCH, DELETE")
            .app_data(account_json.clone())
            .route(web::patch().to(keys::update))
            .route(web::delete().to(keys::revoke)),
    )
    .service(resource(&["/api/logs/", "/api/logs"], "POST").route(web::post().to(logs::ingest)));
}

/// Builds a resource that rejects a method other than `allow` with the JSON 405 and an
/// `Allow` header.
fn resource(paths: &[&str], allow: &'static str) -> actix_web::Resource {
    let paths: Vec<String> = paths.iter().map(|path| path.to_string()).collect();
    web::resource(paths).default_service(web::to(move || method_not_allowed(allow)))
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

async fn method_not_allowed(allow: &'static str) -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed { allow })
}

/// Maps a JSON body that cannot be read to the API's error shape.
fn json_error(err: JsonPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let api_error = match err {
        JsonPayloadError::OverflowKnownLength { limit, .. }
        | JsonPayloadError::Overflow { limit } => ApiError::PayloadTooLarge { limit },
        JsonPayloadError::ContentType => ApiError::UnsupportedMediaType,
        JsonPayloadError::Deserialize(err) => ApiError::InvalidJson(err.to_string()),
        other => ApiError::InvalidJson(other.to_string()),
    };
    api_error.into()
}

/// The user of a request with a valid Bearer access token.
#[derive(Debug, Clone, Copy)]
pub struct AuthUser(pub i64);

impl FromRequest for AuthUser {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

fn authenticate(req: &HttpRequest) -> Result<AuthUser, ApiError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::internal("missing app state", "AuthUser used without AppState"))?;
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .ok_or(ApiError::Unauthorized(
            "missing Authorization: Bearer header",
        ))?;
    // The scheme is case-insensitive (RFC 9110).
    let token = header
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
        .map(|_| &header[7..])
        .ok_or(ApiError::Unauthorized(
            "Authorization header must be 'Bearer <access token>'",
        ))?;
    let claims = state
        .tokens
        .verify(token.trim(), TokenType::Access)
        .map_err(|_| ApiError::Unauthorized("invalid or expired access token"))?;
    let user_id = claims
        .user_id()
        .ok_or(ApiError::Unauthorized("invalid or expired access token"))?;
    Ok(AuthUser(user_id))
}
