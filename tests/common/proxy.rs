//! A TCP proxy between a peerchat server and its database, for tests of a database path that
//! goes silent without closing anything: a dead host that sends no reset, a dropped route, a
//! firewall that forgot the connection. Std threads, loopback only, every wait bounded.
//!
//! It forwards bytes both ways until told to black-hole inserts: from then on, a connection
//! that carries an `insert` command stops forwarding in both directions for good (the bytes
//! are swallowed, nothing more is read or written, and the sockets stay open), and so do new
//! connections that carry one. After `heal`, connections made from then on forward everything;
//! the old ones stay hung until the proxy is dropped.
//!
//! Why only inserts, not every connection: the driver's monitor checks the server on its own
//! connection, and when that check times out it clears the pool and interrupts operations in
//! progress (mongodb 3.x `cmap/worker.rs`, `clear` with a network timeout). A proxy that hangs
//! every connection therefore gets the driver to unstick itself: with such a proxy, the server
//! without the new-client watchdog saved again (and stored the hung message after all) about
//! 10 s after the heal. A hung connection with a healthy monitor next to it is the case the
//! driver never recovers from.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How often idle or hung pumps look at whether the proxy is stopping.
const TICK: Duration = Duration::from_millis(20);

/// The start of an insert command in the BSON of an OP_MSG: a string element named `insert`.
const INSERT: &[u8] = b"\x02insert\x00";

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
}

struct State {
    upstream: SocketAddr,
    stop: AtomicBool,
    /// Inserts are black-holed on connections numbered below `healthy_from`.
    blackholing: AtomicBool,
    healthy_from: AtomicU64,
    next_id: AtomicU64,
    connections: Mutex<Vec<Arc<Connection>>>,
}

struct Connection {
    id: u64,
    client: TcpStream,
    server: TcpStream,
    /// Stopped forwarding for good.
    hung: AtomicBool,
}

impl Proxy {
    /// A proxy on a free loopback port forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            upstream,
            stop: AtomicBool::new(false),
            blackholing: AtomicBool::new(false),
            healthy_from: AtomicU64::new(u64::MAX),
            next_id: AtomicU64::new(0),
            connections: Mutex::new(Vec::new()),
        });
        let acceptor_state = state.clone();
        let acceptor = thread::spawn(move || accept(&listener, &acceptor_state));
        Proxy {
            addr,
            state,
            acceptor: Some(acceptor),
        }
    }

    /// From now on, a connection that carries an insert hangs, existing and new ones alike.
    pub fn blackhole_inserts(&self) {
        self.state.healthy_from.store(u64::MAX, Ordering::SeqCst);
        self.state.blackholing.store(true, Ordering::SeqCst);
    }

    /// Connections made from now on forward everything; hung ones stay hung.
    pub fn heal(&self) {
        let next = self.state.next_id.load(Ordering::SeqCst);
        self.state.healthy_from.store(next, Ordering::SeqCst);
    }

    /// Connections that stopped forwarding and are still open.
    pub fn hung_connections(&self) -> usize {
        let connections = self.state.connections.lock().unwrap();
        connections
            .iter()
            .filter(|conn| conn.hung.load(Ordering::SeqCst))
            .count()
    }
}

impl Drop for Proxy {
    /// Closes every connection, hung ones too, so that nothing waits on them any more.
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for conn in self.state.connections.lock().unwrap().drain(..) {
            conn.close();
        }
    }
}

impl State {
    fn blackholes(&self, conn: &Connection) -> bool {
        self.blackholing.load(Ordering::SeqCst)
            && conn.id < self.healthy_from.load(Ordering::SeqCst)
    }
}

impl Connection {
    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

fn accept(listener: &TcpListener, state: &Arc<State>) {
    while !state.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                thread::sleep(TICK);
                continue;
            }
            Err(err) => panic!("proxy accept: {err}"),
        };
        let Ok(server) = TcpStream::connect_timeout(&state.upstream, Duration::from_secs(5)) else {
            continue; // the database is down: the client sees its connection closed
        };
        client.set_nonblocking(false).unwrap();
        let conn = Arc::new(Connection {
            id: state.next_id.fetch_add(1, Ordering::SeqCst),
            client: client.try_clone().unwrap(),
            server: server.try_clone().unwrap(),
            hung: AtomicBool::new(false),
        });
        state.connections.lock().unwrap().push(conn.clone());
        for to_server in [true, false] {
            let (state, conn) = (state.clone(), conn.clone());
            let (from, to) = match to_server {
                true => (client.try_clone().unwrap(), server.try_clone().unwrap()),
                false => (server.try_clone().unwrap(), client.try_clone().unwrap()),
            };
            thread::spawn(move || pump(from, to, &conn, &state, to_server));
        }
    }
}

/// Copies `from` to `to` until either closes or the proxy stops; once the connection hangs,
/// reads and writes nothing, leaving both sockets open.
fn pump(mut from: TcpStream, mut to: TcpStream, conn: &Connection, state: &State, to_server: bool) {
    from.set_read_timeout(Some(TICK)).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    // The end of the previous read, so an insert split across two reads is still seen.
    let mut seen = Vec::new();
    while !state.stop.load(Ordering::SeqCst) {
        if conn.hung.load(Ordering::SeqCst) {
            thread::sleep(TICK);
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                continue
            }
            Err(_) => break,
        };
        if to_server {
            seen.extend_from_slice(&buf[..n]);
            let carries_insert = seen.windows(INSERT.len()).any(|window| window == INSERT);
            seen.drain(..seen.len().saturating_sub(INSERT.len() - 1));
            if carries_insert && state.blackholes(conn) {
                conn.hung.store(true, Ordering::SeqCst);
            }
        }
        if conn.hung.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if !conn.hung.load(Ordering::SeqCst) {
        conn.close();
    }
}
