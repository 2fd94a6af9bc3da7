//! Storage benchmark: how many chat messages per second reach MongoDB, how long each one waits
//! to be acknowledged, and what storing costs the chat.
//!
//! It stores in the same MongoDB-compatible server the tests use, SecantusDB, a new one for
//! each measurement, or in the server named by `PEERCHAT_BENCH_MONGO_URI` (see
//! `support::db`). Every document is encoded by `persist::Record::new`, as the server
//! encodes it, and written with the server's write concern (`persist::write_concern`: `j: true`
//! unless the URI says otherwise).
//!
//! 1. The ceiling: unordered `insert_many` batches straight through the driver, with the
//!    server's write concern and without `j: true`.
//! 2. The naive design: one `insert_one` per message, from one thread.
//! 3. The real persistence thread (`persist::Persister`), fed as fast as its queue takes.
//! 4. Acceptance → acknowledged latency at a steady 80 % of the rate of section 3.
//! 5. Fan-out through `peerchat-server` (100 receivers, 10 senders): persistence off and on at
//!    80 % of the ceiling, then on and flat out.
//! 6. Goals: batched ≥ 15× naive, batched ≥ 80 % of the ceiling; with persistence on at 80 %,
//!    < 10 % more server CPU per delivery, ≤ 3 µs of CPU per message in the threads outside the
//!    loop (persistence and driver), and every message stored; flat out, every message stored or
//!    reported and every delivery made.
//!
//! ```text
//! cargo bench --bench persist               # 100 000 messages
//! cargo bench --bench persist -- --quick    # 5 000 messages (CI)
//! cargo bench --bench persist -- -m 20000   # any number
//! ```
//! Results are printed as tables and appended as JSON lines to
//! `target/bench-results/persist.jsonl`. Every wait is bounded. It exits with 1 if a message
//! is not stored exactly once, is neither stored nor reported, or misses a receiver, or if the
//! database gets stuck.

mod support;

use std::cell::Cell;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bson::{doc, RawDocumentBuf};
use mongodb::options::{Acknowledgment, ClientOptions, WriteConcern};
use mongodb::sync::Collection;
use mongodb::IndexModel;
use peerchat::config::{DEFAULT_MONGO_COLLECTION, DEFAULT_PERSIST_QUEUE};
use peerchat::persist::{self, ClientRef, PersistStats, Persister, Record, Report, MAX_BATCH};
use peerchat::StoreConfig;

use support::db::{call, TestDatabase};
use support::load::{self, Outcome, Scenario};
use support::servers::ServerProcess;
use support::stats::{append_json, cpu_seconds, json_str, Histogram};
use support::{die, fail};

