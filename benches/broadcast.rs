//! Broadcast fan-out benchmark: how many chat lines per second peerchat delivers.
//!
//! Starts the built `peerchat-server` binary (persistence off) as a child process, so its CPU
//! and memory are read from /proc, then drives it from this process: N receivers on one mio
//! thread, P senders on another. Each message carries its sender's sequence number and send
//! time; receivers check per-sender order and measure latency. Senders keep a bounded number
//! of messages in flight, so the figures are for a server that keeps up, not for a backlog.
//!
//! ```text
//! cargo bench --bench broadcast                          # default scenarios
//! cargo bench --bench broadcast -- --quick               # tiny run (CI)
//! cargo bench --bench broadcast -- -n 100 -p 10 -s 64 -m 200000
//! cargo bench --bench broadcast -- --idle 1000           # idle memory per connection
//! ```
//! Results are printed as a table and appended as JSON lines to
//! `target/bench-results/broadcast.jsonl`.

use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

const SERVER: &str = env!("CARGO_BIN_EXE_peerchat-server");
/// Messages each sender may have in flight (sent, not yet delivered to every receiver).
const WINDOW_PER_SENDER: u64 = 64;
/// Latency histogram resolution: 1 µs buckets up to this many µs; slower goes to the last one.
const LATENCY_BUCKETS: usize = 200_000;
/// A run that makes no progress for this long is declared stuck.
const STALL: Duration = Duration::from_secs(10);

struct Scenario {
    receivers: usize,
    senders: usize,
    size: usize,
    messages_per_sender: u64,
}

