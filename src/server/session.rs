//! One WebSocket session, served by one task that owns its socket.
//!
//! The task answers what it can in place (cache hits, `ping`, request
//! errors), writing the reply into the socket's buffer, and hands misses,
//! subscriptions and cancels to the hub, whose answers come back through
//! the session's outbound queue. Each turn takes every message and queued
//! frame already there and writes their replies with one flush; the same
//! task sends heartbeats and closes the session with the code chosen by
//! whoever asked first.

use crate::config::{Limits, Role};
use crate::core::Target;
use crate::error::ErrorCode;
use crate::exec::pool::EvaluatorSpec;
use crate::hub::{HubMsg, Waiter};
use crate::key::{canonical_json, Key};
use crate::metrics::NsMetrics;
use crate::outbox::{close, Frame, Inbox, Outbox, SessionCtl};
use crate::protocol::{
    error_frame, parse_input, parse_request_knowing, unix_ms, FrameWriter, Invalidation, Op, ReqId,
    Wants, DEFAULT_FN, DRAINING_MESSAGE, PROTOCOL_VERSION,
};
use crate::server::auth::{Identity, ServeRight};
use crate::server::broker::Broker;
use crate::server::snapshot::WatchMsg;
use crate::server::tenants::{Allowance, Seat};
use futures::{Sink, SinkExt, StreamExt};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::{interval_at, MissedTickBehavior};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, Instrument};

/// What an op asks of a session's credentials.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Right {
    /// `watch`, `unwatch`, `get`, `ping`.
    Look,
    /// `submit`, `subscribe`, `cancel`.
    Ask,
    /// `invalidate`.
    Invalidate,
    /// `serve`, `unserve`, `complete`.
    Work,
}

impl Right {
    fn of(op: &Op) -> Right {
        match op {
            Op::Watch { .. } | Op::Unwatch | Op::Get { .. } | Op::Ping => Right::Look,
            Op::Submit { .. } | Op::Subscribe { .. } | Op::Cancel { .. } => Right::Ask,
            Op::Invalidate(_) => Right::Invalidate,
            Op::Serve { .. } | Op::Unserve { .. } | Op::Complete { .. } | Op::Progress { .. } => {
                Right::Work
            }
        }
    }
}

/// Whether `identity` has `right` (which fns it may serve is checked apart).
pub(crate) fn has_right(identity: &Identity, right: Right) -> bool {
    match identity.role {
        // Without tokens everyone is an agent that may also serve and
        // invalidate (as an admin may).
        Role::Agent => {
            matches!(right, Right::Look | Right::Ask) || identity.serve != ServeRight::Nothing
        }
        Role::Admin => right != Right::Work || identity.serve != ServeRight::Nothing,
        Role::Viewer => right == Right::Look,
        Role::Worker => right == Right::Work,
    }
}

/// Whether `identity` may use `op`; `ping` is everyone's.
fn allows(identity: &Identity, op: &Op) -> bool {
    matches!(op, Op::Ping) || has_right(identity, Right::of(op))
}

/// Serves one upgraded connection until it closes. The caller has taken a
/// connection slot with [`Broker::admit`]; it is given back here.
pub fn serve<S>(
    ws: Box<WebSocketStream<S>>,
    broker: Arc<Broker>,
    peer: SocketAddr,
    identity: Identity,
    seat: Seat,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let uuid = uuid::Uuid::new_v4();
    let span = tracing::info_span!("session", %peer, session = %uuid, token = %identity.name);
    run_session(ws, broker, uuid, identity, seat).instrument(span)
}

async fn run_session<S>(
    ws: Box<WebSocketStream<S>>,
    broker: Arc<Broker>,
    uuid: uuid::Uuid,
    identity: Identity,
    seat: Seat,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let id = broker.next_session_id();
    let role = identity.role;
    let label: Arc<str> = format!("{}/{}", identity.name, &uuid.simple().to_string()[..8]).into();
    let limits = &broker.config.limits;
    let ctl = Arc::new(SessionCtl::new(id, limits.outbound_bytes));
    broker.register_session(&ctl);
    let (outbox, rx) = Outbox::channel(Arc::clone(&ctl), limits.outbound_queue);
    outbox.push(hello(&broker, uuid, &identity));
    info!(role = role.as_str(), "session open");
    let mut reader = Reader {
        broker: &broker,
        outbox,
        identity: &identity,
        ns_metrics: &seat.metrics,
        allowance: seat.allowance(),
        label,
        watching: false,
        hits: Vec::new(),
    };
    let expiry = identity.expires.map(expiry);
    run_socket(ws, &mut reader, rx, &ctl, limits, expiry).await;
    reader.unwatch().await;
    drop(reader);
    let closed = HubMsg::SessionClosed { session: id };
    if let Err(TrySendError::Full(closed)) = broker.hub.try_send(closed) {
        let _ = Box::pin(broker.hub.send(closed)).await;
    }
    broker.sessions.remove(&id);
    broker.release();
    let code = ctl.code();
    broker.metrics.record_close(code);
    info!(code, reason = ctl.reason(), "session closed");
}

