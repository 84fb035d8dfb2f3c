//! What a session's client asked for against what the server answered, from the bytes relayed
//! each way without buffering messages: whether the server connection is at an idle point
//! (between messages, every request answered, no COPY open, the last ReadyForQuery `I`).
//! Fallback mode gives a pooled connection back only then; a session whose end is due under
//! the `idle` policy ends only then.

use crate::proto::{self, Framer};

/// What a session's client asked for against what the server answered. Every simple Query, Sync and FunctionCall is
/// answered by exactly one ReadyForQuery, or by none when the server skips it (after an error
/// in an extended-protocol batch, or inside COPY): so the count errs only towards "in doubt".
#[derive(Debug)]
pub struct Tracker {
    client: Framer,
    server: Framer,
    /// Queries, Syncs and function calls sent whose ReadyForQuery has not come back.
    in_flight: u64,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// The server asked for COPY data and has not sent ReadyForQuery since.
    copy_in: bool,
    /// Something that cannot be accounted for: a ReadyForQuery nobody asked for, a message type
    /// the tracker does not know.
    doubt: bool,
}

impl Default for Tracker {
    fn default() -> Self {
        let mut server = Framer::default();
        // The session starts after the set-up's ReadyForQuery, which was `I`.
        server.last_ready = Some(b'I');
        Self {
            client: Framer::default(),
            server,
            in_flight: 0,
            unsynced: false,
            copy_in: false,
            doubt: false,
        }
    }
}

impl Tracker {
    /// Client bytes on their way to the server. Returns where a Terminate starts, if one does.
    pub fn client_bytes(&mut self, data: &[u8]) -> Result<Option<usize>, proto::ProtoError> {
        let (in_flight, unsynced, doubt) = (&mut self.in_flight, &mut self.unsynced, &mut self.doubt);
        self.client.feed_each(data, |tag| match tag {
            b'Q' | b'F' => *in_flight += 1,
            b'S' => {
                *in_flight += 1;
                *unsynced = false;
            }
            b'P' | b'B' | b'E' | b'D' | b'C' => *unsynced = true,
            // Flush; COPY data, done and fail (the server's side shows the COPY's state).
            b'H' | b'd' | b'c' | b'f' => {}
            _ => *doubt = true,
        })
    }

    /// Server bytes on their way to the client.
    pub fn server_bytes(&mut self, data: &[u8]) -> Result<(), proto::ProtoError> {
        let (in_flight, copy_in, doubt) = (&mut self.in_flight, &mut self.copy_in, &mut self.doubt);
        self.server.feed_each(data, |tag| answered(tag, in_flight, copy_in, doubt))?;
        Ok(())
    }

    /// Server bytes as far as the end of the message the server's stream is in. Returns how
    /// many of `data` that took (0 between messages).
    pub fn server_bytes_to_boundary(&mut self, data: &[u8]) -> Result<usize, proto::ProtoError> {
        let (in_flight, copy_in, doubt) = (&mut self.in_flight, &mut self.copy_in, &mut self.doubt);
        self.server.feed_to_boundary(data, |tag| answered(tag, in_flight, copy_in, doubt))
    }

    /// Whether the client's stream stopped between two messages.
    pub fn client_between_messages(&self) -> bool {
        self.client.at_boundary()
    }

    /// Whether the server's stream stopped between two messages.
    pub fn server_between_messages(&self) -> bool {
        self.server.at_boundary()
    }

    /// Queries, Syncs and function calls whose ReadyForQuery has not come back.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// Extended-protocol messages were sent since the last Sync.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// The server waits for the client's COPY data.
    pub fn copy_in(&self) -> bool {
        self.copy_in
    }

    /// The status of the last ReadyForQuery (`I`, `T` or `E`).
    pub fn last_ready(&self) -> Option<u8> {
        self.server.last_ready
    }

    /// Whether the connection can be reset for another client: both streams between messages,
    /// every request answered, no COPY open, the last ReadyForQuery `I`, nothing in doubt.
    pub fn clean(&self) -> bool {
        self.client.at_boundary()
            && self.server.at_boundary()
            && self.in_flight == 0
            && !self.unsynced
            && !self.copy_in
            && !self.doubt
            && self.server.last_ready == Some(b'I')
    }
}

