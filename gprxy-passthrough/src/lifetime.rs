//! When a logged-in session ends (`[session]`, gprxy_core::session): its plan, the relay that
//! watches for the end, the client's FATAL, and the audit line and metric. What happens to the
//! server connection after is the mode's business (closed in pass-through, settled and given
//! back in fallback).
//!
//! The relay tracks requests against answers ([`Tracker`]) to know the session's idle points.
//! When the end comes the client reads no more: the server's message being relayed is
//! finished, then the FATAL is written between messages and the client's side shut down.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use gprxy_core::{EndHow, SessionMode, SessionPlan, SessionPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, Sleep};
use tracing::info;

use crate::conn::BoxStream;
use crate::metrics::Metrics;
use crate::proto::{BackendMessage, SqlState};
use crate::relay::{End, Pipe, Verdict};
use crate::track::Tracker;

/// How long ending the client's side may take (finishing the server's message, the FATAL).
pub const END_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest single timer wait; a later end is waited for in steps.
const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// The proxy mode a session runs in (the metric's `mode` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// The server authenticated the client.
    Passthrough,
    /// gprxy validated the token; a pooled server connection.
    Fallback,
}

impl ProxyMode {
    /// The label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Passthrough => "passthrough",
            Self::Fallback => "fallback",
        }
    }
}

/// What ended a session whose end was due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Its first idle point after the end was due (`idle`, `off` with a maximum age).
    AtIdle,
    /// The end itself (`strict`), whatever the session was doing.
    Strict,
    /// The `idle` policy's hard limit: the session did not go idle in time.
    HardLimit,
}

impl Ending {
    /// Whether the session may have been busy (a request unanswered, a transaction open).
    pub fn forced(self) -> bool {
        !matches!(self, Self::AtIdle)
    }

    fn label(self) -> &'static str {
        match self {
            Self::AtIdle => "idle_point",
            Self::Strict => "strict",
            Self::HardLimit => "hard_limit",
        }
    }
}

/// Whose session it is, for the audit line (never the token itself).
#[derive(Debug, Clone, Default)]
pub struct TokenOwner {
    /// The token's `sub`.
    pub sub: Option<String>,
    /// The token's `iss`.
    pub iss: Option<String>,
    /// The token's fingerprint, as the login line gives it.
    pub token_fp: Option<String>,
}

/// When and why one logged-in session ends, with what its audit line names.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    plan: SessionPlan,
    policy: SessionMode,
    mode: ProxyMode,
    owner: TokenOwner,
    login: std::time::Instant,
}

impl SessionEnd {
    /// The end of a session that logged in now with a token expiring at `exp` (None: no exp
    /// could be read), under `policy`; None when nothing ends it.
    pub fn plan(
        policy: &SessionPolicy,
        mode: ProxyMode,
        exp: Option<u64>,
        owner: TokenOwner,
    ) -> Option<Self> {
        // Whole seconds, rounded up (as the validator does): a session never ends before
        // max_session_age has passed.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let login_at = now.as_secs() + u64::from(now.subsec_nanos() > 0);
        let plan = policy.plan(login_at, exp)?;
        Some(Self { plan, policy: policy.mode, mode, owner, login: std::time::Instant::now() })
    }

    /// The refusal of a login whose session would end at once (a token inside the leeway past
    /// its `exp`): the client's message; None when the end is still ahead.
    pub fn refusal_at_login(&self) -> Option<String> {
        until(self.plan.end_at).is_zero().then(|| self.plan.reason.client_message())
    }

    /// The end as the signed context carries it to the server (fallback mode).
    pub fn context_end(&self) -> gprxy_core::context::ContextEnd {
        gprxy_core::context::ContextEnd::of(&self.plan)
    }

    /// The ErrorResponse the client reads last: FATAL, SQLSTATE 28000, the reason.
    pub fn fatal(&self) -> BytesMut {
        let message = self.plan.reason.client_message();
        BackendMessage::ErrorResponse { sqlstate: SqlState::INVALID_AUTHORIZATION, message: &message }
            .to_bytes()
    }

