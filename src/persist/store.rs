//! The database side of persistence: the driver client, the `(timestamp, _id)` index, inserting
//! a batch, reading the newest messages back, and turning driver errors into which messages
//! failed and a short reason.
//!
//! It uses the driver's async API on a runtime of the worker thread's own (see `watchdog`):
//! the sync API runs every call on the driver's shared multi-threaded runtime, which cost
//! several thread wake-ups per batch, more CPU than the batch's own work.

use bson::{doc, RawDocumentBuf};
use mongodb::error::{Error as DbError, ErrorKind, WriteFailure};
use mongodb::options::{Acknowledgment, ClientOptions, WriteConcern};
use mongodb::{Client, Collection, IndexModel};

use super::history::{Slice, StoredLine};
use crate::config::StoreConfig;
use crate::{info, warn};

/// Added to the reason when a batch may have been stored although no reply said so.
pub const MAY_STILL_BE_SAVED: &str = "; it may still be saved";

/// Why a call failed when no server could be selected, or the connection broke.
pub(super) const UNREACHABLE: &str = "database unreachable";
pub(super) const CONNECTION_LOST: &str = "database connection lost";

/// MongoDB's duplicate key error: the document with this `_id` is already stored.
pub const DUPLICATE_KEY: i32 = 11000;

/// The database side of persistence: a lazily created driver client and the `timestamp`
/// index. Its calls wait for as long as the driver does; the persistence thread runs them
/// behind a watchdog. Public so tests and benches can drive it directly (inside a Tokio
/// runtime that keeps running while the client lives: the driver's monitors run on it).
pub struct Store {
    config: StoreConfig,
    /// Inserts the documents exactly as encoded when their messages were accepted.
    collection: Option<Collection<RawDocumentBuf>>,
    /// The index exists, or could not be made for a reason retrying will not fix.
    index_settled: bool,
}

impl Store {
    /// A store for `config`; nothing connects until the first call that needs the database.
    pub fn new(config: StoreConfig) -> Self {
        Store {
            config,
            collection: None,
            index_settled: false,
        }
    }

    /// Connects and creates the index, logging one line either way. An unreachable
    /// database is a warning, not an error: saving keeps trying with each batch.
    pub async fn prepare(&mut self) {
        let target = format!(
            "{}.{} at {}",
            self.config.database,
            self.config.collection,
            redact_uri(&self.config.uri)
        );
        match self.settle_index().await {
            Ok(()) => info!("storing messages in {target}"),
            Err(err) => warn!(
                "MongoDB for {target} is not available ({}); chat runs, messages are reported unsaved until it is",
                describe(&err)
            ),
        }
    }

    /// Stores a batch (of `Record`s, or of documents). Returns the index of each document that
    /// could not be stored, with the reason to give its sender.
    pub async fn save(&mut self, documents: &[impl AsRef<RawDocumentBuf>]) -> Vec<(usize, String)> {
        let mut result = self.insert(documents).await;
        let mut sent_before = false;
        if let Err(err) = &result {
            if is_transient(err) {
                // Same `_id`s: anything the first attempt stored comes back as a duplicate.
                sent_before = true;
                result = self.insert(documents).await;
            }
        }
        let mut failures = match &result {
            Ok(()) => Vec::new(),
            Err(err) => failed_indexes(err, documents.len()),
        };
        // The first attempt broke off after the batch was sent, and the retry could not check
        // what it stored: the database may have stored it before the connection went.
        if sent_before && result.is_err_and(|err| !matches!(*err.kind, ErrorKind::InsertMany(_))) {
            for (_, reason) in &mut failures {
                reason.push_str(MAY_STILL_BE_SAVED);
            }
        }
        if failures.is_empty() && !self.index_settled {
            let _ = self.settle_index().await;
        }
        failures
    }

