//! Broadcast fan-out benchmark: how many chat lines per second peerchat delivers, and the same
//! for Redis pub/sub driven by the same load generator in the same run.
//!
//! ```text
//! cargo bench --bench broadcast                          # default scenarios, peerchat only
//! cargo bench --bench broadcast -- --peer redis --runs 3 # side by side with redis-server
//! cargo bench --bench broadcast -- --quick               # tiny run (CI), TLS rows included
//! cargo bench --bench broadcast -- --tls --peer redis --runs 3  # n=100 p=10, plain and over TLS
//! cargo bench --bench broadcast -- -n 100 -p 10 -s 64 -m 20000 --window 64,256
//! cargo bench --bench broadcast -- --idle 1000,10000     # idle memory per connection only
//! cargo bench --bench broadcast -- --storm 10000 --peer redis  # reconnect storm only
//! cargo bench --bench broadcast -- --nodes 3             # cluster: 3 nodes on one database
//! cargo bench --bench broadcast -- --nodes 2,3 --rate 2000 --seconds 20 -n 60 -p 10
//! ```
//! Flags: `-n` receivers, `-p` senders, `-s` message bytes, `-m` messages per sender, `--window`
//! messages in flight per sender (a list runs every scenario with each), `--threads` receiving threads, `--runs` runs per server (the
//! best is kept), `--peer redis`, `--persist` (peerchat stores every message in a SecantusDB the
//! bench starts), `--idle` counts, `--storm` client counts (see `support::storm`),
//! `--room-interval` milliseconds between two lines of one room member during a storm (0: the
//! room is silent), `--storm-silent` (peerchat storm clients send nothing at all), `--quick`,
//! `--tls` (every scenario also over TLS, each server serving TLS only, with a certificate the
//! bench makes; without `-n`/`-p` it measures only the TLS goal's scenario, N=100 P=10).
//!
//! `--nodes N` (or a list, `2,3`) measures only the cluster (issue 13, `support::cluster`): a
//! database (SecantusDB, a new one per run, or `PEERCHAT_BENCH_MONGO_URI`; `PEERCHAT_SECANTUSD`
//! names the `secantusd-py` to use), N `peerchat-server --cluster --node-id nK` on it, `-p`
//! senders (default 10) on node 1 and `-n` receivers (default 30) dealt over the nodes,
//! `--rate` messages/s in all (default 1000, the goal's) for `--seconds` (default 10). Before
//! N nodes it runs the same load on one node without `--cluster` and on one node with it (the
//! one-node figures; `--no-baseline` skips them). Per run: messages/s and deliveries/s, local
//! (node 1) and cross-node latency, duplicates, missing and reordered messages, the nodes' and
//! the database's CPU per 1000 messages; side by side, the database's operations per message
//! (`serverStatus`) and what each extra node adds; then the goals (cross-node p99 ≤ 100 ms at
//! 1000 messages/s, no loss, each extra node one stream rather than a query per message).
//! `--quick` includes a 2-second run on two nodes. `--watch-db`: the bench watches the messages
//! collection too and shows how long messages take from send to its own change stream, apart
//! from the nodes (it adds a stream, so the database's figures are then not the nodes' alone).
//!
//! Each run is printed as it finishes; then, per scenario, the best run of each server side by
//! side with the ratios and goals, and with TLS rows, the four rows (each server plain and over
//! TLS) with what TLS costs. Every run is appended as a JSON line to
//! `target/bench-results/broadcast.jsonl` (storm runs with `"scenario":"storm"`, cluster runs
//! with `"scenario":"cluster"`).

mod support;

use std::time::Duration;

use support::cluster::ClusterLoad;
use support::load::{self, Outcome, Scenario};
use support::servers::{redis_available, Kind, ServerProcess, REDIS_MISSING};
use support::stats::{append_json, json_str};
use support::storm::{self, StormOutcome, ROOM_MEMBERS};
use support::{die, raise_open_file_limit};

/// Deliveries per scenario: a few seconds each on a 2-core machine.
const DELIVERIES: u64 = 30_000_000;
const QUICK_DELIVERIES: u64 = 200_000;
/// Default pause between two lines of one room member during a storm: the room says 10 lines
/// a second, each delivered to every storm client too (100 000 deliveries a second at 10 000
/// clients). Ten times that is fan-out work enough to keep Redis busy on its own.
const ROOM_INTERVAL_MS: u64 = 1000;
/// The TLS goal (issue 12): peerchat over TLS delivers at least this many times Redis over TLS.
const GOAL_TLS_RATIO: f64 = 1.5;
/// The scenario the TLS goal is set for: `--tls` without `-n`/`-p` runs this one.
const TLS_SCENARIO: (usize, usize) = (100, 10);
/// Storm goals (issue 10), for 10 000 clients on a 2-core machine.
const GOAL_ALL_GREETED_S: f64 = 1.0;
const GOAL_PRESENCE_MB: f64 = 20.0;
/// Cluster runs (`--nodes`): receivers over all nodes, senders on node 1, seconds of load
/// (at `--rate`, by default the goal's 1000 messages/s).
const CLUSTER_RECEIVERS: u64 = 30;
const CLUSTER_SENDERS: u64 = 10;
const CLUSTER_SECONDS: f64 = 10.0;
/// `--quick`'s cluster run: two nodes, briefly, to show nothing is lost or repeated.
const QUICK_CLUSTER_RATE: f64 = 500.0;
const QUICK_CLUSTER_SECONDS: f64 = 2.0;

