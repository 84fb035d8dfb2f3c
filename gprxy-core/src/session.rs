//! When a session ends: the session policy the validator and the proxy both enforce.
//!
//! A token is checked at login; [`SessionPolicy::plan`] says when the session that login opened
//! must end (the token's `exp` plus a grace, or a maximum age) and how: at its next idle point
//! ([`EndHow::AtIdle`], with a hard limit for a session that never goes idle) or at once
//! ([`EndHow::Now`], rolling back an open transaction).

use std::fmt;

/// What a token's expiry does to the session it opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionMode {
    /// The token is checked at login only (PostgreSQL's own behaviour).
    Off,
    /// After expiry (+ grace) the session ends at its next idle point (no transaction open), or
    /// at expiry + the hard limit if it never goes idle.
    #[default]
    Idle,
    /// The session ends at expiry (+ grace), mid-transaction if need be.
    Strict,
}

impl SessionMode {
    /// The words the settings use.
    pub const NAMES: [&'static str; 3] = ["off", "idle", "strict"];

    /// Parses `off`, `idle` or `strict` (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" => Some(Self::Off),
            "idle" => Some(Self::Idle),
            "strict" => Some(Self::Strict),
            _ => None,
        }
    }

    /// The setting's word for this mode.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// The session policy, parsed once from the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    /// What the token's expiry does.
    pub mode: SessionMode,
    /// Seconds after `exp` before the session's end is due.
    pub grace_secs: u64,
    /// In `idle` mode, seconds after the end was due at which a session that never went idle
    /// ends anyway.
    pub idle_hard_limit_secs: u64,
    /// The longest a session may last whatever its token says (`None`: no limit).
    pub max_session_age_secs: Option<u64>,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        Self {
            mode: SessionMode::Idle,
            grace_secs: 0,
            idle_hard_limit_secs: 3600,
            max_session_age_secs: None,
        }
    }
}

/// Why a session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The token's `exp` (unix seconds) passed.
    TokenExpired {
        /// The token's `exp`.
        exp: u64,
    },
    /// The session reached `max_session_age`.
    MaxAge {
        /// The limit in seconds.
        limit_secs: u64,
    },
}

impl EndReason {
    /// The audit event name.
    pub fn event(self) -> &'static str {
        match self {
            Self::TokenExpired { .. } => "session_expired",
            Self::MaxAge { .. } => "session_max_age",
        }
    }

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Self::TokenExpired { .. } => "token_expired",
            Self::MaxAge { .. } => "max_age",
        }
    }

    /// What the client reads (SQLSTATE [`END_SQLSTATE`], severity FATAL).
    pub fn client_message(self) -> String {
        match self {
            Self::TokenExpired { exp } => {
                format!("gprxy: the access token expired at {}; log in again", UtcTime(exp))
            }
            Self::MaxAge { limit_secs } => format!(
                "gprxy: the session reached its maximum age ({limit_secs} s, max_session_age); log in again"
            ),
        }
    }
}

/// The SQLSTATE of a session ended by its policy: invalid_authorization_specification, the
/// class PostgreSQL uses for a login whose credentials no longer hold.
pub const END_SQLSTATE: &str = "28000";

/// How a session ends when its end is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndHow {
    /// At the next idle point (no transaction open), or at `hard_at` whatever it is doing.
    AtIdle {
        /// Unix seconds at which the session ends even if it never went idle.
        hard_at: u64,
    },
    /// At once, rolling back an open transaction.
    Now,
}

/// When and how one session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPlan {
    /// Unix seconds at which the end is due.
    pub end_at: u64,
    /// How it ends then.
    pub how: EndHow,
    /// Why.
    pub reason: EndReason,
}

impl SessionPolicy {
    /// The plan for a session that logged in at `login_at` (unix seconds) with a token expiring
    /// at `exp` (`None`: the token has no `exp` the proxy could read, as with opaque tokens).
    /// `None` when nothing ends the session.
    pub fn plan(&self, login_at: u64, exp: Option<u64>) -> Option<SessionPlan> {
        let by_token = match (self.mode, exp) {
            (SessionMode::Off, _) | (_, None) => None,
            (_, Some(exp)) => Some((exp.saturating_add(self.grace_secs), EndReason::TokenExpired { exp })),
        };
        let by_age = self
            .max_session_age_secs
            .map(|limit| (login_at.saturating_add(limit), EndReason::MaxAge { limit_secs: limit }));
        let (end_at, reason) = match (by_token, by_age) {
            (Some(t), Some(a)) => {
                if a.0 < t.0 {
                    a
                } else {
                    t
                }
            }
            (t, a) => t.or(a)?,
        };
        let how = match self.mode {
            SessionMode::Strict => EndHow::Now,
            SessionMode::Off | SessionMode::Idle => {
                EndHow::AtIdle { hard_at: end_at.saturating_add(self.idle_hard_limit_secs) }
            }
        };
        Some(SessionPlan { end_at, how, reason })
    }
}

