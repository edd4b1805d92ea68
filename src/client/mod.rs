//! A Rust client for herd, on tokio-tungstenite.
//!
//! One background task owns the socket; every call sends a request with a
//! fresh integer `id` and waits for the reply that echoes it, so any number
//! of calls can be in flight on one connection (the client is cheap to
//! clone and share). With [`ClientOptions::reconnect`], a lost connection is
//! re-opened with backoff and every request still waiting is sent again, so a
//! broker restart loses no request: results come from the cache or are
//! evaluated again.
//!
//! ```no_run
//! # async fn demo() -> Result<(), herd::client::ClientError> {
//! let client = herd::client::Client::connect("ws://127.0.0.1:7878/ws", None).await?;
//! let result = client.submit("default", serde_json::json!({"x": 1})).await?;
//! println!("{} -> {}", result.key, result.output);
//! # Ok(()) }
//! ```

pub mod bench;
pub mod cli;
pub mod token;
pub mod work;
pub mod worker;

use futures::{SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A raw WebSocket to a broker.
pub type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Why a call did not produce what was asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// The evaluation ran and failed (`eval_failed`).
    #[error("evaluation of {key} failed: {message}")]
    EvalFailed { key: String, message: String },
    /// The evaluation ran past its timeout (`eval_timeout`).
    #[error("evaluation of {key} timed out: {message}")]
    EvalTimeout { key: String, message: String },
    /// This request's own `deadline_ms` passed first (`deadline_exceeded`);
    /// the evaluation goes on for its other waiters.
    #[error("no result for {key} within the deadline: {message}")]
    DeadlineExceeded { key: String, message: String },
    /// A limit was reached (`busy`); trying again later may succeed.
    #[error("broker busy: {0}")]
    Busy(String),
    /// The namespace's `submits_per_s` was reached (`rate_limited`); a
    /// submit may succeed after `retry_after_ms`.
    #[error("rate limited (retry after {retry_after_ms} ms): {message}")]
    RateLimited {
        retry_after_ms: u64,
        message: String,
    },
    /// The broker refused the request (`bad_request`, `unknown_fn`, `forbidden`, `shutting_down`, ...).
    #[error("{code}: {message}")]
    Rejected { code: String, message: String },
    /// This client cancelled its wait on the key (`cancel`).
    #[error("wait for {key} cancelled")]
    Cancelled { key: String },
    /// The connection ended (and reconnecting is off).
    #[error("connection closed{}", closed_detail(*.code, reason))]
    Closed { code: Option<u16>, reason: String },
    /// The connection could not be opened.
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    /// The broker answered the upgrade with a refusal (HTTP 401 or 403): a
    /// missing or wrong token, a foreign origin or host.
    #[error("{url} refused the connection (HTTP {status}): {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    /// The request is larger than the broker takes (its `max_frame_bytes`,
    /// from `hello`): refused here, before it is sent.
    #[error("the request is {size} bytes; the broker takes frames of at most {limit} bytes (max_frame_bytes)")]
    TooLarge { size: usize, limit: usize },
    /// The broker said something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Where a result came from (the frame's `source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The broker's cache.
    Cache,
    /// An evaluation this broker started or joined.
    Eval,
    /// Another broker of its cluster.
    Cluster,
}

impl Source {
    /// As the protocol writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Eval => "eval",
            Source::Cluster => "cluster",
        }
    }
}

/// A successful evaluation's output.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub key: String,
    pub output: Value,
    pub source: Source,
    /// How long the evaluation ran (evaluated results only).
    pub eval_ms: Option<f64>,
    /// How many waiters received this result (evaluated results only).
    pub shared: Option<u64>,
}

/// What `submit_nowait` learns: the key, and whether it was already done.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub key: String,
    /// "queued", "running", or "done" when the cache answered.
    pub state: String,
    pub first: bool,
    pub waiters: u64,
}

