//! Reading stored messages back: what the loop asks for, what it gets, and where each query's
//! index range starts.
//!
//! History is served by the persistence thread, between batches, in queue order: a request is
//! answered only after every message queued before it has been inserted (or reported unsaved),
//! and before any message queued after it. A client's request is queued when it joins, so its
//! history ends exactly where its live stream begins: nothing missed, nothing twice, even for a
//! message accepted a moment before the join whose insert had not finished. (A reader thread of
//! its own would need the loop to fill the gap from lines it keeps; this way needs no copy of
//! the chat anywhere but MongoDB.)
//!
//! Requests that follow each other in the queue with no message between them ask the same
//! question, so one query answers them all (a reconnect storm is then a few queries, not one
//! per client).

use std::collections::VecDeque;
use std::sync::Arc;

use bson::raw::RawDocument;

use super::ClientRef;

/// One client's request for the last `count` stored messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryRequest {
    pub client: ClientRef,
    /// Chosen by the loop, to match the answer to the request it is waiting for.
    pub ticket: u64,
    pub count: usize,
}

/// A stored message, as history shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredLine {
    /// The `timestamp` field, in milliseconds since the epoch.
    pub at_millis: i64,
    pub nick: String,
    pub text: String,
    /// Stored with `kind: "action"` (sent with `/me`).
    pub action: bool,
}

/// The value of `kind` for a `/me` action; plain messages have no `kind`.
pub const ACTION_KIND: &str = "action";

impl StoredLine {
    /// Reads the fields history needs; `None` for a document that lacks them (not one of ours).
    pub fn from_document(document: &RawDocument) -> Option<StoredLine> {
        Some(StoredLine {
            at_millis: document.get_datetime("timestamp").ok()?.timestamp_millis(),
            nick: document.get_str("nick").ok()?.to_string(),
            text: document.get_str("content").ok()?.to_string(),
            action: document.get_str("kind").ok() == Some(ACTION_KIND),
        })
    }
}

/// The answer to requests served by one query.
#[derive(Debug)]
pub struct HistoryReply {
    pub requests: Vec<HistoryRequest>,
    /// Oldest first, as many as the largest request asked for; or why they could not be read.
    pub lines: Result<Arc<[StoredLine]>, String>,
}

impl HistoryReply {
    /// The lines for one request: the newest `count` of them, oldest first.
    pub fn lines_for(lines: &[StoredLine], count: usize) -> &[StoredLine] {
        &lines[lines.len().saturating_sub(count)..]
    }
}

/// How far back a query looks when nothing tells it where the last N messages begin: a short
/// window first, then longer ones, and the whole collection last. A range on the `timestamp`
/// index reads only the documents in it, while "sort everything, keep N" may read them all (the
/// test database does): these probes keep a query for 20 lines from reading a million.
const PROBE_WINDOWS_MILLIS: [i64; 4] = [
    60 * 1000,                // a minute
    60 * 60 * 1000,           // an hour
    24 * 60 * 60 * 1000,      // a day
    30 * 24 * 60 * 60 * 1000, // a month
];

/// Timestamps of the newest stored messages the persistence thread knows of, oldest first: the
/// ones it stored itself and the ones its queries returned. The N-th newest is where a query for
/// the last N can start its index range. Other writers (a second server, someone's script) only
/// add messages after it, so the range still holds the N newest, just more than N.
#[derive(Debug)]
pub struct Newest {
    timestamps: VecDeque<i64>,
    keep: usize,
}

impl Newest {
    /// Remembers up to `keep` timestamps (the most any request has asked for).
    pub fn new(keep: usize) -> Newest {
        Newest {
            timestamps: VecDeque::new(),
            keep,
        }
    }

    /// Keeps at least `count` timestamps from now on (the largest request seen so far).
    pub fn keep_at_least(&mut self, count: usize) {
        self.keep = self.keep.max(count);
    }

    /// A message known to be stored.
    pub fn note(&mut self, at_millis: i64) {
        // Messages arrive in order, so this is nearly always a push at the back; an older one
        // (a clock step back, a query's result) goes to its place.
        let place = self.timestamps.partition_point(|&known| known <= at_millis);
        if place == 0 && self.timestamps.len() >= self.keep {
            return; // older than everything kept
        }
        self.timestamps.insert(place, at_millis);
        if self.timestamps.len() > self.keep {
            self.timestamps.pop_front();
        }
    }

