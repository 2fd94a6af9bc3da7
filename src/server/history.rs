//! History on the loop's side: asking the persistence thread for stored messages (on join and
//! for `/history`), placing each answer in the client's output, and giving up on answers that
//! take too long.
//!
//! The loop never waits for a query. A request goes into the persistence queue behind the
//! messages already accepted (see `persist::history` for why that makes history exact), and the
//! answer comes back through the inbox. Meanwhile the client's later output is held behind the
//! request (`Connection::wait_for_history`), so the history arrives as one block where it was
//! asked for, and live lines follow it. An answer that does not come within the deadline is
//! given up on (the client is told, and its held output flows); a late one finds no request
//! waiting and is dropped, as is one for a client that has left.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::room::Room;
use crate::persist::{ClientRef, HistoryReply, HistoryRequest, Persister, StoredLine};
use crate::protocol;

/// Messages `/history` shows without a count.
pub const DEFAULT_COUNT: usize = 20;

/// How many `--mongo-timeout-ms` an answer may take: one for a batch that may be ahead of the
/// request in the queue and one for the query, each failing within one when the database is
/// unreachable. A database that connects but does not answer is given up on then, well inside
/// the 3 × that the issue allows, because a joiner's live chat waits behind its history.
pub const DEADLINE_TIMEOUTS: u32 = 2;

/// Why an answer was given up on.
const TOO_SLOW: &str = "database not responding";

/// History settings and the requests in flight.
#[derive(Debug)]
pub struct History {
    /// Messages sent on join (`--history-on-join`); zero sends none.
    on_join: usize,
    /// Most messages one request may get (`--history-max`).
    max: usize,
    /// How long an answer may take before it is given up on.
    wait_at_most: Duration,
    next_ticket: u64,
    /// Deadlines of requests, in the order they were made (all are the same length after their
    /// request, so the earliest is always at the front); answered ones are dropped when due.
    deadlines: VecDeque<(Instant, ClientRef, u64)>,
}

/// What a request is for: join history is skipped when there is none; `/history` always ends
/// with its end line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Join,
    Command,
}

impl History {
    pub fn new(on_join: usize, max: usize, mongo_timeout: Duration) -> History {
        History {
            on_join,
            max,
            wait_at_most: mongo_timeout * DEADLINE_TIMEOUTS,
            next_ticket: 0,
            deadlines: VecDeque::new(),
        }
    }

    /// Asks for a joining client's history, if history on join is on.
    pub fn on_join(
        &mut self,
        room: &mut Room,
        persister: Option<&Persister>,
        slot: usize,
        now: Instant,
    ) {
        if self.on_join == 0 {
            return;
        }
        if let Some(persister) = persister {
            self.request(room, persister, slot, self.on_join, Purpose::Join, now);
        }
    }

    /// `/history [N]`: asks for the last N (default 20, at most `--history-max`).
    pub fn command(
        &mut self,
        room: &mut Room,
        persister: Option<&Persister>,
        slot: usize,
        count: Option<usize>,
        now: Instant,
    ) {
        let Some(persister) = persister else {
            return room.error(
                slot,
                &protocol::history_unavailable(protocol::PERSISTENCE_OFF),
            );
        };
        let count = count.unwrap_or(DEFAULT_COUNT).min(self.max);
        self.request(room, persister, slot, count, Purpose::Command, now);
    }

    fn request(
        &mut self,
        room: &mut Room,
        persister: &Persister,
        slot: usize,
        count: usize,
        purpose: Purpose,
        now: Instant,
    ) {
        let Some(client) = room.client_ref(slot) else {
            return;
        };
        // Odd tickets are joins, even ones commands: the answer needs no other lookup.
        self.next_ticket += 1;
        let ticket = self.next_ticket * 2 + u64::from(purpose == Purpose::Join);
        let request = HistoryRequest {
            client,
            ticket,
            count,
        };
        match persister.request_history(request) {
            Ok(()) => {
                if let Some(conn) = room.get_mut(slot) {
                    // A joiner's live chat waits for its history (it must come first); the
                    // answer to `/history` joins the output whenever it comes.
                    conn.wait_for_history(ticket, purpose == Purpose::Join);
                }
                self.deadlines
                    .push_back((now + self.wait_at_most, client, ticket));
            }
            Err(reason) => room.error(slot, &protocol::history_unavailable(reason)),
        }
    }

    /// Places an answer in the output of each client it is for that still waits for it. The
    /// lines are encoded once per count asked for, not once per client (a reconnect storm's
    /// joiners share an answer).
    pub fn answer(&mut self, room: &mut Room, reply: HistoryReply) {
        let max_bytes = room.limits().max_output / 2;
        let mut encoded: Vec<((usize, Purpose), Vec<u8>)> = Vec::new();
        for request in &reply.requests {
            let key = (request.count, purpose_of(request.ticket));
            let index = match encoded.iter().position(|(done, _)| *done == key) {
                Some(index) => index,
                None => {
                    let lines = match &reply.lines {
                        Ok(lines) => Ok(HistoryReply::lines_for(lines, request.count)),
                        Err(reason) => Err(reason.as_str()),
                    };
                    encoded.push((key, encode(lines, key.1, max_bytes)));
                    encoded.len() - 1
                }
            };
            room.history_arrived(request.client, request.ticket, &encoded[index].1);
        }
        // Their deadlines stay queued: when due, they find nothing waiting and do nothing
        // (cheaper than searching the queue for each answer during a reconnect storm).
    }

