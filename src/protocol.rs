//! The wire protocol: parsing client requests and writing server frames.
//!
//! Requests are parsed strictly in the order docs/protocol.md implies: not JSON
//! is `bad_json`; not an object, or a missing or ill-typed field, is
//! `bad_request`; an `op` outside the table is `unknown_op`. Frames are
//! written with [`FrameWriter`], which appends already-encoded JSON (ids,
//! outputs) without re-serializing it.

use crate::error::{ErrorCode, EvalError};
use crate::key::Key;
use crate::members::Members;
use compact_str::ToCompactString;
use serde_json::error::Category;
use serde_json::Value;
use std::borrow::Cow;

/// Longest string `id` accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Smallest `watch` interval.
pub const MIN_WATCH_INTERVAL_MS: u64 = 100;
/// `watch` interval when none is given.
pub const DEFAULT_WATCH_INTERVAL_MS: u64 = 500;
/// Nesting depth of `input` beyond which it is refused (serde_json's limit).
pub const MAX_INPUT_DEPTH: usize = 128;
/// The fn of a submit that names none.
pub const DEFAULT_FN: &str = "default";
/// The protocol version spoken.
pub const PROTOCOL_VERSION: u32 = 1;

/// A request's `id`, kept as the JSON text to echo (inline, without a heap
/// allocation, up to 24 bytes).
pub use crate::core::ReqId;

/// One parsed request.
#[derive(Debug)]
pub struct Request<'a> {
    pub id: ReqId,
    pub op: Op<'a>,
}

/// The operations of the protocol (docs/protocol.md).
#[derive(Debug)]
pub enum Op<'a> {
    Submit {
        /// The input as sent (parsed only when its key is not known yet).
        input: &'a str,
        fn_name: Option<Cow<'a, str>>,
        wait: bool,
        wants: Wants,
    },
    Get {
        key: Key,
    },
    Subscribe {
        key: Key,
        /// It gets the evaluation's progress reports.
        progress: bool,
    },
    Cancel {
        key: Key,
    },
    Watch {
        interval_ms: u64,
    },
    Unwatch,
    Ping,
    /// Drop a key's result, or every result of a fn (admin).
    Invalidate(Invalidation),
    /// A worker offers to run up to `concurrency` tasks of `fn_name` at once.
    Serve {
        fn_name: String,
        concurrency: usize,
    },
    /// A worker takes no new tasks of `fn_name`.
    Unserve {
        fn_name: String,
    },
    /// A worker's outcome of a task: the output as JSON text, or its error.
    Complete {
        task: String,
        outcome: Result<String, String>,
    },
    /// A worker's progress report on a task it holds (no reply).
    Progress {
        task: String,
        data: &'a str,
    },
}

/// What a submit asks for besides its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wants {
    /// A cached result older than this is not good enough.
    pub max_age_ms: Option<u64>,
    /// 0-9: its job starts in order of the highest among its submits.
    pub priority: crate::core::Priority,
    /// This submit alone is answered `deadline_exceeded` after this long.
    pub deadline_ms: Option<u64>,
    /// It gets the evaluation's `progress` frames before its result.
    pub progress: bool,
}

impl Default for Wants {
    fn default() -> Self {
        Wants {
            max_age_ms: None,
            priority: crate::core::DEFAULT_PRIORITY,
            deadline_ms: None,
            progress: false,
        }
    }
}

/// What an `invalidate` drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    Key(Key),
    Fn(String),
}

/// Most tasks one worker session may take at once for one fn.
pub const MAX_CONCURRENCY: usize = 1024;

impl Op<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Submit { .. } => "submit",
            Op::Get { .. } => "get",
            Op::Subscribe { .. } => "subscribe",
            Op::Cancel { .. } => "cancel",
            Op::Watch { .. } => "watch",
            Op::Unwatch => "unwatch",
            Op::Ping => "ping",
            Op::Invalidate(_) => "invalidate",
            Op::Serve { .. } => "serve",
            Op::Unserve { .. } => "unserve",
            Op::Complete { .. } => "complete",
            Op::Progress { .. } => "progress",
        }
    }
}