    /// The last `count` stored messages, oldest first: reads the ranges of `plan` (see
    /// `history::Newest::plan`), newest first, until `count` are found. Returns the reason to
    /// show when the database cannot answer.
    pub async fn last_messages(
        &mut self,
        count: usize,
        plan: &[Slice],
    ) -> Result<Vec<StoredLine>, String> {
        let mut found = Vec::new();
        for slice in plan {
            let wanted = count - found.len();
            let mut newest = self
                .newest_in(wanted, *slice)
                .await
                .map_err(|err| describe(&err))?;
            found.append(&mut newest);
            if found.len() >= count {
                break;
            }
        }
        found.reverse();
        Ok(found)
    }

    /// Up to `count` messages of `slice`, newest first, in the `(timestamp, _id)` order of the
    /// index.
    async fn newest_in(&mut self, count: usize, slice: Slice) -> Result<Vec<StoredLine>, DbError> {
        let mut range = doc! {};
        if let Some(since) = slice.since {
            range.insert("$gte", bson::DateTime::from_millis(since));
        }
        if let Some(until) = slice.until {
            range.insert("$lt", bson::DateTime::from_millis(until));
        }
        let filter = match range.is_empty() {
            true => doc! {},
            false => doc! { "timestamp": range },
        };
        let max_time = self.config.timeout;
        let collection = self.collection().await?;
        let mut cursor = collection
            .find(filter)
            .sort(doc! { "timestamp": -1, "_id": -1 })
            .limit(i64::try_from(count).unwrap_or(i64::MAX))
            // All of them in the first reply: one round trip.
            .batch_size(u32::try_from(count).unwrap_or(u32::MAX))
            // The database stops a query that would run long, rather than the watchdog
            // giving up on the connection.
            .max_time(max_time)
            .projection(doc! { "_id": 0, "timestamp": 1, "nick": 1, "content": 1, "kind": 1 })
            .await?;
        let mut lines = Vec::with_capacity(count.min(1024));
        while cursor.advance().await? {
            lines.extend(StoredLine::from_document(cursor.current()));
        }
        Ok(lines)
    }

    async fn insert(&mut self, documents: &[impl AsRef<RawDocumentBuf>]) -> Result<(), DbError> {
        let collection = self.collection().await?;
        collection
            .insert_many(documents.iter().map(AsRef::as_ref))
            .ordered(false)
            .await?;
        Ok(())
    }

    /// The collection, connecting on first use (and again after a failed attempt).
    async fn collection(&mut self) -> Result<&Collection<RawDocumentBuf>, DbError> {
        match &mut self.collection {
            Some(collection) => Ok(collection),
            empty @ None => Ok(empty.insert(connect(&self.config).await?)),
        }
    }

    /// Creates the `(timestamp, _id)` index: history reads the newest messages in that order,
    /// `_id` settling messages stored in the same millisecond. Returns an error only when the database could not be
    /// reached (try again later); any other failure is logged once and not retried.
    async fn settle_index(&mut self) -> Result<(), DbError> {
        let index = IndexModel::builder()
            .keys(doc! { "timestamp": 1, "_id": 1 })
            .build();
        let result = match self.collection().await {
            Ok(collection) => collection.create_index(index).await.map(drop),
            Err(err) => Err(err),
        };
        match result {
            Ok(()) => self.index_settled = true,
            Err(err) if is_connectivity(&err) => return Err(err),
            Err(err) => {
                self.index_settled = true;
                warn!(
                    "could not create the (timestamp, _id) index ({}); messages are still stored",
                    describe(&err)
                );
            }
        }
        Ok(())
    }
}

/// The messages collection on a new driver client.
async fn connect(config: &StoreConfig) -> Result<Collection<RawDocumentBuf>, DbError> {
    Ok(connect_client(config)
        .await?
        .database(&config.database)
        .collection(&config.collection))
}

/// A driver client with peerchat's timeouts and write concern; the cluster threads use it too.
/// Parsing a `mongodb+srv://` URI looks up DNS records, so this runs on a database thread,
/// never on the loop.
pub async fn connect_client(config: &StoreConfig) -> Result<Client, DbError> {
    let mut options = ClientOptions::parse(&config.uri).await?;
    options.server_selection_timeout = Some(config.timeout);
    options.connect_timeout = Some(config.timeout);
    options.app_name = Some("peerchat".to_string());
    options.write_concern = Some(write_concern(options.write_concern.take()));
    Client::with_options(options)
}

