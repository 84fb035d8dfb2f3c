//! After login: bytes copied both ways with no parsing, one read and one write per chunk.
//!
//! Each direction reads into a [`ReadBuffer`]: it starts at [`MIN_BUFFER`] and doubles, up to
//! [`MAX_BUFFER`], while reads fill it, so a bulk transfer moves in large reads; once a read
//! leaves it partly empty (the socket was drained), a grown buffer is given back. While a
//! direction waits for data it holds no buffer at all, so an idle session costs no buffer memory,
//! whatever it once transferred. Buffers are not zeroed, so only the pages a read touches count. Bytes are counted as they are written, so the
//! metric moves while a long session runs.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};

/// The buffer a direction starts with, and returns to when idle.
pub const MIN_BUFFER: usize = 4 * 1024;
/// The largest buffer a direction grows to.
pub const MAX_BUFFER: usize = 64 * 1024;

/// A read buffer that grows while reads fill it and shrinks back once one does not.
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
        self.want = if n >= room { (self.want * 2).min(MAX_BUFFER) } else { MIN_BUFFER };
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

/// One direction: read from one side, write everything read to the other.
struct Pipe {
    buf: ReadBuffer,
    /// Bytes of `buf` already written.
    written: usize,
    /// Written since the last flush.
    need_flush: bool,
    /// The reader reached its end: shut the writer down once `buf` is written.
    eof: bool,
    done: bool,
    counter: Counter,
}

impl Pipe {
    fn new(counter: Counter) -> Self {
        Self { buf: ReadBuffer::default(), written: 0, need_flush: false, eof: false, done: false, counter }
    }

    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            while self.written < self.buf.data().len() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.buf.data()[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.need_flush = true;
                self.counter.inc_by(n as u64);
            }
            if self.eof {
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            self.written = 0;
            let buf = self.buf.for_read();
            let room = buf.capacity();
            match tokio_util::io::poll_read_buf(Pin::new(&mut *r), cx, buf) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => self.buf.after_read(n, room),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing buffered and nothing to read: hold no memory while waiting.
                    self.buf.release();
                    if self.need_flush {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copies `a` → `b` and `b` → `a` until both sides have ended (an end on one side shuts the
/// other's writing half down) or either fails. `a_to_b` and `b_to_a` count the bytes written.
pub async fn relay<A, B>(a: &mut A, b: &mut B, a_to_b: Counter, b_to_a: Counter) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut forward = Pipe::new(a_to_b);
    let mut back = Pipe::new(b_to_a);
    poll_fn(|cx| {
        let f = if forward.done { Poll::Ready(Ok(())) } else { forward.poll_copy(cx, a, b) };
        let r = if back.done { Poll::Ready(Ok(())) } else { back.poll_copy(cx, b, a) };
        match (f, r) {
            (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
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
            tokio::spawn(async move { relay(&mut proxy_client, &mut proxy_server, up, down).await })
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
        let mut pipe = Pipe::new(Counter::default());
        let copy_what_is_there = |pipe: &mut Pipe, r: &mut Recorder<_>, sink: &mut Vec<u8>| {
            let waker = std::task::Waker::noop();
            assert!(pipe.poll_copy(&mut Context::from_waker(waker), r, sink).is_pending());
        };
        peer.write_all(&pattern(500_000, 3)).await.unwrap();
        copy_what_is_there(&mut pipe, &mut r, &mut sink);
        assert_eq!(sink, pattern(500_000, 3));
        assert!(r.largest_offer >= MAX_BUFFER, "reads never grew past {}", r.largest_offer);
        assert_eq!(pipe.buf.capacity(), 0, "a buffer was kept while idle");
        // Small messages go through the small buffer.
        r.largest_offer = 0;
        peer.write_all(b"Q\0\0\0\x0dSELECT 1\0").await.unwrap();
        copy_what_is_there(&mut pipe, &mut r, &mut sink);
        assert!(r.largest_offer < 2 * MIN_BUFFER, "{}", r.largest_offer);
        assert_eq!(pipe.buf.capacity(), 0, "a buffer was kept while idle");
        assert_eq!(pipe.counter.get(), 500_000 + 14);
    }

    #[tokio::test]
    async fn a_failed_side_ends_the_relay_with_its_error() {
        let (mut client, mut proxy_client) = tokio::io::duplex(1024);
        let (proxy_server, _) = tokio::io::duplex(1024);
        let mut proxy_server = proxy_server;
        client.write_all(b"data for a server that is gone").await.unwrap();
        let e = relay(&mut proxy_client, &mut proxy_server, Counter::default(), Counter::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
