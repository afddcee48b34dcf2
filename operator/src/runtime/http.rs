//! The operator's HTTP face: health, readiness, metrics and status.
//!
//! - `GET /`: the status page for people ([`crate::runtime::page`]).
//! - `GET /clusters/{name}[?hours=N]`: one cluster's page.
//! - `GET /healthz`: the process is alive.
//! - `GET /readyz`: the lease is held, specs were loaded and the runner
//!   runs (503 `standby` while another operator leads).
//! - `GET /api/v1/leader`: who leads, and what this process is.
//! - `GET /metrics`: Prometheus text format.
//! - `GET /api/v1/clusters`: every cluster's status (JSON).
//! - `GET /api/v1/clusters/{name}`: one cluster's status.
//! - `GET /api/v1/problems`: problems in the spec directory.
//! - `GET /api/v1/source`: the git spec source: applied commit, last sync,
//!   last error (404 when specs come from a directory).
//! - `POST /api/v1/sync`: a signed webhook asks for a fetch now
//!   ([`crate::runtime::webhook`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::runtime::history::HistoryStore;
use crate::runtime::lease::{LeaderView, RoleName};
use crate::runtime::page;
use crate::runtime::status::ClusterStatus;
use crate::runtime::telemetry::{ResultOnly, Telemetry};
use crate::runtime::webhook::{Verdict, Webhook};

/// A spec problem as served (`hangar_crds::Problem`, flattened to strings).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ProblemView {
    pub file: String,
    pub line: Option<u64>,
    pub column: Option<u64>,
    pub path: String,
    pub message: String,
    /// The one-line form `FILE:LINE:COL: field.path: message`.
    pub text: String,
}

impl From<&hangar_crds::Problem> for ProblemView {
    fn from(p: &hangar_crds::Problem) -> Self {
        ProblemView {
            file: p.file.display().to_string(),
            line: p.line,
            column: p.column,
            path: p.path.clone(),
            message: p.message.clone(),
            text: p.to_string(),
        }
    }
}

/// The git spec source as served.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceView {
    /// The source without credentials.
    pub source: String,
    pub reference: String,
    /// The commit the specs were last loaded from.
    pub commit: Option<crate::effects::git::CommitInfo>,
    /// The last fetch that succeeded.
    pub last_sync: Option<chrono::DateTime<chrono::Utc>>,
    /// Why the last try failed (cleared by the next that works).
    pub error: Option<String>,
    /// Why the newest commit was not loaded (limits, signature).
    pub refused: Option<String>,
    /// Spec problems at the applied commit.
    pub problems: usize,
    /// What happened to the source, newest first.
    pub events: std::collections::VecDeque<String>,
}

/// What the reconciler publishes and the HTTP server reads.
///
/// Statuses are held shared with the reconciler ([`Board::publish_shared`])
/// and stripped to their public view only when served: a second copy of
/// every status was ~10 % of the operator's memory at 1,000 clusters.
///
/// Each status published also feeds the status page's chart history.
#[derive(Default)]
pub struct Board {
    clusters: RwLock<BTreeMap<String, Arc<ClusterStatus>>>,
    problems: RwLock<Vec<ProblemView>>,
    ready: AtomicBool,
    history: HistoryStore,
    leader: RwLock<Option<LeaderView>>,
    source: RwLock<Option<SourceView>>,
}

impl Board {
    pub fn publish(&self, status: &ClusterStatus) {
        self.publish_shared(Arc::new(status.clone()));
    }

    /// Publishes a status without copying it.
    pub fn publish_shared(&self, status: Arc<ClusterStatus>) {
        self.history.observe(&status);
        let mut map = self.clusters.write().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(status.name.as_str()) {
            Some(slot) => *slot = status,
            None => {
                map.insert(status.name.clone(), status);
            }
        }
    }

    /// The status page's chart data.
    pub fn history(&self) -> &HistoryStore {
        &self.history
    }