/// A key's state as `get` reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Done(Output),
    Failed(ClientError),
    Pending {
        state: String,
        waiters: u64,
        age_ms: u64,
    },
    Unknown,
}

/// How a [`Client`] behaves.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Re-open a lost connection and re-send what was still waiting.
    pub reconnect: bool,
}

/// Delay before the first reconnect attempt; doubles up to [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// How long [`Client::close`] waits for the broker's answering close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Submit,
    /// A submit whose progress reports are streamed to the caller.
    SubmitStream,
    SubmitNoWait,
    Get,
    Subscribe,
    Cancel,
    Invalidate,
    Ping,
    Watch,
}

enum ReplyTo {
    Once(oneshot::Sender<Result<Value, ClientError>>),
    Stream(mpsc::Sender<Value>),
    /// Every frame of a submit, its answer last (the caller reads them as
    /// they come: progress is not dropped).
    Updates(mpsc::UnboundedSender<Result<Value, ClientError>>),
}

/// What a submit asks for besides its result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubmitOptions {
    /// 0-9 (the broker's default: 5): its job starts in order of the
    /// highest priority among its submits.
    pub priority: Option<u8>,
    /// This request alone gets [`ClientError::DeadlineExceeded`] after
    /// this long (at most the fn's `timeout_ms`).
    pub deadline_ms: Option<u64>,
}

impl SubmitOptions {
    fn apply(self, request: &mut Value) {
        if let Some(priority) = self.priority {
            request["priority"] = json!(priority);
        }
        if let Some(ms) = self.deadline_ms {
            request["deadline_ms"] = json!(ms);
        }
    }
}

/// What a streamed submit yields: progress reports, then its outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// Report `seq` (from 1 per evaluation) of the evaluation it waits on.
    Progress { seq: u64, data: Value },
    /// The result, or why there is none; the stream ends after it.
    Done(Result<Output, ClientError>),
}

struct Pending {
    kind: Kind,
    /// The key a submit or subscribe waits on (a `cancel` of it ends the wait).
    key: Option<String>,
    frame: String,
    reply: ReplyTo,
}

enum Command {
    Request(u64, Pending),
    Forget(u64, String),
    /// Close the connection (with a close frame), then answer.
    Close(oneshot::Sender<()>),
}

/// A connection to a herd broker; clone it to share it.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    next_id: AtomicU64,
    hello: Value,
}

/// Channel depth between callers and the connection task.
const COMMAND_QUEUE: usize = 1024;

impl Client {
    /// Connects with `token` (if any) and no reconnecting.
    pub async fn connect(url: &str, token: Option<&str>) -> Result<Client, ClientError> {
        Self::connect_with(
            url,
            ClientOptions {
                token: token.map(str::to_string),
                reconnect: false,
            },
        )
        .await
    }

    pub async fn connect_with(url: &str, options: ClientOptions) -> Result<Client, ClientError> {
        let (socket, hello) = open(url, options.token.as_deref()).await?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let driver = Driver {
            url: url.to_string(),
            options,
            pending: BTreeMap::new(),
            commands: rx,
        };
        tokio::spawn(driver.run(socket));
        Ok(Client {
            inner: Arc::new(Inner {
                commands: tx,
                next_id: AtomicU64::new(1),
                hello,
            }),
        })
    }

    /// The broker's `hello` frame of the first connection.
    pub fn hello(&self) -> &Value {
        &self.inner.hello
    }