/// One column of the fan-out bench: a server, over plain TCP or over TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    kind: Kind,
    tls: bool,
}

impl Target {
    fn name(self) -> &'static str {
        match (self.kind, self.tls) {
            (Kind::Peerchat, false) => "peerchat",
            (Kind::Peerchat, true) => "peerchat-tls",
            (Kind::Redis, false) => "redis",
            (Kind::Redis, true) => "redis-tls",
        }
    }
}

/// What the command line asked for.
struct Options {
    scenarios: Vec<Scenario>,
    servers: Vec<Kind>,
    /// Every server plain and, with `--tls` or `--quick`, over TLS, in the order runs alternate.
    targets: Vec<Target>,
    runs: usize,
    persist: bool,
    idle_counts: Vec<usize>,
    storm_counts: Vec<usize>,
    room_interval: Duration,
    /// Peerchat storm clients send nothing (by default an empty line once connected).
    silent: bool,
    /// Cluster runs (`--nodes`), in order; each on a database of its own.
    cluster: Vec<ClusterLoad>,
}

fn main() {
    let open_file_limit = raise_open_file_limit();
    let options = parse_options();
    let mut failures = Vec::new();
    if !options.scenarios.is_empty() && fan_out(&options) {
        failures.push("some receiver missed messages or saw them out of order");
    }
    if !options.idle_counts.is_empty() {
        support::idle::report(&options.idle_counts, &options.servers, open_file_limit);
    }
    if !options.storm_counts.is_empty() && storms(&options, open_file_limit) {
        failures.push("a reconnect storm did not complete (see the NO above)");
    }
    if support::cluster::report(&options.cluster, options.runs) {
        failures.push("a cluster run lost, repeated or reordered messages");
    }
    if !failures.is_empty() {
        eprintln!("\n!!! BENCH FAILURE: {} !!!", failures.join("; "));
        std::process::exit(1);
    }
}

/// Runs every scenario on every server; true if any run was incomplete.
fn fan_out(options: &Options) -> bool {
    let db = options.persist.then(support::db::TestDatabase::start);
    let persist_flags = db.as_ref().map(|db| db.server_flags());
    print_run_header();
    let mut failed = false;
    let mut summary = Vec::new();
    for scenario in &options.scenarios {
        let mut best: Vec<(Target, Outcome)> = Vec::new();
        for run in 1..=options.runs {
            for &target in &options.targets {
                let server = match (target.kind, &persist_flags) {
                    (Kind::Peerchat, Some(flags)) if target.tls => {
                        ServerProcess::peerchat_tls(flags)
                    }
                    (Kind::Peerchat, Some(flags)) => ServerProcess::peerchat(flags),
                    _ => ServerProcess::start_over(target.kind, target.tls),
                };
                let outcome = load::run(&server, scenario);
                drop(server);
                print_run(target, scenario, run, &outcome);
                save_run(target, scenario, run, options.persist, &outcome);
                failed |= !outcome.complete();
                keep_best(&mut best, target, outcome);
            }
        }
        summary.push((scenario.clone(), best));
    }
    if options.servers.len() > 1 || options.runs > 1 {
        print_summary(&summary);
    }
    if options.targets.iter().any(|t| t.tls) {
        print_tls_summary(&summary, options.runs);
    }
    failed
}

fn keep_best(best: &mut Vec<(Target, Outcome)>, target: Target, outcome: Outcome) {
    match best.iter_mut().find(|(t, _)| *t == target) {
        Some((_, kept)) if kept.delivered_per_sec() >= outcome.delivered_per_sec() => {}
        Some((_, kept)) => *kept = outcome,
        None => best.push((target, outcome)),
    }
}

// ---------------------------------------------------------------------------------------------
// Options

