//! History bench: how soon a joining client has its history from a large collection, and what
//! history on join costs live chat.
//!
//! 1. Fill: M stored messages (default 1 000 000) spread over the last 30 days, straight
//!    through the driver, in the documents the server writes (`persist::Record`).
//! 2. Joins on an idle server: J clients join one after another, each timed from the start of
//!    its connect to its `* end of history (20 messages)` line (checked to be the newest 20).
//!    The first join after the server starts is shown on its own: it also finds where the
//!    newest messages begin.
//! 3. The same while a client chats at 200 messages/s (each history request then waits for
//!    the batch ahead of it to be stored).
//! 4. Live fan-out, n=100 p=10, with persistence on, `--history-on-join 0` against `20`,
//!    alternated, 5 runs each (medians compared), each on a new database holding a little
//!    history.
//! 5. Goals: join p99 ≤ 20 ms on an idle server; fan-out deliveries per server CPU second with
//!    history on within 5 % of off.
//!
//! ```text
//! cargo bench --bench history               # 1 000 000 stored messages, 200 joins
//! cargo bench --bench history -- --quick    # 20 000, 50 joins (CI)
//! cargo bench --bench history -- -m 100000  # any number of stored messages
//! ```
//! The database is SecantusDB in memory, or `PEERCHAT_BENCH_MONGO_URI` (see `support::db`).
//! Results are appended as JSON lines to `target/bench-results/history.jsonl`.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bson::{doc, DateTime, RawDocumentBuf};
use mongodb::options::{Acknowledgment, WriteConcern};
use mongodb::IndexModel;
use peerchat::config::DEFAULT_MONGO_COLLECTION;
use peerchat::persist::{ClientRef, Record};

use support::db::{call, client, TestDatabase};
use support::load::{self, Scenario};
use support::servers::ServerProcess;
use support::stats::{append_json, json_str, Histogram};
use support::{die, fail};

const DEFAULT_STORED: usize = 1_000_000;
const QUICK_STORED: usize = 20_000;
const DEFAULT_JOINS: usize = 200;
const QUICK_JOINS: usize = 50;
/// Messages each join gets (the server's default `--history-on-join`).
const ON_JOIN: usize = 20;
/// The stored messages span this long, ending now.
const SPAN_MILLIS: i64 = 30 * 24 * 60 * 60 * 1000;
/// Documents per `insert_many` while filling.
const FILL_BATCH: usize = 10_000;
/// Chat rate during the joins of section 3.
const CHAT_RATE: f64 = 200.0;
/// Fan-out runs: receivers, senders, bytes per message, messages/s, seconds.
const FAN_RECEIVERS: usize = 100;
const FAN_SENDERS: usize = 10;
const FAN_SIZE: usize = 64;
const FAN_RATE: f64 = 4_000.0;
/// Goals.
const GOAL_JOIN_P99_MS: f64 = 20.0;
const GOAL_FAN_OUT_WITHIN: f64 = 0.05;
const RESULTS: &str = "history.jsonl";

fn main() -> ExitCode {
    let mut args = pico_args::Arguments::from_env();
    let _ = args.contains("--bench"); // cargo bench passes it
    let quick = args.contains("--quick");
    let stored: usize = args
        .opt_value_from_str("-m")
        .unwrap_or_else(|err| die(&format!("-m: {err}")))
        .unwrap_or(if quick { QUICK_STORED } else { DEFAULT_STORED });
    if !args.finish().is_empty() {
        die("usage: cargo bench --bench history -- [--quick] [-m STORED]");
    }
    let joins = if quick { QUICK_JOINS } else { DEFAULT_JOINS };
    let run_id = format!(
        "{}-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        std::process::id()
    );
    let save = |section: &str, fields: &[(&str, String)]| {
        let mut line = vec![
            ("run", json_str(&run_id)),
            ("section", json_str(section)),
            ("quick", quick.to_string()),
            ("stored", stored.to_string()),
        ];
        line.extend_from_slice(fields);
        append_json(RESULTS, &line);
    };

    let db = TestDatabase::start();
    println!(
        "history bench: {stored} stored messages in {}",
        db.described()
    );
    let newest = fill(&db, stored, &save);
    let server = ServerProcess::peerchat(&server_flags(&db, ON_JOIN));
    let idle = time_joins(server.addr, joins, &newest, None);
    report_joins("2. joins, idle server", &idle, &save);
    let busy = time_joins(server.addr, joins, &newest, Some(CHAT_RATE));
    report_joins("3. joins, 200 msgs/s of chat", &busy, &save);
    drop(server);
    drop(db);

    let fan = fan_out(quick, &save);
    goals(&idle, fan);
    println!(
        "\nresults appended to {}/target/bench-results/{RESULTS}",
        env!("CARGO_MANIFEST_DIR")
    );
    ExitCode::SUCCESS
}

fn server_flags(db: &TestDatabase, on_join: usize) -> Vec<String> {
    let mut flags = db.server_flags();
    flags.extend(["--history-on-join".to_string(), on_join.to_string()]);
    flags
}