/// Unix seconds as an RFC 3339 UTC time (`2026-12-02T06:00:00Z`).
#[derive(Debug, Clone, Copy)]
pub struct UtcTime(pub u64);

impl fmt::Display for UtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.0 / 86_400;
        let rem = self.0 % 86_400;
        let (y, m, d) = civil_from_days(days);
        write!(f, "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so a leap day is the last day of its year.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGIN: u64 = 1_000_000;

    #[test]
    fn off_keeps_the_session_whatever_the_token_says() {
        let p = SessionPolicy { mode: SessionMode::Off, ..SessionPolicy::default() };
        assert_eq!(p.plan(LOGIN, Some(LOGIN + 5)), None);
    }

    #[test]
    fn idle_ends_at_the_next_idle_point_after_expiry_plus_grace() {
        let p = SessionPolicy { grace_secs: 30, idle_hard_limit_secs: 600, ..SessionPolicy::default() };
        assert_eq!(
            p.plan(LOGIN, Some(LOGIN + 5)),
            Some(SessionPlan {
                end_at: LOGIN + 35,
                how: EndHow::AtIdle { hard_at: LOGIN + 635 },
                reason: EndReason::TokenExpired { exp: LOGIN + 5 },
            })
        );
    }

    #[test]
    fn strict_ends_at_expiry() {
        let p = SessionPolicy { mode: SessionMode::Strict, ..SessionPolicy::default() };
        let plan = p.plan(LOGIN, Some(LOGIN + 5)).unwrap();
        assert_eq!((plan.end_at, plan.how), (LOGIN + 5, EndHow::Now));
    }

    #[test]
    fn the_earlier_of_expiry_and_maximum_age_wins() {
        let p = SessionPolicy { max_session_age_secs: Some(60), ..SessionPolicy::default() };
        let by_age = p.plan(LOGIN, Some(LOGIN + 3600)).unwrap();
        assert_eq!((by_age.end_at, by_age.reason), (LOGIN + 60, EndReason::MaxAge { limit_secs: 60 }));
        let by_token = p.plan(LOGIN, Some(LOGIN + 10)).unwrap();
        assert_eq!(by_token.reason, EndReason::TokenExpired { exp: LOGIN + 10 });
    }

    #[test]
    fn maximum_age_holds_with_the_policy_off_and_without_an_exp() {
        let p = SessionPolicy {
            mode: SessionMode::Off,
            max_session_age_secs: Some(60),
            ..SessionPolicy::default()
        };
        let plan = p.plan(LOGIN, Some(LOGIN + 5)).unwrap();
        assert_eq!(plan.reason, EndReason::MaxAge { limit_secs: 60 });
        assert_eq!(SessionPolicy::default().plan(LOGIN, None), None);
        let strict = SessionPolicy { mode: SessionMode::Strict, max_session_age_secs: Some(9), ..p };
        assert_eq!(strict.plan(LOGIN, None).unwrap().how, EndHow::Now);
    }

    #[test]
    fn a_huge_exp_does_not_overflow() {
        let p = SessionPolicy { grace_secs: u64::MAX, ..SessionPolicy::default() };
        let plan = p.plan(LOGIN, Some(u64::MAX - 1)).unwrap();
        assert_eq!((plan.end_at, plan.how), (u64::MAX, EndHow::AtIdle { hard_at: u64::MAX }));
    }

    #[test]
    fn modes_parse_by_name_only() {
        assert_eq!(SessionMode::parse(" Strict "), Some(SessionMode::Strict));
        assert_eq!(SessionMode::parse("on"), None);
        assert_eq!(SessionMode::Idle.name(), "idle");
    }

    #[test]
    fn the_client_reads_when_its_token_expired() {
        // 2026-12-02T06:00:00Z
        let msg = EndReason::TokenExpired { exp: 1_796_191_200 }.client_message();
        assert_eq!(msg, "gprxy: the access token expired at 2026-12-02T06:00:00Z; log in again");
        assert_eq!(UtcTime(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(UtcTime(951_782_400).to_string(), "2000-02-29T00:00:00Z");
        assert_eq!(UtcTime(4_107_542_399).to_string(), "2100-02-28T23:59:59Z");
    }
}
