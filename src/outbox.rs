//! A session's outbound queue, its byte budget and its close signal.
//!
//! Everything that answers a client from outside its session (the hub, the
//! snapshot renderer, the HTTP API) pushes frames into that session's queue;
//! only the session's task takes them out and writes them. Two
//! bounds hold every queue: `limits.outbound_queue` frames and
//! `limits.outbound_bytes` bytes. Pushes from the hub and the snapshot
//! renderer never wait ([`Outbox::push`]): a queue without room means the
//! client is not reading, and the session is closed with 4001. A reply to
//! an HTTP request waits for room instead ([`Outbox::reply`]); a WebSocket
//! session writes its own replies to its socket in place.

use bytes::Bytes;
use futures::task::AtomicWaker;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

/// Internal session number, cheaper to hash than the session's UUID.
pub type SessionId = u64;

/// Close codes of the protocol (and RFC 6455's for transport errors).
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
            ABNORMAL => "connection lost without a close frame",
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

/// One message for the client, as queued. Kept small (24 bytes): a queue
/// allocates room for 32 frames at a time, idle sessions included.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A text message of this recipient's own.
    Text(String),
    /// A text message shared by several recipients.
    Shared(Arc<Utf8Bytes>),
    /// One text message in two WebSocket frames: a head of this recipient's
    /// own and a tail shared by every recipient (a result's output, a
    /// snapshot), so fanning it out copies no output per recipient.
    Split(Arc<SplitFrame>),
    /// Anything else (the echo transport sends binary messages too).
    Other(Box<Message>),
}

/// The two parts of a [`Frame::Split`].
#[derive(Debug)]
pub struct SplitFrame {
    head: Bytes,
    tail: Bytes,
}

impl Frame {
    /// A message split into a recipient's `head` (valid UTF-8 up to a JSON
    /// member boundary) and a shared `tail`.
    pub fn split(head: String, tail: Bytes) -> Frame {
        Frame::Split(Arc::new(SplitFrame {
            head: head.into(),
            tail,
        }))
    }

    /// One text message for several recipients.
    pub fn shared(text: String) -> Frame {
        Frame::Shared(Arc::new(text.into()))
    }

    /// Bytes this frame holds while queued, as counted against `outbound_bytes`.
    pub fn len(&self) -> usize {
        match self {
            Frame::Text(t) => t.len(),
            Frame::Shared(t) => t.len(),
            Frame::Split(s) => s.head.len() + s.tail.len(),
            Frame::Other(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole message's bytes (a split frame's two parts joined).
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Frame::Text(t) => t.as_bytes().to_vec(),
            Frame::Shared(t) => t.as_bytes().to_vec(),
            Frame::Split(s) => [&s.head[..], &s.tail[..]].concat(),
            Frame::Other(m) => m.clone().into_data().to_vec(),
        }
    }

    /// The WebSocket messages that carry this frame, in order.
    pub fn into_messages(self) -> impl Iterator<Item = Message> {
        let (first, second) = match self {
            Frame::Text(t) => (Message::Text(t.into()), None),
            Frame::Shared(t) => (Message::Text((*t).clone()), None),
            Frame::Other(m) => (*m, None),
            Frame::Split(s) => (
                Message::Frame(WsFrame::message(
                    s.head.clone(),
                    OpCode::Data(Data::Text),
                    false,
                )),
                Some(Message::Frame(WsFrame::message(
                    s.tail.clone(),
                    OpCode::Data(Data::Continue),
                    true,
                ))),
            ),
        };
        std::iter::once(first).chain(second)
    }
}

impl From<String> for Frame {
    fn from(s: String) -> Frame {
        Frame::Text(s)
    }
}