/// What one server message's tag says about the requests.
fn answered(tag: u8, in_flight: &mut u64, copy_in: &mut bool, doubt: &mut bool) {
    match tag {
        b'Z' => {
            *copy_in = false;
            match in_flight.checked_sub(1) {
                Some(n) => *in_flight = n,
                None => *doubt = true,
            }
        }
        // CopyInResponse, CopyBothResponse: the server waits for the client's data.
        b'G' | b'W' => *copy_in = true,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn q(sql: &str) -> BytesMut {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        proto::frame(b'Q', &body)
    }

    fn msgs(list: &[(u8, &[u8])]) -> Vec<u8> {
        list.iter().flat_map(|(tag, body)| proto::frame(*tag, body).to_vec()).collect()
    }

    /// Feeds `client` then `server` to a tracker, whole and one byte at a time; both must agree.
    /// Returns whether a Terminate was found and whether the connection is clean.
    fn track(steps: &[(&[u8], &[u8])]) -> (bool, bool) {
        let run = |chunk: usize| {
            let mut t = Tracker::default();
            let mut terminated = false;
            for (client, server) in steps {
                for c in client.chunks(chunk.max(1)) {
                    if t.client_bytes(c).unwrap().is_some() {
                        terminated = true;
                        break;
                    }
                }
                for c in server.chunks(chunk.max(1)) {
                    t.server_bytes(c).unwrap();
                }
            }
            (terminated, t.clean())
        };
        let whole = run(usize::MAX);
        assert_eq!(run(1), whole, "one byte at a time");
        assert_eq!(run(3), whole, "three bytes at a time");
        whole
    }

    const X: &[u8] = b"X\0\0\0\x04";

    #[test]
    fn answered_requests_leave_the_connection_clean() {
        let answer = msgs(&[(b'T', b"row description"), (b'D', b"row"), (b'C', b"SELECT 1\0"), (b'Z', b"I")]);
        assert_eq!(track(&[(&q("SELECT 1"), &answer), (X, b"")]), (true, true));
        // Extended protocol: Parse, Bind, Execute, Sync; then its answers.
        let ext = msgs(&[
            (b'P', b"\0SELECT 1\0\0\0"),
            (b'B', b"\0\0\0\0\0\0\0\0"),
            (b'E', b"\0\0\0\0\0"),
            (b'S', b""),
        ]);
        let ext_answer =
            msgs(&[(b'1', b""), (b'2', b""), (b'D', b"row"), (b'C', b"SELECT 1\0"), (b'Z', b"I")]);
        assert_eq!(track(&[(&ext, &ext_answer), (X, b"")]), (true, true));
        // A COPY that ended: data, done, then the answer.
        let copy_in = msgs(&[(b'G', b"\0\0\0")]);
        let data = msgs(&[(b'd', b"1\n"), (b'c', b"")]);
        let done = msgs(&[(b'C', b"COPY 1\0"), (b'Z', b"I")]);
        assert_eq!(track(&[(&q("COPY t FROM STDIN"), &copy_in), (&data, &done), (X, b"")]), (true, true));
        // A client that just closes between answered requests.
        assert_eq!(track(&[(&q("SELECT 1"), &answer)]), (false, true));
    }

    #[test]
    fn a_burst_before_terminate_is_in_doubt() {
        // The issue's attack: two empty queries, a slow one and BEGIN, then Terminate at once.
        let mut burst = q("").to_vec();
        burst.extend_from_slice(&q(""));
        burst.extend_from_slice(&q("SELECT pg_sleep(2)"));
        burst.extend_from_slice(&q("BEGIN"));
        burst.extend_from_slice(X);
        assert_eq!(track(&[(&burst, b"")]), (true, false));
        // Even after the two empty queries were answered, two are not.
        let empty = msgs(&[(b'I', b""), (b'Z', b"I"), (b'I', b""), (b'Z', b"I")]);
        assert_eq!(track(&[(&burst, &empty)]), (true, false));
        // All four answered, but BEGIN left a transaction open.
        let rest =
            msgs(&[(b'D', b"r"), (b'C', b"SELECT 1\0"), (b'Z', b"I"), (b'C', b"BEGIN\0"), (b'Z', b"T")]);
        let mut all = empty.clone();
        all.extend_from_slice(&rest);
        assert_eq!(track(&[(&burst, &all)]), (true, false));
        // And the ROLLBACK that ends it, answered: clean again.
        let rollback = msgs(&[(b'C', b"ROLLBACK\0"), (b'Z', b"I")]);
        let mut no_x = burst[..burst.len() - X.len()].to_vec();
        no_x.extend_from_slice(&q("ROLLBACK"));
        all.extend_from_slice(&rollback);
        assert_eq!(track(&[(&no_x, &all), (X, b"")]), (true, true));
    }

    #[test]
    fn copy_unsynced_batches_and_unrequested_answers_are_in_doubt() {
        // COPY FROM STDIN left open: the server waits for data.
        let copy_in = msgs(&[(b'G', b"\0\0\0")]);
        assert_eq!(track(&[(&q("COPY t FROM STDIN"), &copy_in), (X, b"")]), (true, false));
        // Data sent but no CopyDone yet.
        let data = msgs(&[(b'd', b"1\n")]);
        assert_eq!(track(&[(&q("COPY t FROM STDIN"), &copy_in), (&data, b""), (X, b"")]), (true, false));
        // Extended-protocol messages with no Sync after them (Flush only).
        let ext = msgs(&[
            (b'P', b"\0BEGIN\0\0\0"),
            (b'B', b"\0\0\0\0\0\0\0\0"),
            (b'E', b"\0\0\0\0\0"),
            (b'H', b""),
        ]);
        let answers = msgs(&[(b'1', b""), (b'2', b""), (b'C', b"BEGIN\0")]);
        assert_eq!(track(&[(&ext, &answers), (X, b"")]), (true, false));
        // A ReadyForQuery nobody asked for.
        assert_eq!(track(&[(b"", &msgs(&[(b'Z', b"I")])), (X, b"")]), (true, false));
        // A message type no client sends in a session.
        assert_eq!(track(&[(&msgs(&[(b'p', b"secret\0")]), b""), (X, b"")]), (true, false));
        // Cut in the middle of a message.
        let half = q("SELECT 1");
        assert_eq!(track(&[(&half[..6], b"")]), (false, false));
    }
}