fn hello(broker: &Broker, uuid: uuid::Uuid, identity: &Identity) -> String {
    let limits = serde_json::json!({
        "max_frame_bytes": broker.config.limits.max_frame_bytes,
        "max_pending": broker.config.limits.max_pending,
    });
    let namespace = if identity.sees_all {
        "*".into()
    } else {
        identity.ns.name()
    };
    FrameWriter::new("hello")
        .str("session", &uuid.to_string())
        .uint("protocol", PROTOCOL_VERSION.into())
        .str("server", concat!("herd/", env!("CARGO_PKG_VERSION")))
        .str("role", identity.role.as_str())
        .str("namespace", &namespace)
        .raw("limits", &limits.to_string())
        .finish()
}

/// Serves one request `text` from outside a WebSocket session (the HTTP
/// API) as a session's would be served: the same checks, cache, quotas and
/// hub; its frames go to `outbox`, whose session the caller closes.
pub async fn serve_one(
    broker: &Arc<Broker>,
    identity: &Identity,
    ns_metrics: &NsMetrics,
    outbox: Outbox,
    text: &str,
) {
    let mut reader = Reader {
        broker,
        outbox,
        identity,
        ns_metrics,
        allowance: broker.tenants.allowance(identity.ns),
        label: format!("{}/http", identity.name).into(),
        watching: false,
        hits: Vec::new(),
    };
    let arrived = Instant::now();
    let then = reader.handle(text, arrived);
    let outbox = reader.outbox.clone();
    match reader.act(then) {
        Served::Done(Some(reply)) => outbox.reply(reply).await,
        Served::Done(None) => {}
        Served::Wait(wait) => wait.await,
    }
    reader.queued(arrived);
}

/// The timer of a signed token that expires at `at` (Unix seconds, leeway
/// included): the session closes with 1008 "token expired" when it fires.
/// On the heap, as only sessions with such a token have one.
fn expiry(at: u64) -> Pin<Box<tokio::time::Sleep>> {
    let left = Duration::from_millis(at.saturating_mul(1000).saturating_sub(unix_ms()));
    Box::pin(tokio::time::sleep(left))
}

/// A submit's input as sent, and its fn and key if the memo had it when
/// the frame was read.
struct Input<'t, 'a> {
    text: &'t str,
    known: Option<(&'a EvaluatorSpec, Key)>,
}

/// What is left to do for a request once it has been read: at most one wait.
enum Then<'a> {
    Reply(Frame),
    /// A cache hit: the reply, and its fn, whose latency is observed once
    /// the reply is queued ([`Reader::queued`]).
    Hit {
        frame: Frame,
        spec: &'a EvaluatorSpec,
    },
    Hub(HubMsg),
    Watchers(WatchMsg),
    Unwatch,
}

fn reject<'a>(id: &ReqId, code: ErrorCode, message: &str) -> Then<'a> {
    Then::Reply(error_frame(id, code.as_str(), message).into())
}

fn reject_draining<'a>(id: &ReqId) -> Then<'a> {
    reject(id, ErrorCode::ShuttingDown, DRAINING_MESSAGE)
}

/// The answer to a submit beyond its namespace's `submits_per_s`: the
/// bucket holds a submit again after `wait`.
fn rate_limited(id: &ReqId, wait: Duration) -> String {
    FrameWriter::new("error")
        .id_or_null(id)
        .str("code", ErrorCode::RateLimited.as_str())
        .str(
            "message",
            "too many submits in this namespace (its submits_per_s, of [[namespace]] or [namespace_defaults])",
        )
        .uint("retry_after_ms", wait.as_millis().max(1) as u64)
        .finish()
}

/// The answer to a request naming a fn no evaluator serves.
fn reject_unknown_fn<'a>(id: &ReqId, name: &str) -> Then<'a> {
    let shown: String = name.chars().take(64).collect();
    reject(
        id,
        ErrorCode::UnknownFn,
        &format!("no evaluator is configured under fn {shown:?}"),
    )
}