/// What every part of a session shares: how and why it is closing, whether
/// the client has spoken since the last heartbeat, and how many bytes its
/// queue may still take.
pub struct SessionCtl {
    pub id: SessionId,
    closing: CancellationToken,
    code: AtomicU16,
    seen: AtomicBool,
    peer_closed: AtomicBool,
    /// Closed because its signed token expired (1008, "token expired").
    expired: AtomicBool,
    /// Permits are bytes the outbound queue may still take; the writer
    /// gives them back as it writes, and closes it when it stops.
    budget: Semaphore,
    /// The whole budget: a frame counts for at most this much.
    budget_max: usize,
    /// Someone held frames back for want of room ([`Outbox::try_push_half`])
    /// and waits on `drained` for the writer to make some.
    wants_room: AtomicBool,
    drained: tokio::sync::Notify,
}

impl SessionCtl {
    /// A session whose queue may hold `outbound_bytes` bytes.
    pub fn new(id: SessionId, outbound_bytes: usize) -> Self {
        SessionCtl {
            id,
            closing: CancellationToken::new(),
            code: AtomicU16::new(0),
            seen: AtomicBool::new(true),
            peer_closed: AtomicBool::new(false),
            expired: AtomicBool::new(false),
            budget: Semaphore::new(outbound_bytes.min(Semaphore::MAX_PERMITS)),
            budget_max: outbound_bytes.min(Semaphore::MAX_PERMITS),
            wants_room: AtomicBool::new(false),
            drained: tokio::sync::Notify::new(),
        }
    }

    /// Marks that frames were held back; true if nobody had marked it yet
    /// (that caller is the one to wait on [`SessionCtl::room_made`]).
    pub fn want_room(&self) -> bool {
        !self.wants_room.swap(true, Ordering::AcqRel)
    }

    /// Resolves once the writer has written something since
    /// [`SessionCtl::want_room`], or the session closes.
    pub async fn room_made(&self) {
        tokio::select! {
            _ = self.drained.notified() => {}
            _ = self.closing.cancelled() => {}
        }
    }

    /// Asks the session to close; the first code given wins.
    pub fn close_with(&self, code: u16) {
        let _ = self
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.closing.cancel();
    }

    /// The session's signed token expired: it closes with 1008.
    pub fn close_expired(&self) {
        if self.code() == 0 {
            self.expired.store(true, Ordering::Release);
        }
        self.close_with(close::POLICY);
    }

    /// The reason sent with its close code.
    pub fn reason(&self) -> &'static str {
        let code = self.code();
        if code == close::POLICY && self.expired.load(Ordering::Acquire) {
            return "token expired";
        }
        close::reason(code)
    }

    /// The client sent a close frame: the session closes with 1000, and
    /// only the close reply is left to send.
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

    /// What a frame of `len` bytes counts against the budget (a frame larger
    /// than the whole budget takes all of it).
    pub fn cost(&self, len: usize) -> u32 {
        u32::try_from(len.min(self.budget_max)).unwrap_or(u32::MAX)
    }

    /// Gives back the budget of a frame of `len` bytes that was dropped.
    pub fn release_bytes(&self, len: usize) {
        self.release(self.cost(len) as usize);
    }

    /// Gives back `cost` of budget (the sum of [`SessionCtl::cost`] of the
    /// frames written).
    pub fn release(&self, cost: usize) {
        if cost > 0 && !self.budget.is_closed() {
            self.budget.add_permits(cost);
        }
        if self.wants_room.load(Ordering::Acquire) && self.wants_room.swap(false, Ordering::AcqRel)
        {
            self.drained.notify_one();
        }
    }

    /// The writer has stopped: nobody waits for room any more.
    pub fn writer_stopped(&self) {
        self.budget.close();
    }
}

/// One session's outbound queue: frames in order, at most `cap` of them,
/// taken out by the session's task alone. It holds no memory while it has
/// never held a frame (tokio's channel allocates a block of 32 slots and
/// its shared state up front, about 1.3 KB for every session, idle or not).
struct Queue {
    state: Mutex<QueueState>,
    /// The session's task, waiting for a frame.
    reader: AtomicWaker,
    /// Replies waiting for a free slot ([`Outbox::reply`]).
    room: Notify,
    /// Live [`Outbox`] handles; none left ends the reader's [`Inbox::recv`].
    senders: AtomicUsize,
}