fn parse_options() -> Options {
    let mut args = pico_args::Arguments::from_env();
    let _ = args.contains("--bench"); // cargo bench passes it
    let quick = args.contains("--quick");
    let persist = args.contains("--persist");
    let silent = args.contains("--storm-silent");
    let tls = args.contains("--tls");
    let number = |args: &mut pico_args::Arguments, name: &'static str| -> Option<u64> {
        args.opt_value_from_str(name)
            .unwrap_or_else(|err| die(&format!("{name}: {err}")))
    };
    let receivers = number(&mut args, "-n");
    let senders = number(&mut args, "-p");
    let size = number(&mut args, "-s").unwrap_or(64) as usize;
    let messages = number(&mut args, "-m");
    let windows: Option<String> = args.opt_value_from_str("--window").unwrap();
    let threads = number(&mut args, "--threads").unwrap_or(1) as usize;
    let runs = number(&mut args, "--runs").unwrap_or(1).max(1) as usize;
    let peer: Option<String> = args.opt_value_from_str("--peer").unwrap();
    let idle: Option<String> = args.opt_value_from_str("--idle").unwrap();
    let storm: Option<String> = args.opt_value_from_str("--storm").unwrap();
    let room_interval = number(&mut args, "--room-interval").unwrap_or(ROOM_INTERVAL_MS);
    let nodes: Option<String> = args.opt_value_from_str("--nodes").unwrap();
    let fraction = |args: &mut pico_args::Arguments, name: &'static str| -> Option<f64> {
        args.opt_value_from_str(name)
            .unwrap_or_else(|err| die(&format!("{name}: {err}")))
    };
    let rate = fraction(&mut args, "--rate");
    let seconds = fraction(&mut args, "--seconds");
    let no_baseline = args.contains("--no-baseline");
    let watch_db = args.contains("--watch-db");
    let rest = args.finish();
    if !rest.is_empty() {
        die(&format!("unknown arguments: {rest:?}"));
    }
    if size < 48 {
        die("-s must be at least 48 bytes (sender, sequence number and timestamp)");
    }
    let servers = servers(peer.as_deref());
    // `--nodes` measures only the cluster, with `-n`, `-p` and `-s`; `--quick` adds a short
    // cluster run to the rest.
    let cluster = match &nodes {
        Some(list) => {
            let counts = number_list("--nodes", list);
            if counts.contains(&0) {
                die("--nodes: at least 1");
            }
            let plan = ClusterLoad {
                nodes: 1,
                cluster: true,
                receivers: receivers.unwrap_or(CLUSTER_RECEIVERS) as usize,
                senders: senders.unwrap_or(CLUSTER_SENDERS) as usize,
                size,
                rate: rate.unwrap_or(support::cluster::GOAL_RATE),
                seconds: seconds.unwrap_or(CLUSTER_SECONDS),
                watch_db,
            };
            cluster_loads(&plan, &counts, !no_baseline)
        }
        None if quick => vec![ClusterLoad {
            nodes: 2,
            cluster: true,
            receivers: 4,
            senders: 2,
            size,
            rate: rate.unwrap_or(QUICK_CLUSTER_RATE),
            seconds: seconds.unwrap_or(QUICK_CLUSTER_SECONDS),
            watch_db,
        }],
        None => Vec::new(),
    };
    if rate.is_some_and(|r| r.is_nan() || r <= 0.0)
        || seconds.is_some_and(|s| s.is_nan() || s <= 0.0)
    {
        die("--rate and --seconds must be positive");
    }
    if cluster
        .iter()
        .any(|load| load.senders == 0 || load.receivers == 0)
    {
        die("--nodes needs at least one receiver and one sender");
    }
    let pairs: Vec<(usize, usize)> = match (receivers, senders) {
        _ if nodes.is_some() => Vec::new(),
        (Some(n), Some(p)) => vec![(n as usize, p as usize)],
        (None, None) if tls => vec![TLS_SCENARIO],
        (None, None) if quick => vec![(10, 1), (10, 10)],
        (None, None) => [10, 100, 1000]
            .into_iter()
            .flat_map(|n| [(n, 1), (n, 10)])
            .collect(),
        _ => die("give both -n RECEIVERS and -p SENDERS, or neither"),
    };
    let windows = number_list("--window", windows.as_deref().unwrap_or("64"));
    let deliveries = if quick { QUICK_DELIVERIES } else { DELIVERIES };
    // `--idle` or `--storm` without `-n` measures only that; so does `--nodes`.
    let only_extras = (idle.is_some() || storm.is_some()) && receivers.is_none() || nodes.is_some();
    let scenarios = if only_extras {
        Vec::new()
    } else {
        windows
            .iter()
            .flat_map(|&window| pairs.iter().map(move |&pair| (window, pair)))
            .map(|(window, (receivers, senders))| Scenario {
                receivers,
                senders,
                size,
                messages_per_sender: messages
                    .unwrap_or(deliveries / (receivers * senders) as u64)
                    .max(10),
                window: window as u64,
                rate: None,
                receive_threads: threads,
            })
            .collect()
    };
    // Idle memory and the storm are part of the default run, not of a single chosen scenario
    // (`--tls` chooses the TLS goal's).
    let chosen = receivers.is_some() || tls || idle.is_some() || storm.is_some() || nodes.is_some();
    let idle_counts = match idle {
        Some(list) => number_list("--idle", &list),
        None if chosen => Vec::new(),
        None if quick => vec![1000],
        None => vec![1000, 10_000],
    };
    let storm_counts = match storm {
        Some(list) => number_list("--storm", &list),
        None if chosen => Vec::new(),
        None if quick => vec![1000],
        None => vec![10_000],
    };
    // CI's `--quick` covers TLS too, briefly.
    let over = if tls || quick {
        &[false, true][..]
    } else {
        &[false][..]
    };
    let targets = servers
        .iter()
        .flat_map(|&kind| over.iter().map(move |&tls| Target { kind, tls }))
        .collect();
    Options {
        scenarios,
        servers,
        targets,
        runs,
        persist,
        idle_counts,
        storm_counts,
        room_interval: Duration::from_millis(room_interval),
        silent,
        cluster,
    }
}