    async fn call(&self, kind: Kind, mut request: Value) -> Result<Value, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let key = match kind {
            Kind::Subscribe => request["key"].as_str().map(str::to_string),
            Kind::Submit => {
                let fn_name = request["fn"]
                    .as_str()
                    .unwrap_or(crate::protocol::DEFAULT_FN);
                Some(crate::key::key_hex(fn_name, &request["input"]))
            }
            _ => None,
        };
        request["id"] = json!(id);
        let frame = frame_text(request);
        let limit = self.inner.hello["limits"]["max_frame_bytes"].as_u64();
        if let Some(limit) = limit.filter(|l| frame.len() as u64 > *l) {
            return Err(ClientError::TooLarge {
                size: frame.len(),
                limit: limit as usize,
            });
        }
        let (tx, rx) = oneshot::channel();
        let pending = Pending {
            kind,
            key,
            frame,
            reply: ReplyTo::Once(tx),
        };
        self.inner
            .commands
            .send(Command::Request(id, pending))
            .await
            .map_err(|_| closed("client is closed"))?;
        rx.await.map_err(|_| closed("connection task ended"))?
    }

    /// Evaluates `input` with evaluator `fn_name` (or takes the cached
    /// result) and waits for the output.
    pub async fn submit(&self, fn_name: &str, input: Value) -> Result<Output, ClientError> {
        let reply = self
            .call(
                Kind::Submit,
                json!({"op": "submit", "fn": fn_name, "input": input}),
            )
            .await?;
        parse_result(&reply)
    }

    /// [`Client::submit`] with a priority or a deadline.
    pub async fn submit_with(
        &self,
        fn_name: &str,
        input: Value,
        options: SubmitOptions,
    ) -> Result<Output, ClientError> {
        let mut request = json!({"op": "submit", "fn": fn_name, "input": input});
        options.apply(&mut request);
        parse_result(&self.call(Kind::Submit, request).await?)
    }

    /// Submits and streams the evaluation's progress reports as they come
    /// (first those it made before this submit joined it), then its
    /// outcome ([`Update::Done`]), and ends. A cached result comes alone.
    pub async fn submit_stream(
        &self,
        fn_name: &str,
        input: Value,
        options: SubmitOptions,
    ) -> Result<impl Stream<Item = Update> + Send + 'static, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request =
            json!({"op": "submit", "id": id, "fn": fn_name, "input": input, "progress": true});
        options.apply(&mut request);
        let key = crate::key::key_hex(fn_name, &request["input"]);
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Pending {
            kind: Kind::SubmitStream,
            key: Some(key),
            frame: frame_text(request),
            reply: ReplyTo::Updates(tx),
        };
        self.inner
            .commands
            .send(Command::Request(id, pending))
            .await
            .map_err(|_| closed("client is closed"))?;
        Ok(futures::stream::unfold(Some(rx), |rx| async move {
            let mut rx = rx?;
            let update = match rx.recv().await? {
                Ok(frame) if frame["type"] == "progress" => Update::Progress {
                    seq: frame["seq"].as_u64().unwrap_or(0),
                    data: frame["data"].clone(),
                },
                Ok(frame) => return Some((Update::Done(parse_result(&frame)), None)),
                Err(error) => return Some((Update::Done(Err(error)), None)),
            };
            Some((update, Some(rx)))
        }))
    }

    /// Starts (or joins) the evaluation without waiting for its result.
    pub async fn submit_nowait(
        &self,
        fn_name: &str,
        input: Value,
    ) -> Result<Accepted, ClientError> {
        self.submit_nowait_with(fn_name, input, SubmitOptions::default())
            .await
    }

    /// [`Client::submit_nowait`] with a priority.
    pub async fn submit_nowait_with(
        &self,
        fn_name: &str,
        input: Value,
        options: SubmitOptions,
    ) -> Result<Accepted, ClientError> {
        let mut request = json!({"op": "submit", "fn": fn_name, "input": input, "wait": false});
        options.apply(&mut request);
        let reply = self.call(Kind::SubmitNoWait, request).await?;
        if reply["type"] == "result" {
            parse_result(&reply)?;
            return Ok(Accepted {
                key: str_field(&reply, "key"),
                state: "done".into(),
                first: false,
                waiters: 0,
            });
        }
        Ok(Accepted {
            key: str_field(&reply, "key"),
            state: str_field(&reply, "state"),
            first: reply["first"].as_bool().unwrap_or(false),
            waiters: reply["waiters"].as_u64().unwrap_or(0),
        })
    }

    /// Looks at a key without waiting or starting work.
    pub async fn get(&self, key: &str) -> Result<Status, ClientError> {
        let reply = self
            .call(Kind::Get, json!({"op": "get", "key": key}))
            .await?;
        Ok(match reply["state"].as_str() {
            Some("done") => match parse_result(&reply) {
                Ok(output) => Status::Done(output),
                Err(error) => Status::Failed(error),
            },
            Some(state @ ("queued" | "running")) => Status::Pending {
                state: state.to_string(),
                waiters: reply["waiters"].as_u64().unwrap_or(0),
                age_ms: reply["age_ms"].as_u64().unwrap_or(0),
            },
            _ => Status::Unknown,
        })
    }

    /// Waits for a key's result, whoever submits it.
    pub async fn subscribe(&self, key: &str) -> Result<Output, ClientError> {
        let reply = self
            .call(Kind::Subscribe, json!({"op": "subscribe", "key": key}))
            .await?;
        parse_result(&reply)
    }

    /// Stops this connection's waits on `key`; calls waiting on it end with
    /// [`ClientError::Cancelled`].
    pub async fn cancel(&self, key: &str) -> Result<(), ClientError> {
        self.call(Kind::Cancel, json!({"op": "cancel", "key": key}))
            .await
            .map(|_| ())
    }

    /// Drops the cached result of `key` (an admin's op); returns once the
    /// broker has dropped it.
    pub async fn invalidate_key(&self, key: &str) -> Result<(), ClientError> {
        self.call(Kind::Invalidate, json!({"op": "invalidate", "key": key}))
            .await
            .map(|_| ())
    }

    /// Drops every cached result of fn `fn_name` (an admin's op).
    pub async fn invalidate_fn(&self, fn_name: &str) -> Result<(), ClientError> {
        self.call(Kind::Invalidate, json!({"op": "invalidate", "fn": fn_name}))
            .await
            .map(|_| ())
    }

    /// Round trip to the broker; returns its clock (`server_time_ms`).
    pub async fn ping(&self) -> Result<u64, ClientError> {
        let reply = self.call(Kind::Ping, json!({"op": "ping"})).await?;
        Ok(reply["server_time_ms"].as_u64().unwrap_or(0))
    }

    /// `snapshot` frames every `interval_ms`, until the stream is dropped.
    pub async fn watch(
        &self,
        interval_ms: u64,
    ) -> Result<impl Stream<Item = Value> + Send + 'static, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(16);
        let frame = json!({"op": "watch", "id": id, "interval_ms": interval_ms}).to_string();
        self.inner
            .commands
            .send(Command::Request(
                id,
                Pending {
                    kind: Kind::Watch,
                    key: None,
                    frame,
                    reply: ReplyTo::Stream(tx),
                },
            ))
            .await
            .map_err(|_| closed("client is closed"))?;
        let commands = self.inner.commands.clone();
        let guard = WatchGuard { id, commands };
        Ok(futures::stream::unfold(
            (rx, guard),
            |(mut rx, guard)| async move { rx.recv().await.map(|snapshot| (snapshot, (rx, guard))) },
        ))
    }

    /// Closes the connection with a close frame (code 1000) and returns
    /// once it is closed; calls still waiting fail with `Closed`.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.inner.commands.send(Command::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }
}