struct QueueState {
    frames: VecDeque<Frame>,
    cap: usize,
    /// The reader is gone: pushes are dropped.
    closed: bool,
}

impl Queue {
    /// Queues `frame` if there is a slot; gives it back with whether the
    /// queue was full (false: the reader is gone).
    fn try_push(&self, frame: Frame) -> Result<(), (Frame, bool)> {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.closed {
                return Err((frame, false));
            }
            if state.frames.len() >= state.cap {
                return Err((frame, true));
            }
            state.frames.push_back(frame);
        }
        self.reader.wake();
        Ok(())
    }

    /// Free slots, and all of them.
    fn slots(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (state.cap - state.frames.len(), state.cap)
    }
}

/// The session's end of its outbound queue.
pub struct Inbox {
    queue: Arc<Queue>,
}

impl Inbox {
    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Frame> {
        let (frame, was_full) = {
            let mut state = self.queue.state.lock().unwrap_or_else(|e| e.into_inner());
            let was_full = state.frames.len() >= state.cap;
            (state.frames.pop_front()?, was_full)
        };
        if was_full {
            self.queue.room.notify_waiters();
        }
        Some(frame)
    }

    /// The next frame; None once it is empty and every [`Outbox`] is gone.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame>> {
        if let Some(frame) = self.try_recv() {
            return Poll::Ready(Some(frame));
        }
        self.queue.reader.register(cx.waker());
        if let Some(frame) = self.try_recv() {
            return Poll::Ready(Some(frame));
        }
        if self.queue.senders.load(Ordering::Acquire) == 0 {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    /// The next frame; None once it is empty and every [`Outbox`] is gone.
    pub async fn recv(&mut self) -> Option<Frame> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let mut state = self.queue.state.lock().unwrap_or_else(|e| e.into_inner());
        state.closed = true;
        state.frames = VecDeque::new();
        drop(state);
        self.queue.room.notify_waiters();
    }
}

/// The sending side of one session's outbound queue.
pub struct Outbox {
    queue: Arc<Queue>,
    ctl: Arc<SessionCtl>,
}

impl Clone for Outbox {
    fn clone(&self) -> Outbox {
        self.queue.senders.fetch_add(1, Ordering::AcqRel);
        Outbox {
            queue: Arc::clone(&self.queue),
            ctl: Arc::clone(&self.ctl),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.queue.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.queue.reader.wake();
        }
    }
}

