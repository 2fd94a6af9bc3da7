//! What the database holds, and what became of each message sent: stored once, stored more
//! than once, reported unsaved to its sender, or neither.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bson::doc;

use crate::common::TestDb;
use crate::totals::{message_text, RunTotals};
use crate::PROBE_TEXT;

/// Stored documents per `content`: how many, and whether each had the nick its content names.
pub struct StoredContent {
    count: u32,
    nick_mismatch: bool,
}

/// Every document of the collection, by content. Read once the server has exited (see
/// `server::stop_server`): it has then stored or reported every message it accepted and sends
/// the database nothing more, so the collection no longer changes and no wait is needed here.
pub fn stored_contents(db: &TestDb) -> HashMap<String, StoredContent> {
    let collection = db.messages();
    let mut stored: HashMap<String, StoredContent> = HashMap::new();
    let cursor = collection
        .find(doc! {})
        .projection(doc! { "_id": 0, "content": 1, "nick": 1 })
        .run()
        .expect("query stored messages");
    for document in cursor {
        let document = document.expect("read a stored message");
        let content = document
            .get_str("content")
            .unwrap_or("<no content>")
            .to_string();
        let nick = document.get_str("nick").unwrap_or("<no nick>");
        let nick_ok =
            content == PROBE_TEXT && nick == "probe" || content.split(' ').next() == Some(nick);
        let entry = stored.entry(content).or_insert(StoredContent {
            count: 0,
            nick_mismatch: false,
        });
        entry.count += 1;
        entry.nick_mismatch |= !nick_ok;
    }
    stored
}

#[derive(Default)]
pub struct Outcome {
    pub stored_once: u64,
    pub stored_twice: u64,
    pub reported: u64,
    pub reported_and_stored: u64,
    pub reported_and_stored_reasons: BTreeMap<String, u64>,
    /// Neither stored nor reported though the sender stayed long enough to hear.
    pub lost: u64,
    /// Of those, sent in the last 0.5 s before the database was killed.
    pub lost_before_kill: u64,
    /// Neither stored nor reported, and the sender's connection was cut off early.
    pub sender_left: u64,
    /// Stored documents that match no message sent (or carry the wrong nick).
    pub unexpected_documents: u64,
    pub samples: Vec<String>,
}

impl Outcome {
    fn sample(&mut self, text: String) {
        if self.samples.len() < 20 {
            self.samples.push(text);
        }
    }
}

/// Classifies every message sent: stored once, stored more than once, reported unsaved, or
/// neither.
pub fn account(
    run: &RunTotals,
    stored: &HashMap<String, StoredContent>,
    killed_at: Duration,
) -> Outcome {
    let kill = killed_at.as_secs_f32();
    let mut outcome = Outcome::default();
    let mut matched = 0u64;
    for session in &run.session_logs {
        for seq in 1..=session.sent {
            let content = message_text(&session.nick, seq);
            let at = session.sent_at[seq as usize - 1];
            let copies = stored.get(&content).map_or(0, |s| s.count);
            let report = session.reported.get(&seq);
            if copies > 0 {
                matched += 1;
            }
            if let Some(reason) = report {
                outcome.reported += 1;
                if copies > 0 {
                    outcome.reported_and_stored += 1;
                    *outcome
                        .reported_and_stored_reasons
                        .entry(reason.clone())
                        .or_default() += 1;
                }
            }
            match (copies, report) {
                (0, Some(_)) => {}
                (0, None) if session.cut_off => {
                    outcome.sender_left += 1;
                    outcome.sample(format!(
                        "{content:?} (sent at {at:.2} s): unknown fate, sender cut off"
                    ));
                }
                (0, None) => {
                    outcome.lost += 1;
                    if (kill - 0.5..=kill).contains(&at) {
                        outcome.lost_before_kill += 1;
                    }
                    outcome.sample(format!(
                        "{content:?} (sent at {at:.2} s): neither stored nor reported"
                    ));
                }
                (1, _) => outcome.stored_once += 1,
                (n, _) => {
                    outcome.stored_twice += 1;
                    outcome.sample(format!("{content:?} (sent at {at:.2} s): stored {n} times"));
                }
            }
        }
    }
    let probe_ok = stored.get(PROBE_TEXT).is_some_and(|s| s.count == 1);
    let documents: u64 = stored.values().map(|s| u64::from(s.count.min(1))).sum();
    outcome.unexpected_documents = documents - matched - u64::from(probe_ok);
    for (content, entry) in stored {
        if entry.nick_mismatch {
            outcome.unexpected_documents += 1;
            outcome.sample(format!("{content:?}: stored with another nick"));
        }
    }
    outcome
}
