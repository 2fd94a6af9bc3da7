//! A small stderr logger: one line per event, with a UTC timestamp and a level.
//!
//! Twenty lines instead of a logging crate: the server logs little (start, warnings, closes),
//! and stderr is what both a terminal and a service manager capture.

use std::fmt;
use std::io::Write;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// How serious a log line is.
#[derive(Clone, Copy, Debug)]
pub enum Level {
    Info,
    Warn,
    Error,
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
    let now = OffsetDateTime::now_utc();
    let stamp = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default();
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