struct Reader<'a> {
    broker: &'a Arc<Broker>,
    outbox: Outbox,
    identity: &'a Identity,
    /// Its namespace's figures.
    ns_metrics: &'a NsMetrics,
    /// Its namespace's submits.
    allowance: Allowance,
    /// How this session is shown as a worker (token name and session).
    label: Arc<str>,
    /// Whether this session has a `watch` running.
    watching: bool,
    /// The fns of the cache hits answered since the last [`Reader::queued`].
    hits: Vec<&'a EvaluatorSpec>,
}

impl<'a> Reader<'a> {
    /// Carries out what a request asked for without waiting if it can:
    /// the reply to send in place, or the wait that is left (on the heap,
    /// so that the session's task stays small).
    fn act(&mut self, then: Then<'a>) -> Served<'a> {
        let broker: &'a Broker = self.broker;
        match then {
            Then::Reply(frame) => Served::Done(Some(frame)),
            Then::Hit { frame, spec } => {
                self.hits.push(spec);
                Served::Done(Some(frame))
            }
            // The hub outlives every session; a send fails only while the
            // broker stops. Waiting for room in its queue is the rare case.
            Then::Hub(msg) => match broker.hub.try_send(msg) {
                Err(TrySendError::Full(msg)) => Served::Wait(Box::pin(async move {
                    let _ = broker.hub.send(msg).await;
                })),
                _ => Served::Done(None),
            },
            Then::Watchers(msg) => Served::Wait(Box::pin(async move {
                let _ = broker.watchers.send(msg).await;
            })),
            Then::Unwatch => Served::Wait(Box::pin(self.unwatch())),
        }
    }

    /// The replies to the requests that arrived at `arrived` are queued:
    /// observes the latency of the cache hits among them (one clock reading
    /// for all of them).
    fn queued(&mut self, arrived: Instant) {
        if self.hits.is_empty() {
            return;
        }
        let latency = arrived.elapsed().as_secs_f64();
        for spec in self.hits.drain(..) {
            spec.metrics.latency_seconds.observe(latency);
        }
    }

    /// Serves one request as far as it can without waiting, and says what
    /// is left to wait for. Keeping every wait in [`Reader::act`] keeps the
    /// session's task small.
    fn handle(&mut self, text: &str, arrived: Instant) -> Then<'a> {
        let broker: &'a Broker = self.broker;
        // A submit's input seen before, byte for byte: its fn and key, and
        // the input is not read again.
        let mut known = None;
        let request = match parse_request_knowing(text, |fn_name, input| {
            known = broker
                .evaluators
                .lookup(fn_name.unwrap_or(DEFAULT_FN))
                .and_then(|spec| Some((spec, broker.memo.get(spec.index, input.as_bytes())?)));
            known.is_some()
        }) {
            Ok(r) => r,
            Err(rejection) => return Then::Reply(rejection.frame().into()),
        };
        let id = request.id;
        if !allows(self.identity, &request.op) {
            return reject(
                &id,
                ErrorCode::Forbidden,
                &format!(
                    "role {} may not use {}",
                    self.identity.role.as_str(),
                    request.op.name()
                ),
            );
        }
        match request.op {
            Op::Ping => Then::Reply(
                FrameWriter::new("pong")
                    .id(&id)
                    .uint("server_time_ms", unix_ms())
                    .finish()
                    .into(),
            ),
            Op::Submit {
                input,
                fn_name,
                wait,
                wants,
            } => self.submit(
                id,
                Input { text: input, known },
                fn_name,
                wait,
                wants,
                arrived,
            ),
            Op::Get { key } => match self.broker.cache.get_at(&self.scoped(key), arrived) {
                Some(hit) => Then::Reply(hit.cached.status_frame(&id, &key).into()),
                None => Then::Hub(HubMsg::Get {
                    key: self.scoped(key),
                    id,
                    outbox: self.outbox.clone(),
                }),
            },
            Op::Subscribe { key, progress } => {
                let key = self.scoped(key);
                if let Some(hit) = self.broker.cache.get_at(&key, arrived) {
                    return Then::Reply(hit.result_frame(&id, &key).into());
                }
                if self.broker.is_draining() {
                    return reject_draining(&id);
                }
                Then::Hub(HubMsg::Subscribe {
                    waiter: self.waiter(key, id),
                    progress,
                })
            }
            Op::Cancel { key } => Then::Hub(HubMsg::Cancel {
                key: self.scoped(key),
                id,
                outbox: self.outbox.clone(),
            }),
            Op::Watch { interval_ms } => {
                self.watching = true;
                Then::Watchers(WatchMsg::Start {
                    id,
                    scope: (!self.identity.sees_all).then_some(self.identity.ns),
                    interval: Duration::from_millis(interval_ms),
                    outbox: self.outbox.clone(),
                })
            }
            Op::Unwatch => Then::Unwatch,
            Op::Serve {
                fn_name,
                concurrency,
            } => {
                let evaluator = match self.remote_fn(&id, &fn_name) {
                    Ok(evaluator) => evaluator,
                    Err(rejected) => return *rejected,
                };
                if self.broker.is_draining() {
                    return reject_draining(&id);
                }
                Then::Hub(HubMsg::Serve {
                    outbox: self.outbox.clone(),
                    label: Arc::clone(&self.label),
                    evaluator,
                    concurrency,
                    // A worker serves its own namespace's tasks only; one
                    // with namespace "*" serves every namespace.
                    scope: (!self.identity.sees_all).then_some(self.identity.ns),
                    id,
                })
            }
            Op::Unserve { fn_name } => match self.remote_fn(&id, &fn_name) {
                Ok(evaluator) => Then::Hub(HubMsg::Unserve {
                    outbox: self.outbox.clone(),
                    evaluator,
                    id,
                }),
                Err(rejected) => *rejected,
            },
            Op::Invalidate(what) => {
                let target = match what {
                    Invalidation::Key(key) => Target::Key(key.in_ns(self.identity.ns)),
                    Invalidation::Fn(name) => match self.broker.evaluators.lookup(&name) {
                        Some(spec) => Target::Fn(self.identity.ns, spec.index),
                        None => return reject_unknown_fn(&id, &name),
                    },
                };
                Then::Hub(HubMsg::Invalidate {
                    target,
                    id,
                    outbox: self.outbox.clone(),
                })
            }
            Op::Complete { task, outcome } => Then::Hub(HubMsg::Complete {
                outbox: self.outbox.clone(),
                task,
                outcome,
                id,
            }),
            Op::Progress { task, data } => Then::Hub(HubMsg::Progress {
                session: self.outbox.session(),
                task,
                data: data.into(),
            }),
        }
    }