/// The cluster runs for `--nodes COUNTS`: with `baseline`, first one node without `--cluster`
/// (what the stream itself adds) and one node with it (what each extra node adds), then each
/// count asked for, in order, each once.
fn cluster_loads(plan: &ClusterLoad, counts: &[usize], baseline: bool) -> Vec<ClusterLoad> {
    let mut loads = Vec::new();
    let mut add = |nodes: usize, cluster: bool| {
        if !loads
            .iter()
            .any(|l: &ClusterLoad| l.nodes == nodes && l.cluster == cluster)
        {
            loads.push(ClusterLoad {
                nodes,
                cluster,
                ..plan.clone()
            });
        }
    };
    if baseline {
        add(1, false);
        add(1, true);
    }
    for &nodes in counts {
        add(nodes, true);
    }
    loads
}

/// `64,256` → [64, 256].
fn number_list(flag: &str, list: &str) -> Vec<usize> {
    list.split(',')
        .map(|n| {
            n.trim()
                .parse()
                .unwrap_or_else(|_| die(&format!("{flag}: a number or a list like 64,256")))
        })
        .collect()
}

fn servers(peer: Option<&str>) -> Vec<Kind> {
    match peer {
        None => vec![Kind::Peerchat],
        Some("redis") if redis_available() => vec![Kind::Peerchat, Kind::Redis],
        Some("redis") => {
            eprintln!("{REDIS_MISSING}\nRunning peerchat alone.\n");
            vec![Kind::Peerchat]
        }
        Some(other) => die(&format!("--peer: only `redis` is supported, not `{other}`")),
    }
}

// ---------------------------------------------------------------------------------------------
// Output

fn print_run_header() {
    println!(
        "{:<12} {:<22} {:>3} {:>11} {:>7} {:>6} {:>6} {:>6} {:>7} {:>6} {:>11} {:>6} {:>6} {:<10} complete",
        "server", "scenario", "run", "deliv/s", "MB/s", "p50µs", "p99µs", "p99.9", "max µs",
        "cpu s", "deliv/cpu-s", "rss MB", "gen s", "limit"
    );
}

fn print_run(target: Target, scenario: &Scenario, run: usize, o: &Outcome) {
    let complete = if o.complete() {
        "yes".to_string()
    } else {
        format!(
            "NO: {} of {}, {} out of order",
            o.delivered, o.expected, o.out_of_order
        )
    };
    println!(
        "{:<12} {:<22} {:>3} {:>11.0} {:>7.1} {:>6} {:>6} {:>6} {:>7} {:>6.2} {:>11.0} {:>6.1} {:>6.2} {:<10} {}",
        target.name(),
        scenario.label(),
        run,
        o.delivered_per_sec(),
        o.megabytes_per_sec(),
        o.latency_us[0],
        o.latency_us[1],
        o.latency_us[2],
        o.latency_us[3],
        o.server_cpu,
        o.delivered_per_cpu_sec(),
        o.peak_rss_kib as f64 / 1024.0,
        o.generator_cpu,
        o.limit(),
        complete
    );
    if o.not_saved > 0 {
        println!("          {} messages reported `! not saved`", o.not_saved);
    }
}

