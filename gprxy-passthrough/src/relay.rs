//! After login: bytes copied both ways, one read and one write per chunk. The pass-through
//! relay ([`copy_both_ways`]) parses nothing; fallback mode's pooled relay watches message boundaries
//! through [`Pipe`]'s watcher.
//!
//! Each direction reads into a [`ReadBuffer`]: it starts at [`MIN_BUFFER`], doubles up to
//! [`MAX_BUFFER`] while reads fill it, so a bulk transfer moves in large reads, and halves when a
//! read leaves it partly empty. While a direction waits for data it holds no buffer at all, so an
//! idle session costs no buffer memory, whatever it once transferred. Buffers are not zeroed, so
//! only the pages a read touches count. Bytes are counted as they are written, so the metric
//! moves while a long session runs.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};

/// The buffer a direction starts with, and the smallest it halves to.
pub const MIN_BUFFER: usize = 4 * 1024;
/// The largest buffer a direction grows to.
pub const MAX_BUFFER: usize = 64 * 1024;

/// A read buffer that doubles while reads fill it and halves when one does not.
#[derive(Debug)]
pub struct ReadBuffer {
    buf: BytesMut,
    /// The size the next read asks for.
    want: usize,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        Self { buf: BytesMut::new(), want: MIN_BUFFER }
    }
}

impl ReadBuffer {
    /// The emptied buffer, with room for the next read.
    pub fn for_read(&mut self) -> &mut BytesMut {
        self.buf.clear();
        if self.buf.capacity() > 2 * self.want {
            self.buf = BytesMut::with_capacity(self.want);
        } else {
            self.buf.reserve(self.want);
        }
        &mut self.buf
    }

    /// After a read into [`Self::for_read`] of `n` bytes, with `room` bytes offered.
    pub fn after_read(&mut self, n: usize, room: usize) {
        self.want = if n >= room { (self.want * 2).min(MAX_BUFFER) } else { (self.want / 2).max(MIN_BUFFER) };
    }

    /// Gives the memory back while nothing is buffered (the next read allocates again).
    pub fn release(&mut self) {
        self.buf = BytesMut::new();
    }

    /// What the last read brought.
    pub fn data(&self) -> &[u8] {
        &self.buf
    }

    /// The memory held.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// What a direction's watcher says of the bytes just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write them all.
    Pass,
    /// Write the first `n`, then end the direction ([`End::Stopped`]).
    PassUpTo(usize),
    /// Write none and end the direction ([`End::Refused`]).
    Refuse,
}

/// Why a direction ended.
#[derive(Debug)]
pub enum End {
    /// The reader reached its end (and the writer was shut down, if the pipe does that).
    Eof,
    /// Reading failed.
    ReadFailed(io::Error),
    /// Writing (or shutting down) failed.
    WriteFailed(io::Error),
    /// The watcher said [`Verdict::PassUpTo`], and that much was written.
    Stopped,
    /// The watcher said [`Verdict::Refuse`].
    Refused,
}

/// One direction: read from one side, write what was read to the other.
pub struct Pipe {
    buf: ReadBuffer,
    /// Bytes of `buf` already written, and how many are to be.
    written: usize,
    limit: usize,
    /// Written since the last flush.
    need_flush: bool,
    /// How the direction ends once `buf` is written.
    ending: Option<End>,
    /// Whether the reader's end shuts the writer down.
    shutdown_on_eof: bool,
    counter: Counter,
}

impl Pipe {
    /// A direction that counts written bytes in `counter`; the reader's end shuts the writer
    /// down when `shutdown_on_eof`.
    pub fn new(counter: Counter, shutdown_on_eof: bool) -> Self {
        Self {
            buf: ReadBuffer::default(),
            written: 0,
            limit: 0,
            need_flush: false,
            ending: None,
            shutdown_on_eof,
            counter,
        }
    }

