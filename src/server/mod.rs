//! The chat server: binding, starting the persistence thread, and running the event loop.
//!
//! `Server::bind` takes a config and binds, so callers (the binary, tests, benches) learn the
//! real address before serving; port 0 picks a free one. `Server::run` serves on the calling
//! thread until a `ServerHandle` asks it to stop.

mod chat;
mod connection;
mod event_loop;
mod flood;
mod heap;
mod history;
pub mod inbox;
mod per_address;
mod presence;
mod room;
mod roster;
mod socket_options;
mod stats;
mod timers;
mod tls;
mod transport;

use std::net::{SocketAddr, ToSocketAddrs};
use std::thread::{self, JoinHandle};

use mio::net::TcpListener;
use mio::{Poll, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use socket2::{Domain, Protocol, Socket, Type};

use crate::cluster::Cluster;
use crate::config::ServerConfig;
use crate::error::Error;
use crate::persist::{redact_uri, Persister};
use crate::{info, warn};
use event_loop::{EventLoop, Listeners, WAKER};
use inbox::{Inbox, LoopInput, LoopSender};

/// A bound server, ready to run.
pub struct Server {
    event_loop: EventLoop,
    /// The plain listener's address, or the TLS one's with `--no-plain`.
    local_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    plain: bool,
    /// The listen backlog in force: the requested one, capped by the system.
    backlog: u32,
    sender: LoopSender,
}

/// Asks a running server to stop, from any thread.
#[derive(Clone, Debug)]
pub struct ServerHandle {
    sender: LoopSender,
}

impl ServerHandle {
    /// Stops the server: clients are told and disconnected, queued messages are stored.
    /// Does nothing if it has already stopped.
    pub fn shutdown(&self) {
        let _ = self.sender.send(LoopInput::Shutdown);
    }

    /// Shuts the server down cleanly on the first SIGINT or SIGTERM; a second one exits at
    /// once. A small thread waits for signals and asks the loop through its inbox, the same
    /// way every other outside input arrives.
    pub fn shutdown_on_signals(&self) -> std::io::Result<()> {
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        let handle = self.clone();
        thread::Builder::new()
            .name("peerchat-signals".to_string())
            .spawn(move || {
                let mut received = signals.forever();
                if let Some(signal) = received.next() {
                    info!("{}: shutting down", signal_name(signal));
                    handle.shutdown();
                }
                if let Some(signal) = received.next() {
                    warn!("{} again: exiting without waiting", signal_name(signal));
                    crate::log::flush(std::time::Duration::from_millis(200));
                    std::process::exit(128 + signal);
                }
            })?;
        Ok(())
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

impl Server {
    /// Reads the TLS certificate (if any), binds the listeners and starts the persistence
    /// thread (if configured).
    pub fn bind(config: ServerConfig) -> Result<Server, Error> {
        let tls_config = config.tls.as_ref().map(tls::server_config).transpose()?;
        let backlog = effective_backlog(config.backlog);
        let bind = |port| -> Result<TcpListener, Error> {
            let addr = resolve(&config.host, port)?;
            listen(addr, backlog).map_err(|source| Error::Bind { addr, source })
        };
        let plain = config.plain.then(|| bind(config.port)).transpose()?;
        let tls = match (&config.tls, tls_config) {
            (Some(listen), Some(tls_config)) => Some((bind(listen.port)?, tls_config)),
            _ => None,
        };
        let tls_addr = tls.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
        let local_addr = match (&plain, tls_addr) {
            (Some(listener), _) => listener.local_addr()?,
            (None, Some(addr)) => addr,
            (None, None) => unreachable!("config parsing refuses --no-plain without TLS"),
        };
        let listeners = Listeners { plain, tls };
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let (sender, inbox) = Inbox::new(waker);
        let persister = match config.store.clone() {
            Some(store) => {
                info!(
                    "persistence on: {}.{} at {}",
                    store.database,
                    store.collection,
                    redact_uri(&store.uri)
                );
                Some(Persister::start(store, sender.clone())?)
            }
            None => {
                info!("persistence off (--no-persist): messages are not stored");
                None
            }
        };
        let cluster = match (&config.cluster, &config.store) {
            (Some(cluster), Some(store)) => {
                Some(Cluster::start(store, cluster, sender.clone()).map_err(Error::Cluster)?)
            }
            _ => None,
        };
        let event_loop = EventLoop::new(poll, listeners, inbox, persister, cluster, &config)?;
        Ok(Server {
            event_loop,
            local_addr,
            tls_addr,
            plain: config.plain,
            backlog,
            sender,
        })
    }

    /// The address clients connect to: the plain listener's, or with `--no-plain` the TLS one's.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The TLS listener's address, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// A handle that can stop the server once it runs.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            sender: self.sender.clone(),
        }
    }

    /// Serves on this thread until shut down.
    pub fn run(self) -> Result<(), Error> {
        if self.plain {
            info!(
                "listening on {} (backlog {})",
                self.local_addr, self.backlog
            );
        }
        if let Some(addr) = self.tls_addr {
            // The same words as the plain line, so whatever waits for `listening on ADDR` finds
            // the TLS listener of a `--no-plain` server too (after the plain one otherwise).
            info!("listening on {addr} (TLS, backlog {})", self.backlog);
        }
        self.event_loop.run()?;
        info!("server stopped");
        Ok(())
    }

    /// Runs the server on a new thread: for tests, benches and programs that embed it.
    pub fn spawn(self) -> Result<RunningServer, Error> {
        let addr = self.local_addr;
        let tls_addr = self.tls_addr;
        let handle = self.handle();
        let thread = thread::Builder::new()
            .name("peerchat-loop".to_string())
            .spawn(move || self.run())?;
        Ok(RunningServer {
            addr,
            tls_addr,
            handle,
            thread: Some(thread),
        })
    }
}

/// A server running on its own thread; dropping it shuts the server down.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub handle: ServerHandle,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

impl RunningServer {
    /// Shuts down and waits for the loop (and the persistence thread's drain) to finish.
    pub fn stop(mut self) -> Result<(), Error> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), Error> {
        self.handle.shutdown();
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(Error::Panicked),
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// A listening socket with room for `backlog` connections waiting to be accepted (mio's own
/// `bind` always asks for 128, which a reconnect storm overflows in a moment).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As mio and std do: a restarted server can bind again while old connections linger.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Where the kernel caps every listen backlog (Linux); unknown elsewhere.
const SOMAXCONN_PATH: &str = "/proc/sys/net/core/somaxconn";

/// The backlog the kernel will really give: `wanted`, capped by `net.core.somaxconn` as it caps
/// Redis' and nginx's. Logged at start so an operator sees when the system setting wins.
fn effective_backlog(wanted: u32) -> u32 {
    let cap = std::fs::read_to_string(SOMAXCONN_PATH)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok());
    match cap {
        Some(cap) if cap < wanted => {
            warn!("--backlog {wanted} is capped to {cap} by net.core.somaxconn ({SOMAXCONN_PATH})");
            cap
        }
        _ => wanted,
    }
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, Error> {
    (host, port)
        .to_socket_addrs()
        .map_err(|source| Error::Resolve {
            host: host.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| Error::Resolve {
            host: host.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })
}
