//! The client: `--command` for one command and its reply; else terminal mode when standard
//! input and output are both terminals, else the plain line pipe that scripts and tests use.
//! Every mode speaks plain TCP or TLS alike.
//!
//! Modules, one job each:
//! - [`plain`]: plain mode, today's pipe: lines in, lines out, exit 1 when the server goes.
//! - [`interactive`]: terminal mode's session: input line, own messages, reconnects.
//! - [`command`]: `--command`: which server lines are the reply, and the exit status.
//! - [`connection`]: where the server is, connect with a timeout, bounded line reading, the
//!   reconnect backoff.
//! - [`tls`]: whom a TLS client trusts, and the handshake.
//! - [`stream`]: the connection, plain or TLS, shared by a reading and a writing thread.
//! - [`display`]: server text made safe and bounded; time, colours, mentions (pure).
//! - [`identity`]: our name, learnt from the welcome and rename notices (pure).
//! - [`keys`]: raw terminal bytes to keys (pure).
//! - [`editor`]: the line being typed and the input history (pure).
//! - [`screen`]: incoming lines above, the input line below, one write per batch.
//! - [`terminal`]: raw mode and its restoring, the terminal's width.

mod command;
mod connection;
mod display;
mod editor;
mod identity;
mod interactive;
mod keys;
mod plain;
mod screen;
mod stream;
mod terminal;
mod tls;

use time::UtcOffset;

use crate::config::ClientConfig;
use crate::error::Error;

/// Connects and runs in the mode the flags and the standard streams call for. TLS trust is
/// loaded first, so a bad `--tls-ca` file is reported before any connection or terminal mode.
pub fn run(config: &ClientConfig) -> Result<(), Error> {
    let endpoint = connection::Endpoint::new(config)?;
    if let Some(line) = &config.command {
        return command::run(config, &endpoint, line);
    }
    if !terminal::is_interactive() {
        return plain::run(config, &endpoint);
    }
    // Read before any thread starts: on Unix the `time` crate refuses to read the local offset
    // in a multi-threaded process (another thread could change the environment meanwhile).
    let clock = config.time.then(local_offset);
    let no_color = std::env::var_os("NO_COLOR");
    let color = display::color_wanted(config.color, no_color.as_deref());
    interactive::run(config, endpoint, display::Painter::new(color, clock))
}

/// The local time zone's offset now, or UTC when it cannot be known.
fn local_offset() -> UtcOffset {
    UtcOffset::current_local_offset().unwrap_or(UtcOffset::UTC)
}