/// Sends `unwatch` when a watch stream is dropped.
struct WatchGuard {
    id: u64,
    commands: mpsc::Sender<Command>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let _ = self.commands.try_send(Command::Forget(
            self.id,
            json!({"op": "unwatch"}).to_string(),
        ));
    }
}

/// ` by the broker (code 1009: frame larger than max_frame_bytes)`, or the reason alone.
fn closed_detail(code: Option<u16>, reason: &str) -> String {
    match (code, reason.is_empty()) {
        (Some(code), false) => format!(" by the broker (code {code}: {reason})"),
        (Some(code), true) => format!(" by the broker (code {code})"),
        (None, false) => format!(": {reason}"),
        (None, true) => String::new(),
    }
}

/// Explains a refused upgrade in words a person can act on.
fn upgrade_error(url: &str, error: tokio_tungstenite::tungstenite::Error) -> ClientError {
    use tokio_tungstenite::tungstenite::Error;
    let Error::Http(response) = &error else {
        return ClientError::Connect {
            url: url.to_string(),
            message: error.to_string(),
        };
    };
    let status = response.status();
    let body = response
        .body()
        .as_deref()
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .unwrap_or_default();
    let message = if body.is_empty() {
        status.canonical_reason().unwrap_or("refused").to_string()
    } else {
        body
    };
    match status.as_u16() {
        401 | 403 => ClientError::Refused {
            url: url.to_string(),
            status: status.as_u16(),
            message,
        },
        code if code < 300 || code == 404 || code == 426 => ClientError::Connect {
            url: url.to_string(),
            message: format!(
                "not a WebSocket endpoint (HTTP {status}); the broker's WebSocket is at /ws, e.g. ws://127.0.0.1:7878/ws"
            ),
        },
        _ => ClientError::Connect {
            url: url.to_string(),
            message: format!("HTTP {status}: {message}"),
        },
    }
}

