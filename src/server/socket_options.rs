//! The options every client socket carries: `TCP_NODELAY` (chat lines are small and latency
//! matters; output is already gathered per turn) and TCP keepalive (`--keepalive`: a client whose
//! host vanished without a FIN or reset is found and removed). Keepalive probes are only sent on
//! an idle connection: once output is in flight to a vanished host, retransmissions take over
//! and the kernel would keep trying for about 15 minutes, so on Linux `TCP_USER_TIMEOUT` ends the
//! connection when output has gone untaken for as long as keepalive would take (2 × idle).
//!
//! On Linux an accepted socket inherits both from the listening socket, so they are set once on
//! the listener: a reconnect storm then costs no extra system calls per client (five fewer per
//! accept). Elsewhere they are set on each accepted socket.

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// TCP keepalive probes sent to a silent peer, `--keepalive / 3` apart, before the kernel
/// declares it dead (as Redis does): a vanished client is gone within twice `--keepalive`.
const KEEPALIVE_PROBES: u32 = 3;

/// Whether accepted sockets inherit the listener's options.
pub const INHERITED_FROM_LISTENER: bool = cfg!(target_os = "linux");

/// What to set on client sockets.
#[derive(Clone, Debug)]
pub struct ClientSocketOptions {
    keepalive: Option<TcpKeepalive>,
    /// How long output may go unacknowledged; the same time keepalive takes to give up.
    give_up_after: Option<Duration>,
}

impl ClientSocketOptions {
    /// Keepalive after `idle` seconds of silence, or none.
    pub fn new(idle: Option<Duration>) -> Self {
        let interval = |idle: Duration| (idle / KEEPALIVE_PROBES).max(Duration::from_secs(1));
        let keepalive = idle.map(|idle| {
            TcpKeepalive::new()
                .with_time(idle)
                .with_interval(interval(idle))
                .with_retries(KEEPALIVE_PROBES)
        });
        let give_up_after = idle.map(|idle| idle + interval(idle) * KEEPALIVE_PROBES);
        ClientSocketOptions {
            keepalive,
            give_up_after,
        }
    }

    /// Sets the options on a client socket, or on the listener its clients inherit them from.
    pub fn apply(&self, socket: SockRef<'_>) -> io::Result<()> {
        socket.set_tcp_nodelay(true)?;
        #[cfg(target_os = "linux")]
        socket.set_tcp_user_timeout(self.give_up_after)?;
        match &self.keepalive {
            Some(keepalive) => socket.set_tcp_keepalive(keepalive),
            None => socket.set_keepalive(false),
        }
    }
}