    fn submit(
        &self,
        id: ReqId,
        input: Input<'_, 'a>,
        fn_name: Option<std::borrow::Cow<'_, str>>,
        wait: bool,
        wants: Wants,
        arrived: Instant,
    ) -> Then<'a> {
        let max_age = wants.max_age_ms.map(Duration::from_millis);
        let broker: &'a Broker = self.broker;
        let name = fn_name.as_deref().unwrap_or(DEFAULT_FN);
        let found = input.known.map(|(spec, _)| spec);
        let Some(spec) = found.or_else(|| broker.evaluators.lookup(name)) else {
            return reject_unknown_fn(&id, name);
        };
        if let Some(ms) = wants.deadline_ms {
            let timeout = spec.timeout.as_millis() as u64;
            if ms > timeout {
                let message = format!(
                    "\"deadline_ms\" is {ms}; fn {name:?} runs at most {timeout} ms (timeout_ms)"
                );
                return reject(&id, ErrorCode::BadRequest, &message);
            }
        }
        if !self.identity.may_submit(name) {
            let shown: String = name.chars().take(64).collect();
            return reject(
                &id,
                ErrorCode::Forbidden,
                &format!("token {:?} may not submit fn {shown:?}", self.identity.name),
            );
        }
        spec.metrics.submits.inc();
        self.ns_metrics.submits.inc();
        if broker.is_draining() {
            return reject_draining(&id);
        }
        if let Err(wait) = broker.tenants.take_submit(&self.allowance) {
            self.ns_metrics.rate_limited.inc();
            return Then::Reply(rate_limited(&id, wait).into());
        }
        // A byte-identical input seen before: its key without parsing or hashing.
        let raw = input.text.as_bytes();
        let memoized = input
            .known
            .map(|(_, key)| key)
            .or_else(|| broker.memo.get(spec.index, raw))
            .map(|key| self.scoped(key));
        if let Some(key) = memoized {
            if let Some(frame) = self.answer_from_cache(spec, &id, &key, arrived, max_age) {
                return Then::Hit { frame, spec };
            }
        }
        let input = match parse_input(input.text) {
            Ok(value) => value,
            Err(message) => return reject(&id, ErrorCode::BadRequest, &message),
        };
        let canonical = canonical_json(&input);
        drop(input);
        if canonical.len() > spec.max_input_bytes {
            return reject(
                &id,
                ErrorCode::BadRequest,
                &format!(
                    "input is {} bytes; fn {name:?} takes at most {} (max_input_bytes)",
                    canonical.len(),
                    spec.max_input_bytes
                ),
            );
        }
        let key = match memoized {
            Some(key) => key,
            None => {
                let key = Key::derive(name, canonical.as_bytes());
                broker.memo.insert(spec.index, raw, key);
                self.scoped(key)
            }
        };
        if let Some(frame) = self.answer_from_cache(spec, &id, &key, arrived, max_age) {
            return Then::Hit { frame, spec };
        }
        let evaluator = spec.index;
        let mut waiter = self.waiter(key, id);
        waiter.since = wait.then_some(arrived);
        Then::Hub(HubMsg::Submit {
            waiter,
            evaluator,
            input: canonical.into(),
            wait,
            wants,
        })
    }

    /// The reply to a submit from the cache if `key` is there (counted as
    /// a hit). The caller wraps it in [`Then::Hit`]: a frame is a fraction
    /// of a `Then`'s size, and so is the copy of it returned.
    fn answer_from_cache(
        &self,
        spec: &EvaluatorSpec,
        id: &ReqId,
        key: &Key,
        arrived: Instant,
        max_age: Option<Duration>,
    ) -> Option<Frame> {
        let hit = self.broker.cache.get_fresh_at(key, max_age, arrived)?;
        spec.metrics.cache_hits.inc();
        self.ns_metrics.cache_hits.inc();
        Some(hit.result_frame(id, key).into())
    }

    /// A key a client sent, in this session's namespace.
    fn scoped(&self, key: Key) -> Key {
        key.in_ns(self.identity.ns)
    }

    fn waiter(&self, key: Key, id: ReqId) -> Waiter {
        Waiter {
            key,
            id,
            outbox: self.outbox.clone(),
            since: None,
        }
    }

    /// The index of remote evaluator `fn_name` if this session may serve it;
    /// otherwise the `unknown_fn` or `forbidden` answer.
    fn remote_fn(&self, id: &ReqId, fn_name: &str) -> Result<usize, Box<Then<'a>>> {
        let shown: String = fn_name.chars().take(64).collect();
        let Some(spec) = self
            .broker
            .evaluators
            .lookup(fn_name)
            .filter(|spec| spec.remote)
        else {
            return Err(Box::new(reject(
                id,
                ErrorCode::UnknownFn,
                &format!("no remote evaluator is configured under fn {shown:?}"),
            )));
        };
        if !self.identity.serve.allows(fn_name) {
            return Err(Box::new(reject(
                id,
                ErrorCode::Forbidden,
                &format!("token {:?} may not serve fn {shown:?}", self.identity.name),
            )));
        }
        Ok(spec.index)
    }

    /// Stops the session's watch, if it has one.
    fn unwatch(&mut self) -> impl Future<Output = ()> + Send + 'a {
        let (broker, watching): (&'a Broker, _) = (self.broker, std::mem::take(&mut self.watching));
        let session = self.outbox.session();
        async move {
            if watching {
                let _ = broker.watchers.send(WatchMsg::Stop { session }).await;
            }
        }
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

/// What serving one message left to do.
pub(crate) enum Served<'f> {
    /// Nothing, or this reply to write in place.
    Done(Option<Frame>),
    /// A wait to finish before the next message (the rare case: the hub's
    /// queue is full, a watch starts or stops).
    Wait(Pin<Box<dyn Future<Output = ()> + Send + 'f>>),
}

/// What a session does with each text or binary message it reads; its
/// waits borrow nothing of the handler, only what outlives it (`'w`).
pub(crate) trait Handler<'w> {
    /// Serves `message`, read in a turn that began at `arrived`.
    fn message(&mut self, message: Message, arrived: Instant) -> Served<'w>;

    /// The replies of the turn that began at `arrived` are all queued.
    fn queued(&mut self, arrived: Instant);
}

