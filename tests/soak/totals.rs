//! What the client threads saw and sent: per session for the final accounting, and counted
//! over the whole run for the summary.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// What one session did, for the final accounting.
pub struct SessionLog {
    pub nick: String,
    /// Messages sent, numbered 1..=sent.
    pub sent: u64,
    /// When each was sent, in seconds since the start of the run.
    pub sent_at: Vec<f32>,
    /// Messages reported `not saved` to this session, by number, with the reason.
    pub reported: HashMap<u64, String>,
    /// The connection ended before the session meant to leave.
    pub cut_off: bool,
}

/// What a client thread hands back.
#[derive(Default)]
pub struct RunTotals {
    pub session_logs: Vec<SessionLog>,
    pub sessions: u64,
    pub quit: u64,
    pub dropped: u64,
    pub cut_off: u64,
    pub sent: u64,
    pub deliveries: u64,
    pub order_violations: u64,
    pub stale_generation: u64,
    pub own_echo: u64,
    pub report_reasons: BTreeMap<String, u64>,
    pub first_report: Option<Duration>,
    pub last_report: Option<Duration>,
    /// Failures by kind: count and a first example.
    pub anomalies: BTreeMap<String, (u64, String)>,
    /// Notices the test does not know, by their first word (not failures).
    pub other_notices: BTreeMap<String, u64>,
}

impl RunTotals {
    pub fn add(&mut self, other: RunTotals) {
        self.session_logs.extend(other.session_logs);
        self.sessions += other.sessions;
        self.quit += other.quit;
        self.dropped += other.dropped;
        self.cut_off += other.cut_off;
        self.sent += other.sent;
        self.deliveries += other.deliveries;
        self.order_violations += other.order_violations;
        self.stale_generation += other.stale_generation;
        self.own_echo += other.own_echo;
        for (reason, count) in other.report_reasons {
            *self.report_reasons.entry(reason).or_default() += count;
        }
        self.first_report = min_opt(self.first_report, other.first_report);
        self.last_report = self.last_report.max(other.last_report);
        for (kind, (count, sample)) in other.anomalies {
            self.anomalies.entry(kind).or_insert((0, sample)).0 += count;
        }
        for (word, count) in other.other_notices {
            *self.other_notices.entry(word).or_default() += count;
        }
    }

    pub fn anomaly(&mut self, kind: &str, sample: String) {
        self.anomalies
            .entry(kind.to_string())
            .or_insert((0, sample))
            .0 += 1;
    }
}

pub fn min_opt(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

pub fn message_text(nick: &str, seq: u64) -> String {
    format!("{nick} {seq}")
}
