//! One WebSocket session: a reader that serves requests and a writer that
//! drains the session's outbound queue.
//!
//! The reader answers what it can by itself (cache hits, `ping`, request
//! errors) and hands misses, subscriptions and cancels to the hub. The
//! writer is the only code that writes to the socket: it batches frames
//! (`feed`, then one `flush`), sends heartbeats, and closes the session with
//! the code chosen by whoever asked first.

use crate::auth::Identity;
use crate::broker::Broker;
use crate::config::{Limits, Role};
use crate::error::ErrorCode;
use crate::hub::{HubMsg, Waiter};
use crate::key::{canonical_json, Key};
use crate::outbox::{close, Outbox, SessionCtl};
use crate::protocol::{
    error_frame, parse_request, unix_ms, FrameWriter, Op, ReqId, DRAINING_MESSAGE, PROTOCOL_VERSION,
};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::{interval_at, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::{debug, info, Instrument};

/// Whether `role` may use `op`.
fn allows(role: Role, op: &Op) -> bool {
    match role {
        Role::Agent => true,
        Role::Viewer => matches!(
            op,
            Op::Watch { .. } | Op::Unwatch | Op::Get { .. } | Op::Ping
        ),
    }
}

/// Serves one upgraded connection until it closes. The caller has taken a
/// connection slot with [`Broker::admit`]; it is given back here.
pub async fn serve<S>(
    ws: WebSocketStream<S>,
    broker: Arc<Broker>,
    peer: SocketAddr,
    identity: Identity,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let id = broker.next_session_id();
    let uuid = uuid::Uuid::new_v4();
    let role = identity.role;
    let span = tracing::info_span!("session", %peer, session = %uuid, token = %identity.name);
    async move {
        let ctl = Arc::new(SessionCtl::new(id));
        broker.sessions.insert(id, Arc::clone(&ctl));
        let (tx, rx) = mpsc::channel(broker.config.limits.outbound_queue);
        let outbox = Outbox::new(tx, Arc::clone(&ctl));
        outbox.push(hello(&broker, uuid, role));
        info!(role = role.as_str(), "session open");
        let (sink, stream) = ws.split();
        let reader = Reader {
            broker: &broker,
            outbox,
            role,
            watch: None,
        };
        let limits = &broker.config.limits;
        tokio::join!(
            reader.run(stream, &ctl, limits),
            write_loop(sink, rx, &ctl, limits)
        );
        let _ = broker.hub.send(HubMsg::SessionClosed { session: id }).await;
        broker.sessions.remove(&id);
        broker.release();
        let code = ctl.code();
        broker.metrics.record_close(code);
        info!(code, reason = close::reason(code), "session closed");
    }
    .instrument(span)
    .await
}

fn hello(broker: &Broker, uuid: uuid::Uuid, role: Role) -> String {
    let limits = serde_json::json!({
        "max_frame_bytes": broker.config.limits.max_frame_bytes,
        "max_pending": broker.config.limits.max_pending,
    });
    FrameWriter::new("hello")
        .str("session", &uuid.to_string())
        .uint("protocol", PROTOCOL_VERSION.into())
        .str("server", concat!("herd/", env!("CARGO_PKG_VERSION")))
        .str("role", role.as_str())
        .raw("limits", &limits.to_string())
        .finish()
}

struct Reader<'a> {
    broker: &'a Arc<Broker>,
    outbox: Outbox,
    role: Role,
    watch: Option<CancellationToken>,
}