impl<'a> Handler<'a> for Reader<'a> {
    fn message(&mut self, message: Message, arrived: Instant) -> Served<'a> {
        match message {
            Message::Text(text) => {
                let then = self.handle(&text, arrived);
                self.act(then)
            }
            _ => Served::Done(Some(
                error_frame(
                    &None,
                    ErrorCode::BadRequest.as_str(),
                    "binary frames are not accepted; send JSON in text frames",
                )
                .into(),
            )),
        }
    }

    fn queued(&mut self, arrived: Instant) {
        Reader::queued(self, arrived);
    }
}

/// A session's socket, owned by the session's one task. Messages are fed
/// into tungstenite's write buffer and flushed once per batch, without an
/// await: only a write the socket cannot take at once waits (on the heap),
/// within `limits.write_timeout_ms` (past it the session closes with 4001)
/// and until a hard close. So the task's future holds the loop's state and
/// little else.
struct Socket<'c, S> {
    ws: Box<WebSocketStream<S>>,
    ctl: &'c SessionCtl,
    write_timeout: Duration,
    /// Outbound-queue budget of the frames fed since the last flush, given
    /// back once they are written.
    unflushed_cost: usize,
    /// A write was given up midway: no frame can follow it.
    abandoned: bool,
}

/// What a step of a turn left to do before the turn can go on.
enum Left<'w> {
    Nothing,
    /// The session ends (its close code says why).
    End,
    /// Messages the socket could not take at once, in order.
    Write(Vec<Message>),
    /// The handler's wait.
    Wait(Pin<Box<dyn Future<Output = ()> + Send + 'w>>),
}