fn save_run(target: Target, scenario: &Scenario, run: usize, persist: bool, o: &Outcome) {
    append_json(
        "broadcast.jsonl",
        &[
            ("server", json_str(target.kind.name())),
            ("tls", target.tls.to_string()),
            (
                "tls_suite",
                o.tls_suite.as_deref().map_or("null".into(), json_str),
            ),
            ("receivers", scenario.receivers.to_string()),
            ("senders", scenario.senders.to_string()),
            ("size", scenario.size.to_string()),
            ("window", scenario.window.to_string()),
            ("persist", persist.to_string()),
            ("run", run.to_string()),
            ("delivered", o.delivered.to_string()),
            ("expected", o.expected.to_string()),
            ("out_of_order", o.out_of_order.to_string()),
            ("not_saved", o.not_saved.to_string()),
            ("seconds", format!("{:.3}", o.seconds)),
            ("delivered_per_s", format!("{:.0}", o.delivered_per_sec())),
            ("mb_per_s", format!("{:.1}", o.megabytes_per_sec())),
            ("p50_us", o.latency_us[0].to_string()),
            ("p99_us", o.latency_us[1].to_string()),
            ("p999_us", o.latency_us[2].to_string()),
            ("max_us", o.latency_us[3].to_string()),
            ("server_cpu_s", format!("{:.2}", o.server_cpu)),
            (
                "delivered_per_cpu_s",
                format!("{:.0}", o.delivered_per_cpu_sec()),
            ),
            ("peak_rss_kib", o.peak_rss_kib.to_string()),
            ("generator_cpu_s", format!("{:.2}", o.generator_cpu)),
            ("receiver_reads", o.received.reads.to_string()),
            ("receiver_wire_bytes", o.received.wire_bytes.to_string()),
            ("receiver_text_bytes", o.received.text_bytes.to_string()),
            ("limit", json_str(o.limit())),
        ],
    );
}

/// Per scenario, the best plain run of each server side by side, with ratios and the goals.
fn print_summary(summary: &[(Scenario, Vec<(Target, Outcome)>)]) {
    println!("\nBest run per server (by delivered/s), side by side:");
    for (scenario, best) in summary {
        println!(
            "\n{:<24} {:>10} {:>12} {:>7}  goal",
            scenario.label(),
            "peerchat",
            "redis",
            "ratio"
        );
        let get = |kind| best_of(best, Target { kind, tls: false });
        let (Some(ours), theirs) = (get(Kind::Peerchat), get(Kind::Redis)) else {
            continue;
        };
        let row = |name: &str, figure: fn(&Outcome) -> f64, goal: Option<(f64, bool)>| {
            let mine = figure(ours);
            let (other, ratio) = match theirs {
                Some(o) => (
                    format!("{:.0}", figure(o)),
                    format!("{:.2}", mine / figure(o)),
                ),
                None => ("-".into(), "-".into()),
            };
            let verdict = match (goal, theirs) {
                (Some((target, higher_is_better)), Some(o)) => {
                    let met = if higher_is_better {
                        mine >= target * figure(o)
                    } else {
                        mine <= target * figure(o)
                    };
                    let sign = if higher_is_better { "≥" } else { "≤" };
                    format!(
                        "{sign} {target}× redis: {}",
                        if met { "met" } else { "NOT MET" }
                    )
                }
                _ => String::new(),
            };
            println!("  {name:<20} {mine:>12.0} {other:>12} {ratio:>7}  {verdict}");
        };
        row("delivered/s", Outcome::delivered_per_sec, Some((1.5, true)));
        row("MB/s", Outcome::megabytes_per_sec, None);
        row("p50 µs", |o| o.latency_us[0] as f64, None);
        row("p99 µs", |o| o.latency_us[1] as f64, Some((1.0, false)));
        row("p99.9 µs", |o| o.latency_us[2] as f64, None);
        row("max µs", |o| o.latency_us[3] as f64, None);
        row("server CPU ms", |o| o.server_cpu * 1000.0, None);
        row(
            "delivered/CPU-s",
            Outcome::delivered_per_cpu_sec,
            Some((2.0, true)),
        );
        row("peak RSS KiB", |o| o.peak_rss_kib as f64, None);
        row("generator CPU ms", |o| o.generator_cpu * 1000.0, None);
        let limits = match theirs {
            Some(o) => format!("{} / {}", ours.limit(), o.limit()),
            None => ours.limit().to_string(),
        };
        println!("  {:<20} {limits:>25}", "limit (ours / redis)");
    }
}

fn best_of(best: &[(Target, Outcome)], target: Target) -> Option<&Outcome> {
    best.iter().find(|(t, _)| *t == target).map(|(_, o)| o)
}

/// Server CPU microseconds per delivery.
fn cpu_us_per_delivery(o: &Outcome) -> f64 {
    o.server_cpu * 1e6 / o.delivered.max(1) as f64
}

