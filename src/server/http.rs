//! The HTTP API, for scripts that hold no session: `POST /v1/submit`,
//! `GET /v1/keys/<key>`, `POST /v1/invalidate`.
//!
//! Each request is served as a one-request session: it is admitted by the
//! same gate, turned into the protocol request it stands for, and served
//! by the same code as a WebSocket request ([`session::serve_one`]), so
//! roles, fn lists, namespaces, quotas, the cache and coalescing are the
//! same (an HTTP submit joins a WebSocket submit's evaluation, and the
//! other way round). Its frames come back on an outbound queue of its own;
//! when the request ends (answered, timed out, or dropped because the
//! client went away) its session is closed, so its wait leaves the table.

use crate::error::ErrorCode;
use crate::hub::HubMsg;
use crate::outbox::{Outbox, SessionCtl};
use crate::server::auth::Identity;
use crate::server::broker::Broker;
use crate::server::session::{self, Right};
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::info;

/// `timeout_ms` of a submit that gives none.
const DEFAULT_TIMEOUT_MS: u64 = 30_000;

/// The id the protocol requests made here carry.
const ID: &str = "http";

pub fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/v1/submit", post(submit))
        .route("/v1/keys/{key}", get(key))
        .route("/v1/invalidate", post(invalidate))
        .method_not_allowed_fallback(|request: Request| async move {
            Failure::new(
                "bad_request",
                format!(
                    "{} does not take {}",
                    request.uri().path(),
                    request.method()
                ),
            )
            .with_status(StatusCode::METHOD_NOT_ALLOWED)
        })
}

/// An error answer: `{"error":{"code","message"}}` with the code's status.
struct Failure {
    code: &'static str,
    message: String,
    /// `rate_limited`: when to try again.
    retry_after_ms: Option<u64>,
    /// The status, when it is not the one its code maps to.
    status: Option<StatusCode>,
}

impl Failure {
    fn new(code: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            retry_after_ms: None,
            status: None,
        }
    }

    /// The failure, answered with `status`.
    fn with_status(mut self, status: StatusCode) -> Failure {
        self.status = Some(status);
        self
    }

    /// The failure an `error` frame (or a failed `result`'s `error`) says.
    fn from_frame(frame: &Value) -> Failure {
        let code = frame["code"].as_str().unwrap_or("");
        let known = [
            ErrorCode::BadJson,
            ErrorCode::BadRequest,
            ErrorCode::UnknownOp,
            ErrorCode::UnknownFn,
            ErrorCode::Forbidden,
            ErrorCode::Busy,
            ErrorCode::RateLimited,
            ErrorCode::ShuttingDown,
        ]
        .map(ErrorCode::as_str)
        .into_iter()
        .chain(["eval_failed", "eval_timeout"])
        .find(|c| *c == code)
        .unwrap_or("eval_failed");
        Failure {
            code: known,
            message: frame["message"].as_str().unwrap_or("").to_string(),
            retry_after_ms: frame["retry_after_ms"].as_u64(),
            status: None,
        }
    }

    fn status(&self) -> StatusCode {
        if let Some(status) = self.status {
            return status;
        }
        match self.code {
            "unauthorized" => StatusCode::UNAUTHORIZED,
            "forbidden" => StatusCode::FORBIDDEN,
            "unknown_fn" => StatusCode::NOT_FOUND,
            "busy" | "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
            "eval_failed" => StatusCode::BAD_GATEWAY,
            "shutting_down" => StatusCode::SERVICE_UNAVAILABLE,
            "eval_timeout" => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait = Duration::from_millis(self.retry_after_ms.unwrap_or(1000));
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, super::retry_after_seconds(wait));
        }
        response
    }
}

/// A 200 (or `status`) answer with a frame's members but its `type` and `id`.
fn members(status: StatusCode, mut frame: Value) -> Response {
    if let Some(map) = frame.as_object_mut() {
        map.remove("type");
        map.remove("id");
    }
    (status, axum::Json(frame)).into_response()
}