fn closed(reason: &str) -> ClientError {
    ClientError::Closed {
        code: None,
        reason: reason.to_string(),
    }
}

fn str_field(v: &Value, name: &str) -> String {
    v[name].as_str().unwrap_or_default().to_string()
}

/// A request's text with its `input` (if any) last: a broker that has
/// read that input before does not read the frame past its start.
fn frame_text(mut request: Value) -> String {
    let input = request.as_object_mut().and_then(|m| m.remove("input"));
    let mut text = request.to_string();
    if let Some(input) = input {
        text.pop();
        if text.len() > 1 {
            text.push(',');
        }
        text.push_str("\"input\":");
        text.push_str(&input.to_string());
        text.push('}');
    }
    text
}

/// Turns a `result` (or `status` done) frame into an output or its error.
fn parse_result(frame: &Value) -> Result<Output, ClientError> {
    let key = str_field(frame, "key");
    if let Some(error) = frame.get("error") {
        let message = str_field(error, "message");
        return Err(match error["code"].as_str() {
            Some("eval_timeout") => ClientError::EvalTimeout { key, message },
            Some("deadline_exceeded") => ClientError::DeadlineExceeded { key, message },
            _ => ClientError::EvalFailed { key, message },
        });
    }
    let output = frame
        .get("output")
        .cloned()
        .ok_or_else(|| ClientError::Protocol(format!("no output in {frame}")))?;
    Ok(Output {
        key,
        output,
        source: match frame["source"].as_str() {
            Some("cluster") => Source::Cluster,
            _ if frame["source"] == "cache" || frame["type"] == "status" => Source::Cache,
            _ => Source::Eval,
        },
        eval_ms: frame["eval_ms"].as_f64(),
        shared: frame["shared"].as_u64(),
    })
}

fn error_of(frame: &Value) -> ClientError {
    let code = str_field(frame, "code");
    let message = str_field(frame, "message");
    if code == "busy" {
        ClientError::Busy(message)
    } else if code == "rate_limited" {
        ClientError::RateLimited {
            retry_after_ms: frame["retry_after_ms"].as_u64().unwrap_or(0),
            message,
        }
    } else {
        ClientError::Rejected { code, message }
    }
}