/// A request that cannot be served, with the `id` to echo when one was readable.
#[derive(Debug)]
pub struct Rejection {
    pub id: ReqId,
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    fn new(id: &ReqId, code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            id: id.clone(),
            code,
            message: message.into(),
        }
    }

    /// The `error` frame for this rejection.
    pub fn frame(&self) -> String {
        error_frame(&self.id, self.code.as_str(), &self.message)
    }
}

/// Parses one text frame into a request.
pub fn parse_request(text: &str) -> Result<Request<'_>, Rejection> {
    parse_request_knowing(text, |_, _| false)
}

/// As [`parse_request`], except that a submit whose input is the frame's
/// last member offers it first to `known`, with its fn as sent (`None`
/// when there is none): `known` says whether it is an input read before,
/// byte for byte, and if it is, the input is not read again. Only valid
/// inputs may be vouched for; the request is then what `parse_request`
/// reads.
pub fn parse_request_knowing<'t>(
    text: &'t str,
    mut known: impl FnMut(Option<&str>, &'t str) -> bool,
) -> Result<Request<'t>, Rejection> {
    let scanned = Members::scan_knowing(text, MAX_INPUT_DEPTH + 1, |before, input| {
        match before.fn_name.map(string_of) {
            None => known(None, input),
            Some(Some(name)) => known(Some(&name), input),
            Some(None) => false,
        }
    });
    let members = match scanned {
        Some(members) => members,
        None => read_members(text)?,
    };
    let id = parse_id(members.id)?;
    let bad = |message: &str| Rejection::new(&id, ErrorCode::BadRequest, message);
    let op = match members.op {
        None => return Err(bad("missing \"op\"")),
        Some(raw) => string_of(raw).ok_or_else(|| bad("\"op\" must be a string"))?,
    };
    let op = match &*op {
        "submit" => {
            let input = members.input.ok_or_else(|| bad("missing \"input\""))?;
            let fn_name = match members.fn_name {
                None => None,
                Some(raw) => Some(string_of(raw).ok_or_else(|| bad("\"fn\" must be a string"))?),
            };
            let wait = match members.wait {
                None | Some("true") => true,
                Some("false") => false,
                Some(_) => return Err(bad("\"wait\" must be a boolean")),
            };
            let max_age_ms = match members.max_age_ms {
                None => None,
                Some(raw) => Some(raw.parse::<u64>().map_err(|_| {
                    bad("\"max_age_ms\" must be a non-negative integer (milliseconds)")
                })?),
            };
            let priority = match members.priority {
                None => crate::core::DEFAULT_PRIORITY,
                Some(raw) => match raw.parse::<u8>() {
                    Ok(p) if p <= crate::core::MAX_PRIORITY => p,
                    _ => return Err(bad("\"priority\" must be an integer from 0 to 9")),
                },
            };
            let deadline_ms =
                match members.deadline_ms {
                    None => None,
                    Some(raw) => match raw.parse::<u64>() {
                        Ok(ms) if ms >= 1 => Some(ms),
                        _ => return Err(bad(
                            "\"deadline_ms\" must be a positive integer (milliseconds from now)",
                        )),
                    },
                };
            Op::Submit {
                input,
                fn_name,
                wait,
                wants: Wants {
                    max_age_ms,
                    priority,
                    deadline_ms,
                    progress: flag(members.progress, "progress", &id)?,
                },
            }
        }
        "invalidate" => Op::Invalidate(match (members.key, members.fn_name) {
            (Some(_), None) => Invalidation::Key(parse_key(members.key, &id)?),
            (None, Some(raw)) => Invalidation::Fn(
                string_of(raw)
                    .ok_or_else(|| bad("\"fn\" must be a string"))?
                    .into_owned(),
            ),
            _ => return Err(bad("give exactly one of \"key\" and \"fn\"")),
        }),
        "get" => Op::Get {
            key: parse_key(members.key, &id)?,
        },
        "subscribe" => Op::Subscribe {
            key: parse_key(members.key, &id)?,
            progress: flag(members.progress, "progress", &id)?,
        },
        "cancel" => Op::Cancel {
            key: parse_key(members.key, &id)?,
        },
        "watch" => {
            let interval_ms = match members.interval_ms {
                None => DEFAULT_WATCH_INTERVAL_MS,
                Some(raw) => match raw.parse::<u64>() {
                    Ok(ms) if ms >= MIN_WATCH_INTERVAL_MS => ms,
                    _ => {
                        return Err(bad(&format!(
                            "\"interval_ms\" must be an integer of at least {MIN_WATCH_INTERVAL_MS}"
                        )))
                    }
                },
            };
            Op::Watch { interval_ms }
        }
        "unwatch" => Op::Unwatch,
        "ping" => Op::Ping,
        "serve" | "unserve" => {
            let fn_name = match members.fn_name {
                None => return Err(bad("missing \"fn\"")),
                Some(raw) => string_of(raw)
                    .ok_or_else(|| bad("\"fn\" must be a string"))?
                    .into_owned(),
            };
            if &*op == "unserve" {
                Op::Unserve { fn_name }
            } else {
                let concurrency = match members.concurrency {
                    None => 1,
                    Some(raw) => match raw.parse::<usize>() {
                        Ok(n) if (1..=MAX_CONCURRENCY).contains(&n) => n,
                        _ => {
                            return Err(bad(&format!(
                                "\"concurrency\" must be an integer from 1 to {MAX_CONCURRENCY}"
                            )))
                        }
                    },
                };
                Op::Serve {
                    fn_name,
                    concurrency,
                }
            }
        }
        "complete" => {
            let task = members
                .task
                .and_then(string_of)
                .ok_or_else(|| bad("\"task\" must be the task's id (a string)"))?
                .into_owned();
            let outcome = match (members.output, members.error) {
                (Some(output), None) => Ok(output.to_string()),
                (None, Some(error)) => Err(string_of(error)
                    .ok_or_else(|| bad("\"error\" must be a string"))?
                    .into_owned()),
                _ => return Err(bad("give exactly one of \"output\" and \"error\"")),
            };
            Op::Complete { task, outcome }
        }
        "progress" => Op::Progress {
            task: members
                .task
                .and_then(string_of)
                .ok_or_else(|| bad("\"task\" must be the task's id (a string)"))?
                .into_owned(),
            data: members.data.ok_or_else(|| bad("missing \"data\""))?,
        },
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(Rejection::new(
                &id,
                ErrorCode::UnknownOp,
                format!("unknown op {shown:?}"),
            ));
        }
    };
    Ok(Request { id, op })
}