    /// Gives up on answers whose deadline has passed: the client is told, and its held output
    /// flows again.
    pub fn expire_due(&mut self, room: &mut Room, now: Instant) {
        while let Some(&(at, client, ticket)) = self.deadlines.front() {
            if at > now {
                return;
            }
            self.deadlines.pop_front();
            let encoded = encode(Err(TOO_SLOW), purpose_of(ticket), usize::MAX);
            room.history_arrived(client, ticket, &encoded);
        }
    }

    /// Gives up on every answer at once (the server is stopping): held output flows.
    pub fn give_up_all(&mut self, room: &mut Room, reason: &str) {
        for (_, client, ticket) in std::mem::take(&mut self.deadlines) {
            let encoded = encode(Err(reason), purpose_of(ticket), usize::MAX);
            room.history_arrived(client, ticket, &encoded);
        }
    }

    /// When the earliest deadline is due (its request may have been answered meanwhile).
    pub fn next_due(&self) -> Option<Instant> {
        self.deadlines.front().map(|(at, _, _)| *at)
    }
}

fn purpose_of(ticket: u64) -> Purpose {
    if ticket % 2 == 1 {
        Purpose::Join
    } else {
        Purpose::Command
    }
}

/// The lines of an answer: one notice per message, oldest first, then the end line (none at
/// all for a join with no history), or the error. An answer is at most `max_bytes` (half of
/// `--max-output`, so a reader is never cut off for what it asked for): the oldest lines that
/// do not fit are left out, and the end line counts what was sent.
fn encode(lines: Result<&[StoredLine], &str>, purpose: Purpose, max_bytes: usize) -> Vec<u8> {
    let lines = match lines {
        Ok([]) if purpose == Purpose::Join => return Vec::new(),
        Ok(lines) => lines,
        Err(reason) => {
            let mut out = Vec::new();
            protocol::write_error(&mut out, &protocol::history_unavailable(reason));
            return out;
        }
    };
    // Newest first, so the lines left out for size are the oldest.
    let mut encoded: Vec<Vec<u8>> = Vec::new();
    let mut total = protocol::end_of_history(lines.len()).len() + 4;
    for line in lines.iter().rev() {
        // Stored text is shown to terminals again: whatever wrote it, clean it again.
        let nick = protocol::sanitize(line.nick.as_bytes());
        let text = protocol::sanitize(line.text.as_bytes());
        let mut one = Vec::new();
        let shown = protocol::history_line(line.at_millis, &nick, &text, line.action);
        protocol::write_notice(&mut one, &shown);
        total += one.len();
        if total > max_bytes {
            break;
        }
        encoded.push(one);
    }
    let mut out = Vec::with_capacity(total);
    for one in encoded.iter().rev() {
        out.extend_from_slice(one);
    }
    protocol::write_notice(&mut out, &protocol::end_of_history(encoded.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(at_millis: i64, nick: &str, text: &str, action: bool) -> StoredLine {
        StoredLine {
            at_millis,
            nick: nick.to_string(),
            text: text.to_string(),
            action,
        }
    }

    #[test]
    fn answers_are_notices_with_an_end_line() {
        let lines = [
            stored(1_764_000_000_000, "alice", "hi", false),
            stored(1_764_000_001_500, "bob", "waves", true),
        ];
        let text = String::from_utf8(encode(Ok(&lines), Purpose::Join, usize::MAX)).unwrap();
        assert_eq!(
            text,
            "* [2025-11-24T16:00:00Z] <alice> hi\r\n\
             * [2025-11-24T16:00:01Z] * bob waves\r\n\
             * end of history (2 messages)\r\n"
        );
    }

    #[test]
    fn no_history_is_silent_on_join_and_said_for_the_command() {
        assert!(encode(Ok(&[]), Purpose::Join, usize::MAX).is_empty());
        assert_eq!(
            encode(Ok(&[]), Purpose::Command, usize::MAX),
            b"* end of history (0 messages)\r\n"
        );
        assert_eq!(
            encode(Err("database unreachable"), Purpose::Join, usize::MAX),
            b"! history unavailable: database unreachable\r\n"
        );
    }

    #[test]
    fn an_answer_too_big_for_the_output_limit_keeps_its_newest_lines() {
        let lines: Vec<StoredLine> = (0..10)
            .map(|n| stored(0, "a", &format!("{n}{}", "x".repeat(99)), false))
            .collect();
        let whole = encode(Ok(&lines), Purpose::Command, usize::MAX);
        let cut = encode(Ok(&lines), Purpose::Command, whole.len() / 2);
        assert!(cut.len() <= whole.len() / 2);
        let text = String::from_utf8(cut).unwrap();
        let shown: Vec<&str> = text.lines().collect();
        assert_eq!(
            shown.last(),
            Some(&format!("* end of history ({} messages)", shown.len() - 1).as_str())
        );
        assert!(
            shown[shown.len() - 2].contains("> 9x"),
            "the newest is kept: {text}"
        );
        assert!(shown.len() > 2 && shown.len() < 11, "{text}");
    }

    #[test]
    fn stored_text_is_cleaned_again() {
        let lines = [stored(0, "x\u{1b}[2J", "a\u{1b}]0;t\u{7}b", false)];
        let text = String::from_utf8(encode(Ok(&lines), Purpose::Command, usize::MAX)).unwrap();
        assert!(
            text.starts_with("* [1970-01-01T00:00:00Z] <x> ab\r\n"),
            "{text:?}"
        );
    }
}