impl Outbox {
    /// A queue of at most `frames` frames for the session `ctl`.
    pub fn channel(ctl: Arc<SessionCtl>, frames: usize) -> (Outbox, Inbox) {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                frames: VecDeque::new(),
                cap: frames,
                closed: false,
            }),
            reader: AtomicWaker::new(),
            room: Notify::new(),
            senders: AtomicUsize::new(1),
        });
        let inbox = Inbox {
            queue: Arc::clone(&queue),
        };
        (Outbox { queue, ctl }, inbox)
    }

    pub fn session(&self) -> SessionId {
        self.ctl.id
    }

    pub fn ctl(&self) -> &Arc<SessionCtl> {
        &self.ctl
    }

    /// Queues a frame without waiting; no room (in frames or bytes) closes
    /// the session with 4001.
    pub fn push(&self, frame: impl Into<Frame>) {
        let frame = frame.into();
        let len = frame.len();
        match self.ctl.budget.try_acquire_many(self.ctl.cost(len)) {
            Ok(permit) => permit.forget(),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                return self.ctl.close_with(close::SLOW_CONSUMER)
            }
            Err(tokio::sync::TryAcquireError::Closed) => return,
        }
        if let Err((_, true)) = self.queue.try_push(frame) {
            self.ctl.release_bytes(len);
            self.ctl.close_with(close::SLOW_CONSUMER)
        }
    }

    /// Queues a frame only if the queue is empty, or if it keeps at least
    /// half of its room (frames and bytes) free after this one: what
    /// [`Outbox::push`] sends later (a `revoke`, a result) always finds room.
    /// Gives the frame back otherwise.
    pub fn try_push_half(&self, frame: Frame) -> Result<(), Frame> {
        let cost = self.ctl.cost(frame.len()) as usize;
        let free = self.ctl.budget.available_permits();
        let (slots, all) = self.queue.slots();
        let empty = free >= self.ctl.budget_max && slots == all;
        let keeps_half = free.saturating_sub(cost) >= self.ctl.budget_max / 2 && slots > all / 2;
        if !(empty || keeps_half) {
            return Err(frame);
        }
        self.try_reply(frame)
    }

    /// Queues a reply to the session's own request, waiting for room; gives
    /// up when the session closes.
    pub async fn reply(&self, frame: impl Into<Frame>) {
        // Room at once is the usual case; only a wait needs the waiting
        // machinery, which lives on the heap while it waits.
        match self.try_reply(frame.into()) {
            Ok(()) => {}
            Err(frame) => Box::pin(self.reply_when_room(frame)).await,
        }
    }

    /// Queues `frame` if the queue has room for it now.
    fn try_reply(&self, frame: Frame) -> Result<(), Frame> {
        let Ok(budget) = self.ctl.budget.try_acquire_many(self.ctl.cost(frame.len())) else {
            return Err(frame);
        };
        match self.queue.try_push(frame) {
            Ok(()) => {
                budget.forget();
                Ok(())
            }
            Err((frame, _)) => Err(frame),
        }
    }

    async fn reply_when_room(&self, frame: Frame) {
        let len = frame.len();
        let room = async {
            self.ctl
                .budget
                .acquire_many(self.ctl.cost(len))
                .await
                .ok()?
                .forget();
            let mut frame = frame;
            loop {
                let freed = self.queue.room.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                match self.queue.try_push(frame) {
                    Ok(()) => return Some(()),
                    Err((_, false)) => return None,
                    Err((back, true)) => frame = back,
                }
                freed.await;
            }
        };
        tokio::select! {
            queued = room => if queued.is_none() {
                self.ctl.release_bytes(len);
            },
            _ = self.ctl.closing.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(frames: usize) -> (Outbox, Inbox) {
        Outbox::channel(Arc::new(SessionCtl::new(1, 1 << 20)), frames)
    }

    #[tokio::test]
    async fn frames_come_out_in_order_and_a_full_queue_closes_the_session_with_4001() {
        let (outbox, mut inbox) = queue(2);
        assert_eq!(inbox.queue.state.lock().unwrap().frames.capacity(), 0);
        outbox.push("a".to_string());
        outbox.push("b".to_string());
        assert_eq!(outbox.ctl().code(), 0);
        outbox.push("c".to_string());
        assert_eq!(outbox.ctl().code(), close::SLOW_CONSUMER);
        let texts: Vec<_> = std::iter::from_fn(|| inbox.try_recv())
            .map(|f| String::from_utf8(f.to_bytes()).unwrap())
            .collect();
        assert_eq!(texts, ["a", "b"]);
    }

    #[tokio::test]
    async fn a_reply_waits_for_a_free_slot_and_the_reader_ends_when_every_outbox_is_gone() {
        let (outbox, mut inbox) = queue(1);
        outbox.push("first".to_string());
        let replier = outbox.clone();
        let reply = tokio::spawn(async move { replier.reply("second".to_string()).await });
        tokio::task::yield_now().await;
        assert!(!reply.is_finished());
        assert_eq!(inbox.recv().await.unwrap().to_bytes(), b"first");
        reply.await.unwrap();
        assert_eq!(inbox.recv().await.unwrap().to_bytes(), b"second");
        drop(outbox);
        assert!(inbox.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_reply_to_a_session_whose_reader_is_gone_gives_its_budget_back() {
        let (outbox, inbox) = queue(1);
        outbox.push("first".to_string());
        let before = outbox.ctl().budget.available_permits();
        let replier = outbox.clone();
        let reply = tokio::spawn(async move { replier.reply("second".to_string()).await });
        tokio::task::yield_now().await;
        drop(inbox);
        reply.await.unwrap();
        assert_eq!(outbox.ctl().budget.available_permits(), before);
    }
}