struct Report {
    scenario: String,
    delivered: u64,
    expected: u64,
    out_of_order: u64,
    seconds: f64,
    server_cpu: f64,
    generator_cpu: f64,
    peak_rss_kb: u64,
    latency_us: [u64; 4], // p50, p99, p99.9, max
    size: usize,
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let flag = |name: &str| -> Option<u64> {
        let at = args.iter().position(|a| a == name)?;
        let value = args
            .get(at + 1)
            .unwrap_or_else(|| die(&format!("{name} needs a value")));
        Some(
            value
                .parse()
                .unwrap_or_else(|_| die(&format!("{name}: not a number: {value}"))),
        )
    };
    if let Some(idle) = flag("--idle") {
        return idle_memory(idle as usize);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let size = flag("-s").unwrap_or(64) as usize;
    let scenarios: Vec<Scenario> = match (flag("-n"), flag("-p")) {
        (Some(n), Some(p)) => vec![scenario(n as usize, p as usize, size, flag("-m"), quick)],
        (None, None) => {
            let ns: &[usize] = if quick { &[10] } else { &[10, 100, 1000] };
            ns.iter()
                .flat_map(|&n| [1, 10].map(|p| scenario(n, p, size, flag("-m"), quick)))
                .collect()
        }
        _ => die("give both -n RECEIVERS and -p SENDERS, or neither"),
    };
    println!(
        "{:<18} {:>12} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>13} {:>8} {:>7}  complete",
        "scenario",
        "deliv/s",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "p99.9",
        "max µs",
        "srv cpu",
        "deliv/cpu-s",
        "rss MB",
        "gen cpu"
    );
    let mut failed = false;
    for scenario in scenarios {
        let report = run(&scenario);
        print_report(&report);
        save_json(&report);
        failed |= report.delivered != report.expected || report.out_of_order > 0;
    }
    if failed {
        eprintln!(
            "\n!!! BENCH FAILURE: some receiver missed messages or saw them out of order !!!"
        );
        std::process::exit(1);
    }
}

fn scenario(
    receivers: usize,
    senders: usize,
    size: usize,
    m: Option<u64>,
    quick: bool,
) -> Scenario {
    // About 20 M deliveries per scenario (a few seconds), 200 k for --quick.
    let deliveries: u64 = if quick { 200_000 } else { 20_000_000 };
    let per_sender = m.unwrap_or((deliveries / (receivers * senders) as u64).max(10));
    if size < 40 {
        die("-s must be at least 40 bytes (sequence number and timestamp)");
    }
    Scenario {
        receivers,
        senders,
        size,
        messages_per_sender: per_sender,
    }
}

fn die(message: &str) -> ! {
    eprintln!("broadcast bench: {message}");
    std::process::exit(2)
}

// ---------------------------------------------------------------------------------------------
// Server process

struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

impl ServerProcess {
    fn start() -> ServerProcess {
        let mut child = Command::new(SERVER)
            // Load generators send far above a person's rate: flood control off. 10 000 idle
            // clients need --max-clients above its default.
            .args(["--port", "0", "--no-persist", "--flood-rate", "0"])
            .args(["--max-clients", "100000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| die(&format!("cannot start {SERVER}: {err}")));
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .and_then(Result::ok)
                .unwrap_or_else(|| die("server exited before listening"));
            if let Some(addr) = line.split("listening on ").nth(1) {
                break addr.trim().parse().expect("address");
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        thread::spawn(move || for _ in lines {});
        ServerProcess { child, addr }
    }

    /// User + system CPU seconds so far.
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(&format!("/proc/{}/stat", self.child.id()))
    }

    fn status_kb(&self, field: &str) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cpu_seconds_of(stat_path: &str) -> f64 {
    let stat = fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0 // USER_HZ is 100 on Linux
}

// ---------------------------------------------------------------------------------------------
// One scenario

fn run(scenario: &Scenario) -> Report {
    let server = ServerProcess::start();
    let receivers: Vec<StdStream> = (0..scenario.receivers)
        .map(|_| StdStream::connect(server.addr).expect("connect receiver"))
        .collect();
    let mut senders: Vec<StdStream> = (0..scenario.senders)
        .map(|_| StdStream::connect(server.addr).expect("connect sender"))
        .collect();
    for sender in &senders {
        sender.set_nodelay(true).unwrap(); // no Nagle delay on a small final write
    }
    for (index, sender) in senders.iter_mut().enumerate() {
        sender
            .write_all(format!("/nick s{index}\n").as_bytes())
            .unwrap();
    }
    let delivered = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let expected =
        scenario.receivers as u64 * scenario.senders as u64 * scenario.messages_per_sender;
    let base = Instant::now();

    // Senders receive each other's chat too; they must read it or the server would rightly
    // cut them off as slow consumers.
    let sender_inputs: Vec<StdStream> = senders.iter().map(|s| s.try_clone().unwrap()).collect();
    let receiver_thread = {
        let (delivered, ready, done) = (delivered.clone(), ready.clone(), done.clone());
        let senders = scenario.senders;
        let sending_thread = thread::current();
        thread::spawn(move || {
            let progress = Progress {
                delivered: &delivered,
                ready: &ready,
                done: &done,
                sender: sending_thread,
            };
            receive(receivers, sender_inputs, senders, base, &progress)
        })
    };
    while !ready.load(Ordering::Acquire) {
        thread::sleep(Duration::from_millis(5));
    }
    let cpu_before = server.cpu_seconds();
    let gen_before = cpu_seconds_of("/proc/self/stat");
    let started = Instant::now();
    send(&mut senders, scenario, base, &delivered);
    wait_for(&delivered, expected);
    let seconds = started.elapsed().as_secs_f64();
    let server_cpu = server.cpu_seconds() - cpu_before;
    let generator_cpu = cpu_seconds_of("/proc/self/stat") - gen_before;
    done.store(true, Ordering::Release);
    let (histogram, out_of_order) = receiver_thread.join().expect("receiver thread");
    Report {
        scenario: format!(
            "n={} p={} s={}",
            scenario.receivers, scenario.senders, scenario.size
        ),
        delivered: delivered.load(Ordering::Acquire),
        expected,
        out_of_order,
        seconds,
        server_cpu,
        generator_cpu,
        peak_rss_kb: server.status_kb("VmHWM"),
        latency_us: percentiles(&histogram),
        size: scenario.size,
    }
}

/// Waits until everything is delivered or nothing moves for `STALL`.
fn wait_for(delivered: &AtomicU64, expected: u64) {
    let mut last = (delivered.load(Ordering::Acquire), Instant::now());
    loop {
        let now = delivered.load(Ordering::Acquire);
        if now >= expected {
            return;
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > STALL {
            eprintln!("stalled at {now} of {expected} deliveries");
            return;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Sends every sender's messages, keeping at most `WINDOW_PER_SENDER` per sender in flight.
/// Whatever the window allows is written in one `write` per sender, as a real client would.
fn send(senders: &mut [StdStream], scenario: &Scenario, base: Instant, delivered: &AtomicU64) {
    let receivers = scenario.receivers as u64;
    let count = senders.len() as u64;
    let pad = "x".repeat(scenario.size - 32);
    let mut batch = Vec::new();
    let mut next_seq = 0u64;
    while next_seq < scenario.messages_per_sender {
        let in_flight = next_seq - delivered.load(Ordering::Acquire) / receivers / count;
        if in_flight >= WINDOW_PER_SENDER {
            // The receiving thread unparks us when deliveries move; the timeout is a safety net.
            thread::park_timeout(Duration::from_millis(1));
            continue;
        }
        let room = (WINDOW_PER_SENDER - in_flight).min(scenario.messages_per_sender - next_seq);
        for sender in senders.iter_mut() {
            batch.clear();
            let now = base.elapsed().as_nanos() as u64;
            for seq in next_seq..next_seq + room {
                writeln!(batch, "{seq:010} {now:020} {pad}").unwrap();
            }
            sender.write_all(&batch).expect("send");
        }
        next_seq += room;
    }
}

/// How the receiving thread reports to the sending one.
struct Progress<'a> {
    delivered: &'a AtomicU64,
    ready: &'a AtomicBool,
    done: &'a AtomicBool,
    /// Parked while its window is full.
    sender: thread::Thread,
}

/// One receiving connection's state.
struct Receiver {
    socket: TcpStream,
    buffer: Vec<u8>,
    next_seq: Vec<u64>,
}

/// Reads every receiver until `done`; returns the latency histogram and order violations.
fn receive(
    sockets: Vec<StdStream>,
    sender_inputs: Vec<StdStream>,
    senders: usize,
    base: Instant,
    progress: &Progress<'_>,
) -> (Vec<u64>, u64) {
    let mut poll = Poll::new().unwrap();
    let mut receivers: Vec<Receiver> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| Receiver {
            socket: register(&poll, socket, i),
            buffer: Vec::with_capacity(64 * 1024),
            next_seq: vec![0; senders],
        })
        .collect();
    let receiver_count = receivers.len();
    let mut discarded: Vec<TcpStream> = sender_inputs
        .into_iter()
        .enumerate()
        .map(|(i, socket)| register(&poll, socket, receiver_count + i))
        .collect();
    let mut histogram = vec![0u64; LATENCY_BUCKETS + 1];
    let mut out_of_order = 0;
    let mut renames_seen = vec![0usize; receivers.len()];
    let mut not_ready = receivers.len();
    let mut chunk = vec![0u8; 256 * 1024];
    let mut events = Events::with_capacity(4096);
    let mut local_delivered = 0u64;
    while !progress.done.load(Ordering::Acquire) {
        poll.poll(&mut events, Some(Duration::from_millis(20)))
            .unwrap();
        for event in events.iter() {
            let index = event.token().0;
            if index >= receiver_count {
                drain(&mut discarded[index - receiver_count], &mut chunk);
                continue;
            }
            let receiver = &mut receivers[index];
            loop {
                match receiver.socket.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => receiver.buffer.extend_from_slice(&chunk[..n]),
                    Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                    Err(err) => panic!("receiver read: {err}"),
                }
            }
            let now = base.elapsed().as_nanos() as u64;
            let mut start = 0;
            let buffer = &receiver.buffer;
            while let Some(end) = buffer[start..].iter().position(|&b| b == b'\n') {
                let line = &buffer[start..start + end];
                start += end + 1;
                if line.starts_with(b"<s") {
                    let (sender, seq, sent_at) = parse_message(line);
                    if seq != receiver.next_seq[sender] {
                        out_of_order += 1;
                    }
                    receiver.next_seq[sender] = seq + 1;
                    let micros = (now.saturating_sub(sent_at) / 1000) as usize;
                    histogram[micros.min(LATENCY_BUCKETS)] += 1;
                    local_delivered += 1;
                } else if line.starts_with(b"* ") && contains(line, b" is now s") {
                    renames_seen[index] += 1;
                    if renames_seen[index] == senders {
                        not_ready -= 1;
                        if not_ready == 0 {
                            progress.ready.store(true, Ordering::Release);
                        }
                    }
                }
            }
            receiver.buffer.drain(..start);
        }
        if progress.delivered.swap(local_delivered, Ordering::AcqRel) != local_delivered {
            progress.sender.unpark();
        }
    }
    (histogram, out_of_order)
}

/// Makes `socket` nonblocking and registers it for reading under `token`.
fn register(poll: &Poll, socket: StdStream, token: usize) -> TcpStream {
    socket.set_nonblocking(true).unwrap();
    let mut socket = TcpStream::from_std(socket);
    poll.registry()
        .register(&mut socket, Token(token), Interest::READABLE)
        .unwrap();
    socket
}

fn drain(socket: &mut TcpStream, chunk: &mut [u8]) {
    loop {
        match socket.read(chunk) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// `<sP> SEQ TIME pad` → (P, SEQ, TIME).
fn parse_message(line: &[u8]) -> (usize, u64, u64) {
    let text = std::str::from_utf8(line).expect("utf-8");
    let mut parts = text.split(' ');
    let name = parts.next().unwrap();
    let sender = name[2..name.len() - 1].parse().expect("sender index");
    let seq = parts.next().unwrap().parse().expect("sequence");
    let sent_at = parts.next().unwrap().parse().expect("timestamp");
    (sender, seq, sent_at)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn percentiles(histogram: &[u64]) -> [u64; 4] {
    let total: u64 = histogram.iter().sum();
    let at = |fraction: f64| -> u64 {
        let target = (total as f64 * fraction).ceil() as u64;
        let mut seen = 0;
        for (micros, count) in histogram.iter().enumerate() {
            seen += count;
            if seen >= target.max(1) {
                return micros as u64;
            }
        }
        0
    };
    let max = histogram.iter().rposition(|&c| c > 0).unwrap_or(0) as u64;
    [at(0.50), at(0.99), at(0.999), max]
}

// ---------------------------------------------------------------------------------------------
// Output

fn print_report(r: &Report) {
    let rate = r.delivered as f64 / r.seconds;
    let wire_bytes = (r.size + 8) as f64; // "<sN> " + text + "\r\n", about
    println!(
        "{:<18} {:>12.0} {:>9.1} {:>8} {:>8} {:>8} {:>8} {:>8.2} {:>13.0} {:>8.1} {:>7.2}  {}",
        r.scenario,
        rate,
        rate * wire_bytes / 1e6,
        r.latency_us[0],
        r.latency_us[1],
        r.latency_us[2],
        r.latency_us[3],
        r.server_cpu,
        r.delivered as f64 / r.server_cpu.max(0.01),
        r.peak_rss_kb as f64 / 1024.0,
        r.generator_cpu,
        if r.delivered == r.expected && r.out_of_order == 0 {
            "yes".to_string()
        } else {
            format!(
                "NO: {} of {}, {} out of order",
                r.delivered, r.expected, r.out_of_order
            )
        }
    );
}

fn save_json(r: &Report) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-results");
    let _ = fs::create_dir_all(dir);
    let line = format!(
        "{{\"scenario\":\"{}\",\"delivered\":{},\"expected\":{},\"out_of_order\":{},\"seconds\":{:.3},\
\"delivered_per_s\":{:.0},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\
\"server_cpu_s\":{:.2},\"generator_cpu_s\":{:.2},\"peak_rss_kb\":{}}}\n",
        r.scenario,
        r.delivered,
        r.expected,
        r.out_of_order,
        r.seconds,
        r.delivered as f64 / r.seconds,
        r.latency_us[0],
        r.latency_us[1],
        r.latency_us[2],
        r.latency_us[3],
        r.server_cpu,
        r.generator_cpu,
        r.peak_rss_kb
    );
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{dir}/broadcast.jsonl"));
    if let Ok(mut file) = file {
        let _ = file.write_all(line.as_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Idle memory

/// Connects `count` clients that say nothing, drains what the server sends them (join notices),
/// waits for the server's idle sweep, and reports resident memory per connection.
fn idle_memory(count: usize) {
    let server = ServerProcess::start();
    thread::sleep(Duration::from_millis(200));
    let empty_kb = server.status_kb("VmRSS");
    let mut clients: Vec<StdStream> = Vec::with_capacity(count);
    let mut sink = vec![0u8; 1 << 16];
    for i in 0..count {
        let client = StdStream::connect(server.addr).expect("connect idle client");
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
    thread::sleep(Duration::from_millis(2500)); // at least two idle sweeps
    let idle_kb = server.status_kb("VmRSS");
    let per_conn = (idle_kb.saturating_sub(empty_kb)) as f64 * 1024.0 / count as f64;
    println!(
        "idle: {count} connections, server RSS {:.1} MB (empty {:.1} MB), {:.0} bytes per connection",
        idle_kb as f64 / 1024.0,
        empty_kb as f64 / 1024.0,
        per_conn
    );
}

fn drain_all(clients: &mut [StdStream], sink: &mut [u8]) {
    for client in clients {
        loop {
            match client.read(sink) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
    }
}