/// Opens a raw socket (with `token` as a bearer credential) and reads its
/// `hello`; for callers that speak the protocol themselves, like the benchmark.
pub async fn open(url: &str, token: Option<&str>) -> Result<(Socket, Value), ClientError> {
    let connect_error = |message: String| ClientError::Connect {
        url: url.to_string(),
        message,
    };
    if let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    {
        let scheme = if url.starts_with("https") {
            "wss"
        } else {
            "ws"
        };
        let rest = rest.trim_end_matches('/');
        let path = if rest.ends_with("/ws") { "" } else { "/ws" };
        return Err(connect_error(format!(
            "herd is reached over WebSocket: use {scheme}://{rest}{path} (ws:// or wss://, not http://)"
        )));
    }
    let mut request = url
        .into_client_request()
        .map_err(|e| connect_error(e.to_string()))?;
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| connect_error(e.to_string()))?;
        request.headers_mut().insert("authorization", value);
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| upgrade_error(url, e))?;
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                let hello: Value = serde_json::from_str(&text)
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                if hello["type"] != "hello" {
                    return Err(ClientError::Protocol(format!(
                        "expected hello, got {hello}"
                    )));
                }
                return Ok((socket, hello));
            }
            Some(Ok(_)) => continue,
            other => return Err(connect_error(format!("closed before hello: {other:?}"))),
        }
    }
}

/// The connection task: owns the socket and the requests in flight.
struct Driver {
    url: String,
    options: ClientOptions,
    pending: BTreeMap<u64, Pending>,
    commands: mpsc::Receiver<Command>,
}

enum Ended {
    /// The caller closed the client (or dropped every handle).
    ByCaller(Option<oneshot::Sender<()>>),
    /// The connection was lost, with the close code if one came.
    Lost(Option<u16>, String),
}

impl Driver {
    async fn run(mut self, mut socket: Socket) {
        loop {
            match self.serve(&mut socket).await {
                Ended::ByCaller(done) => {
                    let _ = socket.close(None).await;
                    // The broker's close frame in answer, then the end of
                    // the stream: the close handshake is complete.
                    let drained = async { while let Some(Ok(_)) = socket.next().await {} };
                    let _ = tokio::time::timeout(CLOSE_WAIT, drained).await;
                    self.fail_all(closed("client closed"));
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                Ended::Lost(code, reason) => {
                    if !self.options.reconnect {
                        self.fail_all(ClientError::Closed { code, reason });
                        // Answer later calls with the same error.
                        while let Some(command) = self.commands.recv().await {
                            if let Command::Request(_, p) = command {
                                reply(p.reply, Err(closed("connection closed")));
                            }
                        }
                        return;
                    }
                    match self.reopen().await {
                        Some(s) => socket = s,
                        None => return,
                    }
                }
            }
        }
    }

    /// Re-opens the connection with backoff and re-sends every request still waiting.
    async fn reopen(&mut self) -> Option<Socket> {
        let mut delay = RECONNECT_FIRST;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                command = self.commands.recv() => match command {
                    Some(Command::Request(id, p)) => { self.pending.insert(id, p); continue; }
                    Some(Command::Forget(id, _)) => { self.pending.remove(&id); continue; }
                    Some(Command::Close(_)) | None => {
                        self.fail_all(closed("client closed"));
                        return None;
                    }
                }
            }
            if let Ok((mut socket, _hello)) = open(&self.url, self.options.token.as_deref()).await {
                let mut ok = true;
                for p in self.pending.values() {
                    if socket.feed(Message::text(p.frame.clone())).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                if ok && socket.flush().await.is_ok() {
                    return Some(socket);
                }
            }
            delay = (delay * 2).min(RECONNECT_MAX);
        }
    }

    fn fail_all(&mut self, error: ClientError) {
        for (_, p) in std::mem::take(&mut self.pending) {
            reply(p.reply, Err(error.clone()));
        }
    }