/// One request's session: its identity, and the queue its frames come on.
/// Dropping it closes the session (its waits leave the table).
struct Exchange {
    broker: Arc<Broker>,
    identity: Identity,
    outbox: Outbox,
    frames: crate::outbox::Inbox,
    /// Its place among `limits.max_http_requests`.
    _room: OwnedSemaphorePermit,
}

impl Exchange {
    /// Admits a request for an op that needs `right`: its credentials and
    /// role are checked, and it takes a place among the HTTP requests
    /// served at once, before anything else (its body included) is read.
    fn open(broker: &Arc<Broker>, request: &Request, right: Right) -> Result<Exchange, Failure> {
        let peer = request.extensions().get::<super::Peer>().map(|p| p.0);
        let path = request.uri().path();
        let ip = peer.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |p| p.ip());
        let identity = match broker.gate.admit(request.headers(), request.uri(), ip) {
            Ok(identity) => identity,
            Err(refusal) => {
                info!(?peer, path, "HTTP request refused: {}", refusal.logged());
                let mut failure = Failure::new(refusal.code(), refusal.message(path));
                failure.retry_after_ms = refusal.retry_after().map(|w| w.as_millis() as u64);
                return Err(failure.with_status(refusal.status()));
            }
        };
        if !session::has_right(&identity, right) {
            info!(?peer, path, token = %identity.name, "HTTP request refused: role");
            return Err(Failure::new(
                "forbidden",
                format!("role {} may not use {path}", identity.role.as_str()),
            ));
        }
        let Ok(room) = Arc::clone(&broker.http_requests).try_acquire_owned() else {
            return Err(Failure::new(
                "busy",
                "too many HTTP requests at once (limits.max_http_requests)",
            )
            .with_status(StatusCode::SERVICE_UNAVAILABLE));
        };
        let limits = &broker.config.limits;
        let ctl = Arc::new(SessionCtl::new(
            broker.next_session_id(),
            limits.outbound_bytes,
        ));
        let (outbox, frames) = Outbox::channel(ctl, 16);
        Ok(Exchange {
            broker: Arc::clone(broker),
            identity,
            outbox,
            frames,
            _room: room,
        })
    }

    /// The exchange of a request with a JSON object body, and that body.
    async fn open_with_body(
        broker: &Arc<Broker>,
        request: Request,
        right: Right,
    ) -> Result<(Exchange, Map<String, Value>), Failure> {
        let exchange = Exchange::open(broker, &request, right)?;
        let body = body_object(broker, request.into_body()).await?;
        Ok((exchange, body))
    }

    /// The latest an answer other than a submit's result is waited for.
    fn longest(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.broker.config.limits.http_max_timeout_ms)
    }

    /// Serves protocol request `request` (its `id` set here).
    async fn ask(&self, mut request: Map<String, Value>) {
        request.insert("id".into(), json!(ID));
        let text = Value::Object(request).to_string();
        let metrics = self.broker.metrics.for_ns(self.identity.ns);
        session::serve_one(
            &self.broker,
            &self.identity,
            &metrics,
            self.outbox.clone(),
            &text,
        )
        .await;
    }

    /// The next frame, unless `deadline` passes first.
    async fn next(&mut self, deadline: Instant) -> Option<Value> {
        let frame = tokio::time::timeout_at(deadline, self.frames.recv())
            .await
            .ok()??;
        self.outbox.ctl().release_bytes(frame.len());
        serde_json::from_slice(&frame.to_bytes()).ok()
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let closed = HubMsg::SessionClosed {
            session: self.outbox.session(),
        };
        if let Err(mpsc::error::TrySendError::Full(closed)) = self.broker.hub.try_send(closed) {
            let hub = self.broker.hub.clone();
            tokio::spawn(async move {
                let _ = hub.send(closed).await;
            });
        }
    }
}