/// The members of a frame [`Members::scan`] declined, read by serde_json,
/// whose error becomes the rejection.
fn read_members(text: &str) -> Result<Members<'_>, Rejection> {
    // Checked first: serde would also read a struct from a JSON array.
    if !text.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => Rejection::new(&None, ErrorCode::BadRequest, "a request is a JSON object"),
            Err(e) => Rejection::new(&None, ErrorCode::BadJson, format!("not JSON: {e}")),
        });
    }
    let too_deep = nested_deeper_than(text, MAX_INPUT_DEPTH + 1);
    let members: Members = serde_json::from_str(text).map_err(|e| match e.classify() {
        Category::Data => Rejection::new(
            &None,
            ErrorCode::BadRequest,
            format!("a request is a JSON object with an \"op\": {e}"),
        ),
        _ => Rejection::new(&None, ErrorCode::BadJson, format!("not JSON: {e}")),
    })?;
    // serde_json skips unknown members without a depth limit; the frame is
    // refused as a whole unless the depth is the input's (answered by
    // `parse_input`).
    if too_deep
        && !members
            .input
            .is_some_and(|i| nested_deeper_than(i, MAX_INPUT_DEPTH))
    {
        return Err(Rejection::new(
            &parse_id(members.id)?,
            ErrorCode::BadJson,
            format!(
                "the frame is nested deeper than {} levels",
                MAX_INPUT_DEPTH + 1
            ),
        ));
    }
    Ok(members)
}

/// An optional boolean member (absent: false).
fn flag(raw: Option<&str>, name: &str, id: &ReqId) -> Result<bool, Rejection> {
    match raw {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(Rejection::new(
            id,
            ErrorCode::BadRequest,
            format!("\"{name}\" must be a boolean"),
        )),
    }
}