    /// The audit line and the metric of the end (never the token).
    pub fn record(&self, metrics: &Metrics, ending: Ending) {
        let reason = self.plan.reason;
        metrics.session_ended(self.mode.label(), reason.label());
        info!(
            event = reason.event(),
            reason = reason.label(),
            sub = self.owner.sub.as_deref().unwrap_or(""),
            iss = self.owner.iss.as_deref().unwrap_or(""),
            token_fp = self.owner.token_fp.as_deref().unwrap_or(""),
            age_secs = self.login.elapsed().as_secs(),
            policy = self.policy.name(),
            mode = self.mode.label(),
            ended_at = ending.label(),
            "session ended: {}",
            reason.client_message()
        );
    }
}

/// The time left until `unix_secs` (zero once it has come).
fn until(unix_secs: u64) -> Duration {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Duration::from_secs(unix_secs).saturating_sub(now)
}

/// The session's timer: first the end, then (`AtIdle`) the hard limit, by the wall clock as
/// token times are.
struct Clock {
    how: EndHow,
    /// Unix seconds the timer waits for.
    target: u64,
    /// The end has come; the session ends at its next idle point.
    due: bool,
    sleep: Pin<Box<Sleep>>,
}

impl Clock {
    fn new(plan: &SessionPlan) -> Self {
        // An end already past is due from the first poll on (the timer would tick first).
        let (target, due) = match plan.how {
            EndHow::AtIdle { hard_at } if until(plan.end_at).is_zero() => (hard_at, true),
            _ => (plan.end_at, false),
        };
        let sleep = Box::pin(tokio::time::sleep(until(target).min(MAX_WAIT)));
        Self { how: plan.how, target, due, sleep }
    }

    /// Ready when the session must end; `idle` says whether it is at an idle point now. The wall
    /// clock decides, not only the timer: a target already past is taken at this poll, before
    /// the timer's next tick, so that no client byte read after it is relayed.
    fn poll_end(&mut self, cx: &mut Context<'_>, idle: impl Fn() -> bool) -> Poll<Ending> {
        loop {
            if self.due && idle() {
                return Poll::Ready(Ending::AtIdle);
            }
            let fired = self.sleep.as_mut().poll(cx).is_ready();
            let left = until(self.target);
            if !left.is_zero() {
                if !fired {
                    return Poll::Pending;
                }
                self.sleep.as_mut().reset(Instant::now() + left.min(MAX_WAIT));
                continue;
            }
            match (self.how, self.due) {
                (EndHow::Now, _) => return Poll::Ready(Ending::Strict),
                (EndHow::AtIdle { .. }, true) => return Poll::Ready(Ending::HardLimit),
                (EndHow::AtIdle { hard_at }, false) => {
                    self.due = true;
                    self.target = hard_at;
                    self.sleep.as_mut().reset(Instant::now() + until(hard_at).min(MAX_WAIT));
                }
            }
        }
    }
}

/// How a watched relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// The client sent Terminate (not forwarded) or closed its side.
    ClientLeft,
    /// The server closed, a side failed, or a stream broke the protocol.
    Broken,
    /// The session's end came: the client got the FATAL (unless it stopped reading) and its
    /// side was shut down.
    Ended {
        /// What ended it.
        ending: Ending,
        /// The server received whole client messages only and sent whole messages the tracker
        /// saw, less `server_leftover`: the tracker tells where the server connection stands.
        server_in_step: bool,
        /// Server bytes read past the last message relayed.
        server_leftover: BytesMut,
    },
}