/// The JSON object of a request's body: at most `max_frame_bytes` (413
/// beyond), arrived within `http_body_timeout_ms` (408 past it).
async fn body_object(broker: &Broker, body: Body) -> Result<Map<String, Value>, Failure> {
    let limits = &broker.config.limits;
    let limit = limits.max_frame_bytes;
    let too_large = || {
        Failure::new(
            "bad_request",
            format!("the body is larger than {limit} bytes (max_frame_bytes)"),
        )
        .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    };
    if http_body::Body::size_hint(&body).lower() > limit as u64 {
        return Err(too_large());
    }
    let deadline = Duration::from_millis(limits.http_body_timeout_ms);
    let bytes = match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Err(_) => {
            return Err(Failure::new(
                "bad_request",
                format!(
                    "the body did not arrive within {} ms (http_body_timeout_ms)",
                    limits.http_body_timeout_ms
                ),
            )
            .with_status(StatusCode::REQUEST_TIMEOUT))
        }
        Ok(Err(error)) => {
            let over = std::error::Error::source(&error)
                .is_some_and(|e| e.is::<http_body_util::LengthLimitError>());
            return Err(if over {
                too_large()
            } else {
                Failure::new("bad_request", "the body was cut off")
            });
        }
        Ok(Ok(bytes)) => bytes,
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Failure::new(
            "bad_request",
            "the body must be a JSON object",
        )),
        Err(e) => Err(Failure::new(
            "bad_json",
            format!("the body is not JSON: {e}"),
        )),
    }
}

/// The protocol request `get` of `key`.
fn get_request(key: Value) -> Map<String, Value> {
    Map::from_iter([("op".into(), json!("get")), ("key".into(), key)])
}

/// The answer a `result` frame gives: 200, or the evaluation's failure.
fn result(frame: Value) -> Response {
    match frame.get("error") {
        Some(error) => Failure::from_frame(error).into_response(),
        None => members(StatusCode::OK, frame),
    }
}

async fn submit(State(broker): State<Arc<Broker>>, request: Request) -> Response {
    let streams = request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"));
    let (mut exchange, mut body) =
        match Exchange::open_with_body(&broker, request, Right::Ask).await {
            Ok(opened) => opened,
            Err(f) => return f.into_response(),
        };
    let timeout_ms = match body.remove("timeout_ms") {
        None => DEFAULT_TIMEOUT_MS,
        Some(v) => match v.as_u64() {
            Some(ms) => ms,
            None => {
                return Failure::new("bad_request", "\"timeout_ms\" must be a whole number")
                    .into_response()
            }
        },
    };
    let timeout_ms = timeout_ms.min(broker.config.limits.http_max_timeout_ms);
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    let wait = body.get("wait").and_then(Value::as_bool).unwrap_or(true);
    body.insert("op".into(), json!("submit"));
    if streams && wait {
        body.insert("progress".into(), json!(true));
        exchange.ask(body).await;
        return events(exchange, deadline).await;
    }
    exchange.ask(body).await;
    let mut key = Value::Null;
    while let Some(frame) = exchange.next(deadline).await {
        match frame["type"].as_str() {
            Some("result") => return result(frame),
            Some("error") => return Failure::from_frame(&frame).into_response(),
            Some("accepted") if !wait => {
                let answer = json!({"key": frame["key"], "state": frame["state"]});
                return (StatusCode::ACCEPTED, axum::Json(answer)).into_response();
            }
            Some("accepted") => key = frame["key"].clone(),
            _ => {}
        }
    }
    // The timeout passed first: 202 with the key's state now. The wait
    // leaves when the exchange is dropped; the evaluation goes on.
    match state_now(&mut exchange, &key).await {
        Ok(state) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({"key": key, "state": state})),
        )
            .into_response(),
        Err(frame) => result(frame),
    }
}

