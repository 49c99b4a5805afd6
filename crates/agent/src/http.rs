//! Health (felix's `/liveness`, `/readiness` on 9099, and `/status`: the
//! applied datastore revision as JSON) and metrics
//! (`/metrics` on 9091) over plain HTTP/1.1. Both default to localhost.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::daemon::Health;
use crate::metrics::Metrics;

/// A live loop has turned within this many seconds.
const LIVENESS_WINDOW_SECS: u64 = 30;

pub async fn serve_health(addr: SocketAddr, health: Arc<Health>) -> anyhow::Result<()> {
    let live = health.clone();
    let app = Router::new()
        .route(
            "/liveness",
            get(move || {
                let h = live.clone();
                async move {
                    let age = now().saturating_sub(h.last_tick.load(Ordering::Relaxed));
                    if age <= LIVENESS_WINDOW_SECS {
                        (StatusCode::OK, "live\n".to_owned())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("main loop stalled for {age}s\n"),
                        )
                    }
                }
            }),
        )
        .route(
            "/status",
            get({
                let h = health.clone();
                // What a test or an operator waits on: the datastore
                // revision this node's kernel reflects.
                move || {
                    let h = h.clone();
                    async move {
                        format!(
                            "{{\"applied_revision\":{},\"ready\":{}}}\n",
                            h.applied_revision.load(Ordering::Relaxed),
                            h.ready.load(Ordering::Relaxed)
                        )
                    }
                }
            }),
        )
        .route(
            "/readiness",
            get(move || {
                let h = health.clone();
                async move {
                    if h.ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ready\n".to_owned())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not in sync with the datastore, or the last apply failed\n".to_owned(),
                        )
                    }
                }
            }),
        );
    serve(addr, app, "health").await
}

pub async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move { m.render() }
        }),
    );
    serve(addr, app, "metrics").await
}

async fn serve(addr: SocketAddr, app: Router, what: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} endpoint on {addr}"))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