/// Relays a session until the client leaves or, with `end`, its end comes. `to_server` and
/// `to_client` are bytes read with the login; `track` follows both streams from the login's
/// ReadyForQuery on. Relayed bytes are counted in `metrics`.
pub async fn relay_watched(
    metrics: &Metrics,
    client: &mut BoxStream,
    server: &mut BoxStream,
    to_server: BytesMut,
    to_client: BytesMut,
    track: &mut Tracker,
    end: Option<&SessionEnd>,
) -> RelayEnd {
    let (to_server_bytes, to_client_bytes) = metrics.relayed_bytes();
    // Server bytes that came after the login's answer count like any other.
    if track.server_bytes(&to_client).is_err() {
        return RelayEnd::Broken;
    }
    if !to_client.is_empty() && client.write_all(&to_client).await.is_err() {
        return RelayEnd::Broken;
    }
    // Client bytes go to the server as they are, up to a Terminate, which ends the session:
    // first what came with the login, then the relay.
    match track.client_bytes(&to_server) {
        Ok(Some(at)) => {
            return match server.write_all(&to_server[..at]).await {
                Ok(()) => RelayEnd::ClientLeft,
                Err(_) => RelayEnd::Broken,
            }
        }
        Ok(None) if server.write_all(&to_server).await.is_err() => return RelayEnd::Broken,
        Ok(None) => {}
        Err(_) => return RelayEnd::Broken,
    }
    let mut clock = end.map(|e| Clock::new(&e.plan));
    let mut forward = Pipe::new(to_server_bytes, false);
    let mut back = Pipe::new(to_client_bytes.clone(), false);
    let step = poll_fn(|cx| {
        // The clock first, so that the end being due is known before any client byte is read
        // in this round (a forced end is taken at once).
        if let Some(clock) = clock.as_mut() {
            if let Poll::Ready(ending) = clock.poll_end(cx, || false) {
                return Poll::Ready(Ok(ending));
            }
        }
        // The server's answers next, so that whether the client may be read is decided on
        // what the server said last.
        let watch_server =
            |data: &[u8]| if track.server_bytes(data).is_ok() { Verdict::Pass } else { Verdict::Refuse };
        if back.poll_copy(cx, &mut **server, &mut **client, watch_server).is_ready() {
            return Poll::Ready(Err(RelayEnd::Broken));
        }
        // Once the end is due, a client outside a transaction is read no more (between whole
        // requests, no COPY open): what it sent is answered, and then the session is at its
        // idle point. A client that always has its next command queued is never idle
        // otherwise; the commands it queued after the end never reach the server. An
        // extended-protocol batch with no Sync yet, begun outside a transaction, is held too:
        // its work is not committed (no Sync comes), and the session ends once every request
        // before it was answered.
        let held = |track: &Tracker| {
            clock.as_ref().is_some_and(|c| c.due)
                && track.last_ready() == Some(b'I')
                && track.client_between_messages()
                && !track.copy_in()
        };
        let hold_client = held(track);
        if hold_client {
            if let Poll::Ready(Err(_)) = forward.poll_write_out(cx, &mut **server) {
                return Poll::Ready(Err(RelayEnd::Broken));
            }
        } else {
            let watch_client = |data: &[u8]| match track.client_bytes(data) {
                Ok(Some(at)) => Verdict::PassUpTo(at),
                Ok(None) => Verdict::Pass,
                Err(_) => Verdict::Refuse,
            };
            match forward.poll_copy(cx, &mut **client, &mut **server, watch_client) {
                // The client left, or sent Terminate (not forwarded).
                Poll::Ready(End::Eof | End::ReadFailed(_) | End::Stopped) => {
                    return Poll::Ready(Err(RelayEnd::ClientLeft))
                }
                Poll::Ready(End::WriteFailed(_) | End::Refused) => return Poll::Ready(Err(RelayEnd::Broken)),
                Poll::Pending => {}
            }
        }
        match clock.as_mut() {
            Some(clock) => {
                let held_unsynced = hold_client && track.unsynced() && track.in_flight() == 0;
                let idle = || {
                    forward.drained()
                        && back.drained()
                        && (track.clean() || (held_unsynced && track.server_between_messages()))
                };
                clock.poll_end(cx, idle).map(Ok)
            }
            None => Poll::Pending,
        }
    })
    .await;
    let ending = match step {
        Ok(ending) => ending,
        Err(relay_end) => return relay_end,
    };
    // Bytes the client sent that the server did not get all of leave the server out of step.
    let forward_in_step = forward.drained() && track.client_between_messages();
    let fatal = end.map(SessionEnd::fatal).unwrap_or_default();
    let finished = tokio::time::timeout(
        END_TIMEOUT,
        end_client(client, server, &mut back, track, &fatal, &to_client_bytes),
    )
    .await;
    let _ = tokio::time::timeout(END_TIMEOUT, client.shutdown()).await;
    match finished {
        Ok(Ok(server_leftover)) => {
            RelayEnd::Ended { ending, server_in_step: forward_in_step, server_leftover }
        }
        _ => RelayEnd::Ended { ending, server_in_step: false, server_leftover: BytesMut::new() },
    }
}

