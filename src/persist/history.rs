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

/// A range of `timestamp` to read, `[since, until)`; `None` leaves that side open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    pub since: Option<i64>,
    pub until: Option<i64>,
}

/// How far back a query looks when nothing tells it where the last N messages begin: a second,
/// then windows four times longer each, further back, until a century, then the rest. Each
/// window is read on the `timestamp` index and only its own documents are read: "sort
/// everything, keep N" may read the whole collection (the test database does: 5 s for 200 000
/// documents), and so may a wide range (it sorts the whole range). Empty windows cost a
/// millisecond or two each; a window holding many documents is the cost that remains.
const FIRST_WINDOW_MILLIS: i64 = 1000;
const WINDOW_GROWTH: i64 = 4;
const LAST_WINDOW_MILLIS: i64 = 100 * 365 * 24 * 60 * 60 * 1000;

/// Timestamps of the newest stored messages the persistence thread knows of, oldest first: the
/// ones it stored itself and the ones its queries returned. The N-th newest is where a query for
/// the last N can start its index range. Other writers (a second server, someone's script) only
/// add messages after it, so the range still holds the N newest, just more than N.
#[derive(Debug)]
pub struct Newest {
    timestamps: VecDeque<i64>,
    keep: usize,
    /// A query read the collection to its end: `timestamps` holds every message stored (as far
    /// as this thread knows), so a request for more than that reads the (small) collection.
    all_known: bool,
}

impl Newest {
    /// Remembers up to `keep` timestamps (the most any request has asked for).
    pub fn new(keep: usize) -> Newest {
        Newest {
            timestamps: VecDeque::new(),
            keep,
            all_known: false,
        }
    }

    /// Keeps at least `count` timestamps from now on (the largest request seen so far).
    pub fn keep_at_least(&mut self, count: usize) {
        self.keep = self.keep.max(count);
    }

    /// A message known to be stored.
    pub fn note(&mut self, at_millis: i64) {
        // Messages arrive in order, so this is nearly always a push at the back; an older one
        // (a clock step back) goes to its place.
        let place = self.timestamps.partition_point(|&known| known <= at_millis);
        if place == 0 && self.timestamps.len() >= self.keep {
            return; // older than everything kept
        }
        self.timestamps.insert(place, at_millis);
        if self.timestamps.len() > self.keep {
            self.timestamps.pop_front();
            self.all_known = false;
        }
    }

    /// What a query for `count` found: the newest stored messages at the time, oldest first.
    /// They include every message this thread stored before (a query runs after the inserts
    /// queued before it), so they replace what is known, unless fewer are known than before.
    /// Fewer than `count` means the query read the collection to its end.
    pub fn note_found(&mut self, lines: &[StoredLine], count: usize) {
        if lines.len() >= self.timestamps.len() {
            let skip = lines.len().saturating_sub(self.keep);
            self.timestamps = lines[skip..].iter().map(|line| line.at_millis).collect();
            self.all_known = lines.len() < count;
        }
    }

    /// Where to look for the last `count` messages: ranges of `timestamp` to read newest first
    /// until `count` are found. From the count-th newest known timestamp if there are that many,
    /// else from `now`: that range, then windows further back, then everything older.
    pub fn plan(&self, count: usize, now_millis: i64) -> Vec<Slice> {
        let whole = Slice {
            since: None,
            until: None,
        };
        let known_bound = self
            .timestamps
            .len()
            .checked_sub(count)
            .and_then(|index| self.timestamps.get(index).copied());
        if known_bound.is_none() && self.all_known {
            return vec![whole];
        }
        let from = known_bound.unwrap_or(now_millis);
        let mut plan = Vec::new();
        let mut until = None;
        if known_bound.is_some() {
            plan.push(Slice {
                since: Some(from),
                until: None,
            });
            until = Some(from);
        }
        let mut window = FIRST_WINDOW_MILLIS;
        loop {
            let since = from.saturating_sub(window);
            plan.push(Slice {
                since: Some(since),
                until,
            });
            until = Some(since);
            if window >= LAST_WINDOW_MILLIS {
                break;
            }
            window = window.saturating_mul(WINDOW_GROWTH);
        }
        plan.push(Slice { since: None, until });
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

    fn since(plan: &[Slice]) -> Vec<Option<i64>> {
        plan.iter().map(|slice| slice.since).collect()
    }

    #[test]
    fn without_a_bound_windows_reach_back_from_now_without_overlapping() {
        let now = 10_000_000_000;
        let plan = Newest::new(3).plan(2, now);
        assert_eq!(
            plan[..3],
            [
                Slice {
                    since: Some(now - 1000),
                    until: None
                },
                Slice {
                    since: Some(now - 4000),
                    until: Some(now - 1000)
                },
                Slice {
                    since: Some(now - 16_000),
                    until: Some(now - 4000)
                },
            ]
        );
        for pair in plan.windows(2) {
            assert_eq!(pair[1].until, pair[0].since, "adjacent, not overlapping");
        }
        let last = plan.last().unwrap();
        assert_eq!(last.since, None, "everything older comes last");
        assert!(plan.len() < 25, "{} slices", plan.len());
    }

    #[test]
    fn a_known_bound_comes_first() {
        let now = 10_000_000_000;
        let mut newest = Newest::new(3);
        for at in [now - 30, now - 20, now - 10, now - 5] {
            newest.note(at);
        }
        let plan = newest.plan(2, now);
        assert_eq!(
            plan[0],
            Slice {
                since: Some(now - 10),
                until: None
            },
            "the 2nd newest"
        );
        assert_eq!(plan[1].until, Some(now - 10), "then further back from it");
        assert_eq!(
            since(&newest.plan(3, now))[0],
            Some(now - 20),
            "only 3 kept"
        );
        assert_eq!(
            since(&newest.plan(4, now))[0],
            Some(now - 1000),
            "not known"
        );
    }

    #[test]
    fn a_collection_read_to_its_end_is_read_whole_while_it_is_small() {
        let mut newest = Newest::new(0);
        newest.keep_at_least(20);
        newest.note_found(&[line(1), line(2)], 20);
        let whole = Slice {
            since: None,
            until: None,
        };
        assert_eq!(newest.plan(20, 100), [whole]);
        assert_eq!(
            since(&newest.plan(2, 100))[0],
            Some(1),
            "as many as known: a bound"
        );
        for at in 3..30 {
            newest.note(at);
        }
        assert_ne!(
            newest.plan(20, 100),
            [whole],
            "no longer all known once some were let go"
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
        newest.note_found(&[line(25), line(40)], 2);
        assert_eq!(newest.timestamps, [10, 20, 30], "fewer than known: kept");
        newest.note_found(&[line(1), line(25), line(35), line(40)], 4);
        assert_eq!(
            newest.timestamps,
            [25, 35, 40],
            "the newest found replace them"
        );
    }
}
