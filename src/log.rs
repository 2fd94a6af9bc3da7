//! A small logger: one line per event, with a UTC timestamp and a level, written to stderr by a
//! thread of its own.
//!
//! The event loop must never wait for its log: a stderr pipe that nobody reads (a wedged log
//! shipper, a terminal paused with Ctrl-S) would otherwise freeze the whole chat. So a log call
//! only formats the line and hands it to a bounded queue without waiting; the logger thread
//! writes it. When the queue is full the line is dropped and counted, and the logger reports
//! how many it dropped as soon as it can write again.

use std::fmt;
use std::io::Write;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use time::format_description::FormatItem;
use time::macros::format_description;
use time::OffsetDateTime;

/// UTC, millisecond precision, fixed width: `2026-01-02T03:04:05.678Z`.
const STAMP: &[FormatItem<'_>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// Lines waiting for the logger thread before new ones are dropped: about 100 KB, more than a
/// healthy stderr ever falls behind.
const QUEUE_LINES: usize = 1024;

/// How often the logger thread reports dropped lines when no new line arrives to carry the news.
const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// How serious a log line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// One line per connection and other detail an operator only wants when looking for a problem.
    Debug = 0,
    Info = 1,
    Warn = 2,
    Error = 3,
}

/// Lines below this level are not written.
static MIN_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
/// Lines dropped because the queue was full, not yet reported.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines queued and lines written, so `flush` can tell when the queue has been written.
static QUEUED: AtomicU64 = AtomicU64::new(0);
static WRITTEN: AtomicU64 = AtomicU64::new(0);
static QUEUE: OnceLock<Option<SyncSender<String>>> = OnceLock::new();

/// Writes only lines at `level` or above from now on.
pub fn set_min_level(level: Level) {
    MIN_LEVEL.store(level as u8, Ordering::Relaxed);
}

/// True if a line at `level` would be written: lets callers skip building costly arguments.
pub fn enabled(level: Level) -> bool {
    (level as u8) >= MIN_LEVEL.load(Ordering::Relaxed)
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Debug => "DEBUG",
            Level::Info => "INFO ",
            Level::Warn => "WARN ",
            Level::Error => "ERROR",
        }
    }
}

impl FromStr for Level {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.to_ascii_lowercase().as_str() {
            "debug" => Ok(Level::Debug),
            "info" => Ok(Level::Info),
            "warn" | "warning" => Ok(Level::Warn),
            "error" => Ok(Level::Error),
            _ => Err(format!(
                "{name:?} is not a level (debug, info, warn, error)"
            )),
        }
    }
}

/// Logs `2026-01-02T03:04:05.678Z LEVEL message` without ever waiting. Prefer the macros.
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let stamp = OffsetDateTime::now_utc().format(STAMP).unwrap_or_default();
    let line = format!("{stamp} {} {args}\n", level.label());
    let Some(queue) = QUEUE.get_or_init(start_writer) else {
        // No thread could be started: write directly, which is what a logger can still do.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        return;
    };
    QUEUED.fetch_add(1, Ordering::Relaxed);
    match queue.try_send(line) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            QUEUED.fetch_sub(1, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Waits up to `timeout` for the lines logged so far to be written: programs call it before
/// they exit, so the last lines are not lost, without hanging on a stderr nobody reads.
pub fn flush(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while WRITTEN.load(Ordering::Acquire) < QUEUED.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(2));
    }
}

fn start_writer() -> Option<SyncSender<String>> {
    let (queue, lines) = mpsc::sync_channel(QUEUE_LINES);
    thread::Builder::new()
        .name("peerchat-log".to_string())
        .spawn(move || write_lines(lines))
        .ok()
        .map(|_| queue)
}

/// The logger thread: writes each queued line, and reports lines dropped since the last report.
fn write_lines(lines: Receiver<String>) {
    loop {
        let line = match lines.recv_timeout(DROP_REPORT_INTERVAL) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut stderr = std::io::stderr().lock();
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let stamp = OffsetDateTime::now_utc().format(STAMP).unwrap_or_default();
            let _ = writeln!(
                stderr,
                "{stamp} {} {dropped} log lines dropped: the log output did not keep up",
                Level::Warn.label()
            );
        }
        if let Some(line) = line {
            // A failed log write has nowhere better to go; ignore it rather than crash.
            let _ = stderr.write_all(line.as_bytes());
            WRITTEN.fetch_add(1, Ordering::Release);
        }
    }
}

/// Logs at DEBUG level, with `format!` arguments.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Debug, format_args!($($arg)*)) };
}

/// Logs at INFO level, with `format!` arguments.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($arg)*)) };
}

/// Logs at WARN level, with `format!` arguments.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Warn, format_args!($($arg)*)) };
}

/// Logs at ERROR level, with `format!` arguments.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($arg)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_by_name() {
        assert_eq!("debug".parse::<Level>(), Ok(Level::Debug));
        assert_eq!("INFO".parse::<Level>(), Ok(Level::Info));
        assert_eq!("warning".parse::<Level>(), Ok(Level::Warn));
        assert_eq!("error".parse::<Level>(), Ok(Level::Error));
        assert!("verbose".parse::<Level>().is_err());
        assert!(Level::Debug < Level::Info && Level::Warn < Level::Error);
    }
}