impl<'w> From<Result<Vec<Message>, ()>> for Left<'w> {
    fn from(fed: Result<Vec<Message>, ()>) -> Left<'w> {
        match fed {
            Ok(unsent) if unsent.is_empty() => Left::Nothing,
            Ok(unsent) => Left::Write(unsent),
            Err(()) => Left::End,
        }
    }
}

impl<S> Socket<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Feeds a frame taken from the outbound queue.
    fn queued(&mut self, waker: &Waker, frame: Frame) -> Result<Vec<Message>, ()> {
        self.unflushed_cost += self.ctl.cost(frame.len()) as usize;
        self.reply(waker, frame)
    }

    /// Feeds a frame's messages; those the socket cannot take now are
    /// given back, in order.
    fn reply(&mut self, waker: &Waker, frame: Frame) -> Result<Vec<Message>, ()> {
        let mut messages = frame.into_messages();
        while let Some(message) = messages.next() {
            if let Some(unsent) = self.feed(waker, message)? {
                return Ok(std::iter::once(unsent).chain(messages).collect());
            }
        }
        Ok(Vec::new())
    }

    /// Feeds a message if the socket's buffer can take it now; gives it
    /// back if not.
    fn feed(&mut self, waker: &Waker, message: Message) -> Result<Option<Message>, ()> {
        let mut cx = Context::from_waker(waker);
        match Pin::new(&mut self.ws).poll_ready(&mut cx) {
            Poll::Pending => return Ok(Some(message)),
            Poll::Ready(Err(error)) => return self.finished(Some(Err(error))).map(|()| None),
            Poll::Ready(Ok(())) => {}
        }
        let fed = Pin::new(&mut self.ws).start_send(message);
        self.finished(Some(fed)).map(|()| None)
    }

    /// Writes messages the socket could not take at once.
    async fn write_unsent(&mut self, unsent: Vec<Message>) -> Result<(), ()> {
        for message in unsent {
            let fed = wait_for_write(self.ws.feed(message), self.ctl, self.write_timeout).await;
            self.finished(fed)?;
        }
        Ok(())
    }

    /// Writes everything fed so far: at once if the socket takes it,
    /// otherwise waiting on the heap.
    async fn flush(&mut self, waker: &Waker) -> Result<(), ()> {
        let now = Pin::new(&mut self.ws).poll_flush(&mut Context::from_waker(waker));
        let flushed = match now {
            Poll::Ready(flushed) => Some(flushed),
            Poll::Pending => {
                Box::pin(wait_for_write(
                    self.ws.flush(),
                    self.ctl,
                    self.write_timeout,
                ))
                .await
            }
        };
        self.finished(flushed)?;
        self.ctl.release(std::mem::take(&mut self.unflushed_cost));
        Ok(())
    }

    /// What a write came to: a failure closes the session with 1006, a
    /// write given up (None) leaves the socket unusable.
    fn finished(&mut self, result: Option<Result<(), WsError>>) -> Result<(), ()> {
        match result {
            Some(Ok(())) => Ok(()),
            Some(Err(error)) => {
                debug!(%error, "write failed");
                self.ctl.close_with(close::ABNORMAL);
                Err(())
            }
            None => {
                self.abandoned = true;
                Err(())
            }
        }
    }
}

/// Waits for a write the socket could not take at once; None if it was
/// given up: past `write_timeout` (the session closes with 4001) or on a
/// hard close.
async fn wait_for_write<F>(
    write: F,
    ctl: &SessionCtl,
    write_timeout: Duration,
) -> Option<Result<(), WsError>>
where
    F: Future<Output = Result<(), WsError>>,
{
    tokio::select! {
        biased;
        _ = hard_close(ctl) => None,
        written = tokio::time::timeout(write_timeout, write) => match written {
            Ok(result) => Some(result),
            Err(_) => {
                debug!("write made no progress within write_timeout_ms");
                ctl.close_with(close::SLOW_CONSUMER);
                None
            }
        },
    }
}