/// Whether JSON `text` nests arrays and objects deeper than `max`. Cheap for
/// ordinary frames: only a text with more than `max` brackets is scanned.
fn nested_deeper_than(text: &str, max: usize) -> bool {
    let bytes = text.as_bytes();
    if memchr::memchr2_iter(b'[', b'{', bytes)
        .take(max + 1)
        .count()
        <= max
    {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Parses a submit's raw `input` into a value; the frame is valid JSON, so
/// this fails only past serde_json's depth limit.
pub fn parse_input(input: &str) -> Result<Value, String> {
    serde_json::from_str(input)
        .map_err(|e| format!("\"input\" is nested deeper than {MAX_INPUT_DEPTH} levels: {e}"))
}

/// The string a raw JSON value holds, borrowed when it has no escapes.
fn string_of(text: &str) -> Option<Cow<'_, str>> {
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(text).ok().map(Cow::Owned)
}

fn parse_id(raw: Option<&str>) -> Result<ReqId, Rejection> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let invalid = || {
        Rejection::new(
            &None,
            ErrorCode::BadRequest,
            format!("\"id\" must be an integer or a string of at most {MAX_ID_BYTES} bytes"),
        )
    };
    if let Some(s) = string_of(raw) {
        return match s {
            s if s.len() > MAX_ID_BYTES => Err(invalid()),
            Cow::Borrowed(_) => Ok(Some(raw.into())),
            Cow::Owned(s) => Ok(Some(serde_json::to_string(&s).expect("string").into())),
        };
    }
    // An integer is echoed as it was sent: valid JSON has no `+` or leading
    // zeros, so this is the text serde_json would write (`-0` it reads as
    // a float, refused below).
    if raw != "-0" && (raw.parse::<u64>().is_ok() || raw.parse::<i64>().is_ok()) {
        return Ok(Some(raw.into()));
    }
    match serde_json::from_str::<serde_json::Number>(raw) {
        Ok(n) if n.is_i64() || n.is_u64() => Ok(Some(n.to_compact_string())),
        _ => Err(invalid()),
    }
}

fn parse_key(raw: Option<&str>, id: &ReqId) -> Result<Key, Rejection> {
    let raw = raw.ok_or_else(|| Rejection::new(id, ErrorCode::BadRequest, "missing \"key\""))?;
    string_of(raw).and_then(|s| Key::parse(&s)).ok_or_else(|| {
        Rejection::new(
            id,
            ErrorCode::BadRequest,
            "\"key\" must be 32 lowercase hex characters",
        )
    })
}

/// Writes one JSON object frame field by field; values given as `raw` are
/// already JSON and are copied, not re-encoded.
#[derive(Clone)]
pub struct FrameWriter {
    buf: String,
}

impl FrameWriter {
    /// Starts a frame `{"type":"<kind>"`.
    pub fn new(kind: &str) -> Self {
        Self::with_capacity(kind, 128)
    }

    /// Starts the members-only tail of a frame shared by many waiters; each
    /// waiter's copy gets its own head from [`result_frame`].
    pub fn tail(capacity: usize) -> Self {
        FrameWriter {
            buf: String::with_capacity(capacity),
        }
    }

    pub fn with_capacity(kind: &str, capacity: usize) -> Self {
        let mut buf = String::with_capacity(capacity);
        buf.push_str("{\"type\":\"");
        buf.push_str(kind);
        buf.push('"');
        FrameWriter { buf }
    }

    /// Adds `"id":…` when the request had one.
    pub fn id(self, id: &ReqId) -> Self {
        match id {
            Some(raw) => self.raw("id", raw),
            None => self,
        }
    }

    /// Adds `"id":…`, or `"id":null` when the request had none.
    pub fn id_or_null(self, id: &ReqId) -> Self {
        self.raw("id", id.as_deref().unwrap_or("null"))
    }

    /// Adds a member whose value is already JSON text.
    pub fn raw(mut self, name: &str, json: &str) -> Self {
        self.buf.push_str(",\"");
        self.buf.push_str(name);
        self.buf.push_str("\":");
        self.buf.push_str(json);
        self
    }

