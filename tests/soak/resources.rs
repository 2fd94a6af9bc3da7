//! The server's memory and CPU time: the idle baseline before the run, and the figures once
//! the last client has gone.

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::process::ServerProcess;
use crate::common::{Chat, TestDb, DEADLINE};
use crate::PROBE_TEXT;

/// How far above its idle level the server's RSS may end. Measured on a 2-core VM: idle about
/// 9 MB, peak under 12 MB, final about 2 MB above idle, all of it anonymous memory: about 1 MB of
/// free heap that glibc keeps after the last clients' buffers are freed (a `malloc_trim` by hand
/// returns it; the server trims only after an idle sweep that freed buffers), and under 1 MB
/// still in use (the slot table sized for the peak, the driver's state after reconnecting). A
/// leak grows with the traffic: 8 MiB is about 400 bytes per message sent or 2.4 KB per session
/// here, so a real leak fails, while four times the residue observed leaves room for allocator
/// and driver differences between machines.
const RSS_SLACK_KIB: u64 = 8 * 1024;

/// The server's RSS has settled once it has not fallen for this long: two and a half of its
/// idle sweeps (`SWEEP_INTERVAL`, 1 s, in src/server/event_loop.rs; each frees the buffers of
/// quiet connections and trims the heap if that freed enough), so at least two whole sweeps
/// passed that gave nothing back.
const SETTLED_AFTER: Duration = Duration::from_millis(2500);
/// A fall smaller than this is not memory given back but noise (a few pages of a thread's
/// stack or of the driver's monitoring). A trim returns far more: the server trims only after
/// a sweep that freed 256 KiB of buffers or followed 64 closed connections.
const SETTLE_TOLERANCE_KIB: u64 = 64;
/// How long after the last client the RSS may take to settle before it is read regardless:
/// a sweep or two to free the last buffers and trim, then `SETTLED_AFTER`, many times over.
const SETTLE_LIMIT: Duration = Duration::from_secs(13);
/// How often the RSS is read while waiting for it to settle.
const RSS_POLL: Duration = Duration::from_millis(100);

/// The server's resource use at rest: the baseline for the final memory check.
pub struct Idle {
    rss: u64,
    /// The RSS had settled when read (else it was read at `DEADLINE`, still falling).
    settled: bool,
    anon: u64,
    cpu_ticks: u64,
}

/// Idle level: a server that has connected to its database and stored a message (so the
/// driver's client and connection exist), with no client connected and its RSS settled: no
/// fall over two idle sweeps.
pub fn measure_idle(server: &ServerProcess, db: &TestDb, addr: SocketAddr) -> Idle {
    let mut probe = Chat::named(addr, "probe");
    probe.send(PROBE_TEXT);
    db.wait_for_stored(1);
    probe.send("/quit");
    probe.read_to_end();
    let rss = settled_rss(server, Instant::now() + DEADLINE);
    Idle {
        rss: rss.kib,
        settled: rss.settled,
        anon: server.memory_kib("RssAnon"),
        cpu_ticks: server.cpu_ticks(),
    }
}

/// The server's memory from idle to the end, and the CPU time it used after the idle level.
pub struct Resources {
    pub idle_rss: u64,
    pub idle_settled: bool,
    pub idle_anon: u64,
    pub peak_rss: u64,
    pub final_rss: u64,
    /// `final_rss` had settled when read (else it was read at `SETTLE_LIMIT`, still falling).
    pub final_settled: bool,
    pub final_anon: u64,
    /// How high `final_rss` may be.
    pub rss_bound: u64,
    /// How long after the last client `final_rss` was read.
    pub rss_waited: Duration,
    pub cpu_secs: f64,
}

/// Memory back near idle: waits (bounded) until the RSS has settled, then reads the final
/// figures.
pub fn wait_for_memory_back(server: &ServerProcess, idle: &Idle, peak_rss: u64) -> Resources {
    let rss_bound = idle.rss + RSS_SLACK_KIB;
    let rss_wait = Instant::now();
    let rss = settled_rss(server, rss_wait + SETTLE_LIMIT);
    Resources {
        idle_rss: idle.rss,
        idle_settled: idle.settled,
        idle_anon: idle.anon,
        peak_rss,
        final_rss: rss.kib,
        final_settled: rss.settled,
        rss_bound,
        rss_waited: rss_wait.elapsed(),
        final_anon: server.memory_kib("RssAnon"),
        cpu_secs: (server.cpu_ticks() - idle.cpu_ticks) as f64 / 100.0,
    }
}

/// An RSS reading, in KiB, and whether it had stopped falling.
struct SettledRss {
    kib: u64,
    settled: bool,
}

/// Reads the server's RSS until it has not fallen by more than `SETTLE_TOLERANCE_KIB` for
/// `SETTLED_AFTER`, or until `give_up`; returns the last reading. The window starts again at
/// every fall, measured from the reading that started it, so a slow slide of small steps
/// counts as falling too.
fn settled_rss(server: &ServerProcess, give_up: Instant) -> SettledRss {
    let mut window_start = (server.memory_kib("VmRSS"), Instant::now());
    loop {
        thread::sleep(RSS_POLL);
        let (kib, now) = (server.memory_kib("VmRSS"), Instant::now());
        if kib + SETTLE_TOLERANCE_KIB < window_start.0 {
            window_start = (kib, now);
        } else if now >= window_start.1 + SETTLED_AFTER {
            return SettledRss { kib, settled: true };
        }
        if now >= give_up {
            return SettledRss {
                kib,
                settled: false,
            };
        }
    }
}