    pub fn forget(&self, name: &str) {
        self.history.forget(name);
        self.clusters
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    pub fn set_problems(&self, problems: Vec<ProblemView>) {
        *self.problems.write().unwrap_or_else(|e| e.into_inner()) = problems;
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Who leads, for `/api/v1/leader` and `/readyz`.
    pub fn set_leader(&self, view: LeaderView) {
        *self.leader.write().unwrap_or_else(|e| e.into_inner()) = Some(view);
    }

    pub fn set_source(&self, view: SourceView) {
        *self.source.write().unwrap_or_else(|e| e.into_inner()) = Some(view);
    }

    pub fn source(&self) -> Option<SourceView> {
        self.source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn leader(&self) -> Option<LeaderView> {
        self.leader
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets every status (a new term loads them afresh).
    pub fn clear(&self) {
        self.clusters
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn clusters(&self) -> Vec<ClusterStatus> {
        self.clusters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|s| s.public())
            .collect()
    }

    pub fn cluster(&self, name: &str) -> Option<ClusterStatus> {
        self.clusters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|s| s.public())
    }

    pub fn problems(&self) -> Vec<ProblemView> {
        self.problems
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[derive(Clone)]
struct AppState {
    board: Arc<Board>,
    telemetry: Telemetry,
    webhook: Option<Arc<Webhook>>,
}

pub fn router(board: Arc<Board>, telemetry: Telemetry) -> Router {
    router_with(board, telemetry, None)
}

/// [`router`], with the sync webhook when a secret is configured.
pub fn router_with(
    board: Arc<Board>,
    telemetry: Telemetry,
    webhook: Option<Arc<Webhook>>,
) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/clusters/{name}", get(cluster_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/clusters", get(clusters))
        .route("/api/v1/clusters/{name}", get(cluster))
        .route("/api/v1/problems", get(problems))
        .route("/api/v1/leader", get(leader))
        .route("/api/v1/source", get(source))
        .route("/api/v1/sync", post(sync))
        .with_state(AppState {
            board,
            telemetry,
            webhook,
        })
}

async fn index(State(s): State<AppState>) -> Html<String> {
    let clusters = s.board.clusters();
    Html(page::index(
        &clusters,
        &s.board.problems(),
        &s.board.history,
        chrono::Utc::now(),
    ))
}

#[derive(serde::Deserialize)]
struct PageQuery {
    hours: Option<u32>,
}

async fn cluster_page(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    match s.board.cluster(&name) {
        Some(c) => {
            let series = s.board.history.get(&name).unwrap_or_default();
            let hours = q.hours.unwrap_or(page::DEFAULT_HOURS);
            Html(page::cluster(&c, &series, hours, chrono::Utc::now())).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            Html(format!(
                "<!doctype html><p>no cluster named <code>{}</code></p>\n",
                page::esc(&name)
            )),
        )
            .into_response(),
    }
}

async fn readyz(State(s): State<AppState>) -> Response {
    let standby = s
        .board
        .leader()
        .is_some_and(|l| l.role == RoleName::Standby);
    if standby {
        (StatusCode::SERVICE_UNAVAILABLE, "standby\n").into_response()
    } else if s.board.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn leader(State(s): State<AppState>) -> Response {
    match s.board.leader() {
        Some(l) => Json(l).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response(),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.telemetry.encode(),
    )
        .into_response()
}

async fn clusters(State(s): State<AppState>) -> Json<Vec<ClusterStatus>> {
    Json(s.board.clusters())
}

async fn cluster(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match s.board.cluster(&name) {
        Some(c) => Json(c).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("no cluster named `{name}`\n"),
        )
            .into_response(),
    }
}

async fn source(State(s): State<AppState>) -> Response {
    match s.board.source() {
        Some(v) => Json(v).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "specs come from a directory, not a git source\n",
        )
            .into_response(),
    }
}

async fn sync(State(s): State<AppState>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let Some(hook) = &s.webhook else {
        return (
            StatusCode::NOT_FOUND,
            "no webhook: set webhook_secret_file (or HANGAR_WEBHOOK_SECRET) with a git spec source\n",
        )
            .into_response();
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let delivery = header("x-github-delivery").or(header("x-hangar-delivery"));
    let verdict = hook.receive(header("x-hub-signature-256"), delivery, &body);
    let (result, answer) = match verdict {
        Verdict::Accepted => (
            "accepted",
            (StatusCode::ACCEPTED, "sync requested\n".to_string()),
        ),
        Verdict::Unauthorized(why) => {
            tracing::warn!(
                reason = why,
                delivery = delivery.unwrap_or(""),
                "webhook refused"
            );
            (
                "unauthorized",
                (StatusCode::UNAUTHORIZED, format!("{why}\n")),
            )
        }
        Verdict::Replayed => {
            tracing::warn!(delivery = delivery.unwrap_or(""), "webhook replay refused");
            (
                "replayed",
                (StatusCode::CONFLICT, "delivery already seen\n".to_string()),
            )
        }
    };
    s.telemetry
        .webhooks
        .get_or_create(&ResultOnly {
            result: result.into(),
        })
        .inc();
    answer.into_response()
}

async fn problems(State(s): State<AppState>) -> Json<Vec<ProblemView>> {
    Json(s.board.problems())
}

/// Serves until `shutdown` fires. Binding errors are returned at once so a
/// busy port is a clear startup failure.
pub async fn serve(
    addr: SocketAddr,
    board: Arc<Board>,
    telemetry: Telemetry,
    webhook: Option<Arc<Webhook>>,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = router_with(board, telemetry, webhook);
    Ok(tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(app: &Router, path: &str) -> (StatusCode, String) {
        use tower::ServiceExt as _;
        let req = axum::http::Request::builder()
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn serves_health_readiness_status_and_metrics() {
        let board = Arc::new(Board::default());
        let telemetry = Telemetry::new();
        let app = router(board.clone(), telemetry.clone());
        assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get(&app, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        board.set_ready(true);
        assert_eq!(get(&app, "/readyz").await.0, StatusCode::OK);

        let mut web = ClusterStatus::new("web");
        web.memory.desired = 2;
        web.memory.history = crate::core::planner::History::default();
        board.publish(&web);
        let (code, body) = get(&app, "/api/v1/clusters").await;
        assert_eq!(code, StatusCode::OK);
        let list: Vec<ClusterStatus> = serde_json::from_str(&body).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].memory.desired, 2);
        assert_eq!(get(&app, "/api/v1/clusters/web").await.0, StatusCode::OK);
        assert_eq!(
            get(&app, "/api/v1/clusters/nope").await.0,
            StatusCode::NOT_FOUND
        );

        let (code, html) = get(&app, "/").await;
        assert_eq!(code, StatusCode::OK);
        assert!(html.contains(r#"<tr data-cluster="web">"#), "{html}");
        assert_eq!(get(&app, "/clusters/web?hours=24").await.0, StatusCode::OK);
        assert_eq!(get(&app, "/clusters/nope").await.0, StatusCode::NOT_FOUND);
        let mut view = crate::runtime::lease::Leadership::single("me").view();
        view.role = RoleName::Standby;
        board.set_leader(view);
        let (code, body) = get(&app, "/readyz").await;
        assert_eq!(
            (code, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "standby\n")
        );
        let (code, body) = get(&app, "/api/v1/leader").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("\"role\":\"standby\""), "{body}");

        telemetry.spec_problems.set(2);
        let (code, body) = get(&app, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("hangar_spec_problems 2"), "{body}");
    }
}
