//! `/stats`: one line of `key=value` figures, the ones operators look for in Redis `INFO` and
//! NATS `/varz`. The names are part of the protocol: keep them once released.
//!
//! Counters of the loop's own events live here; chat traffic is counted by the room, where it
//! is delivered, and storage by the persistence thread's handle. This puts them in one line.

use std::fmt::Write;
use std::time::Instant;

use super::room::Room;
use crate::persist::Persister;

/// What the event loop counts itself, since the start.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    /// `--max-clients` in force.
    clients_max: usize,
    /// Connections admitted (refused ones are not).
    pub connections_total: u64,
    /// Refused at `--max-clients`.
    pub rejected_full: u64,
    /// Refused at `--max-per-ip`.
    pub rejected_per_ip: u64,
    /// Disconnected for not reading: their own output limit or the total one.
    pub slow_consumers: u64,
    /// Bursts of a client's lines held back by flood control (each told `! slow down` once).
    pub flood_delayed: u64,
    /// TLS connections closed before their handshake finished: failed, timed out or given up.
    pub tls_handshake_failures: u64,
    /// Messages the persistence thread reported not saved (the queue's refusals are counted
    /// where they happen): counted as their senders are told.
    pub failed_saves: u64,
}

impl Stats {
    pub fn new(clients_max: usize, now: Instant) -> Self {
        Stats {
            started: now,
            clients_max,
            connections_total: 0,
            rejected_full: 0,
            rejected_per_ip: 0,
            slow_consumers: 0,
            flood_delayed: 0,
            tls_handshake_failures: 0,
            failed_saves: 0,
        }
    }

    /// The line `/stats` answers (after `* `) and `--stats-interval` logs.
    pub fn line(&self, room: &Room, persister: Option<&Persister>, now: Instant) -> String {
        let traffic = room.traffic();
        let saving = persister.map(Persister::figures).unwrap_or_default();
        let figures: [(&str, &dyn std::fmt::Display); 17] = [
            ("uptime_s", &now.duration_since(self.started).as_secs()),
            ("clients", &room.len()),
            ("clients_max", &self.clients_max),
            ("connections_total", &self.connections_total),
            ("rejected_full", &self.rejected_full),
            ("rejected_per_ip", &self.rejected_per_ip),
            ("msgs_in", &traffic.msgs_in),
            ("deliveries_out", &traffic.deliveries_out),
            ("bytes_in", &traffic.wire.received),
            ("bytes_out", &traffic.wire.sent),
            ("slow_consumers", &self.slow_consumers),
            ("flood_delayed", &self.flood_delayed),
            ("saved", &saving.saved),
            ("not_saved", &(saving.refused + self.failed_saves)),
            ("save_queue", &saving.queued),
            (
                "save_batch_ms_p99",
                &format_args!("{:.1}", saving.batch_ms_p99),
            ),
            ("tls_handshake_failures", &self.tls_handshake_failures),
        ];
        let mut line = String::from("stats");
        for (name, value) in figures {
            let _ = write!(line, " {name}={value}");
        }
        line
    }
}
