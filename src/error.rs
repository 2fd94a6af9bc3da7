//! The errors that stop the server or the client, with messages meant for a person.

use std::fmt;
use std::io;
use std::net::SocketAddr;

/// Why peerchat could not start or keep running.
#[derive(Debug)]
pub enum Error {
    /// `--host` did not resolve to an address.
    Resolve { host: String, source: io::Error },
    /// The listen address is taken or not ours.
    Bind { addr: SocketAddr, source: io::Error },
    /// A TLS certificate or key file is missing or unusable (a start-up error, exit 2).
    TlsFile {
        path: std::path::PathBuf,
        reason: String,
    },
    /// The client could not reach the server.
    Connect { addr: String, source: io::Error },
    /// The client lost its server.
    Disconnected(String),
    /// The client could not print what arrived.
    Output(io::Error),
    /// A flag names something the client cannot use (a `--tls-ca` file that does not hold a
    /// CA certificate, a `--host` that cannot be a TLS server name): a command-line mistake,
    /// so exit status 2 like the ones `config` catches.
    Usage(String),
    /// The client could not set up TLS or its handshake failed (certificate not trusted, not
    /// for this host, no TLS on that port); the message names the server.
    TlsConnect(String),
    /// `--command` got no complete reply, or an error line in it.
    Reply(String),
    /// Any other I/O failure (poll, thread spawn, terminal).
    Io(io::Error),
    /// The server thread panicked.
    Panicked,
    /// `--cluster` could not start: no change streams (a setup mistake, exit 2) or no database.
    Cluster(crate::cluster::StartError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Resolve { host, source } => write!(f, "cannot resolve host {host}: {source}"),
            Error::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::TlsFile { path, reason } => write!(f, "TLS: {}: {reason}", path.display()),
            Error::Connect { addr, source } => write!(f, "cannot connect to {addr}: {source}"),
            Error::Disconnected(why) => f.write_str(why),
            Error::Output(source) => write!(f, "cannot write to standard output: {source}"),
            Error::Usage(why) => write!(f, "error: {why}"),
            Error::TlsConnect(why) | Error::Reply(why) => f.write_str(why),
            Error::Io(source) => write!(f, "{source}"),
            Error::Panicked => write!(f, "the server thread panicked"),
            Error::Cluster(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Resolve { source, .. }
            | Error::Bind { source, .. }
            | Error::Connect { source, .. }
            | Error::Output(source)
            | Error::Io(source) => Some(source),
            Error::TlsFile { .. }
            | Error::Disconnected(_)
            | Error::Usage(_)
            | Error::TlsConnect(_)
            | Error::Reply(_)
            | Error::Panicked
            | Error::Cluster(_) => None,
        }
    }
}

impl Error {
    /// The exit status for this error: 2 for a command-line mistake or a file a flag names
    /// that cannot be used, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_)
            | Error::TlsFile { .. }
            | Error::Cluster(crate::cluster::StartError::NoChangeStreams(_)) => 2,
            _ => 1,
        }
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Error::Io(err)
    }
}