impl Reader<'_> {
    async fn run<S>(
        mut self,
        mut stream: SplitStream<WebSocketStream<S>>,
        ctl: &SessionCtl,
        limits: &Limits,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // One registration for the session's life, not one per message.
        let closing = ctl.closing().cancelled();
        tokio::pin!(closing);
        while let Some(message) = next_message(&mut stream, &mut closing, ctl, limits).await {
            match message {
                Message::Text(text) => self.handle(&text).await,
                _ => self.outbox.push(error_frame(
                    &None,
                    ErrorCode::BadRequest.as_str(),
                    "binary frames are not accepted; send JSON in text frames",
                )),
            }
        }
        if let Some(watch) = self.watch.take() {
            watch.cancel();
        }
    }

    async fn handle(&mut self, text: &str) {
        let request = match parse_request(text) {
            Ok(r) => r,
            Err(rejection) => return self.outbox.push(rejection.frame()),
        };
        let id = request.id;
        if !allows(self.role, &request.op) {
            return self.reject(
                &id,
                ErrorCode::Forbidden,
                &format!(
                    "role {} may not use {}",
                    self.role.as_str(),
                    request.op.name()
                ),
            );
        }
        match request.op {
            Op::Ping => self.outbox.push(
                FrameWriter::new("pong")
                    .id(&id)
                    .uint("server_time_ms", unix_ms())
                    .finish(),
            ),
            Op::Submit {
                input,
                fn_name,
                wait,
            } => self.submit(id, input, fn_name, wait).await,
            Op::Get { key } => match self.broker.cache.get(&key) {
                Some(cached) => self.outbox.push(cached.status_frame(&id, &key)),
                None => {
                    self.to_hub(HubMsg::Get {
                        key,
                        id,
                        outbox: self.outbox.clone(),
                    })
                    .await
                }
            },
            Op::Subscribe { key } => {
                if let Some(cached) = self.broker.cache.get(&key) {
                    return self.outbox.push(cached.result_frame(&id, &key));
                }
                if self.broker.is_draining() {
                    return self.reject_draining(&id);
                }
                let waiter = self.waiter(key, id);
                self.to_hub(HubMsg::Subscribe { waiter }).await
            }
            Op::Cancel { key } => {
                self.to_hub(HubMsg::Cancel {
                    key,
                    id,
                    outbox: self.outbox.clone(),
                })
                .await
            }
            Op::Watch { interval_ms } => self.watch(id, interval_ms),
            Op::Unwatch => {
                if let Some(watch) = self.watch.take() {
                    watch.cancel();
                }
            }
        }
    }

    async fn submit(
        &mut self,
        id: ReqId,
        input: serde_json::Value,
        fn_name: Option<String>,
        wait: bool,
    ) {
        let broker = self.broker;
        let arrived = std::time::Instant::now();
        let name = fn_name.as_deref().unwrap_or("default");
        let Some(spec) = broker.evaluators.lookup(name) else {
            let shown: String = name.chars().take(64).collect();
            return self.reject(
                &id,
                ErrorCode::UnknownFn,
                &format!("no evaluator is configured under fn {shown:?}"),
            );
        };
        spec.metrics.submits.inc();
        if broker.is_draining() {
            return self.reject_draining(&id);
        }
        let canonical = canonical_json(&input);
        drop(input);
        if canonical.len() > spec.max_input_bytes {
            return self.reject(
                &id,
                ErrorCode::BadRequest,
                &format!(
                    "input is {} bytes; fn {name:?} takes at most {} (max_input_bytes)",
                    canonical.len(),
                    spec.max_input_bytes
                ),
            );
        }
        let key = Key::derive(name, canonical.as_bytes());
        if let Some(cached) = broker.cache.get(&key) {
            spec.metrics.cache_hits.inc();
            self.outbox.push(cached.result_frame(&id, &key));
            spec.metrics
                .latency_seconds
                .observe(arrived.elapsed().as_secs_f64());
            return;
        }
        let evaluator = spec.index;
        let mut waiter = self.waiter(key, id);
        waiter.since = wait.then_some(arrived);
        self.to_hub(HubMsg::Submit {
            waiter,
            evaluator,
            input: canonical.into(),
            wait,
        })
        .await
    }

    fn waiter(&self, key: Key, id: ReqId) -> Waiter {
        Waiter {
            key,
            id,
            outbox: self.outbox.clone(),
            since: None,
        }
    }

    async fn to_hub(&self, msg: HubMsg) {
        // The hub outlives every session; a send fails only while the broker stops.
        let _ = self.broker.hub.send(msg).await;
    }

    fn reject(&self, id: &ReqId, code: ErrorCode, message: &str) {
        self.outbox.push(error_frame(id, code.as_str(), message));
    }

    fn reject_draining(&self, id: &ReqId) {
        self.reject(id, ErrorCode::ShuttingDown, DRAINING_MESSAGE)
    }

    fn watch(&mut self, id: ReqId, interval_ms: u64) {
        if let Some(previous) = self.watch.take() {
            previous.cancel();
        }
        let token = CancellationToken::new();
        self.watch = Some(token.clone());
        let hub = self.broker.hub.clone();
        let outbox = self.outbox.clone();
        tokio::spawn(async move {
            let period = Duration::from_millis(interval_ms);
            let mut ticks = interval_at(Instant::now(), period);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = ticks.tick() => {
                        let msg = HubMsg::Snapshot { id: id.clone(), outbox: outbox.clone() };
                        if hub.send(msg).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}

fn is_graceful(code: u16) -> bool {
    code == close::NORMAL || code == close::GOING_AWAY
}

/// Resolves once the session is asked to close with a code that does not
/// wait for queued frames.
async fn hard_close(ctl: &SessionCtl) {
    ctl.closing().cancelled().await;
    if is_graceful(ctl.code()) {
        std::future::pending::<()>().await;
    }
}

/// While the writer sends the close frame, keeps reading (and dropping)
/// what the client still sends until its close reply, so the socket is not
/// torn down with unread data (which would reset the connection and could
/// cost the client the frames it has not read yet).
async fn linger<S>(stream: &mut SplitStream<WebSocketStream<S>>, limits: &Limits)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limit = Duration::from_millis(limits.close_timeout_ms);
    let _ = tokio::time::timeout(limit, async {
        while let Some(Ok(message)) = stream.next().await {
            if message.is_close() {
                break;
            }
        }
    })
    .await;
}

/// The next text or binary message, or None once the session ends: closing
/// was asked for (then it lingers for the client's close reply), the client
/// closed, or reading failed (the close code is set to say why).
async fn next_message<S>(
    stream: &mut SplitStream<WebSocketStream<S>>,
    closing: &mut Pin<&mut WaitForCancellationFuture<'_>>,
    ctl: &SessionCtl,
    limits: &Limits,
) -> Option<Message>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let next = tokio::select! {
            biased;
            next = stream.next() => next,
            _ = closing.as_mut() => {
                linger(stream, limits).await;
                return None;
            }
        };
        ctl.mark_seen();
        match next {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return Some(m),
            Some(Ok(Message::Close(_))) | None => {
                ctl.close_by_peer();
                return None;
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                debug!(%error, "read failed");
                ctl.close_with(close_code_for(&error));
                return None;
            }
        }
    }
}