/// Runs a session's socket until the session closes: reads messages and
/// serves them with `handler`, writes what its outbound queue `rx` holds,
/// sends heartbeats, closes the session when `expiry` fires, then closes
/// with the code chosen by whoever asked first.
///
/// One task owns the socket. Each turn waits for one thing (a queued frame,
/// a message, the heartbeat, closing), then takes whatever else is already
/// there, up to `limits.write_batch` frames and messages, and writes the
/// whole turn's replies with one flush. A write the socket cannot take
/// stops reading until it is written, so a client that does not read its
/// answers is not read either.
async fn run_socket<'w, S, H>(
    ws: Box<WebSocketStream<S>>,
    handler: &mut H,
    mut rx: Inbox,
    ctl: &SessionCtl,
    limits: &Limits,
    mut expiry: Option<Pin<Box<tokio::time::Sleep>>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    H: Handler<'w>,
{
    let mut socket = Socket {
        ws,
        ctl,
        write_timeout: Duration::from_millis(limits.write_timeout_ms),
        unflushed_cost: 0,
        abandoned: false,
    };
    let heartbeat = Duration::from_millis(limits.heartbeat_ms);
    let mut pings = interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut silent_intervals = 0u32;
    // One registration for the session's life, not one per message.
    let closing = ctl.closing().cancelled();
    tokio::pin!(closing);
    // The task's own waker: a turn feeds, reads and flushes with it without
    // awaiting, so the task's future holds no write or read in progress.
    let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
    loop {
        // Queued frames first: they were answered before what is read now.
        let event = tokio::select! {
            biased;
            _ = &mut closing => break,
            frame = rx.recv() => match frame {
                Some(frame) => Event::Queued(frame),
                None => break,
            },
            message = socket.ws.next() => Event::Read(message),
            _ = pings.tick() => Event::Heartbeat,
            _ = async { expiry.as_mut().expect("guarded").await }, if expiry.is_some() => {
                info!("signed token expired");
                ctl.close_expired();
                break;
            }
        };
        // One clock reading per turn: when its requests arrived.
        let arrived = Instant::now();
        let mut left = match event {
            Event::Queued(frame) => socket.queued(&waker, frame).into(),
            Event::Read(message) => serve_message(&waker, &mut socket, handler, message, arrived),
            Event::Heartbeat => {
                if !heard_lately(ctl, &mut silent_intervals) {
                    ctl.close_with(close::HEARTBEAT_TIMEOUT);
                    break;
                }
                socket
                    .feed(&waker, Message::Ping(Default::default()))
                    .map(|unsent| unsent.into_iter().collect())
                    .into()
            }
        };
        let mut taken = 1;
        let ended = loop {
            match left {
                Left::Nothing => {}
                Left::End => break true,
                Left::Write(unsent) => {
                    if Box::pin(socket.write_unsent(unsent)).await.is_err() {
                        break true;
                    }
                }
                Left::Wait(wait) => wait.await,
            }
            left = take_ready(
                &waker,
                &mut socket,
                handler,
                &mut rx,
                limits,
                arrived,
                &mut taken,
            );
            if matches!(left, Left::Nothing) {
                break false;
            }
        };
        handler.queued(arrived);
        if ended || socket.flush(&waker).await.is_err() {
            break;
        }
    }
    Box::pin(finish_close(socket, rx, ctl, limits)).await;
    ctl.writer_stopped();
}

/// At a heartbeat: whether the client sent anything within the last three
/// (`silent_intervals` counts the heartbeats since it last did).
fn heard_lately(ctl: &SessionCtl, silent_intervals: &mut u32) -> bool {
    if ctl.take_seen() {
        *silent_intervals = 0;
    } else {
        *silent_intervals += 1;
    }
    *silent_intervals < 3
}

/// What a session's turn begins with.
enum Event {
    Queued(Frame),
    Read(Option<Result<Message, WsError>>),
    Heartbeat,
}

/// Takes the queued frames and read messages that are already there, up to
/// `limits.write_batch` of them in the turn (`taken` so far), until one
/// leaves something to do.
fn take_ready<'w, S, H>(
    waker: &Waker,
    socket: &mut Socket<'_, S>,
    handler: &mut H,
    rx: &mut Inbox,
    limits: &Limits,
    arrived: Instant,
    taken: &mut usize,
) -> Left<'w>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    H: Handler<'w>,
{
    while *taken < limits.write_batch && socket.ctl.code() == 0 {
        let mut progressed = false;
        if let Some(frame) = rx.try_recv() {
            *taken += 1;
            progressed = true;
            let left = socket.queued(waker, frame).into();
            if !matches!(left, Left::Nothing) {
                return left;
            }
        }
        if let Poll::Ready(message) = socket.ws.poll_next_unpin(&mut Context::from_waker(waker)) {
            *taken += 1;
            progressed = true;
            let left = serve_message(waker, socket, handler, message, arrived);
            if !matches!(left, Left::Nothing) {
                return left;
            }
        }
        if !progressed {
            break;
        }
    }
    Left::Nothing
}

