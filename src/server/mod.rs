//! The listener: one port for HTTP routes and WebSocket upgrades, and the
//! shutdown sequence.
//!
//! [`run`] takes an already-bound listener and a shutdown future, so tests
//! bind port 0 and stop the broker when they like. Shutdown is "tell, then
//! drain": `/readyz` turns 503 and new work is refused, evaluations under
//! way finish and their results are delivered, then sessions close with
//! 1001; every step is bounded by `limits.drain_timeout_s`.

pub mod auth;
pub mod broker;
pub mod http;
pub mod idle;
pub mod lent;
pub mod logins;
pub mod session;
pub mod snapshot;
pub mod tenants;
pub mod web;

use crate::config::{Config, Limits, TlsConfig};
use crate::error::HerdError;
use crate::outbox::close;
use crate::server::auth::Refusal;
use crate::server::broker::Broker;
use crate::server::lent::LentReads;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use futures::future::Either;
use futures::FutureExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, info, warn};

/// The address of the peer of an HTTP request.
#[derive(Clone, Copy, Debug)]
struct Peer(SocketAddr);

/// Serves `listener` until `shutdown` resolves, then drains and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), HerdError> {
    let drain_timeout = Duration::from_secs(config.limits.drain_timeout_s);
    let close_timeout = Duration::from_millis(config.limits.close_timeout_ms);
    let header_timeout = Duration::from_millis(config.limits.header_timeout_ms);
    let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
    let broker = Broker::start(config)?;
    // Said once the broker has started (its secrets resolved, its
    // evaluators up), so a broker that cannot start never says it listens.
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "herd listening; dashboard at http://{addr}/ , WebSocket at ws://{addr}/ws");
    }
    let app = router(Arc::clone(&broker));
    let stop_accepting = CancellationToken::new();
    let connections = TaskTracker::new();
    let idle = idle::Idle::new(broker.config.limits.max_idle_connections);
    let serving = Serving {
        app,
        stop: stop_accepting.clone(),
        header_timeout,
        close_timeout,
    };
    let accept = tokio::spawn(accept_loop(
        listener,
        tls,
        serving,
        connections.clone(),
        idle,
    ));

    shutdown.await;
    info!("shutting down: refusing new work, finishing evaluations under way");
    if tokio::time::timeout(drain_timeout, broker.drain())
        .await
        .is_err()
    {
        warn!("drain timeout reached with evaluations still under way");
    }
    broker.close_sessions(close::GOING_AWAY);
    broker.session_tasks.close();
    if tokio::time::timeout(drain_timeout + close_timeout, broker.session_tasks.wait())
        .await
        .is_err()
    {
        warn!("some sessions did not close in time");
    }
    stop_accepting.cancel();
    let _ = accept.await;
    connections.close();
    let _ = tokio::time::timeout(close_timeout, connections.wait()).await;
    broker.stop(drain_timeout).await;
    info!("stopped");
    Ok(())
}