// ---------------------------------------------------------------------------------------------
// 1. Fill

/// Stores `count` messages `fill N` spread evenly over the last 30 days; returns the bodies of
/// the newest `ON_JOIN` as history shows them (`<nick> text`), oldest first.
fn fill(db: &TestDatabase, count: usize, save: &impl Fn(&str, &[(&str, String)])) -> Vec<String> {
    let mut options = db.client_options();
    options.write_concern = Some(WriteConcern::builder().w(Acknowledgment::Nodes(1)).build());
    let collection = client(&options)
        .database(&db.name)
        .collection::<RawDocumentBuf>(DEFAULT_MONGO_COLLECTION);
    let index = IndexModel::builder()
        .keys(doc! { "timestamp": 1, "_id": 1 })
        .build();
    call("create_index", || {
        collection.create_index(index.clone()).run()
    });
    let now = DateTime::now().timestamp_millis();
    let step = SPAN_MILLIS / count.max(1) as i64;
    let started = Instant::now();
    for first in (0..count).step_by(FILL_BATCH) {
        let documents: Vec<RawDocumentBuf> = (first..count.min(first + FILL_BATCH))
            .map(|n| {
                let at = DateTime::from_millis(now - SPAN_MILLIS + n as i64 * step);
                let sender = ClientRef { slot: 0, id: 0 };
                let addr = "127.0.0.1:40000".parse().unwrap();
                let record = Record::new(sender, &format!("u{}", n % 50), addr, &filler(n), at);
                record.document().clone()
            })
            .collect();
        call("insert_many", || {
            collection.insert_many(&documents).ordered(false).run()
        });
        let done = first + documents.len();
        if done.is_multiple_of(100_000) && done < count {
            println!(
                "1. fill: {done} of {count}, {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "1. fill: {count} messages in {seconds:.1} s ({:.0} docs/s)",
        count as f64 / seconds
    );
    save(
        "1_fill",
        &[
            ("seconds", format!("{seconds:.1}")),
            ("docs_per_s", format!("{:.0}", count as f64 / seconds)),
        ],
    );
    (count.saturating_sub(ON_JOIN)..count)
        .map(|n| format!("<u{}> {}", n % 50, filler(n)))
        .collect()
}

fn filler(n: usize) -> String {
    format!("fill {n} lorem ipsum dolor sit amet")
}

// ---------------------------------------------------------------------------------------------
// 2–3. Joins

/// Join latencies in µs, the first join's on its own (it may have to find where the newest
/// messages begin), and the chat sent meanwhile.
struct Joins {
    histogram: Histogram,
    first_us: u64,
    count: usize,
}

/// `joins` clients join one after another; each must get the newest `ON_JOIN` messages.
/// With `chat_rate`, a client chats at that rate meanwhile (its lines become the newest).
fn time_joins(addr: SocketAddr, joins: usize, newest: &[String], chat_rate: Option<f64>) -> Joins {
    let stop = Arc::new(AtomicBool::new(false));
    let chatter = chat_rate.map(|rate| {
        let stop = stop.clone();
        thread::spawn(move || chat_until(addr, rate, &stop))
    });
    if chatter.is_some() {
        thread::sleep(Duration::from_millis(500)); // under way before the first join
    }
    let mut histogram = Histogram::default();
    let mut first_us = 0;
    for join in 0..joins {
        let started = Instant::now();
        let bodies = join_and_read_history(addr);
        let micros = started.elapsed().as_micros() as u64;
        // The first join after a start also finds where the newest messages begin (windows
        // reaching back from now); it is reported on its own.
        if join == 0 {
            first_us = micros;
        } else {
            histogram.record(micros);
        }
        if bodies.len() != ON_JOIN || (chat_rate.is_none() && bodies != newest) {
            fail(&format!(
                "join {join} got {} history lines, not the newest {ON_JOIN}: {:?}",
                bodies.len(),
                bodies.first()
            ));
        }
    }
    stop.store(true, Ordering::Release);
    if let Some(chatter) = chatter {
        chatter.join().expect("chatting thread");
    }
    Joins {
        histogram,
        first_us,
        count: joins,
    }
}

/// Connects, reads the history up to its end line, and leaves; returns the history bodies.
fn join_and_read_history(addr: SocketAddr) -> Vec<String> {
    let stream = TcpStream::connect(addr).unwrap_or_else(|err| fail(&format!("connect: {err}")));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut lines = BufReader::new(stream).lines();
    let mut bodies = Vec::new();
    loop {
        let line = match lines.next() {
            Some(Ok(line)) => line,
            other => fail(&format!("no end of history line: {other:?}")),
        };
        if line.starts_with("* end of history") {
            return bodies;
        }
        if let Some((_, body)) = line.strip_prefix("* [").and_then(|l| l.split_once("] ")) {
            bodies.push(body.trim_end().to_string());
        }
    }
}

/// Sends chat lines at `rate` until `stop`.
fn chat_until(addr: SocketAddr, rate: f64, stop: &AtomicBool) {
    let mut stream = TcpStream::connect(addr).expect("connect chatter");
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Acquire) {
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            writeln!(stream, "live {sent}").expect("send chat");
            sent += 1;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn report_joins(label: &str, joins: &Joins, save: &impl Fn(&str, &[(&str, String)])) {
    let [p50, p99, _, max] = joins.histogram.percentiles();
    let ms = |micros: u64| micros as f64 / 1000.0;
    println!(
        "{label:<32} {} joins after the first: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; first {:.2} ms",
        joins.count - 1,
        ms(p50),
        ms(p99),
        ms(max),
        ms(joins.first_us)
    );
    save(
        label,
        &[
            ("joins", joins.count.to_string()),
            ("p50_us", p50.to_string()),
            ("p99_us", p99.to_string()),
            ("max_us", max.to_string()),
            ("first_us", joins.first_us.to_string()),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Fan-out with history on and off

/// Median deliveries per server CPU second over the runs, history off and on (the CPU figure
/// comes from 10 ms ticks over a second or two: single runs differ by 15 %).
struct FanOut {
    off: f64,
    on: f64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn fan_out(quick: bool, save: &impl Fn(&str, &[(&str, String)])) -> FanOut {
    let seconds = if quick { 1.0 } else { 4.0 };
    let scenario = Scenario {
        receivers: FAN_RECEIVERS,
        senders: FAN_SENDERS,
        size: FAN_SIZE,
        messages_per_sender: (FAN_RATE * seconds) as u64 / FAN_SENDERS as u64,
        window: 64,
        rate: Some(FAN_RATE),
        receive_threads: 1,
    };
    println!(
        "\n4. fan-out {} at {FAN_RATE:.0} msgs/s, persistence on:\n\
         history on join   deliv/s  p99 ms  server cpu s  deliveries per cpu s",
        scenario.label()
    );
    let runs = if quick { 1 } else { 5 };
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        off.push(fan_out_run(&scenario, 0, save));
        on.push(fan_out_run(&scenario, ON_JOIN, save));
    }
    FanOut {
        off: median(off),
        on: median(on),
    }
}

/// One run on a new database holding `ON_JOIN` messages (so history on join has some to send);
/// returns deliveries per server CPU second.
fn fan_out_run(
    scenario: &Scenario,
    on_join: usize,
    save: &impl Fn(&str, &[(&str, String)]),
) -> f64 {
    let db = TestDatabase::start();
    let collection = db.collection(DEFAULT_MONGO_COLLECTION);
    let now = DateTime::now();
    let history: Vec<_> = (0..ON_JOIN)
        .map(|n| doc! { "content": filler(n), "nick": "old", "ip": "127.0.0.1", "port": 1, "timestamp": now })
        .collect();
    call("insert_many", || collection.insert_many(&history).run());
    let server = ServerProcess::peerchat(&server_flags(&db, on_join));
    let cpu_before = server.cpu_seconds();
    let outcome = load::run(&server, scenario);
    let cpu = server.cpu_seconds() - cpu_before;
    if !outcome.complete() {
        fail(&format!(
            "fan-out with --history-on-join {on_join}: {} of {} deliveries",
            outcome.delivered, outcome.expected
        ));
    }
    let per_cpu = outcome.delivered as f64 / cpu.max(0.01);
    println!(
        "{on_join:>15} {:>9.0} {:>7.2} {:>13.2} {:>21.0}",
        outcome.delivered_per_sec(),
        outcome.latency_us[1] as f64 / 1000.0,
        cpu,
        per_cpu
    );
    save(
        "4_fan_out",
        &[
            ("history_on_join", on_join.to_string()),
            (
                "delivered_per_s",
                format!("{:.0}", outcome.delivered_per_sec()),
            ),
            ("p99_us", outcome.latency_us[1].to_string()),
            ("server_cpu_s", format!("{cpu:.2}")),
            ("deliveries_per_cpu_s", format!("{per_cpu:.0}")),
        ],
    );
    per_cpu
}

// ---------------------------------------------------------------------------------------------
// 5. Goals

/// Prints the goals. A missed goal does not fail the bench (wrong history or lost deliveries
/// do, above): these are figures to watch on a noisy machine, not assertions.
fn goals(idle: &Joins, fan: FanOut) {
    let p99_ms = idle.histogram.percentiles()[1] as f64 / 1000.0;
    let ratio = fan.on / fan.off.max(1.0);
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("\n5. goals");
    println!(
        "join → end of history p99 ≤ {GOAL_JOIN_P99_MS} ms (idle): {p99_ms:.2} ms — {}",
        met(p99_ms <= GOAL_JOIN_P99_MS)
    );
    println!(
        "fan-out deliveries per CPU s (medians), history on / off within {:.0}%: {:.3} — {}",
        GOAL_FAN_OUT_WITHIN * 100.0,
        ratio,
        met(ratio >= 1.0 - GOAL_FAN_OUT_WITHIN)
    );
}