    async fn serve(&mut self, socket: &mut Socket) -> Ended {
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(Command::Request(id, p)) => {
                        let sent = socket.send(Message::text(p.frame.clone())).await;
                        self.pending.insert(id, p);
                        if let Err(e) = sent {
                            return Ended::Lost(None, e.to_string());
                        }
                    }
                    Some(Command::Forget(id, frame)) => {
                        self.pending.remove(&id);
                        if socket.send(Message::text(frame)).await.is_err() {
                            return Ended::Lost(None, "send failed".into());
                        }
                    }
                    Some(Command::Close(done)) => return Ended::ByCaller(Some(done)),
                    None => return Ended::ByCaller(None),
                },
                message = socket.next() => match message {
                    Some(Ok(Message::Text(text))) => self.route(&text),
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = frame
                            .map(|f| (Some(u16::from(f.code)), f.reason.to_string()))
                            .unwrap_or((None, String::new()));
                        return Ended::Lost(code, reason);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Ended::Lost(None, e.to_string()),
                    None => return Ended::Lost(None, "connection ended".into()),
                },
            }
        }
    }

    fn route(&mut self, text: &str) {
        let Ok(frame) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let Some(id) = frame["id"].as_u64() else {
            return;
        };
        let Some(pending) = self.pending.get(&id) else {
            return;
        };
        let kind = pending.kind;
        let kind_of_frame = frame["type"].as_str().unwrap_or_default();
        let cancelled_key = (kind_of_frame == "cancelled").then(|| str_field(&frame, "key"));
        let finished = match (kind, kind_of_frame) {
            (Kind::Watch, "snapshot") => {
                if let ReplyTo::Stream(tx) = &pending.reply {
                    if tx.try_send(frame).is_err() && tx.is_closed() {
                        self.pending.remove(&id);
                    }
                }
                return;
            }
            (Kind::SubmitStream, "progress") => {
                if let ReplyTo::Updates(tx) = &pending.reply {
                    if tx.send(Ok(frame)).is_err() {
                        // The caller dropped the stream.
                        self.pending.remove(&id);
                    }
                }
                return;
            }
            (_, "error") => Some(Err(error_of(&frame))),
            (Kind::Submit | Kind::SubmitStream | Kind::Subscribe, "result") => Some(Ok(frame)),
            (Kind::SubmitNoWait, "accepted" | "result") => Some(Ok(frame)),
            (Kind::Get, "status")
            | (Kind::Cancel, "cancelled")
            | (Kind::Invalidate, "invalidated")
            | (Kind::Ping, "pong") => Some(Ok(frame)),
            _ => None,
        };
        if let Some(outcome) = finished {
            if let Some(p) = self.pending.remove(&id) {
                reply(p.reply, outcome);
            }
        }
        if let Some(key) = cancelled_key {
            let ended: Vec<u64> = self
                .pending
                .iter()
                .filter(|(_, p)| p.key.as_deref() == Some(key.as_str()))
                .map(|(&id, _)| id)
                .collect();
            for id in ended {
                if let Some(p) = self.pending.remove(&id) {
                    let key = key.clone();
                    reply(p.reply, Err(ClientError::Cancelled { key }));
                }
            }
        }
    }
}

fn reply(to: ReplyTo, outcome: Result<Value, ClientError>) {
    match to {
        ReplyTo::Once(tx) => {
            let _ = tx.send(outcome);
        }
        ReplyTo::Updates(tx) => {
            let _ = tx.send(outcome);
        }
        ReplyTo::Stream(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_sent_with_its_input_last() {
        let request = json!({"op": "submit", "id": 3, "input": {"b": [1]}, "wait": false});
        let text = frame_text(request.clone());
        assert!(text.ends_with(r#","input":{"b":[1]}}"#), "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), request);
        assert_eq!(frame_text(json!({"input": 1})), r#"{"input":1}"#);
        assert_eq!(
            frame_text(json!({"op": "get", "key": "k"})),
            r#"{"key":"k","op":"get"}"#
        );
    }
}
