//! The server's memory and CPU time: the idle baseline before the run, and the figures once
//! the last client has gone.

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::process::ServerProcess;
use crate::common::{Chat, TestDb};
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

/// The server's resource use at rest: the baseline for the final memory check.
pub struct Idle {
    rss: u64,
    anon: u64,
    cpu_ticks: u64,
}

/// Idle level: a server that has connected to its database and stored a message (so the
/// driver's client and connection exist), with no client connected and two idle sweeps done.
pub fn measure_idle(server: &ServerProcess, db: &TestDb, addr: SocketAddr) -> Idle {
    let mut probe = Chat::named(addr, "probe");
    probe.send(PROBE_TEXT);
    db.wait_for_stored(1);
    probe.send("/quit");
    probe.read_to_end();
    thread::sleep(Duration::from_millis(2500));
    Idle {
        rss: server.memory_kib("VmRSS"),
        anon: server.memory_kib("RssAnon"),
        cpu_ticks: server.cpu_ticks(),
    }
}

/// The server's memory from idle to the end, and the CPU time it used after the idle level.
pub struct Resources {
    pub idle_rss: u64,
    pub idle_anon: u64,
    pub peak_rss: u64,
    pub final_rss: u64,
    pub final_anon: u64,
    /// How high `final_rss` may be.
    pub rss_bound: u64,
    /// How long after the last client `final_rss` was read.
    pub rss_waited: Duration,
    pub cpu_secs: f64,
}

/// Memory back near idle: waits for idle sweeps, bounded, then reads the final figures.
pub fn wait_for_memory_back(server: &ServerProcess, idle: &Idle, peak_rss: u64) -> Resources {
    let rss_bound = idle.rss + RSS_SLACK_KIB;
    let rss_wait = Instant::now();
    thread::sleep(Duration::from_secs(3));
    let mut final_rss = server.memory_kib("VmRSS");
    while final_rss > rss_bound && rss_wait.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(500));
        final_rss = server.memory_kib("VmRSS");
    }
    Resources {
        idle_rss: idle.rss,
        idle_anon: idle.anon,
        peak_rss,
        final_rss,
        rss_bound,
        rss_waited: rss_wait.elapsed(),
        final_anon: server.memory_kib("RssAnon"),
        cpu_secs: (server.cpu_ticks() - idle.cpu_ticks) as f64 / 100.0,
    }
}