    /// Copies until the direction ends; `watch` sees every chunk read before it is written.
    pub fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        mut watch: impl FnMut(&[u8]) -> Verdict,
    ) -> Poll<End>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if let Err(e) = ready!(self.poll_write_read_bytes(cx, w)) {
                return Poll::Ready(End::WriteFailed(e));
            }
            if let Some(ending) = &self.ending {
                // Kept until the shutdown or flush is done, so that a pending one resumes here.
                let step = if matches!(ending, End::Eof) && self.shutdown_on_eof {
                    ready!(Pin::new(&mut *w).poll_shutdown(cx))
                } else if self.need_flush {
                    ready!(Pin::new(&mut *w).poll_flush(cx))
                } else {
                    Ok(())
                };
                let ending = self.ending.take().unwrap_or(End::Eof);
                self.need_flush = false;
                return Poll::Ready(match step {
                    Ok(()) => ending,
                    Err(e) => End::WriteFailed(e),
                });
            }
            (self.written, self.limit) = (0, 0);
            let buf = self.buf.for_read();
            let room = buf.capacity();
            match tokio_util::io::poll_read_buf(Pin::new(&mut *r), cx, buf) {
                Poll::Ready(Ok(0)) => self.ending = Some(End::Eof),
                Poll::Ready(Ok(n)) => {
                    self.buf.after_read(n, room);
                    match watch(self.buf.data()) {
                        Verdict::Pass => self.limit = n,
                        Verdict::PassUpTo(k) => {
                            self.limit = k.min(n);
                            self.ending = Some(End::Stopped);
                        }
                        Verdict::Refuse => return Poll::Ready(End::Refused),
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(End::ReadFailed(e)),
                Poll::Pending => {
                    // Nothing buffered and nothing to read: hold no memory while waiting.
                    self.buf.release();
                    if self.need_flush {
                        if let Err(e) = ready!(Pin::new(&mut *w).poll_flush(cx)) {
                            return Poll::Ready(End::WriteFailed(e));
                        }
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Pipe {
    /// Writes the bytes read and passed that are not written yet.
    fn poll_write_read_bytes<W>(&mut self, cx: &mut Context<'_>, w: &mut W) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        while self.written < self.limit {
            let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.buf.data()[self.written..self.limit]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
            self.need_flush = true;
            self.counter.inc_by(n as u64);
        }
        Poll::Ready(Ok(()))
    }

    /// Whether every byte read was written (nothing waits in the buffer).
    pub fn drained(&self) -> bool {
        self.written == self.limit && self.ending.is_none()
    }

    /// Writes and flushes what was read and passed, reading nothing more: for a relay that
    /// stops with a message of its own to write after.
    pub fn poll_write_out<W>(&mut self, cx: &mut Context<'_>, w: &mut W) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        ready!(self.poll_write_read_bytes(cx, w))?;
        if self.need_flush {
            ready!(Pin::new(&mut *w).poll_flush(cx))?;
            self.need_flush = false;
        }
        Poll::Ready(Ok(()))
    }
}

/// Copies `a` → `b` and `b` → `a` until both sides have ended (an end on one side shuts the
/// other's writing half down) or either fails. `a_to_b` and `b_to_a` count the bytes written.
pub async fn copy_both_ways<A, B>(a: &mut A, b: &mut B, a_to_b: Counter, b_to_a: Counter) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    copy(a, b, a_to_b, b_to_a, false).await
}

/// As [`copy_both_ways`], but over as soon as `b` has ended (its bytes written to `a`, whose
/// writing half is then shut down), whatever `a` does: for a relay whose `b` is a server
/// connection, the session is over when the server has closed it, even while the application
/// keeps its socket open without reading; an end of `a` first still waits for `b`'s.
pub async fn copy_until_b_ends<A, B>(a: &mut A, b: &mut B, a_to_b: Counter, b_to_a: Counter) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    copy(a, b, a_to_b, b_to_a, true).await
}

async fn copy<A, B>(
    a: &mut A,
    b: &mut B,
    a_to_b: Counter,
    b_to_a: Counter,
    until_b_ends: bool,
) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut forward, mut back) = (Pipe::new(a_to_b, true), Pipe::new(b_to_a, true));
    let (mut forward_done, mut back_done) = (false, false);
    let pass = |_: &[u8]| Verdict::Pass;
    // A direction is done at its end; a failure on either side ends the relay.
    let step = |done: &mut bool, polled: Poll<End>| match polled {
        Poll::Ready(End::ReadFailed(e) | End::WriteFailed(e)) => Err(e),
        Poll::Ready(_) => {
            *done = true;
            Ok(())
        }
        Poll::Pending => Ok(()),
    };
    poll_fn(|cx| {
        if !forward_done {
            step(&mut forward_done, forward.poll_copy(cx, a, b, pass))?;
        }
        if !back_done {
            step(&mut back_done, back.poll_copy(cx, b, a, pass))?;
        }
        if back_done && (forward_done || until_b_ends) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[tokio::test]
    async fn copies_both_ways_counts_bytes_and_passes_the_end_on() {
        let (mut client, mut proxy_client) = tokio::io::duplex(8 * 1024);
        let (mut proxy_server, mut server) = tokio::io::duplex(8 * 1024);
        let (up, down) = (Counter::default(), Counter::default());
        let task = {
            let (up, down) = (up.clone(), down.clone());
            tokio::spawn(async move { copy_both_ways(&mut proxy_client, &mut proxy_server, up, down).await })
        };
        let request = pattern(300_000, 1);
        let answer = pattern(1_000_000, 7);
        let (req, ans) = (request.clone(), answer.clone());
        let server_side = tokio::spawn(async move {
            let mut got = vec![0u8; req.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, req);
            server.write_all(&ans).await.unwrap();
            server.shutdown().await.unwrap();
            // The client's end reaches the server as an end too.
            assert_eq!(server.read(&mut [0u8; 1]).await.unwrap(), 0);
        });
        client.write_all(&request).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 10_000];
        while got.len() < answer.len() {
            let n = client.read(&mut chunk).await.unwrap();
            assert_ne!(n, 0, "answer cut short at {}", got.len());
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, answer);
        assert_eq!(client.read(&mut chunk).await.unwrap(), 0, "the server's end was not passed on");
        client.shutdown().await.unwrap();
        server_side.await.unwrap();
        task.await.unwrap().unwrap();
        assert_eq!((up.get(), down.get()), (300_000, 1_000_000));
    }

    /// A reader that records the largest read it was offered.
    struct Recorder<R> {
        inner: R,
        largest_offer: usize,
    }

    impl<R: AsyncRead + Unpin> AsyncRead for Recorder<R> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.largest_offer = self.largest_offer.max(buf.remaining());
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    #[tokio::test]
    async fn grows_while_reads_fill_the_buffer_and_gives_it_back_when_idle() {
        let (mut peer, r) = tokio::io::duplex(1 << 20);
        let mut r = Recorder { inner: r, largest_offer: 0 };
        let mut sink = Vec::new();
        let mut pipe = Pipe::new(Counter::default(), true);
        let copy_what_is_there = |pipe: &mut Pipe, r: &mut Recorder<_>, sink: &mut Vec<u8>| {
            let waker = std::task::Waker::noop();
            let polled = pipe.poll_copy(&mut Context::from_waker(waker), r, sink, |_| Verdict::Pass);
            assert!(polled.is_pending());
        };
        peer.write_all(&pattern(500_000, 3)).await.unwrap();
        copy_what_is_there(&mut pipe, &mut r, &mut sink);
        assert_eq!(sink, pattern(500_000, 3));
        assert!(r.largest_offer >= MAX_BUFFER, "reads never grew past {}", r.largest_offer);
        assert_eq!(pipe.buf.capacity(), 0, "a buffer was kept while idle");
        // Small messages halve the reads back to the small buffer.
        for _ in 0..5 {
            r.largest_offer = 0;
            peer.write_all(b"Q\0\0\0\x0dSELECT 1\0").await.unwrap();
            copy_what_is_there(&mut pipe, &mut r, &mut sink);
            assert_eq!(pipe.buf.capacity(), 0, "a buffer was kept while idle");
        }
        assert_eq!(r.largest_offer, MIN_BUFFER);
        assert_eq!(pipe.counter.get(), 500_000 + 5 * 14);
    }

    #[tokio::test]
    async fn a_watcher_stops_or_refuses_and_a_kept_writer_is_not_shut_down() {
        let copy = async |data: &[u8], verdict: Verdict, close: bool| {
            let (mut peer, mut r) = tokio::io::duplex(1024);
            let (mut w, mut out) = tokio::io::duplex(1024);
            peer.write_all(data).await.unwrap();
            if close {
                drop(peer);
            }
            let mut pipe = Pipe::new(Counter::default(), false);
            let end = poll_fn(|cx| pipe.poll_copy(cx, &mut r, &mut w, |_| verdict)).await;
            // The writer is still open: what was written can be read, and then nothing ends.
            let mut got = vec![0u8; 64];
            let n = tokio::time::timeout(std::time::Duration::from_millis(100), out.read(&mut got)).await;
            let got = n.map(|n| got[..n.unwrap()].to_vec()).unwrap_or_default();
            let wait = std::time::Duration::from_millis(50);
            let still_open = tokio::time::timeout(wait, out.read(&mut [0u8; 8])).await.is_err();
            assert!(still_open, "the writer was shut down");
            (end, got, pipe.counter.get())
        };
        let (end, got, counted) = copy(b"abcdefX\0\0\0\x04", Verdict::PassUpTo(6), false).await;
        assert!(matches!(end, End::Stopped), "{end:?}");
        assert_eq!((got.as_slice(), counted), (&b"abcdef"[..], 6));
        let (end, got, counted) = copy(b"bad", Verdict::Refuse, false).await;
        assert!(matches!(end, End::Refused), "{end:?}");
        assert_eq!((got.len(), counted), (0, 0));
        let (end, got, _) = copy(b"last words", Verdict::Pass, true).await;
        assert!(matches!(end, End::Eof), "{end:?}");
        assert_eq!(got, b"last words");
    }

    /// A reader that reports its end once, then never again; a writer whose shutdown is
    /// pending on the first call.
    struct EndsOnce(tokio::io::DuplexStream, bool);
    struct SlowShutdown(Vec<u8>, u32);

    impl AsyncRead for EndsOnce {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.1 {
                return Poll::Pending;
            }
            let before = buf.filled().len();
            ready!(Pin::new(&mut self.0).poll_read(cx, buf))?;
            self.1 = buf.filled().len() == before;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for SlowShutdown {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
            self.0.extend_from_slice(b);
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.1 += 1;
            if self.1 == 1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_pending_shutdown_resumes_without_reading_again() {
        let (mut peer, r) = tokio::io::duplex(1024);
        peer.write_all(b"bye").await.unwrap();
        drop(peer);
        let (mut r, mut w) = (EndsOnce(r, false), SlowShutdown(Vec::new(), 0));
        let mut pipe = Pipe::new(Counter::default(), true);
        let copy = poll_fn(|cx| pipe.poll_copy(cx, &mut r, &mut w, |_| Verdict::Pass));
        let end = tokio::time::timeout(std::time::Duration::from_secs(2), copy).await.expect("stuck");
        assert!(matches!(end, End::Eof), "{end:?}");
        assert_eq!((w.0.as_slice(), w.1), (&b"bye"[..], 2));
    }

    #[tokio::test]
    async fn until_b_ends_is_over_at_the_servers_end_while_the_client_holds_its_socket() {
        let (mut client, mut proxy_client) = tokio::io::duplex(1024);
        let (mut proxy_server, mut server) = tokio::io::duplex(1024);
        server.write_all(b"FATAL").await.unwrap();
        server.shutdown().await.unwrap();
        // The client neither writes nor closes: copy_both_ways would wait for it.
        let relay =
            copy_until_b_ends(&mut proxy_client, &mut proxy_server, Counter::default(), Counter::default());
        tokio::time::timeout(std::time::Duration::from_secs(2), relay).await.expect("stuck").unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"FATAL", "the server's bytes and its end were passed on");
        // The client's end first: the relay still waits for the server's.
        let (mut client, mut proxy_client) = tokio::io::duplex(1024);
        let (mut proxy_server, mut server) = tokio::io::duplex(1024);
        client.shutdown().await.unwrap();
        let relay = tokio::spawn(async move {
            copy_until_b_ends(&mut proxy_client, &mut proxy_server, Counter::default(), Counter::default())
                .await
        });
        assert_eq!(server.read(&mut [0u8; 1]).await.unwrap(), 0, "the client's end was passed on");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!relay.is_finished(), "over before the server's end");
        drop(server);
        relay.await.unwrap().unwrap();
        drop(client);
    }

    #[tokio::test]
    async fn a_failed_side_ends_the_relay_with_its_error() {
        let (mut client, mut proxy_client) = tokio::io::duplex(1024);
        let (proxy_server, _) = tokio::io::duplex(1024);
        let mut proxy_server = proxy_server;
        client.write_all(b"data for a server that is gone").await.unwrap();
        let e = copy_both_ways(&mut proxy_client, &mut proxy_server, Counter::default(), Counter::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