/// Serves what reading gave: what is left is the end of the session when
/// the client closed, or reading failed (the close code is set to say
/// why), or a reply could not be written.
fn serve_message<'w, S, H>(
    waker: &Waker,
    socket: &mut Socket<'_, S>,
    handler: &mut H,
    message: Option<Result<Message, WsError>>,
    arrived: Instant,
) -> Left<'w>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    H: Handler<'w>,
{
    socket.ctl.mark_seen();
    match message {
        Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
            match handler.message(m, arrived) {
                Served::Done(Some(reply)) => socket.reply(waker, reply).into(),
                Served::Done(None) => Left::Nothing,
                Served::Wait(wait) => Left::Wait(wait),
            }
        }
        Some(Ok(Message::Close(_))) | None => {
            socket.ctl.close_by_peer();
            Left::End
        }
        // tungstenite answers pings itself; the pong goes with the next flush.
        Some(Ok(_)) => Left::Nothing,
        Some(Err(error)) => {
            debug!(%error, "read failed");
            socket.ctl.close_with(close_code_for(&error));
            Left::End
        }
    }
}

/// Sends the close frame (after what is still queued, for a graceful
/// close), then keeps reading (and dropping) what the client still sends
/// until its close reply, so the socket is not torn down with unread data
/// (which would reset the connection and could cost the client the frames
/// it has not read yet); all within `limits.close_timeout_ms`.
async fn finish_close<S>(socket: Socket<'_, S>, mut rx: Inbox, ctl: &SessionCtl, limits: &Limits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let code = ctl.code();
    if socket.abandoned || code == close::ABNORMAL {
        return;
    }
    let mut ws = socket.ws;
    let finish = async {
        if ctl.closed_by_peer() {
            // tungstenite queued the close reply when it read the client's
            // close frame; nothing else may be sent after it.
            return SinkExt::close(&mut ws).await;
        }
        if is_graceful(code) {
            // A graceful close still delivers what was already queued.
            while let Some(frame) = rx.try_recv() {
                for message in frame.into_messages() {
                    ws.feed(message).await?;
                }
            }
        }
        ws.send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: ctl.reason().into(),
        })))
        .await?;
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                break;
            }
        }
        SinkExt::close(&mut ws).await
    };
    let close_timeout = Duration::from_millis(limits.close_timeout_ms);
    let _ = tokio::time::timeout(close_timeout, finish).await;
}

/// The tokio-tungstenite settings for a session, from the limits.
pub fn websocket_config(limits: &Limits) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(limits.ws_frame_buffer)
        .write_buffer_size(limits.ws_write_buffer)
        .max_write_buffer_size(limits.ws_max_write_buffer)
        .max_message_size(Some(limits.max_frame_bytes))
        .max_frame_size(Some(limits.max_frame_bytes))
}

/// The close code for a read error.
fn close_code_for(error: &WsError) -> u16 {
    match error {
        WsError::Capacity(_) => close::TOO_BIG,
        // The peer dropped the connection without a close frame.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => close::ABNORMAL,
        WsError::Protocol(_) => close::PROTOCOL_ERROR,
        WsError::Utf8(_) => close::INVALID_DATA,
        _ => close::ABNORMAL,
    }
}

/// Echoes every text and binary message back.
struct Echo;

impl Handler<'static> for Echo {
    fn message(&mut self, message: Message, _: Instant) -> Served<'static> {
        Served::Done(Some(Frame::Other(Box::new(message))))
    }

    fn queued(&mut self, _: Instant) {}
}

/// Echoes every text and binary message back through the same socket loop
/// as a broker session: the transport without the broker, for WebSocket
/// conformance runs and as the floor hits are measured against
/// (examples/echo_server.rs).
pub async fn echo<S>(ws: Box<WebSocketStream<S>>, limits: &Limits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctl = Arc::new(SessionCtl::new(0, limits.outbound_bytes));
    let (_outbox, rx) = Outbox::channel(Arc::clone(&ctl), 1);
    run_socket(ws, &mut Echo, rx, &ctl, limits, None).await;
}