/// Messages stored in sections 1 and 3, unless `-m` says otherwise.
const DEFAULT_MESSAGES: usize = 100_000;
const QUICK_MESSAGES: usize = 5_000;
/// Chat text per message, in bytes.
const CONTENT_BYTES: usize = 64;
/// Distinct senders the messages of sections 1–4 come from.
const SENDERS: usize = 50;
/// Sections 4 and 5 send at this fraction of a measured rate.
const STEADY_FRACTION: f64 = 0.8;
/// Goals: the persistence thread stores at least this many times what one `insert_one` per
/// message does...
const GOAL_OVER_NAIVE: f64 = 15.0;
/// ...and at least this fraction of what direct `insert_many` does with the same write concern.
const GOAL_OF_CEILING: f64 = 0.8;
/// Goal: persistence on adds less than this fraction to the server's CPU per delivery.
const GOAL_CPU_OVERHEAD: f64 = 0.10;
/// Goal: the threads outside the event loop (persistence and the driver's) spend at most this
/// many microseconds of CPU per stored message, in the fan-out run at 80 %.
const GOAL_PERSIST_CPU_US: f64 = 3.0;
/// The persistence thread, in sections 3 and 4, is stuck if it finishes nothing for this long.
const STALL: Duration = Duration::from_secs(30);
/// How often sections 3 and 4 look at the persistence thread.
const TICK: Duration = Duration::from_micros(100);
/// Batches of failure reports the thread may hand over before it waits for the bench to read
/// them (the server's inbox is bounded the same way).
const REPORTS_IN_FLIGHT: usize = 256;
/// Receivers and senders of the fan-out runs.
const FAN_OUT_RECEIVERS: usize = 100;
const FAN_OUT_SENDERS: usize = 10;
/// After a fan-out run the server has stored all it will once its count has not moved for this
/// long: more than the 3 × `--mongo-timeout-ms` it gives a batch before reporting it unsaved.
const SETTLE: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    // The persistence thread logs its connection at INFO; that would break up the table.
    peerchat::log::set_min_level(peerchat::log::Level::Warn);
    let bench = Bench::from_args();
    bench.print_intro();

    let ceiling = direct_insert_many(&bench);
    let naive = naive_insert_one(&bench);
    let batched = batched_through_persister(&bench);
    latency_at_steady_rate(&bench, batched.per_second());
    let fan_out = fan_out(&bench, ceiling.per_second());
    goals(&bench, &naive, &batched, ceiling.per_second(), &fan_out);

    println!(
        "\nresults appended to {}/target/bench-results/{RESULTS}",
        env!("CARGO_MANIFEST_DIR")
    );
    if bench.failed.get() {
        eprintln!("\n!!! BENCH FAILURE: messages not stored exactly once, or lost (see above) !!!");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// What every section needs to know.
struct Bench {
    messages: usize,
    quick: bool,
    /// Tells this run's JSON lines apart from earlier ones.
    run_id: String,
    /// Where the measurements store, for the output and the JSON lines.
    database: String,
    own_secantusdb: bool,
    /// What `Concern::Server` and `Concern::Plain` are with this run's URI, e.g. "j:true".
    concerns: [String; 2],
    /// Some message was not stored exactly once, or lost; `main` exits with 1.
    failed: Cell<bool>,
}

impl Bench {
    fn from_args() -> Bench {
        let mut args = pico_args::Arguments::from_env();
        let _ = args.contains("--bench"); // cargo bench passes it
        let quick = args.contains("--quick");
        let messages: usize = args
            .opt_value_from_str("-m")
            .unwrap_or_else(|err| usage(&format!("-m: {err}")))
            .unwrap_or(if quick {
                QUICK_MESSAGES
            } else {
                DEFAULT_MESSAGES
            });
        let rest = args.finish();
        if !rest.is_empty() {
            usage(&format!("unexpected arguments {rest:?}"));
        }
        if messages == 0 {
            usage("-m must be at least 1");
        }
        // Installs SecantusDB if need be and checks a database answers before anything else.
        let probe = TestDatabase::start();
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Bench {
            messages,
            quick,
            run_id: format!("{}-{}", started.as_secs(), std::process::id()),
            database: match probe.is_own_secantusdb() {
                true => format!("{}, a new one per measurement", probe.described()),
                false => probe.described(),
            },
            own_secantusdb: probe.is_own_secantusdb(),
            concerns: [Concern::Server, Concern::Plain].map(|concern| {
                let mut options = probe.client_options();
                concern.apply(&mut options);
                describe(&options.write_concern.unwrap_or_default())
            }),
            failed: Cell::new(false),
        }
    }

    fn print_intro(&self) {
        println!(
            "persist bench: {} messages of {CONTENT_BYTES} bytes from {SENDERS} senders",
            self.messages
        );
        println!("storing in {}", self.database);
        println!(
            "write concern: server's {} (persist::write_concern), plain {}\n",
            self.label(Concern::Server),
            self.label(Concern::Plain)
        );
        println!(
            "{:<44} {:>8} {:>8} {:>10} {:>8} {:>8} {:>8}  stored",
            "measurement", "docs", "seconds", "docs/s", "p50 ms", "p99 ms", "max ms"
        );
    }

    fn label(&self, concern: Concern) -> &str {
        &self.concerns[concern as usize]
    }

    /// Says loudly that messages were not stored exactly once, and makes the bench fail.
    fn check_failed(&self, message: &str) {
        eprintln!("\n!!! {message} !!!\n");
        self.failed.set(true);
    }

    /// True if `collection` holds exactly `expected` documents; says loudly if not. `_id` is
    /// unique, so no message can be stored twice: the right count means each is stored once.
    fn stored_once(&self, db: &TestDatabase, collection: &str, expected: usize) -> bool {
        let count = db.count(collection);
        let right = count == expected as u64;
        if !right {
            self.check_failed(&format!(
                "{collection} holds {count} documents, expected {expected}"
            ));
        }
        right
    }

    /// Appends one section's figures to the results, after what every line has.
    fn save(&self, section: &str, fields: &[(&str, String)]) {
        let mut line = vec![
            ("run", json_str(&self.run_id)),
            ("section", json_str(section)),
            ("quick", self.quick.to_string()),
            ("messages", self.messages.to_string()),
            ("database", json_str(&self.database)),
        ];
        line.extend_from_slice(fields);
        append_json(RESULTS, &line);
    }
}

const RESULTS: &str = "persist.jsonl";

fn usage(message: &str) -> ! {
    die(&format!(
        "{message}\nusage: cargo bench --bench persist -- [--quick] [-m MESSAGES]"
    ))
}

/// The write concerns the bench compares.
#[derive(Clone, Copy)]
enum Concern {
    /// The server's: `persist::write_concern` of the URI's.
    Server = 0,
    /// The URI's own, which for a plain URI is the driver's default: no `j`.
    Plain = 1,
}

impl Concern {
    fn apply(self, options: &mut ClientOptions) {
        if let Concern::Server = self {
            options.write_concern = Some(persist::write_concern(options.write_concern.take()));
        }
    }
}

fn describe(concern: &WriteConcern) -> String {
    let journal = match concern.journal {
        Some(true) => "j:true",
        Some(false) => "j:false",
        None => "no j",
    };
    match &concern.w {
        Some(Acknowledgment::Nodes(nodes)) => format!("w:{nodes} {journal}"),
        Some(Acknowledgment::Majority) => format!("w:majority {journal}"),
        Some(other) => format!("w:{other:?} {journal}"),
        None => journal.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Sections 1 and 2: straight through the driver

/// Section 1: what the database itself can take: the server's documents in unordered
/// `insert_many` batches of `MAX_BATCH`. Once with the server's write concern, once with the
/// URI's plain one, to show what waiting for the journal costs. Returns the first: the ceiling
/// the persistence thread is measured against.
fn direct_insert_many(bench: &Bench) -> Throughput {
    let documents = documents(bench.messages);
    let [server, plain] = [Concern::Server, Concern::Plain].map(|concern| {
        let db = TestDatabase::start();
        let collection = indexed_collection(&db, "direct_insert_many", concern);
        let started = Instant::now();
        for batch in documents.chunks(MAX_BATCH) {
            call("insert_many", || {
                collection.insert_many(batch).ordered(false).run()
            });
        }
        let result = Throughput {
            label: format!("1. insert_many ×{MAX_BATCH}, {}", bench.label(concern)),
            documents: documents.len(),
            elapsed: started.elapsed(),
        };
        let stored = bench.stored_once(&db, "direct_insert_many", documents.len());
        result.print(None, stored);
        result
    });
    if bench.own_secantusdb {
        println!(
            "     (SecantusDB keeps no journal with --storage-path :memory:, so j:true costs nothing \
here; on disk every j:true commit is an fsync)"
        );
    }
    bench.save(
        "1_direct_insert_many",
        &[
            ("documents", documents.len().to_string()),
            ("batch", MAX_BATCH.to_string()),
            ("server_concern", json_str(bench.label(Concern::Server))),
            (
                "server_concern_per_s",
                format!("{:.0}", server.per_second()),
            ),
            ("plain_concern", json_str(bench.label(Concern::Plain))),
            ("plain_concern_per_s", format!("{:.0}", plain.per_second())),
        ],
    );
    server
}

/// Section 2: what a server that inserts each message from its loop would get: one
/// `insert_one` per message, each waiting for its answer, with the server's write concern.
/// Fewer messages than the other sections, so it takes seconds, not minutes.
fn naive_insert_one(bench: &Bench) -> Throughput {
    let documents = documents((bench.messages / 10).max(1000));
    let db = TestDatabase::start();
    let collection = indexed_collection(&db, "naive_insert_one", Concern::Server);
    let started = Instant::now();
    for document in &documents {
        call("insert_one", || collection.insert_one(document).run());
    }
    let result = Throughput {
        label: format!("2. insert_one each, {}", bench.label(Concern::Server)),
        documents: documents.len(),
        elapsed: started.elapsed(),
    };
    result.print(
        None,
        bench.stored_once(&db, "naive_insert_one", documents.len()),
    );
    bench.save(
        "2_naive_insert_one",
        &[
            ("documents", result.documents.to_string()),
            ("per_s", format!("{:.0}", result.per_second())),
        ],
    );
    result
}

/// `name` in `db`, written to with `concern`, with the `timestamp` index the server creates,
/// so that inserts pay for it here too.
fn indexed_collection(
    db: &TestDatabase,
    name: &str,
    concern: Concern,
) -> Collection<RawDocumentBuf> {
    let mut options = db.client_options();
    concern.apply(&mut options);
    let collection = support::db::client(&options)
        .database(&db.name)
        .collection(name);
    let index = IndexModel::builder().keys(doc! { "timestamp": 1 }).build();
    call("create_index", || collection.create_index(index).run());
    collection
}

// ---------------------------------------------------------------------------------------------
// Sections 3 and 4: through the persistence thread

/// Section 3: the real persistence thread, fed as fast as its queue takes messages, timed from
/// the first submit until the thread has finished with the last one.
fn batched_through_persister(bench: &Bench) -> Throughput {
    let db = TestDatabase::start();
    let mut rig = Rig::start(&db, "batched_persister");
    let started = Instant::now();
    let mut refusals = 0;
    for index in 0..bench.messages {
        while !rig.offer(index) {
            refusals += 1; // the queue is full: wait for the thread to take some
            rig.tick();
        }
    }
    while rig.persister.settled() < rig.submitted {
        rig.tick();
    }
    let result = Throughput {
        label: format!("3. Persister, queue {DEFAULT_PERSIST_QUEUE}"),
        documents: bench.messages,
        elapsed: started.elapsed(),
    };
    let stats = rig.finish(bench);
    result.print(
        None,
        bench.stored_once(&db, "batched_persister", bench.messages + 1),
    );
    println!(
        "     queue capacity {DEFAULT_PERSIST_QUEUE} (the server's default --persist-queue), \
full {refusals} times while submitting; {} saved, {} reported",
        stats.saved, stats.failed
    );
    bench.save(
        "3_batched_persister",
        &[
            ("documents", result.documents.to_string()),
            ("queue_capacity", DEFAULT_PERSIST_QUEUE.to_string()),
            ("per_s", format!("{:.0}", result.per_second())),
            ("queue_full_refusals", refusals.to_string()),
            ("saved", stats.saved.to_string()),
            ("not_saved", stats.failed.to_string()),
        ],
    );
    result
}

/// Section 4: how long a message waits between acceptance (its `submit`) and the thread having
/// finished with it, when messages arrive steadily at 80 % of what section 3 measured. The
/// thread stores in FIFO order, so message i is done when `settled()` first passes i; one loop
/// submits what the clock says is due, then looks at `settled()`, every `TICK`.
fn latency_at_steady_rate(bench: &Bench, batched_per_s: f64) {
    let rate = batched_per_s * STEADY_FRACTION;
    let seconds = if bench.quick { 0.5 } else { 3.0 };
    let count = ((rate * seconds) as usize).max(100);
    let db = TestDatabase::start();
    let mut rig = Rig::start(&db, "steady_latency");
    let before = rig.persister.settled(); // the warm-up message
    let mut submitted_at: Vec<Instant> = Vec::with_capacity(count);
    let mut latency = Histogram::default();
    let mut measured = 0;
    let mut refusals = 0u64;
    let started = Instant::now();
    while measured < count {
        let due = ((started.elapsed().as_secs_f64() * rate) as usize + 1).min(count);
        while submitted_at.len() < due {
            if !rig.offer(submitted_at.len()) {
                refusals += 1; // full (it should not be at this rate): try again next turn
                break;
            }
            submitted_at.push(Instant::now());
        }
        // Messages measured..settled were finished since the last look: now.
        let settled = (rig.persister.settled() - before) as usize;
        let now = Instant::now();
        for submitted in &submitted_at[measured..settled] {
            latency.record((now - *submitted).as_micros() as u64);
        }
        measured = settled;
        rig.tick();
    }
    let result = Throughput {
        label: format!(
            "4. Persister at {:.0}% ({rate:.0}/s)",
            STEADY_FRACTION * 100.0
        ),
        documents: count,
        elapsed: submitted_at[count - 1] - started,
    };
    let [p50, p99, _, max] = latency.percentiles();
    let stats = rig.finish(bench);
    result.print(
        Some([p50, p99, max]),
        bench.stored_once(&db, "steady_latency", count + 1),
    );
    println!(
        "     docs/s here is the rate achieved while submitting; {refusals} refused (queue full); \
{} saved, {} reported",
        stats.saved, stats.failed
    );
    bench.save(
        "4_steady_latency",
        &[
            ("documents", count.to_string()),
            ("target_per_s", format!("{rate:.0}")),
            ("achieved_per_s", format!("{:.0}", result.per_second())),
            ("p50_us", p50.to_string()),
            ("p99_us", p99.to_string()),
            ("max_us", max.to_string()),
            ("queue_full_refusals", refusals.to_string()),
            ("not_saved", stats.failed.to_string()),
        ],
    );
}

/// The real persistence thread, with the bench in the event loop's place: it holds the channel
/// the thread reports to, and reads what is reported there.
struct Rig {
    persister: Persister,
    inbox: Receiver<Report>,
    /// Messages the queue took.
    submitted: u64,
    /// Reasons given for messages reported not saved. There should be none.
    not_saved: Vec<String>,
    /// `settled()` when it last moved (or had caught up), and when.
    progress: (u64, Instant),
}

impl Rig {
    /// Starts the thread with the server's defaults, storing into `collection`, and has it
    /// store one message, so timing starts with the connection made and the `timestamp` index
    /// in place, as on a server that has been running.
    fn start(db: &TestDatabase, collection: &str) -> Rig {
        let mut config = StoreConfig::new(&db.uri);
        config.database = db.name.clone();
        config.collection = collection.to_string();
        let (reports, inbox) = mpsc::sync_channel(REPORTS_IN_FLIGHT);
        let persister = Persister::start(config, reports)
            .unwrap_or_else(|err| die(&format!("starting the persistence thread: {err}")));
        let mut rig = Rig {
            persister,
            inbox,
            submitted: 0,
            not_saved: Vec::new(),
            progress: (0, Instant::now()),
        };
        while !rig.offer(0) {
            rig.tick();
        }
        while rig.persister.settled() < 1 {
            rig.tick();
        }
        rig
    }

    /// Offers message `index` to the queue once; false if the queue is full. Any other refusal
    /// means the thread has stopped, and fails the bench.
    fn offer(&mut self, index: usize) -> bool {
        match self.persister.submit(message(index)) {
            Ok(()) => {
                self.submitted += 1;
                true
            }
            Err(refused) if refused.reason.contains("queue full") => false,
            Err(refused) => fail(&format!(
                "the persistence thread refused a message: {}",
                refused.reason
            )),
        }
    }

    /// Between looks at the thread: reads what it reported, fails the bench if it has finished
    /// nothing for `STALL` while it had work, and sleeps for a `TICK`.
    fn tick(&mut self) {
        drain_into(&self.inbox, &mut self.not_saved);
        let settled = self.persister.settled();
        if settled != self.progress.0 || settled == self.submitted {
            self.progress = (settled, Instant::now());
        } else if self.progress.1.elapsed() > STALL {
            fail(&format!(
                "the persistence thread finished nothing for {STALL:?}: the database is stuck"
            ));
        }
        thread::sleep(TICK);
    }

    /// Stops the thread (after what is queued) and says loudly if any message was not saved.
    fn finish(self, bench: &Bench) -> PersistStats {
        let Rig {
            persister,
            inbox,
            mut not_saved,
            ..
        } = self;
        let stats = persister
            .finish(STALL, || drain_into(&inbox, &mut not_saved))
            .unwrap_or_else(|unsettled| {
                fail(&format!(
                    "the persistence thread did not finish {unsettled} messages within {STALL:?}"
                ))
            });
        drain_into(&inbox, &mut not_saved);
        if !not_saved.is_empty() || stats.failed > 0 {
            bench.check_failed(&format!(
                "{} messages reported NOT SAVED ({} by the thread's count); first reason: {}",
                not_saved.len(),
                stats.failed,
                not_saved.first().map_or("?", String::as_str)
            ));
        }
        stats
    }
}

/// Takes the failure reports waiting (the bench asks for no history, so there are no others).
fn drain_into(inbox: &Receiver<Report>, not_saved: &mut Vec<String>) {
    for report in inbox.try_iter() {
        if let Report::NotSaved(failures) = report {
            not_saved.extend(failures.into_iter().map(|failure| failure.reason));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Section 5: fan-out through the server

/// What the fan-out runs found, for the goals.
struct FanOut {
    off: FanOutRun,
    on: FanOutRun,
    flat: FanOutRun,
}

/// One fan-out run and what became of its messages.
struct FanOutRun {
    outcome: Outcome,
    /// Messages the senders sent.
    sent: u64,
    stored: u64,
    /// Neither stored nor reported `! not saved`.
    missing: u64,
    /// Server CPU seconds (the loop and the persistence threads) from the clients connecting
    /// until every message was stored or reported...
    cpu: f64,
    /// ...and of the event loop thread alone.
    loop_cpu: f64,
    /// CPU seconds of the threads other than the loop (persistence and driver), to the
    /// nanosecond (`/proc` ticks are 10 ms, too coarse for a few microseconds per message).
    outside_loop_cpu: f64,
}

impl FanOutRun {
    fn cpu_per_delivery(&self) -> f64 {
        self.cpu / self.outcome.delivered.max(1) as f64
    }
}

/// Section 5: chat fan-out through the real server, each run on a new server and, with
/// persistence on, a new database: at a rate the database absorbs (80 % of its ceiling) with
/// persistence off and on, then on and flat out.
fn fan_out(bench: &Bench, ceiling_per_s: f64) -> FanOut {
    let rate = STEADY_FRACTION * ceiling_per_s;
    let seconds = if bench.quick { 1.0 } else { 5.0 };
    let paced = ((rate * seconds) as u64 / FAN_OUT_SENDERS as u64).max(10);
    // Flat out sends at least twice what the save queue holds, so that it overflows.
    let flat = paced.max(2 * DEFAULT_PERSIST_QUEUE as u64 / FAN_OUT_SENDERS as u64);
    let scenario = |messages_per_sender, rate| Scenario {
        receivers: FAN_OUT_RECEIVERS,
        senders: FAN_OUT_SENDERS,
        size: CONTENT_BYTES,
        messages_per_sender,
        window: 64,
        rate,
        receive_threads: 1,
    };
    println!(
        "\n5. fan-out through peerchat-server: n={FAN_OUT_RECEIVERS} p={FAN_OUT_SENDERS} \
s={CONTENT_BYTES}; at 80% of the ceiling ({rate:.0} messages/s) {paced} messages per sender, \
flat out {flat}"
    );
    println!(
        "run                           deliv/s  p99 ms  stored not saved missing  cpu s loop s \
ns/deliv rss MB"
    );
    let [off, on, flat] = [
        ("persistence off, 80%", false, paced, Some(rate)),
        ("persistence on, 80%", true, paced, Some(rate)),
        ("persistence on, flat out", true, flat, None),
    ]
    .map(|(label, persist, messages_per_sender, rate)| {
        fan_out_run(bench, label, persist, &scenario(messages_per_sender, rate))
    });
    FanOut { off, on, flat }
}

/// Runs `scenario` against a new server, storing into a new database if `persist`, then waits
/// until the server has stored all it will.
fn fan_out_run(bench: &Bench, label: &str, persist: bool, scenario: &Scenario) -> FanOutRun {
    let db = persist.then(TestDatabase::start);
    let mut flags = db.as_ref().map_or_else(
        || vec!["--no-persist".to_string()],
        TestDatabase::server_flags,
    );
    // This bench measures storing. The receivers' history queries on joining would count in
    // the persistence threads' CPU per stored message (44 ms over the 5 000 messages of a
    // quick run); the history bench measures them.
    flags.extend(["--history-on-join", "0"].map(String::from));
    let server = ServerProcess::peerchat(&flags);
    // The whole server, and its event loop thread alone.
    let loop_stat = format!("/proc/{0}/task/{0}/stat", server.pid());
    let cpu_before = (server.cpu_seconds(), cpu_seconds(&loop_stat));
    let outside_before = outside_loop_cpu_seconds(server.pid());
    let outcome = load::run(&server, scenario);
    let sent = scenario.senders as u64 * scenario.messages_per_sender;
    let stored = db.as_ref().map_or(0, |db| {
        stored_when_settled(db, sent.saturating_sub(outcome.not_saved))
    });
    let run = FanOutRun {
        sent,
        stored,
        missing: match persist {
            true => sent.saturating_sub(stored + outcome.not_saved),
            false => 0,
        },
        cpu: server.cpu_seconds() - cpu_before.0,
        loop_cpu: cpu_seconds(&loop_stat) - cpu_before.1,
        outside_loop_cpu: outside_loop_cpu_seconds(server.pid()) - outside_before,
        outcome,
    };
    let o = &run.outcome;
    let figure = |value: u64| match persist {
        true => value.to_string(),
        false => "-".to_string(),
    };
    println!(
        "{label:<26} {:>10.0} {:>7.2} {:>7} {:>9} {:>7} {:>6.2} {:>6.2} {:>8.0} {:>6.1}",
        o.delivered_per_sec(),
        o.latency_us[1] as f64 / 1000.0,
        figure(run.stored),
        figure(o.not_saved),
        figure(run.missing),
        run.cpu,
        run.loop_cpu,
        run.cpu_per_delivery() * 1e9,
        o.peak_rss_kib as f64 / 1024.0,
    );
    if !o.complete() {
        bench.check_failed(&format!(
            "{label}: {} of {} deliveries made, {} out of order",
            o.delivered, o.expected, o.out_of_order
        ));
    }
    if run.missing > 0 || run.stored > sent {
        bench.check_failed(&format!(
            "{label}: of {sent} messages {} stored and {} reported not saved: {} lost",
            run.stored, o.not_saved, run.missing
        ));
    }
    bench.save(
        "5_fan_out",
        &[
            ("run_label", json_str(label)),
            ("persist", persist.to_string()),
            ("receivers", scenario.receivers.to_string()),
            ("senders", scenario.senders.to_string()),
            ("size", scenario.size.to_string()),
            (
                "rate_per_s",
                scenario.rate.map_or("null".into(), |r| format!("{r:.0}")),
            ),
            ("sent", sent.to_string()),
            ("delivered", o.delivered.to_string()),
            ("expected", o.expected.to_string()),
            ("delivered_per_s", format!("{:.0}", o.delivered_per_sec())),
            ("p99_us", o.latency_us[1].to_string()),
            ("stored", run.stored.to_string()),
            ("not_saved", o.not_saved.to_string()),
            ("missing", run.missing.to_string()),
            ("server_cpu_s", format!("{:.2}", run.cpu)),
            ("loop_cpu_s", format!("{:.2}", run.loop_cpu)),
            ("outside_loop_cpu_s", format!("{:.4}", run.outside_loop_cpu)),
            (
                "server_ns_per_delivery",
                format!("{:.1}", run.cpu_per_delivery() * 1e9),
            ),
            ("peak_rss_kib", o.peak_rss_kib.to_string()),
        ],
    );
    run
}

/// CPU seconds of the server's threads other than the event loop (the main thread), from
/// each thread's `schedstat` (nanoseconds on the CPU). Threads that have ended are not counted;
/// in these runs none end (a worker ends only after its client was given up on).
fn outside_loop_cpu_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let nanos: u64 = tasks
        .flatten()
        .filter(|task| task.file_name().to_str() != Some(pid.to_string().as_str()))
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    nanos as f64 / 1e9
}

/// Messages in the server's collection once it holds `expected` of them or has not grown for
/// `SETTLE`.
fn stored_when_settled(db: &TestDatabase, expected: u64) -> u64 {
    let (mut stored, mut since) = (db.count(DEFAULT_MONGO_COLLECTION), Instant::now());
    while stored < expected && since.elapsed() < SETTLE {
        thread::sleep(Duration::from_millis(50));
        let now = db.count(DEFAULT_MONGO_COLLECTION);
        if now != stored {
            (stored, since) = (now, Instant::now());
        }
    }
    stored
}

// ---------------------------------------------------------------------------------------------
// Section 6: goals

/// Section 6: the goals of the persistence design, each printed as met or not met.
fn goals(bench: &Bench, naive: &Throughput, batched: &Throughput, ceiling: f64, fan: &FanOut) {
    println!("\n6. goals");
    let goal = |met: bool, goal: String, figure: String| {
        println!(
            "  {:<8} {goal}: {figure}",
            if met { "met" } else { "NOT MET" }
        );
        met
    };
    let over_naive = batched.per_second() / naive.per_second();
    let of_ceiling = batched.per_second() / ceiling;
    let cpu_overhead = fan.on.cpu_per_delivery() / fan.off.cpu_per_delivery() - 1.0;
    let (on, flat) = (&fan.on, &fan.flat);
    let met = [
        goal(
            over_naive >= GOAL_OVER_NAIVE,
            format!("batched ≥ {GOAL_OVER_NAIVE}× naive insert_one"),
            format!("{over_naive:.1}×"),
        ),
        goal(
            of_ceiling >= GOAL_OF_CEILING,
            format!(
                "batched ≥ {:.0}% of direct insert_many (same w.c.)",
                GOAL_OF_CEILING * 100.0
            ),
            format!("{:.0}%", of_ceiling * 100.0),
        ),
        goal(
            cpu_overhead < GOAL_CPU_OVERHEAD,
            format!(
                "fan-out at 80%, persistence on costs < {:.0}% more server CPU per delivery",
                GOAL_CPU_OVERHEAD * 100.0
            ),
            format!("{:+.1}%", cpu_overhead * 100.0),
        ),
        goal(
            on.stored == on.sent && on.outcome.not_saved == 0,
            "fan-out at 80%, every message stored".to_string(),
            format!("{} of {}", on.stored, on.sent),
        ),
        goal(
            flat.missing == 0 && flat.stored <= flat.sent && flat.outcome.complete(),
            "fan-out flat out, excess reported, none lost, every delivery made".to_string(),
            format!(
                "{} stored + {} reported of {}, {} lost; {} of {} deliveries",
                flat.stored,
                flat.outcome.not_saved,
                flat.sent,
                flat.missing,
                flat.outcome.delivered,
                flat.outcome.expected
            ),
        ),
    ];
    // At a paced rate the loop's CPU per delivery depends mostly on how often it wakes, and a
    // busy database makes it wake less often; so also show what the threads outside the loop
    // (persistence, driver) cost on their own.
    let persistence_threads = (on.cpu - on.loop_cpu) / fan.off.cpu;
    println!(
        "           (the threads outside the loop used {:.2} s with persistence on: {:.1}% of the \
         server's CPU with persistence off)",
        on.cpu - on.loop_cpu,
        persistence_threads * 100.0
    );
    let per_message_us = on.outside_loop_cpu / on.sent.max(1) as f64 * 1e6;
    let per_message_met = per_message_us <= GOAL_PERSIST_CPU_US;
    println!(
        "  persistence threads CPU per message: {per_message_us:.1} µs (goal ≤ {GOAL_PERSIST_CPU_US} \
         µs): {}",
        if per_message_met { "met" } else { "NOT MET" }
    );
    bench.save(
        "6_goals",
        &[
            ("batched_over_naive", format!("{over_naive:.2}")),
            ("batched_over_naive_met", met[0].to_string()),
            ("batched_over_ceiling", format!("{of_ceiling:.3}")),
            ("batched_over_ceiling_met", met[1].to_string()),
            ("fan_out_cpu_overhead", format!("{cpu_overhead:.3}")),
            ("fan_out_cpu_overhead_met", met[2].to_string()),
            (
                "persistence_threads_cpu_share",
                format!("{persistence_threads:.3}"),
            ),
            (
                "persistence_threads_us_per_message",
                format!("{per_message_us:.2}"),
            ),
            (
                "persistence_threads_us_per_message_met",
                per_message_met.to_string(),
            ),
            ("fan_out_all_stored_met", met[3].to_string()),
            ("fan_out_flat_none_lost_met", met[4].to_string()),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Messages and results

/// Nicks of the senders; every fifth sender has none and is named `IP:PORT`, as on the server.
const NICKS: [&str; 10] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
];

/// Message `index` as the server would accept it, from one of `SENDERS` senders, with
/// `CONTENT_BYTES` of text numbered so that no two are alike.
fn message(index: usize) -> Record {
    let sender = index % SENDERS;
    let addr = SocketAddr::from(([192, 0, 2, 10 + sender as u8], 40_000 + 37 * sender as u16));
    let nick = match sender % 5 {
        4 => addr.to_string(),
        _ => format!("{}{}", NICKS[sender % NICKS.len()], sender / NICKS.len()),
    };
    let mut content = format!("message {index}: ");
    while content.len() < CONTENT_BYTES {
        content.push_str("the quick brown fox jumps over the lazy dog ");
    }
    content.truncate(CONTENT_BYTES);
    let sender_ref = ClientRef {
        slot: sender,
        id: sender as u64 + 1,
    };
    Record::new(sender_ref, &nick, addr, &content, bson::DateTime::now())
}

/// `count` documents encoded exactly as the server encodes them.
fn documents(count: usize) -> Vec<RawDocumentBuf> {
    (0..count)
        .map(|index| message(index).document().clone())
        .collect()
}

/// One throughput figure.
struct Throughput {
    label: String,
    documents: usize,
    elapsed: Duration,
}

impl Throughput {
    fn per_second(&self) -> f64 {
        self.documents as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// One row of the table; `latency_us` is p50, p99 and max.
    fn print(&self, latency_us: Option<[u64; 3]>, stored_once: bool) {
        let [p50, p99, max] = match latency_us {
            Some(latency) => latency.map(|micros| format!("{:.2}", micros as f64 / 1000.0)),
            None => ["-", "-", "-"].map(String::from),
        };
        println!(
            "{:<44} {:>8} {:>8.2} {:>10.0} {p50:>8} {p99:>8} {max:>8}  {}",
            self.label,
            self.documents,
            self.elapsed.as_secs_f64(),
            self.per_second(),
            if stored_once { "all, once" } else { "NO" }
        );
    }
}