/// Builds the TLS acceptor from the configured PEM files.
fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, HerdError> {
    let bad = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        HerdError::Config(format!("tls.{what} {}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| bad("cert", &tls.cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("cert", &tls.cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| bad("key", &tls.key, &e))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| HerdError::Config(format!("tls: {e}")))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| HerdError::Config(format!("tls: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// What every connection is served with.
#[derive(Clone)]
struct Serving {
    app: Router,
    /// Cancelled when the broker stops: connections finish what they are
    /// doing and close.
    stop: CancellationToken,
    header_timeout: Duration,
    /// How long a connection closed for being idle too long may take to
    /// finish writing a response.
    close_timeout: Duration,
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    serving: Serving,
    connections: TaskTracker,
    idle: Arc<idle::Idle>,
) {
    // Failed accepts since the last one logged: logged once a second at most.
    let mut failed = 0u64;
    let mut last_logged: Option<tokio::time::Instant> = None;
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    failed += 1;
                    if last_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        warn!(%error, failed, "accept failed (out of file descriptors?); retrying every 50 ms");
                        failed = 0;
                        last_logged = Some(tokio::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = serving.stop.cancelled() => break,
        };
        let _ = tcp.set_nodelay(true);
        let serving = serving.clone();
        let tls = tls.clone();
        let connection = Arc::new(idle.open());
        connections.spawn(async move {
            let Some(acceptor) = tls else {
                return serve_http(tcp, addr, serving, connection).await;
            };
            let handshake = tokio::time::timeout(serving.header_timeout, acceptor.accept(tcp));
            let handshake = tokio::select! {
                done = handshake => done,
                _ = connection.close.cancelled() => {
                    return debug!(%addr, "idle connection closed before its TLS handshake (limits.max_idle_connections)");
                }
            };
            match handshake {
                Ok(Ok(stream)) => serve_http(stream, addr, serving, connection).await,
                Ok(Err(error)) => debug!(%addr, %error, "TLS handshake failed"),
                Err(_) => debug!(%addr, "TLS handshake timed out"),
            }
        });
    }
}

/// Serves HTTP/1.1 (and WebSocket upgrades) on one connection. Closed for
/// being idle too long, it finishes a response it is writing (within the
/// close timeout) and reads no further request.
async fn serve_http<I>(io: I, addr: SocketAddr, serving: Serving, connection: Arc<idle::Connection>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let close = connection.close.clone();
    let app = serving.app;
    let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(Peer(addr));
        let (app, connection) = (app.clone(), Arc::clone(&connection));
        connection.busy();
        async move {
            let response = app.oneshot(request.map(Body::new)).await;
            // An upgraded connection is a session's now, never idle again.
            if !matches!(&response, Ok(r) if r.status() == StatusCode::SWITCHING_PROTOCOLS) {
                connection.rest();
            }
            response
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(serving.header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = serving.stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
        _ = close.cancelled() => {
            debug!(%addr, "idle connection closed (limits.max_idle_connections)");
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(serving.close_timeout, connection).await;
        }
    }
}

fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/ws", get(upgrade))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(http::routes())
        .fallback(get(web::serve))
        .with_state(broker)
}

/// 503 while draining; otherwise 200, with a line per unhealthy evaluator.
async fn readyz(State(broker): State<Arc<Broker>>) -> Response {
    if broker.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let mut body = String::from("ready\n");
    for spec in broker.evaluators.iter() {
        if let Some(reason) = spec.health.reason() {
            body.push_str(&format!("evaluator {} unhealthy: {reason}\n", spec.name));
        }
    }
    body.into_response()
}

async fn metrics(
    State(broker): State<Arc<Broker>>,
    Extension(Peer(peer)): Extension<Peer>,
    request: Request,
) -> Response {
    let need_token = broker.config.metrics_need_token;
    let admitted =
        broker
            .gate
            .admit_metrics(request.headers(), request.uri(), need_token, peer.ip());
    if let Err(refusal) = admitted {
        info!(%peer, "/metrics refused: {}", refusal.logged());
        return refused(&refusal, "/metrics");
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        broker
            .metrics
            .render(&broker.cache, broker.evaluators.figures()),
    )
        .into_response()
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn plain(status: StatusCode, message: &'static str) -> Response {
    (status, message).into_response()
}

/// A plain-text answer to a request to `path` refused by the gate.
fn refused(refusal: &Refusal, path: &str) -> Response {
    let mut response = (refusal.status(), format!("{}\n", refusal.message(path))).into_response();
    if let Some(wait) = refusal.retry_after() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, retry_after_seconds(wait));
    }
    response
}

/// A `Retry-After` of `wait` in whole seconds, rounded up; at least one.
pub fn retry_after_seconds(wait: Duration) -> HeaderValue {
    HeaderValue::from((wait.as_millis() as u64).div_ceil(1000).max(1))
}

/// Why a request to a WebSocket endpoint cannot be upgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    NotWebSocket,
    Version,
    MissingKey,
}

impl IntoResponse for HandshakeError {
    fn into_response(self) -> Response {
        match self {
            HandshakeError::NotWebSocket => plain(
                StatusCode::UPGRADE_REQUIRED,
                "this endpoint speaks WebSocket\n",
            ),
            HandshakeError::Version => plain(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Version must be 13\n",
            ),
            HandshakeError::MissingKey => {
                plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n")
            }
        }
    }
}