/// Writes what the server side already passed, then the rest of the server message it is in,
/// then `fatal`, reading nothing more from the client. Returns server bytes read past that
/// message.
async fn end_client(
    client: &mut BoxStream,
    server: &mut BoxStream,
    back: &mut Pipe,
    track: &mut Tracker,
    fatal: &[u8],
    counter: &prometheus_client::metrics::counter::Counter,
) -> std::io::Result<BytesMut> {
    poll_fn(|cx| back.poll_write_out(cx, &mut **client)).await?;
    let mut buf = BytesMut::new();
    while !track.server_between_messages() {
        if buf.is_empty() && server.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let n = track.server_bytes_to_boundary(&buf).map_err(std::io::Error::other)?;
        client.write_all(&buf[..n]).await?;
        counter.inc_by(n as u64);
        buf.advance(n);
    }
    client.write_all(fatal).await?;
    client.flush().await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::duplex::{next, pair};
    use crate::proto::{frame, Message};
    use gprxy_core::EndReason;

    fn q(sql: &str) -> BytesMut {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        frame(b'Q', &body)
    }

    fn answer(tag: &str, status: u8) -> BytesMut {
        let mut out = frame(b'C', format!("{tag}\0").as_bytes());
        out.extend_from_slice(&frame(b'Z', &[status]));
        out
    }

    fn unix_now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    /// A session whose token expired 10 s ago, under `policy`.
    fn expired(mode: SessionMode, hard_limit: u64) -> SessionEnd {
        let policy = SessionPolicy { mode, idle_hard_limit_secs: hard_limit, ..SessionPolicy::default() };
        let exp = unix_now() - 10;
        let owner = TokenOwner { sub: Some("alice".into()), ..TokenOwner::default() };
        SessionEnd::plan(&policy, ProxyMode::Passthrough, Some(exp), owner).unwrap()
    }

    fn expiry_message(end: &SessionEnd) -> String {
        let EndReason::TokenExpired { exp } = end.plan.reason else { panic!("{:?}", end.plan) };
        format!("gprxy: the access token expired at {}; log in again", gprxy_core::session::UtcTime(exp))
    }

    /// Runs the relay with the two far ends given to the test.
    fn start(
        end: SessionEnd,
        to_server: BytesMut,
        to_client: BytesMut,
    ) -> (tokio::task::JoinHandle<(RelayEnd, Tracker)>, BoxStream, BoxStream) {
        let (mut client_end, client) = pair();
        let (mut server_end, server) = pair();
        let relay = tokio::spawn(async move {
            let mut track = Tracker::default();
            let metrics = Metrics::new();
            let r = relay_watched(
                &metrics,
                &mut client_end,
                &mut server_end,
                to_server,
                to_client,
                &mut track,
                Some(&end),
            )
            .await;
            (r, track)
        });
        (relay, client, server)
    }

    /// Everything the peer reads until the relay shuts its side down.
    async fn rest(s: &mut BoxStream) -> Vec<u8> {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().unwrap();
        out
    }

    /// The tags of every message the client gets until its side is shut down; an ErrorResponse
    /// among them must be the session's FATAL with `message`.
    async fn tags_to_the_end(client: &mut BoxStream, message: &str) -> Vec<u8> {
        let got = rest(client).await;
        let mut buf = BytesMut::from(&got[..]);
        let mut tags = Vec::new();
        while let Some(m) = crate::proto::parse_message(&mut buf, 1024, "x").unwrap() {
            tags.push(m.tag);
            if m.tag == b'E' {
                assert!(is_fatal(&m, message));
            }
        }
        tags
    }

    fn is_fatal(m: &Message, message: &str) -> bool {
        let mut want = BytesMut::new();
        BackendMessage::ErrorResponse { sqlstate: SqlState::INVALID_AUTHORIZATION, message }
            .encode(&mut want);
        m.raw == want
    }

    #[test]
    fn the_fatal_is_28000_with_the_reason_for_the_client() {
        assert_eq!(SqlState::INVALID_AUTHORIZATION.code(), gprxy_core::session::END_SQLSTATE);
        let end = expired(SessionMode::Idle, 3600);
        let fatal = end.fatal();
        let m = crate::proto::parse_message(&mut fatal.clone(), 1024, "x").unwrap().unwrap();
        assert_eq!(crate::proto::error_fields(&m), ("28000".to_owned(), expiry_message(&end)));
        assert!(fatal.windows(7).any(|w| w == b"SFATAL\0"));
    }

    #[test]
    fn a_maximum_age_is_never_cut_short_and_a_login_without_exp_has_only_that() {
        let policy = SessionPolicy { max_session_age_secs: Some(60), ..SessionPolicy::default() };
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let end = SessionEnd::plan(&policy, ProxyMode::Passthrough, None, TokenOwner::default()).unwrap();
        assert_eq!(end.plan.reason, EndReason::MaxAge { limit_secs: 60 });
        let end_at = Duration::from_secs(end.plan.end_at);
        assert!(end_at >= before + Duration::from_secs(60), "{end_at:?} < {before:?} + 60 s");
        assert!(end_at <= before + Duration::from_secs(62));
        let no_limit = SessionPolicy::default();
        assert!(SessionEnd::plan(&no_limit, ProxyMode::Passthrough, None, TokenOwner::default()).is_none());
    }

    #[tokio::test]
    async fn an_idle_session_ends_at_once_when_its_end_is_due() {
        let end = expired(SessionMode::Idle, 3600);
        let message = expiry_message(&end);
        let (relay, mut client, _server) = start(end, BytesMut::new(), BytesMut::new());
        let got = rest(&mut client).await;
        let mut buf = BytesMut::from(&got[..]);
        let m = crate::proto::parse_message(&mut buf, 1024, "x").unwrap().unwrap();
        assert!(is_fatal(&m, &message), "{got:?}");
        assert!(buf.is_empty());
        let (r, track) = relay.await.unwrap();
        assert!(
            matches!(r, RelayEnd::Ended { ending: Ending::AtIdle, server_in_step: true, ref server_leftover } if server_leftover.is_empty()),
            "{r:?}"
        );
        assert!(track.clean());
    }

    /// Under `idle`, a transaction open when the end came runs on; its COMMIT's answer reaches
    /// the client, then the FATAL.
    #[tokio::test]
    async fn a_transaction_commits_before_the_idle_end() {
        let end = expired(SessionMode::Idle, 3600);
        let message = expiry_message(&end);
        // BEGIN came with the login: a request in flight from the start.
        let (relay, mut client, mut server) = start(end, q("BEGIN"), BytesMut::new());
        let mut sbuf = BytesMut::new();
        assert_eq!(next(&mut server, &mut sbuf).await.raw, q("BEGIN"));
        send(&mut server, &answer("BEGIN", b'T')).await;
        let mut cbuf = BytesMut::new();
        assert_eq!(next(&mut client, &mut cbuf).await.tag, b'C');
        assert_eq!(next(&mut client, &mut cbuf).await.raw, frame(b'Z', b"T"));
        // In a transaction: nothing ends it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!relay.is_finished());
        send(&mut client, &q("INSERT INTO t VALUES (1)")).await;
        next(&mut server, &mut sbuf).await;
        send(&mut server, &answer("INSERT 0 1", b'T')).await;
        send(&mut client, &q("COMMIT")).await;
        assert_eq!(next(&mut server, &mut sbuf).await.raw, q("COMMIT"));
        send(&mut server, &answer("COMMIT", b'I')).await;
        let tags = tags_to_the_end(&mut client, &message).await;
        assert_eq!(tags, b"CZCZE", "the INSERT's and the COMMIT's answers, then the FATAL");
        let (r, _) = relay.await.unwrap();
        assert!(matches!(r, RelayEnd::Ended { ending: Ending::AtIdle, server_in_step: true, .. }), "{r:?}");
    }

    /// Under `idle`, a client that always has its next command queued: the command being
    /// answered when the end came finishes; the one queued after it never reaches the server.
    #[tokio::test]
    async fn a_client_with_its_next_command_queued_is_ended_after_the_answer_in_flight() {
        let end = expired(SessionMode::Idle, 3600);
        let message = expiry_message(&end);
        let (relay, mut client, mut server) = start(end, q("SELECT 1"), BytesMut::new());
        let mut sbuf = BytesMut::new();
        assert_eq!(next(&mut server, &mut sbuf).await.raw, q("SELECT 1"));
        // The next command is queued before the first is answered.
        send(&mut client, &q("INSERT INTO t VALUES (2)")).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        send(&mut server, &answer("SELECT 1", b'I')).await;
        let tags = tags_to_the_end(&mut client, &message).await;
        assert_eq!(tags, b"CZE", "the first command's answer, then the FATAL");
        let (r, track) = relay.await.unwrap();
        assert!(matches!(r, RelayEnd::Ended { ending: Ending::AtIdle, server_in_step: true, .. }), "{r:?}");
        assert!(track.clean());
        drop(client);
        let mut rest_of_server = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_millis(200), server.read_to_end(&mut rest_of_server)).await;
        assert!(
            !rest_of_server.windows(6).any(|w| w == b"INSERT"),
            "the queued command reached the server: {rest_of_server:?}"
        );
    }

    /// Under `idle`, an extended-protocol batch with no Sync, begun outside a transaction, does
    /// not keep the session: once the end is due the client is read no more, and the session
    /// ends with the batch unsynced (nothing the client sends after the end reaches the server).
    #[tokio::test]
    async fn an_unsynced_batch_does_not_keep_a_session_past_its_idle_end() {
        let end = expired(SessionMode::Idle, 3600);
        let message = expiry_message(&end);
        let mut batch = frame(b'P', b"\0BEGIN\0\0\0");
        batch.extend_from_slice(&frame(b'B', &[0u8; 8]));
        batch.extend_from_slice(&frame(b'E', &[0u8; 5]));
        let (relay, mut client, mut server) = start(end, batch.clone(), BytesMut::new());
        send(&mut client, &q("INSERT INTO t VALUES (1)")).await;
        let tags = tags_to_the_end(&mut client, &message).await;
        assert_eq!(tags, b"E", "only the FATAL");
        let (r, track) = relay.await.unwrap();
        assert!(matches!(r, RelayEnd::Ended { ending: Ending::AtIdle, server_in_step: true, .. }), "{r:?}");
        assert!(track.unsynced() && track.in_flight() == 0);
        drop(client);
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_millis(200), server.read_to_end(&mut got)).await;
        assert_eq!(got, batch.to_vec(), "the server got the batch and nothing after it");
    }

    /// Under `strict` the end does not wait; the server message being relayed is finished
    /// first, and what the server sent after it stays with the relay.
    #[tokio::test]
    async fn a_strict_end_comes_between_server_messages() {
        let end = expired(SessionMode::Strict, 3600);
        let message = expiry_message(&end);
        let row = frame(b'D', &[7u8; 300]);
        let mut after = row[100..].to_vec();
        after.extend_from_slice(&answer("SELECT 1", b'I'));
        // A query in flight whose answer's first 100 bytes came with the login.
        let (relay, mut client, mut server) = start(end, q("SELECT x"), BytesMut::from(&row[..100]));
        let mut sbuf = BytesMut::new();
        next(&mut server, &mut sbuf).await;
        let mut first = vec![0u8; 100];
        client.read_exact(&mut first).await.unwrap();
        // The end has come (it was due at once) while the DataRow is cut; then the server goes on.
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(&mut server, &after).await;
        let got = rest(&mut client).await;
        let mut buf = BytesMut::from(&first[..]);
        buf.extend_from_slice(&got);
        assert_eq!(crate::proto::parse_message(&mut buf, 1024, "x").unwrap().unwrap().raw, row);
        let m = crate::proto::parse_message(&mut buf, 1024, "x").unwrap().unwrap();
        assert!(is_fatal(&m, &message), "{got:?}");
        assert!(buf.is_empty(), "nothing after the FATAL");
        let (r, track) = relay.await.unwrap();
        let RelayEnd::Ended { ending: Ending::Strict, server_in_step: true, server_leftover } = r else {
            panic!("{r:?}")
        };
        assert_eq!(&server_leftover[..], &answer("SELECT 1", b'I')[..]);
        assert_eq!(track.in_flight(), 1, "the query's ReadyForQuery was not relayed");
    }

    /// Under `idle`, a session busy past the hard limit ends anyway.
    #[tokio::test]
    async fn the_hard_limit_ends_a_session_that_never_goes_idle() {
        let (relay, mut client, _server) =
            start(expired(SessionMode::Idle, 0), q("SELECT pg_sleep(60)"), BytesMut::new());
        let got = rest(&mut client).await;
        assert_eq!(got.first(), Some(&b'E'));
        let (r, track) = relay.await.unwrap();
        assert!(
            matches!(r, RelayEnd::Ended { ending: Ending::HardLimit, server_in_step: true, .. }),
            "{r:?}"
        );
        assert_eq!(track.in_flight(), 1);
    }

    /// A session before its end relays as any other; the client's Terminate ends it.
    #[tokio::test]
    async fn before_its_end_a_session_relays_and_terminate_is_kept_back() {
        let policy = SessionPolicy { mode: SessionMode::Strict, ..SessionPolicy::default() };
        let in_an_hour = Some(unix_now() + 3600);
        let end = SessionEnd::plan(&policy, ProxyMode::Fallback, in_an_hour, TokenOwner::default()).unwrap();
        let (relay, mut client, mut server) = start(end, BytesMut::new(), BytesMut::new());
        let mut bye = q("SELECT 1");
        bye.extend_from_slice(b"X\0\0\0\x04");
        send(&mut client, &bye).await;
        let mut sbuf = BytesMut::new();
        assert_eq!(next(&mut server, &mut sbuf).await.raw, q("SELECT 1"));
        let (r, track) = relay.await.unwrap();
        assert!(matches!(r, RelayEnd::ClientLeft), "{r:?}");
        assert!(track.client_between_messages());
        drop(client);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty() && sbuf.is_empty(), "Terminate was relayed: {rest:?}");
    }

    /// A strict end already past is taken at the first poll, before the timer's tick: a client
    /// command that is there at once never reaches the server (#26, found by the generator: a
    /// session that waited for its pool slot past its end relayed a request first).
    #[tokio::test]
    async fn a_strict_end_already_past_relays_nothing() {
        let end = expired(SessionMode::Strict, 3600);
        let (mut client_end, mut client) = pair();
        let (mut server_end, mut server) = pair();
        send(&mut client, &q("INSERT INTO t VALUES (1)")).await;
        let r = {
            let mut track = Tracker::default();
            let metrics = Metrics::new();
            relay_watched(
                &metrics,
                &mut client_end,
                &mut server_end,
                BytesMut::new(),
                BytesMut::new(),
                &mut track,
                Some(&end),
            )
            .await
        };
        assert!(matches!(r, RelayEnd::Ended { ending: Ending::Strict, .. }), "{r:?}");
        drop(server_end);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "relayed after the end: {got:?}");
    }

    /// The wall-clock timer: an end one second ahead comes about a second later.
    #[tokio::test]
    async fn the_clock_waits_for_the_end() {
        let end_at = unix_now() + 1;
        let plan = SessionPlan { end_at, how: EndHow::Now, reason: EndReason::MaxAge { limit_secs: 1 } };
        let mut clock = Clock::new(&plan);
        let ending = poll_fn(|cx| clock.poll_end(cx, || true)).await;
        assert_eq!(ending, Ending::Strict);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        assert!(now >= Duration::from_secs(end_at), "{now:?} before {end_at}");
        assert!(now < Duration::from_secs(end_at) + Duration::from_millis(500), "{now:?}");
    }

    async fn send(s: &mut BoxStream, bytes: &[u8]) {
        s.write_all(bytes).await.unwrap();
        s.flush().await.unwrap();
    }
}
