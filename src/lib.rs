//! peerchat: a small line-based chat server that stores every message in MongoDB, and its
//! terminal client.
//!
//! ```text
//!            sockets (mio, edge-triggered)
//!   clients <──────────────────────────────> event loop thread ── owns every connection
//!                                              │        ▲
//!                       Record (bounded queue, │        │ LoopInput (inbox channel + Waker):
//!                       try_send, never waits) ▼        │ NotSaved, Shutdown, …
//!                                          persistence thread ── insert_many ──> MongoDB
//! ```
//!
//! The loop never touches the database and never blocks on another thread; results come back
//! through one inbox. Connections are named in those results by a slot plus an id that is
//! never reused, so a late report cannot reach a different client.
//!
//! Modules, one job each:
//! - [`config`]: flags, defaults and limits of the server and client.
//! - [`telnet`]: telnet commands cut out of the byte stream, across reads (pure).
//! - [`framing`]: bytes to lines, with a bounded tail (pure).
//! - [`protocol`]: what a line means and every line the server sends (pure).
//! - [`server`]: binding and running; inside it the event loop, connections (buffers over a
//!   plain or TLS transport), the room (broadcast, summed output cap), the chat rules, flood
//!   control, per-address limits, `/stats`, and the inbox.
//! - [`fd_limit`]: raises the process's open-file limit and fits `--max-clients` to it; only
//!   programs call it (the server binary, benches), never the library on its own.
//! - [`persist`]: the persistence queue and thread, the stored document; inside it the batch
//!   watchdog and the driver calls (`store`).
//! - [`client`]: the terminal client (plain or TLS; `--command` for scripts).
//! - [`log`]: timestamped stderr logging.

pub mod client;
pub mod cluster;
pub mod config;
pub mod error;
pub mod fd_limit;
pub mod framing;
pub mod log;
pub mod persist;
pub mod protocol;
pub mod server;
pub mod telnet;

pub use config::{ClientConfig, ClientLimits, FloodLimit, ServerConfig, StoreConfig};
pub use error::Error;
pub use server::{RunningServer, Server, ServerHandle};