/// A WebSocket upgrade request that passed the protocol checks.
pub struct Handshake {
    accept: String,
}

impl Handshake {
    /// Checks method and headers (RFC 6455 §4.2.1).
    pub fn check(request: &Request) -> Result<Handshake, HandshakeError> {
        let headers = request.headers();
        if request.method() != Method::GET
            || !header_has_token(headers, header::CONNECTION, "upgrade")
            || !header_has_token(headers, header::UPGRADE, "websocket")
        {
            return Err(HandshakeError::NotWebSocket);
        }
        if headers.get(header::SEC_WEBSOCKET_VERSION) != Some(&HeaderValue::from_static("13")) {
            return Err(HandshakeError::Version);
        }
        headers
            .get(header::SEC_WEBSOCKET_KEY)
            .map(|key| Handshake {
                accept: derive_accept_key(key.as_bytes()),
            })
            .ok_or(HandshakeError::MissingKey)
    }

    /// Answers 101 and runs `session` on the upgraded socket once hyper hands it over
    /// (its reads through a lent buffer, [`LentReads`], its settings from `limits`);
    /// `failed` runs instead if the upgrade does not complete.
    pub fn accept<F, Fut>(
        self,
        request: &mut Request,
        tasks: &TaskTracker,
        limits: &Limits,
        session: F,
        failed: impl FnOnce(hyper::Error) + Send + 'static,
    ) -> Response
    where
        F: FnOnce(Box<WebSocketStream<LentReads<TokioIo<hyper::upgrade::Upgraded>>>>) -> Fut
            + Send
            + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = hyper::upgrade::on(request);
        let (config, read_size) = (session::websocket_config(limits), limits.ws_read_buffer);
        // Chained, not one async block: what each step captures is moved
        // into the next, so the session's task does not keep it for life.
        tasks.spawn(on_upgrade.then(move |upgraded| match upgraded {
            Ok(upgraded) => {
                let io = LentReads::new(TokioIo::new(upgraded), read_size);
                let ws = WebSocketStream::from_raw_socket(io, WsRole::Server, Some(config));
                // On the heap: the session's future holds it once, not once
                // per layer it passes through.
                Either::Left(ws.then(move |ws| session(Box::new(ws))))
            }
            Err(error) => {
                failed(error);
                Either::Right(std::future::ready(()))
            }
        }));
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_ACCEPT, self.accept)
            .body(Body::empty())
            .expect("static response parts are valid")
    }
}

async fn upgrade(
    State(broker): State<Arc<Broker>>,
    Extension(Peer(peer)): Extension<Peer>,
    mut request: Request,
) -> Response {
    let handshake = match Handshake::check(&request) {
        Ok(h) => h,
        Err(error) => return error.into_response(),
    };
    let identity = match broker
        .gate
        .admit(request.headers(), request.uri(), peer.ip())
    {
        Ok(identity) => identity,
        Err(refusal) => {
            info!(%peer, "upgrade refused: {}", refusal.logged());
            return refused(&refusal, "/ws");
        }
    };
    if broker.is_draining() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "broker shutting down\n");
    }
    let Some(seat) = broker.tenants.seat(identity.ns) else {
        info!(%peer, ns = %identity.ns, "upgrade refused: the namespace's max_sessions are taken");
        return plain(
            StatusCode::TOO_MANY_REQUESTS,
            "too many sessions in this namespace (its max_sessions, of [[namespace]] or [namespace_defaults])\n",
        );
    };
    if !broker.admit() {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections (limits.max_connections)\n",
        );
    }
    let (for_session, for_failure) = (Arc::clone(&broker), Arc::clone(&broker));
    handshake.accept(
        &mut request,
        &broker.session_tasks,
        &broker.config.limits,
        move |ws| session::serve(ws, for_session, peer, identity, seat),
        move |error| {
            warn!(%peer, %error, "upgrade failed");
            for_failure.release();
        },
    )
}