    /// Adds a string member, escaped as JSON.
    pub fn str(mut self, name: &str, value: &str) -> Self {
        // A string with nothing to escape (every code, most messages) is
        // copied as it is.
        if value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            self.buf.push_str(",\"");
            self.buf.push_str(name);
            self.buf.push_str("\":\"");
            self.buf.push_str(value);
            self.buf.push('"');
            return self;
        }
        let json = serde_json::to_string(value).expect("string serializes");
        self.raw(name, &json)
    }

    /// Adds a key member.
    pub fn key(mut self, key: &Key) -> Self {
        self.buf.push_str(",\"key\":\"");
        let mut hex = [0u8; 32];
        hex::encode_to_slice(key.bytes(), &mut hex).expect("32 hex bytes");
        self.buf
            .push_str(std::str::from_utf8(&hex).expect("hex is ASCII"));
        self.buf.push('"');
        self
    }

    pub fn bool(self, name: &str, value: bool) -> Self {
        self.raw(name, if value { "true" } else { "false" })
    }

    pub fn uint(self, name: &str, value: u64) -> Self {
        self.raw(name, itoa::Buffer::new().format(value))
    }

    /// Adds a float with one decimal of precision kept (milliseconds).
    pub fn millis(self, name: &str, value: f64) -> Self {
        let rounded = (value * 1000.0).round() / 1000.0;
        let json = serde_json::to_string(&rounded).expect("float serializes");
        self.raw(name, &json)
    }

    /// The frame so far, left open: the head of a frame whose members go on
    /// in a shared tail (see [`crate::outbox::Frame::Split`]).
    pub fn open(self) -> String {
        self.buf
    }

    /// Closes the object.
    pub fn finish(mut self) -> String {
        self.buf.push('}');
        self.buf
    }
}

/// The message of every `shutting_down` error.
pub const DRAINING_MESSAGE: &str = crate::core::DRAINING;

/// Milliseconds since the Unix epoch, as frames report time (`at_ms`, `server_time_ms`).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `{"type":"error","id":…|null,"code":"…","message":"…"}`.
pub fn error_frame(id: &ReqId, code: &str, message: &str) -> String {
    FrameWriter::new("error")
        .id_or_null(id)
        .str("code", code)
        .str("message", message)
        .finish()
}

/// `{"code":"eval_failed"|"eval_timeout","message":"…"}`.
pub fn eval_error_json(error: &EvalError) -> String {
    serde_json::json!({"code": error.code(), "message": error.message()}).to_string()
}

/// The length of a result frame's head, `{"type":"result"` and its `id`.
pub fn result_head_len(id: &ReqId) -> usize {
    "{\"type\":\"result\"".len() + id.as_deref().map_or(0, |id| ",\"id\":".len() + id.len())
}

/// One waiter's copy of a shared result `tail`: `{"type":"result","id":…`
/// and the tail, allocated at its exact length so that it becomes a
/// WebSocket message's bytes as it is.
pub fn result_frame(id: &ReqId, tail: &str) -> String {
    with_head("{\"type\":\"result\"", id, tail)
}

/// One waiter's copy of a shared progress `tail` (`,"key":…,"seq":…,"data":…}`).
pub fn progress_frame(id: &ReqId, tail: &str) -> String {
    with_head("{\"type\":\"progress\"", id, tail)
}

/// `head` (`{"type":"…"`), the `id` if any, and `tail`, allocated at their
/// exact length.
fn with_head(head: &str, id: &ReqId, tail: &str) -> String {
    let id_len = id.as_deref().map_or(0, |id| ",\"id\":".len() + id.len());
    let mut out = String::with_capacity(head.len() + id_len + tail.len());
    out.push_str(head);
    if let Some(raw) = id {
        out.push_str(",\"id\":");
        out.push_str(raw);
    }
    out.push_str(tail);
    out
}

