//! Idle cost: resident memory of a server holding many connected clients that say nothing.

use std::io::Read;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use super::servers::{Kind, ServerProcess};
use super::stats::{append_json, json_str};

/// Goal: at most this many bytes per idle connection.
const GOAL_BYTES_PER_CONNECTION: f64 = 1024.0;

/// Measures and prints idle memory per connection for every count and server.
/// Counts that need more descriptors than `open_file_limit` allows are skipped with a note.
pub fn report(counts: &[usize], servers: &[Kind], open_file_limit: u64) {
    println!();
    for &count in counts {
        if count as u64 + 64 > open_file_limit {
            println!(
                "idle: {count} connections skipped: the open-file limit is {open_file_limit} \
                 (raise it with `ulimit -n` as root)"
            );
            continue;
        }
        for &kind in servers {
            let bytes = per_connection(kind, count);
            let verdict = match kind {
                Kind::Peerchat if bytes <= GOAL_BYTES_PER_CONNECTION => "  (goal ≤ 1 KiB: met)",
                Kind::Peerchat => "  (goal ≤ 1 KiB: NOT MET)",
                Kind::Redis => "",
            };
            println!(
                "idle {:<9} {count:>6} connections: {bytes:>6.0} bytes per connection{verdict}",
                kind.name()
            );
            append_json(
                "broadcast.jsonl",
                &[
                    ("server", json_str(kind.name())),
                    ("idle_connections", count.to_string()),
                    ("bytes_per_connection", format!("{bytes:.0}")),
                ],
            );
        }
    }
}

/// Connects `count` clients that say nothing, drains what the server sends them (join
/// notices), waits for peerchat's idle sweep to shrink buffers, and returns the growth of the
/// server's resident memory divided by `count`.
fn per_connection(kind: Kind, count: usize) -> f64 {
    let server = ServerProcess::start(kind);
    thread::sleep(Duration::from_millis(300));
    let empty_kib = server.memory_kib("VmRSS");
    let mut clients: Vec<TcpStream> = Vec::with_capacity(count);
    let mut sink = vec![0u8; 1 << 16];
    for i in 0..count {
        let client = TcpStream::connect(server.addr).expect("connect idle client");
        client.set_nonblocking(true).unwrap();
        clients.push(client);
        if i % 100 == 99 {
            drain_all(&mut clients, &mut sink);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        drain_all(&mut clients, &mut sink);
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(2500)); // at least two of peerchat's idle sweeps
    let idle_kib = server.memory_kib("VmRSS");
    idle_kib.saturating_sub(empty_kib) as f64 * 1024.0 / count as f64
}

fn drain_all(clients: &mut [TcpStream], sink: &mut [u8]) {
    for client in clients {
        while let Ok(n) = client.read(sink) {
            if n == 0 {
                break;
            }
        }
        // Stopped at WouldBlock (drained) or an error: either way, on to the next client.
    }
}
