//! The run: client threads drive their seats through `SOAK` while the database is killed and
//! restarted; afterwards, what they did and how chat flowed per second.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::TestDb;
use crate::seats::Worker;
use crate::totals::RunTotals;
use crate::{SEATS, SOAK, WORKERS};

/// When the database is killed, and for how long it stays down.
const DB_KILL_AT: Duration = Duration::from_secs(25);
const DB_DOWN_FOR: Duration = Duration::from_secs(3);

/// Seconds of the run whose deliveries are counted (more than the whole run can take).
pub const SECONDS_TRACKED: usize = 256;

/// Shared between the client threads and the test.
pub struct Shared {
    pub start: Instant,
    /// Chat lines received, per second of the run.
    pub deliveries: Vec<AtomicU64>,
}

/// When the database was killed and when it was back, since the start of the run.
pub struct Outage {
    pub killed_at: Duration,
    pub restarted_at: Duration,
}

/// What the client threads did.
pub struct Run {
    pub totals: RunTotals,
    pub outage: Outage,
    /// When the last client thread finished, since the start of the run.
    pub clients_done: Duration,
    /// The fewest deliveries in one second of the sending time: (deliveries, second).
    pub quietest: (u64, usize),
    /// Deliveries per second from the kill to a second after the restart.
    pub during_outage: Vec<u64>,
}

/// The run: the client threads go to the end while the database is killed and restarted.
pub fn run_clients_through_outage(addr: SocketAddr, db: &mut TestDb) -> Run {
    let shared = Arc::new(Shared {
        start: Instant::now(),
        deliveries: (0..SECONDS_TRACKED).map(|_| AtomicU64::new(0)).collect(),
    });
    let workers = start_workers(addr, &shared);
    let outage = kill_and_restart_database(db, shared.start);
    let mut totals = RunTotals::default();
    for worker in workers {
        totals.add(worker.join().expect("client thread panicked"));
    }
    let clients_done = shared.start.elapsed();
    let (quietest, during_outage) = delivery_profile(&shared, &outage);
    Run {
        totals,
        outage,
        clients_done,
        quietest,
        during_outage,
    }
}

/// Starts `WORKERS` client threads, each driving its share of the seats.
fn start_workers(addr: SocketAddr, shared: &Arc<Shared>) -> Vec<thread::JoinHandle<RunTotals>> {
    let per_worker = SEATS / WORKERS;
    (0..WORKERS)
        .map(|w| {
            let seats = w * per_worker..if w + 1 == WORKERS {
                SEATS
            } else {
                (w + 1) * per_worker
            };
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("soak-{w}"))
                .spawn(move || Worker::new(w, addr, seats, shared).run())
                .expect("start client thread")
        })
        .collect()
}

/// Kills the database `DB_KILL_AT` into the run and restarts it `DB_DOWN_FOR` later.
fn kill_and_restart_database(db: &mut TestDb, start: Instant) -> Outage {
    sleep_until(start + DB_KILL_AT);
    db.kill();
    let killed_at = start.elapsed();
    sleep_until(start + DB_KILL_AT + DB_DOWN_FOR);
    db.restart();
    let restarted_at = start.elapsed();
    println!(
        "soak: database killed at {:.1} s, back at {:.1} s",
        killed_at.as_secs_f64(),
        restarted_at.as_secs_f64()
    );
    Outage {
        killed_at,
        restarted_at,
    }
}

/// Deliveries in the quietest second of the sending time (leaving out its first 3 s and last
/// 2 s), and per second of the outage: chat must keep flowing while the database is away.
fn delivery_profile(shared: &Shared, outage: &Outage) -> ((u64, usize), Vec<u64>) {
    let delivered = |s: usize| shared.deliveries[s].load(Ordering::Relaxed);
    let quietest = (3..(SOAK.as_secs() as usize - 2))
        .map(|s| (delivered(s), s))
        .min()
        .expect("some seconds");
    let outage_seconds =
        outage.killed_at.as_secs() as usize..=outage.restarted_at.as_secs() as usize + 1;
    (quietest, outage_seconds.map(delivered).collect())
}

fn sleep_until(when: Instant) {
    let now = Instant::now();
    if when > now {
        thread::sleep(when - now);
    }
}
