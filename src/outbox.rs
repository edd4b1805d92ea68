//! A session's outbound queue and its close signal.
//!
//! Everything that replies to a client (its own reader, the hub, a watch
//! timer) pushes frames with [`Outbox::push`], which never waits: a full
//! queue means the client is not reading, and the session is closed with
//! 4001 instead of letting anyone block on it.

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

/// Internal session number, cheaper to hash than the session's UUID.
pub type SessionId = u64;

/// Close codes of PROTOCOL.md (and RFC 6455's for transport errors).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Never sent: recorded when the peer vanished without a close frame.
    pub const ABNORMAL: u16 = 1006;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const SLOW_CONSUMER: u16 = 4001;
    pub const HEARTBEAT_TIMEOUT: u16 = 4002;

    /// The reason text sent with a close code.
    pub fn reason(code: u16) -> &'static str {
        match code {
            GOING_AWAY => "broker shutting down",
            PROTOCOL_ERROR => "protocol error",
            INVALID_DATA => "invalid data",
            POLICY => "policy violation",
            TOO_BIG => "frame larger than max_frame_bytes",
            INTERNAL => "internal error",
            SLOW_CONSUMER => "slow consumer",
            HEARTBEAT_TIMEOUT => "heartbeat timeout",
            _ => "",
        }
    }
}

/// What every part of a session shares: how and why it is closing, and
/// whether the client has spoken since the last heartbeat.
pub struct SessionCtl {
    pub id: SessionId,
    closing: CancellationToken,
    code: AtomicU16,
    seen: AtomicBool,
    peer_closed: AtomicBool,
}

impl SessionCtl {
    pub fn new(id: SessionId) -> Self {
        SessionCtl {
            id,
            closing: CancellationToken::new(),
            code: AtomicU16::new(0),
            seen: AtomicBool::new(true),
            peer_closed: AtomicBool::new(false),
        }
    }

    /// Asks the session to close; the first code given wins.
    pub fn close_with(&self, code: u16) {
        let _ = self
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.closing.cancel();
    }

    /// The client sent a close frame (or vanished): the session closes with
    /// 1000, and only the close reply is left to send.
    pub fn close_by_peer(&self) {
        self.peer_closed.store(true, Ordering::Release);
        self.close_with(close::NORMAL);
    }

    pub fn closed_by_peer(&self) -> bool {
        self.peer_closed.load(Ordering::Acquire)
    }

    /// The close code chosen so far (0 while open).
    pub fn code(&self) -> u16 {
        self.code.load(Ordering::Acquire)
    }

    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    /// Records that the client sent something.
    pub fn mark_seen(&self) {
        self.seen.store(true, Ordering::Relaxed);
    }

    /// Whether the client sent anything since the last call.
    pub fn take_seen(&self) -> bool {
        self.seen.swap(false, Ordering::Relaxed)
    }
}

/// The sending side of one session's outbound queue.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Message>,
    ctl: Arc<SessionCtl>,
}

impl Outbox {
    pub fn new(tx: mpsc::Sender<Message>, ctl: Arc<SessionCtl>) -> Self {
        Outbox { tx, ctl }
    }

    pub fn session(&self) -> SessionId {
        self.ctl.id
    }

    /// Queues a frame without waiting; a full queue closes the session with 4001.
    pub fn push(&self, frame: impl Into<Utf8Bytes>) {
        self.push_message(Message::Text(frame.into()));
    }

    /// Queues any message (the echo transport sends binary ones too).
    pub fn push_message(&self, message: Message) {
        match self.tx.try_send(message) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.ctl.close_with(close::SLOW_CONSUMER),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}
