//! A small stderr logger: one line per event, with a UTC timestamp and a level.
//!
//! Twenty lines instead of a logging crate: the server logs little (start, warnings, closes),
//! and stderr is what both a terminal and a service manager capture.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

use time::format_description::FormatItem;
use time::macros::format_description;
use time::OffsetDateTime;

/// UTC, millisecond precision, fixed width: `2026-01-02T03:04:05.678Z`.
const STAMP: &[FormatItem<'_>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// How serious a log line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Info = 0,
    Warn = 1,
    Error = 2,
}

/// Lines below this level are not written.
static MIN_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Writes only lines at `level` or above from now on (tests use it to keep their output short).
pub fn set_min_level(level: Level) {
    MIN_LEVEL.store(level as u8, Ordering::Relaxed);
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Info => "INFO ",
            Level::Warn => "WARN ",
            Level::Error => "ERROR",
        }
    }
}

/// Writes `2026-01-02T03:04:05.678Z LEVEL message` to stderr. Prefer the macros.
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    if (level as u8) < MIN_LEVEL.load(Ordering::Relaxed) {
        return;
    }
    let stamp = OffsetDateTime::now_utc().format(STAMP).unwrap_or_default();
    // A failed log write has nowhere better to go; ignore it rather than crash the server.
    let _ = writeln!(std::io::stderr().lock(), "{stamp} {} {args}", level.label());
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