/// The tokio-tungstenite settings for a session, from the limits.
pub fn websocket_config(limits: &Limits) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(limits.ws_read_buffer)
        .write_buffer_size(limits.ws_write_buffer)
        .max_write_buffer_size(limits.ws_max_write_buffer)
        .max_message_size(Some(limits.max_frame_bytes))
        .max_frame_size(Some(limits.max_frame_bytes))
}

/// The close code for a read error.
fn close_code_for(error: &WsError) -> u16 {
    match error {
        WsError::Capacity(_) => close::TOO_BIG,
        WsError::Protocol(_) => close::PROTOCOL_ERROR,
        WsError::Utf8(_) => close::INVALID_DATA,
        _ => close::ABNORMAL,
    }
}

/// Echoes every text and binary message back through the same outbound
/// queue and writer as a broker session: the transport without the broker,
/// for WebSocket conformance runs (examples/echo_server.rs).
pub async fn echo<S>(ws: WebSocketStream<S>, limits: &Limits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctl = Arc::new(SessionCtl::new(0));
    let (tx, rx) = mpsc::channel(limits.outbound_queue);
    let outbox = Outbox::new(tx, Arc::clone(&ctl));
    let (sink, mut stream) = ws.split();
    let reader = async {
        let closing = ctl.closing().cancelled();
        tokio::pin!(closing);
        while let Some(message) = next_message(&mut stream, &mut closing, &ctl, limits).await {
            outbox.push_message(message);
        }
    };
    tokio::join!(reader, write_loop(sink, rx, &ctl, limits));
}

/// Writes queued frames in batches until the session closes, then sends the close frame.
async fn write_loop<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    mut rx: mpsc::Receiver<Message>,
    ctl: &SessionCtl,
    limits: &Limits,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let heartbeat = Duration::from_millis(limits.heartbeat_ms);
    let mut pings = interval_at(Instant::now() + heartbeat, heartbeat);
    pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut silent_intervals = 0u32;
    let closing = ctl.closing().cancelled();
    let hard = hard_close(ctl);
    tokio::pin!(closing, hard);
    loop {
        tokio::select! {
            biased;
            _ = &mut closing => break,
            frame = rx.recv() => {
                let Some(frame) = frame else { break };
                let batch = async {
                    sink.feed(frame).await?;
                    for _ in 1..limits.write_batch {
                        match rx.try_recv() {
                            Ok(frame) => sink.feed(frame).await?,
                            Err(_) => break,
                        }
                    }
                    sink.flush().await
                };
                tokio::select! {
                    biased;
                    written = batch => if written.is_err() {
                        ctl.close_with(close::ABNORMAL);
                        break;
                    },
                    // A stuck write is abandoned only for a hard close; a
                    // graceful one lets the batch (results included) finish.
                    _ = &mut hard => break,
                }
            }
            _ = pings.tick() => {
                if ctl.take_seen() {
                    silent_intervals = 0;
                } else {
                    silent_intervals += 1;
                    if silent_intervals >= 3 {
                        ctl.close_with(close::HEARTBEAT_TIMEOUT);
                        break;
                    }
                }
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    ctl.close_with(close::ABNORMAL);
                    break;
                }
            }
        }
    }
    let code = ctl.code();
    let close_timeout = Duration::from_millis(limits.close_timeout_ms);
    if code == close::ABNORMAL {
        return;
    }
    let finish = async {
        if ctl.closed_by_peer() {
            // tungstenite queued the close reply when it read the client's
            // close frame; nothing else may be sent after it.
            return sink.close().await;
        }
        if is_graceful(code) {
            // A graceful close still delivers what was already queued.
            while let Ok(frame) = rx.try_recv() {
                sink.feed(frame).await?;
            }
        }
        sink.send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: close::reason(code).into(),
        })))
        .await?;
        sink.close().await
    };
    let _ = tokio::time::timeout(close_timeout, finish).await;
}
