//! Reads through a buffer that a session borrows from its thread only while
//! bytes are flowing, so an idle session holds no read buffer of its own.
//!
//! A read from the socket takes up to `limits.ws_read_buffer` bytes at once
//! into the thread's spare buffer; the WebSocket codec then takes them in
//! small steps into its own small buffer (`limits.ws_frame_buffer`). A
//! session keeps the lent buffer only while it still holds unread bytes;
//! once they are taken, or when the socket has none, the buffer goes back
//! to its thread (each runtime thread keeps one spare).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

thread_local! {
    /// The thread's spare read buffer, lent to the next session that reads.
    static SPARE: RefCell<Option<Box<[u8]>>> = const { RefCell::new(None) };
}

/// A buffer of `size` bytes: the thread's spare if it has one that size.
fn borrow(size: usize) -> Box<[u8]> {
    SPARE
        .with(|spare| spare.borrow_mut().take())
        .filter(|buf| buf.len() == size)
        .unwrap_or_else(|| vec![0; size].into_boxed_slice())
}

/// Gives `buf` back to this thread, which keeps it if it has no spare.
fn give_back(buf: Box<[u8]>) {
    SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.is_none() {
            *spare = Some(buf);
        }
    });
}

/// A stream whose reads go through a lent buffer (see the module's docs);
/// writes pass straight through.
pub struct LentReads<S> {
    inner: S,
    /// How much one read from the socket takes at most.
    size: usize,
    /// The lent buffer while it holds bytes not yet taken: `lent[start..end]`.
    lent: Option<Box<[u8]>>,
    start: usize,
    end: usize,
}

impl<S> LentReads<S> {
    /// Reads `inner` up to `size` bytes at a time.
    pub fn new(inner: S, size: usize) -> Self {
        LentReads {
            inner,
            size,
            lent: None,
            start: 0,
            end: 0,
        }
    }

    /// Whether this session holds a lent buffer now.
    pub fn holds_buffer(&self) -> bool {
        self.lent.is_some()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LentReads<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let buf = match this.lent.take() {
            Some(buf) => buf,
            // A caller with room for a whole read needs no lent buffer.
            None if out.remaining() >= this.size => {
                return Pin::new(&mut this.inner).poll_read(cx, out)
            }
            None => {
                let mut buf = borrow(this.size);
                let mut read = ReadBuf::new(&mut buf);
                match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                        this.end = read.filled().len();
                        this.start = 0;
                        buf
                    }
                    // Nothing yet, the end of the stream, or an error.
                    other => {
                        give_back(buf);
                        return other;
                    }
                }
            }
        };
        let n = (this.end - this.start).min(out.remaining());
        out.put_slice(&buf[this.start..this.start + n]);
        this.start += n;
        if this.start == this.end {
            give_back(buf);
        } else {
            this.lent = Some(buf);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LentReads<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes come through whole and in order in steps smaller than a read,
    /// the buffer is held only while some are left, and the next read
    /// after it went back takes the thread's spare.
    #[tokio::test(flavor = "current_thread")]
    async fn reads_come_through_and_the_buffer_is_held_only_while_bytes_are_left() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let mut lent = LentReads::new(server, 1024);
        let mut client = client;
        let sent: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&sent).await.unwrap();
        let mut got = Vec::new();
        let mut step = [0u8; 100];
        while got.len() < sent.len() {
            let n = lent.read(&mut step).await.unwrap();
            got.extend_from_slice(&step[..n]);
            let whole_reads = got.len() % 1024 == 0 || got.len() == sent.len();
            assert_eq!(
                lent.holds_buffer(),
                !whole_reads,
                "after {} bytes",
                got.len()
            );
        }
        assert_eq!(got, sent);
        assert!(!lent.holds_buffer());
        let spare = SPARE.with(|s| s.borrow().as_ref().map(|b| b.as_ptr()));
        assert!(spare.is_some(), "the buffer went back to the thread");
        client.write_all(b"more").await.unwrap();
        let n = lent.read(&mut step).await.unwrap();
        assert_eq!(&step[..n], b"more");
        assert_eq!(
            SPARE.with(|s| s.borrow().as_ref().map(|b| b.as_ptr())),
            spare
        );
    }

    /// A caller with room for a whole read reads straight from the socket.
    #[tokio::test(flavor = "current_thread")]
    async fn a_large_read_borrows_nothing() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut lent = LentReads::new(server, 256);
        client.write_all(&[7u8; 600]).await.unwrap();
        let mut big = [0u8; 1024];
        let n = lent.read(&mut big).await.unwrap();
        assert_eq!(n, 600);
        assert!(!lent.holds_buffer());
        client.shutdown().await.unwrap();
        assert_eq!(lent.read(&mut big).await.unwrap(), 0);
    }
}