    /// What a query found: the newest stored messages at the time, oldest first. They include
    /// every message this thread stored before (a query runs after the inserts queued before
    /// it), so they replace what is known, unless fewer are known than before.
    pub fn note_found(&mut self, lines: &[StoredLine]) {
        if lines.len() >= self.timestamps.len() {
            let skip = lines.len().saturating_sub(self.keep);
            self.timestamps = lines[skip..].iter().map(|line| line.at_millis).collect();
        }
    }

    /// Where to look for the last `count` messages, in the order to try: from the count-th
    /// newest known timestamp if there are that many, then windows back from `now`, then
    /// everything (`None`). The first range that holds `count` messages answers.
    pub fn plan(&self, count: usize, now_millis: i64) -> Vec<Option<i64>> {
        let mut plan = Vec::with_capacity(PROBE_WINDOWS_MILLIS.len() + 2);
        if let Some(&bound) = self
            .timestamps
            .len()
            .checked_sub(count)
            .and_then(|index| self.timestamps.get(index))
        {
            plan.push(Some(bound));
        }
        for window in PROBE_WINDOWS_MILLIS {
            let since = now_millis.saturating_sub(window);
            // Only a range wider than the one before can find more.
            if plan.last().is_none_or(|&last| Some(since) < last) {
                plan.push(Some(since));
            }
        }
        plan.push(None);
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(at_millis: i64) -> StoredLine {
        StoredLine {
            at_millis,
            nick: "a".to_string(),
            text: "t".to_string(),
            action: false,
        }
    }

    #[test]
    fn each_request_gets_the_newest_of_a_shared_answer() {
        let lines: Vec<StoredLine> = (1..=5).map(line).collect();
        let times = |count| {
            HistoryReply::lines_for(&lines, count)
                .iter()
                .map(|line| line.at_millis)
                .collect::<Vec<_>>()
        };
        assert_eq!(times(2), [4, 5]);
        assert_eq!(times(20), [1, 2, 3, 4, 5]);
        assert_eq!(times(0), Vec::<i64>::new());
    }

    #[test]
    fn a_known_bound_comes_first_then_wider_windows_then_everything() {
        let now = 10_000_000_000;
        let mut newest = Newest::new(3);
        assert_eq!(
            newest.plan(2, now),
            [
                Some(now - 60_000),
                Some(now - 3_600_000),
                Some(now - 86_400_000),
                Some(now - 2_592_000_000),
                None
            ]
        );
        for at in [now - 30, now - 20, now - 10, now - 5] {
            newest.note(at);
        }
        assert_eq!(newest.plan(2, now)[0], Some(now - 10), "the 2nd newest");
        assert_eq!(newest.plan(3, now)[0], Some(now - 20), "only 3 are kept");
        assert_eq!(newest.plan(4, now)[0], Some(now - 60_000), "not known");
    }

    #[test]
    fn windows_narrower_than_the_known_bound_are_skipped() {
        let now = 10_000_000_000;
        let mut newest = Newest::new(5);
        newest.note(now - 7_200_000); // two hours ago
        let plan = newest.plan(1, now);
        assert_eq!(
            plan,
            [
                Some(now - 7_200_000),
                Some(now - 86_400_000),
                Some(now - 2_592_000_000),
                None
            ]
        );
    }

    #[test]
    fn out_of_order_and_found_timestamps_keep_the_newest() {
        let mut newest = Newest::new(3);
        newest.note(10);
        newest.note(30);
        newest.note(20); // a clock step back
        newest.note(5); // older than all three kept: ignored
        assert_eq!(newest.timestamps, [10, 20, 30]);
        newest.note_found(&[line(25), line(40)]);
        assert_eq!(newest.timestamps, [10, 20, 30], "fewer than known: kept");
        newest.note_found(&[line(1), line(25), line(35), line(40)]);
        assert_eq!(
            newest.timestamps,
            [25, 35, 40],
            "the newest found replace them"
        );
    }
}