/// After a submit's timeout: the key's state now, or its `result` frame
/// (Err) when that came meanwhile.
async fn state_now(exchange: &mut Exchange, key: &Value) -> Result<Value, Value> {
    exchange.ask(get_request(key.clone())).await;
    let deadline = exchange.longest();
    while let Some(frame) = exchange.next(deadline).await {
        match frame["type"].as_str() {
            Some("status") => return Ok(frame["state"].clone()),
            Some("result") => return Err(frame),
            _ => {}
        }
    }
    Ok(json!("running"))
}

/// A submit's answer as Server-Sent Events: `progress` for each report,
/// then `result`, and the stream ends. A refusal before anything was
/// accepted is the usual JSON error; when `deadline` passes first the last
/// event is `status`, the key's state then (the evaluation goes on).
async fn events(mut exchange: Exchange, deadline: Instant) -> Response {
    use axum::response::sse::{Event, Sse};
    let first = exchange.next(deadline).await;
    match &first {
        Some(frame) if frame["type"] == "error" => {
            return Failure::from_frame(frame).into_response()
        }
        None => return Failure::new("busy", "no answer in time").into_response(),
        _ => {}
    }
    let event = |frame: &Value| {
        let kind = frame["type"].as_str().unwrap_or("message").to_string();
        let mut members = frame.clone();
        if let Some(m) = members.as_object_mut() {
            m.remove("id");
        }
        Event::default().event(kind).data(members.to_string())
    };
    // (exchange, pending first frame, the key, done)
    let state = (exchange, first, Value::Null, false);
    let stream = futures::stream::unfold(
        state,
        move |(mut exchange, first, mut key, done)| async move {
            if done {
                return None;
            }
            let mut frame = match first {
                Some(frame) => Some(frame),
                None => exchange.next(deadline).await,
            };
            // `accepted` names the key; the stream carries what follows it.
            while let Some(accepted) = frame.as_ref().filter(|f| f["type"] == "accepted") {
                key = accepted["key"].clone();
                frame = exchange.next(deadline).await;
            }
            let Some(frame) = frame else {
                // The deadline passed: the key's state now (or its result,
                // if that came meanwhile), and the end.
                let last = match state_now(&mut exchange, &key).await {
                    Ok(state) => json!({"type": "status", "key": key, "state": state}),
                    Err(result) => result,
                };
                return Some((
                    Ok::<_, std::convert::Infallible>(event(&last)),
                    (exchange, None, key, true),
                ));
            };
            let end = matches!(frame["type"].as_str(), Some("result" | "error"));
            Some((Ok(event(&frame)), (exchange, None, key, end)))
        },
    );
    Sse::new(stream).into_response()
}

async fn key(
    State(broker): State<Arc<Broker>>,
    Path(key): Path<String>,
    request: Request,
) -> Response {
    let mut exchange = match Exchange::open(&broker, &request, Right::Look) {
        Ok(e) => e,
        Err(f) => return f.into_response(),
    };
    exchange.ask(get_request(json!(key))).await;
    let deadline = exchange.longest();
    match exchange.next(deadline).await {
        Some(frame) if frame["type"] == "status" && frame["state"] == "unknown" => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"state": "unknown"})),
        )
            .into_response(),
        Some(frame) if frame["type"] == "status" => members(StatusCode::OK, frame),
        Some(frame) => Failure::from_frame(&frame).into_response(),
        None => Failure::new("busy", "no answer in time").into_response(),
    }
}

async fn invalidate(State(broker): State<Arc<Broker>>, request: Request) -> Response {
    let (mut exchange, mut body) =
        match Exchange::open_with_body(&broker, request, Right::Invalidate).await {
            Ok(opened) => opened,
            Err(f) => return f.into_response(),
        };
    body.insert("op".into(), json!("invalidate"));
    exchange.ask(body).await;
    let deadline = exchange.longest();
    match exchange.next(deadline).await {
        Some(frame) if frame["type"] == "invalidated" => members(StatusCode::OK, frame),
        Some(frame) => Failure::from_frame(&frame).into_response(),
        None => Failure::new("busy", "no answer in time").into_response(),
    }
}