/// Per scenario with TLS rows: each server plain and over TLS (best run of each), peerchat over
/// TLS against Redis over TLS (the goal), and what TLS costs each server.
fn print_tls_summary(summary: &[(Scenario, Vec<(Target, Outcome)>)], runs: usize) {
    let which = if runs > 1 {
        format!("best of {runs} runs of each row by delivered/s")
    } else {
        "one run of each row".to_string()
    };
    println!("\nPlain and over TLS ({which}):");
    for (scenario, best) in summary {
        let rows: Vec<(Target, &Outcome)> = [Kind::Peerchat, Kind::Redis]
            .into_iter()
            .flat_map(|kind| [false, true].map(|tls| Target { kind, tls }))
            .filter_map(|t| best_of(best, t).map(|o| (t, o)))
            .collect();
        println!(
            "\n  {:<22} {:>12} {:>11} {:>6} {:>12} {:>13} {:>8} {:>10} {:>10} {:>12}  {:<10} cipher suite",
            scenario.label(),
            "delivered/s",
            "server CPU s",
            "CPU %",
            "deliv/CPU-s",
            "CPU µs/deliv",
            "p99 µs",
            "gen CPU s",
            "deliv/read",
            "deliv/record",
            "limit"
        );
        for (target, o) in &rows {
            let name = format!(
                "{} {}",
                target.kind.name(),
                if target.tls { "TLS" } else { "plain" }
            );
            println!(
                "  {name:<22} {:>12.0} {:>11.2} {:>6.0} {:>12.0} {:>13.3} {:>8} {:>10.2} {:>10.1} {:>12}  {:<10} {}",
                o.delivered_per_sec(),
                o.server_cpu,
                100.0 * o.server_cpu / o.seconds,
                o.delivered_per_cpu_sec(),
                cpu_us_per_delivery(o),
                o.latency_us[1],
                o.generator_cpu,
                o.delivered_per_read(),
                o.delivered_per_record()
                    .map_or("-".to_string(), |d| format!("{d:.1}")),
                o.limit(),
                o.tls_suite.as_deref().unwrap_or("-")
            );
        }
        let get = |kind, tls| best_of(best, Target { kind, tls });
        match (get(Kind::Peerchat, true), get(Kind::Redis, true)) {
            (Some(ours), Some(theirs)) => {
                let ratio = ours.delivered_per_sec() / theirs.delivered_per_sec();
                let met = if ratio >= GOAL_TLS_RATIO {
                    "met"
                } else {
                    "NOT MET"
                };
                println!(
                    "  peerchat TLS / redis TLS: {ratio:.2}× delivered/s (goal ≥ {GOAL_TLS_RATIO}×: \
                     {met}), {:.2}× deliveries per server CPU-s",
                    ours.delivered_per_cpu_sec() / theirs.delivered_per_cpu_sec()
                );
            }
            (Some(_), None) => println!("  (no Redis over TLS in this run: no goal ratio)"),
            _ => {}
        }
        for kind in [Kind::Peerchat, Kind::Redis] {
            let (Some(plain), Some(tls)) = (get(kind, false), get(kind, true)) else {
                continue;
            };
            let (before, after) = (cpu_us_per_delivery(plain), cpu_us_per_delivery(tls));
            println!(
                "  {} TLS / plain: {:.2}× delivered/s; server CPU per delivery {before:.3} → \
                 {after:.3} µs (+{:.3} µs, {:.2}×){}",
                kind.name(),
                tls.delivered_per_sec() / plain.delivered_per_sec(),
                after - before,
                after / before,
                if kind == Kind::Peerchat {
                    ": each message encrypted once per receiver"
                } else {
                    ""
                }
            );
        }
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!(
        "\n  Over TLS the bench's own receivers decrypt every delivery (rustls, in the generator \
         process), on the same {cores} cores as the server: gen CPU s is that work, the same \
         for both servers. CPU µs/deliv is server CPU only. MB/s in the runs above counts \
         plaintext. deliv/read: deliveries per receiver socket read; deliv/record: per TLS \
         record (from the 22 bytes TLS 1.3 adds to each)."
    );
}

// ---------------------------------------------------------------------------------------------
// Reconnect storm

/// Runs every storm size on every server, a fresh server per run; true if any run was
/// incomplete. Sizes the open-file limit cannot hold are skipped with a note.
fn storms(options: &Options, open_file_limit: u64) -> bool {
    let mut failed = false;
    let mut summary = Vec::new();
    let room = match options.room_interval.as_millis() {
        0 => "stay silent".to_string(),
        ms => format!("chat (each a line every {ms} ms)"),
    };
    let hello = if options.silent {
        "send nothing"
    } else {
        "send an empty line once connected (Redis: SUBSCRIBE)"
    };
    println!(
        "\nReconnect storm: N clients connect at once and {hello}, while {ROOM_MEMBERS} \
         connected clients {room}"
    );
    print_storm_header();
    for &clients in &options.storm_counts {
        let needed = clients as u64 + 2 * ROOM_MEMBERS as u64 + 64;
        if needed > open_file_limit {
            println!(
                "storm of {clients} skipped: the open-file limit is {open_file_limit} \
                 (raise it with `ulimit -n` as root)"
            );
            continue;
        }
        let mut best: Vec<(Kind, StormOutcome)> = Vec::new();
        for run in 1..=options.runs {
            for &kind in &options.servers {
                let server = ServerProcess::start(kind);
                let outcome = storm::run(server, clients, options.room_interval, options.silent);
                print_storm_run(kind, run, &outcome);
                save_storm_run(kind, run, options.room_interval, &outcome);
                failed |= !outcome.complete();
                match best.iter_mut().find(|(k, _)| *k == kind) {
                    Some((_, kept)) if !storm_better(&outcome, kept) => {}
                    Some((_, kept)) => *kept = outcome,
                    None => best.push((kind, outcome)),
                }
            }
        }
        summary.push((clients, best));
    }
    print_storm_summary(&summary, options.runs);
    failed
}

/// The better storm run: everyone greeted sooner or, if neither greeted everyone, more greeted.
fn storm_better(a: &StormOutcome, b: &StormOutcome) -> bool {
    match (a.all_greeted_s, b.all_greeted_s) {
        (Some(a), Some(b)) => a < b,
        (Some(_), None) => true,
        (None, Some(_)) => false,
        (None, None) => a.greeted > b.greeted,
    }
}

fn print_storm_header() {
    println!(
        "{:<9} {:>6} {:>3} {:>7} {:>7} {:>6} {:>7} {:>7} {:>7} {:>7} {:>6} {:>9} {:>9} {:>7} {:>6} {:>6} {:>6} {:>18} {:>9} complete",
        "server", "storm", "run", "greeted", "all s", "open s", "p50 ms", "p99 ms", "max ms",
        "retried", "failed", "pres. MB", "pres. lns", "storm s", "cpu s", "rss MB", "gen s",
        "room ms p50/p99/max", "calm p99"
    );
}

fn print_storm_run(kind: Kind, run: usize, o: &StormOutcome) {
    let complete = if o.complete() {
        "yes".to_string()
    } else {
        format!("NO: {}", o.problems())
    };
    let all = o
        .all_greeted_s
        .map_or("-".to_string(), |s| format!("{s:.3}"));
    let room = &o.room;
    let storm_latency = if room.latency_samples == 0 {
        "none sent".to_string()
    } else {
        let l = &room.latency_us;
        format!("{:.1}/{:.1}/{:.1}", ms(l[0]), ms(l[1]), ms(l[3]))
    };
    println!(
        "{:<9} {:>6} {:>3} {:>7} {:>7} {:>6.3} {:>7.1} {:>7.1} {:>7.1} {:>7} {:>6} {:>9.2} {:>9} {:>7.2} {:>6.2} {:>6.1} {:>6.2} {:>18} {:>9.1} {}",
        kind.name(),
        o.clients,
        run,
        o.greeted,
        all,
        o.opening_s,
        ms(o.greeting_us[0]),
        ms(o.greeting_us[1]),
        ms(o.greeting_us[3]),
        o.retries,
        o.failed,
        o.presence_megabytes(),
        o.presence_lines,
        o.storm_s,
        o.server_cpu,
        o.peak_rss_kib as f64 / 1024.0,
        o.generator_cpu,
        storm_latency,
        ms(room.calm_latency_us[1]),
        complete
    );
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn save_storm_run(kind: Kind, run: usize, room_interval: Duration, o: &StormOutcome) {
    let room = &o.room;
    append_json(
        "broadcast.jsonl",
        &[
            ("scenario", json_str("storm")),
            ("server", json_str(kind.name())),
            ("clients", o.clients.to_string()),
            ("run", run.to_string()),
            ("complete", o.complete().to_string()),
            ("greeted", o.greeted.to_string()),
            ("retries", o.retries.to_string()),
            ("failed", o.failed.to_string()),
            ("dropped", o.dropped.to_string()),
            ("still_connecting", o.still_connecting.to_string()),
            ("connected_waiting", o.waiting.to_string()),
            (
                "all_greeted_s",
                o.all_greeted_s.map_or("null".into(), |s| format!("{s:.3}")),
            ),
            ("greeting_p50_us", o.greeting_us[0].to_string()),
            ("greeting_p99_us", o.greeting_us[1].to_string()),
            ("greeting_max_us", o.greeting_us[3].to_string()),
            ("opening_s", format!("{:.3}", o.opening_s)),
            // Redis sends no presence notices: 0.
            ("presence_bytes", o.presence_bytes.to_string()),
            ("presence_lines", o.presence_lines.to_string()),
            ("presence_settled", o.settled.to_string()),
            ("storm_s", format!("{:.3}", o.storm_s)),
            ("server_cpu_s", format!("{:.2}", o.server_cpu)),
            ("peak_rss_kib", o.peak_rss_kib.to_string()),
            ("generator_cpu_s", format!("{:.2}", o.generator_cpu)),
            ("room_members", room.members.to_string()),
            ("room_interval_ms", room_interval.as_millis().to_string()),
            ("room_sent", room.sent.to_string()),
            ("room_expected", room.expected.to_string()),
            ("room_received", room.received.to_string()),
            ("room_out_of_order", room.out_of_order.to_string()),
            ("room_p50_us", room.latency_us[0].to_string()),
            ("room_p99_us", room.latency_us[1].to_string()),
            ("room_max_us", room.latency_us[3].to_string()),
            ("room_samples", room.latency_samples.to_string()),
            ("room_calm_p50_us", room.calm_latency_us[0].to_string()),
            ("room_calm_p99_us", room.calm_latency_us[1].to_string()),
            ("room_calm_max_us", room.calm_latency_us[3].to_string()),
        ],
    );
}

/// Per storm size, the best run of each server (soonest all greeted) side by side, with the
/// goals.
fn print_storm_summary(summary: &[(usize, Vec<(Kind, StormOutcome)>)], runs: usize) {
    let which = if runs > 1 {
        format!("best of {runs} runs per server (soonest all greeted, else most greeted)")
    } else {
        "one run per server".to_string()
    };
    println!("\nReconnect storm, {which}:");
    for (clients, best) in summary {
        let get = |kind| best.iter().find(|(k, _)| *k == kind).map(|(_, o)| o);
        let Some(ours) = get(Kind::Peerchat) else {
            continue;
        };
        let theirs = get(Kind::Redis);
        println!(
            "\n  storm of {:<17} {:>12} {:>12} {:>7}  goal",
            clients, "peerchat", "redis", "ratio"
        );
        let row =
            |name: &str, figure: &dyn Fn(&StormOutcome) -> f64, decimals: usize, goal: &str| {
                let mine = figure(ours);
                let (other, ratio) = match theirs {
                    Some(o) => {
                        let other = figure(o);
                        let ratio = if other > 0.0 && mine.is_finite() {
                            format!("{:.2}", mine / other)
                        } else {
                            "-".into()
                        };
                        (format!("{other:.decimals$}"), ratio)
                    }
                    None => ("-".into(), "-".into()),
                };
                println!("  {name:<26} {mine:>12.decimals$} {other:>12} {ratio:>7}  {goal}");
            };
        let met = |ok: bool| if ok { "met" } else { "NOT MET" };
        let all_greeted = ours.all_greeted_or_inf();
        row(
            "all greeted s",
            &StormOutcome::all_greeted_or_inf,
            3,
            &format!(
                "≤ {GOAL_ALL_GREETED_S} s: {}",
                met(all_greeted <= GOAL_ALL_GREETED_S)
            ),
        );
        row("greeting p50 ms", &|o| ms(o.greeting_us[0]), 1, "");
        row("greeting p99 ms", &|o| ms(o.greeting_us[1]), 1, "");
        row("greeting max ms", &|o| ms(o.greeting_us[3]), 1, "");
        row("opening all s (generator)", &|o| o.opening_s, 3, "");
        row("connects retried", &|o| o.retries as f64, 0, "");
        row("clients given up", &|o| o.failed as f64, 0, "");
        row(
            "presence MB",
            &StormOutcome::presence_megabytes,
            2,
            &format!(
                "< {GOAL_PRESENCE_MB} MB: {}{}",
                met(ours.presence_megabytes() < GOAL_PRESENCE_MB),
                if theirs.is_some() {
                    " (Redis sends no presence notices)"
                } else {
                    ""
                }
            ),
        );
        row("presence lines", &|o| o.presence_lines as f64, 0, "");
        row("storm s (to last presence)", &|o| o.storm_s, 3, "");
        row("server CPU s", &|o| o.server_cpu, 2, "");
        row("peak RSS MB", &|o| o.peak_rss_kib as f64 / 1024.0, 1, "");
        row("generator CPU s", &|o| o.generator_cpu, 2, "");
        // A silent room (--room-interval 0) has no latency to show.
        if ours.room.latency_samples > 0 {
            row("room chat p50 ms", &|o| ms(o.room.latency_us[0]), 1, "");
            row("room chat p99 ms", &|o| ms(o.room.latency_us[1]), 1, "");
            row("room chat max ms", &|o| ms(o.room.latency_us[3]), 1, "");
            row(
                "  from deliveries",
                &|o| o.room.latency_samples as f64,
                0,
                "",
            );
            row(
                "  p99 before storm ms",
                &|o| ms(o.room.calm_latency_us[1]),
                1,
                "",
            );
        }
        row(
            "room lines missing",
            &|o| (o.room.expected - o.room.received.min(o.room.expected)) as f64,
            0,
            &format!("none lost or reordered: {}", met(ours.room.complete())),
        );
        row(
            "room lines out of order",
            &|o| o.room.out_of_order as f64,
            0,
            "",
        );
        if *clients != 10_000 {
            println!("  (the goals are set for 10 000 clients)");
        }
    }
}
