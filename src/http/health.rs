//! `GET /healthz` (the process is alive) and `GET /readyz` (its dependencies respond).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::AppState;
use crate::actors::consumer_supervisor::Status;
use crate::actors::{call, kafka_producer, rate_limiter, ActorStatus};
use crate::config::StoreErrorPolicy;

/// How long one readiness check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Checks each dependency this process uses; 503 names the ones that fail.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let mut checks = BTreeMap::new();
    checks.insert("accepting", !state.draining.load(Ordering::Relaxed));
    checks.insert("postgres", check_postgres(&state).await);
    // Without Redis, ingestion goes on unless the limiter denies (`on_store_error`), so
    // only then does an unreachable Redis make this process unready.
    let mut degraded = Vec::new();
    if let Some(limiter) = &state.rate_limiter {
        let answer = call(limiter, |reply| rate_limiter::Ping { reply }, CHECK_TIMEOUT).await;
        let reachable = matches!(answer, Ok(Ok(())));
        let denies = state.config.rate_limit.on_store_error == StoreErrorPolicy::Deny;
        if !reachable && !denies {
            degraded.push("redis");
        }
        checks.insert("redis", reachable || !denies);
    }
    if let Some(producer) = &state.producer {
        let answer = call(
            producer,
            |reply| kafka_producer::Ping { reply },
            CHECK_TIMEOUT,
        )
        .await;
        checks.insert("kafka", matches!(answer, Ok(Ok(()))));
    }
    let mut consumers = None;
    if let Some(supervisor) = &state.supervisor {
        let statuses = call(supervisor, |reply| Status { reply }, CHECK_TIMEOUT)
            .await
            .unwrap_or_default();
        let all_running = !statuses.is_empty() && statuses.iter().all(|status| status.is_running());
        checks.insert("consumers", all_running);
        consumers = Some(statuses);
    }

    let actors: BTreeMap<&str, ActorStatus> = state
        .actor_statuses
        .iter()
        .map(|(name, status)| (*name, status.snapshot()))
        .collect();
    let restarting = actors.values().any(|status| status.state == "restarting");
    checks.insert("actors", !restarting);
    let failing: Vec<&str> = checks
        .iter()
        .filter(|(_, ok)| !**ok)
        .map(|(name, _)| *name)
        .collect();
    let report: BTreeMap<&str, &str> = checks
        .iter()
        .map(|(name, ok)| {
            let state = match (*ok, degraded.contains(name)) {
                (_, true) => "degraded",
                (true, false) => "ok",
                (false, false) => "unavailable",
            };
            (*name, state)
        })
        .collect();
    if failing.is_empty() {
        return HttpResponse::Ok().json(json!({
            "status": "ready",
            "checks": report,
            "actors": actors,
            "consumers": consumers,
        }));
    }
    HttpResponse::ServiceUnavailable()
        .insert_header((
            "Retry-After",
            state.config.http.retry_after_secs.to_string(),
        ))
        .json(json!({
            "error": {
                "code": "unavailable",
                "message": format!("not ready: {} unavailable", failing.join(", ")),
            },
            "checks": report,
            "actors": actors,
            "consumers": consumers,
        }))
}

async fn check_postgres(state: &AppState) -> bool {
    let check = async {
        let client = state.accounts.pool().get().await.ok()?;
        client.simple_query("SELECT 1").await.ok()
    };
    matches!(
        tokio::time::timeout(CHECK_TIMEOUT, check).await,
        Ok(Some(_))
    )
}