/// `{"seq":N,"data":…}`: the latest report, in `get`'s answer.
pub fn progress_json(seq: u64, data: &str) -> String {
    format!("{{\"seq\":{seq},\"data\":{data}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse_request(text).unwrap_err().code
    }

    #[test]
    fn error_codes_follow_the_protocol() {
        assert_eq!(code("{"), ErrorCode::BadJson);
        assert_eq!(code("[1]"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"id":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":5}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":"fly"}"#), ErrorCode::UnknownOp);
        assert_eq!(code(r#"{"op":"submit"}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"op":"submit","input":1,"wait":"yes"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code(r#"{"op":"get","key":"xyz"}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"op":"watch","interval_ms":99}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code(r#"{"op":"ping","id":1.5}"#), ErrorCode::BadRequest);
        let long = format!(r#"{{"op":"ping","id":"{}"}}"#, "x".repeat(129));
        assert_eq!(code(&long), ErrorCode::BadRequest);
    }

    #[test]
    fn a_last_input_is_offered_with_its_fn_as_a_string() {
        let offered = |text: &str| {
            let mut fns = vec![];
            let read = parse_request_knowing(text, |fn_name, input| {
                fns.push((fn_name.map(str::to_owned), input.to_owned()));
                false
            })
            .map(|r| r.op.name())
            .map_err(|e| e.code);
            (fns, read)
        };
        assert_eq!(
            offered(r#"{"op":"submit","fn":"a\u0062","input":[1]}"#),
            (vec![(Some("ab".into()), "[1]".into())], Ok("submit"))
        );
        assert_eq!(
            offered(r#"{"op":"submit","input":[1]}"#),
            (vec![(None, "[1]".into())], Ok("submit"))
        );
        // A fn that is not a string: not offered, and refused as ever.
        assert_eq!(
            offered(r#"{"op":"submit","fn":1,"input":[1]}"#),
            (vec![], Err(ErrorCode::BadRequest))
        );
    }

    #[test]
    fn ids_are_echoed_verbatim() {
        let r = parse_request(r#"{"op":"ping","id":"a\"b","extra":true}"#).unwrap();
        assert_eq!(r.id.as_deref(), Some(r#""a\"b""#));
        for (sent, echoed) in [
            ("7", Some("7")),
            ("-7", Some("-7")),
            ("18446744073709551615", Some("18446744073709551615")),
            ("-9223372036854775808", Some("-9223372036854775808")),
            ("18446744073709551616", None),
            // serde_json reads `-0` as a float.
            ("-0", None),
            ("1.0", None),
            ("1e2", None),
        ] {
            let text = format!(r#"{{"op":"ping","id":{sent}}}"#);
            let id = parse_request(&text).map(|r| r.id);
            assert_eq!(
                id.as_ref().ok().and_then(|id| id.as_deref()),
                echoed,
                "{sent}"
            );
        }
        let r = parse_request(r#"{"op":"fly","id":7}"#).unwrap_err();
        let frame: Value = serde_json::from_str(&r.frame()).unwrap();
        assert_eq!(frame["id"], 7);
        assert_eq!(frame["code"], "unknown_op");
    }

    #[test]
    fn result_frames_share_a_tail() {
        let tail = FrameWriter::tail(64)
            .key(&Key::from_bytes([0xab; 16]))
            .raw("output", r#"{"x":1}"#)
            .uint("shared", 2)
            .finish();
        let a: Value = serde_json::from_str(&result_frame(&Some("1".into()), &tail)).unwrap();
        let b: Value = serde_json::from_str(&result_frame(&None, &tail)).unwrap();
        assert_eq!(a["id"], 1);
        assert_eq!(a["type"], "result");
        assert_eq!(b["output"]["x"], 1);
        assert!(b.get("id").is_none());
        assert_eq!(b["key"], "ab".repeat(16));
        for id in [
            None,
            Some("1".into()),
            Some("\"a-longer-request-id-than-24\"".into()),
        ] {
            let frame = result_frame(&id, &tail);
            assert_eq!(frame.len(), frame.capacity(), "allocated at its length");
        }
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,200}") {
            let _ = parse_request(&s);
        }

        #[test]
        fn parsing_json_shaped_text_never_panics(
            op in "(submit|get|subscribe|cancel|watch|unwatch|ping|x)",
            field in "(input|key|fn|wait|interval_ms|id)",
            value in "(1|-1|1.5|\"s\"|null|true|\\[\\]|\\{\\}|\"[0-9a-f]{32}\")",
        ) {
            let text = format!(r#"{{"op":"{op}","{field}":{value}}}"#);
            let _ = parse_request(&text);
        }
    }
}