/// The write concern messages are stored with, given the one the URI sets (`None` if it sets
/// none): the URI's, plus `j: true` unless it sets `journal` or `w=0`. An acknowledged message
/// must survive a database crash, so an insert returns once it is in the on-disk journal;
/// without this a killed database lost messages it had acknowledged moments before. `w=0` asks
/// for no answer at all, so no journal then. Public so the benches measure with the same rule.
pub fn write_concern(from_uri: Option<WriteConcern>) -> WriteConcern {
    let mut concern = from_uri.unwrap_or_default();
    if concern.w != Some(Acknowledgment::Nodes(0)) {
        concern.journal.get_or_insert(true);
    }
    concern
}

/// The database could not be reached at all (as opposed to refusing the operation).
pub fn is_connectivity(err: &DbError) -> bool {
    matches!(
        *err.kind,
        ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::DnsResolve { .. }
    )
}

/// Errors worth one immediate retry: the connection broke, or the server says so.
fn is_transient(err: &DbError) -> bool {
    matches!(
        *err.kind,
        ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. }
    ) || err.contains_label("RetryableWriteError")
}

/// Which documents of a failed `insert_many` were not stored, and why. With an unordered
/// insert every document was tried and write errors name the failed ones by index; any other
/// error leaves the whole batch unsaved. A duplicate key means the document is already there.
fn failed_indexes(err: &DbError, batch_len: usize) -> Vec<(usize, String)> {
    if let ErrorKind::InsertMany(failure) = &*err.kind {
        let mut failed: Vec<(usize, String)> = failure
            .write_errors
            .iter()
            .flatten()
            .filter(|write| write.code != DUPLICATE_KEY)
            .map(|write| (write.index, format!("database error {}", write.code)))
            .collect();
        if failure.write_concern_error.is_some() {
            let reported: Vec<usize> = failed.iter().map(|(index, _)| *index).collect();
            let duplicates: Vec<usize> = failure
                .write_errors
                .iter()
                .flatten()
                .map(|write| write.index)
                .collect();
            failed.extend(
                (0..batch_len)
                    .filter(|index| !reported.contains(index) && !duplicates.contains(index))
                    .map(|index| (index, "database did not confirm the write".to_string())),
            );
        }
        return failed;
    }
    let reason = describe(err);
    (0..batch_len)
        .map(|index| (index, reason.clone()))
        .collect()
}

/// A short reason for a sender or the log.
pub fn describe(err: &DbError) -> String {
    match &*err.kind {
        ErrorKind::ServerSelection { .. } => UNREACHABLE.to_string(),
        ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. } => CONNECTION_LOST.to_string(),
        ErrorKind::Command(command) => {
            format!("database error {} {}", command.code, command.code_name)
        }
        ErrorKind::Write(WriteFailure::WriteError(write)) => {
            format!("database error {}", write.code)
        }
        ErrorKind::Write(WriteFailure::WriteConcernError(_)) => {
            "database did not confirm the write".to_string()
        }
        ErrorKind::Authentication { .. } => "database authentication failed".to_string(),
        ErrorKind::DnsResolve { .. } => "database address not found (DNS)".to_string(),
        ErrorKind::InvalidArgument { .. } => "invalid database URI".to_string(),
        _ => "database error".to_string(),
    }
}

/// The URI without its password, for logs.
pub fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => uri.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_uri("mongodb+srv://app:s3cret@cluster0.example.net/?retryWrites=true"),
            "mongodb+srv://app:***@cluster0.example.net/?retryWrites=true"
        );
        assert_eq!(
            redact_uri("mongodb://127.0.0.1:27017"),
            "mongodb://127.0.0.1:27017"
        );
    }
}
