//! Broadcast fan-out benchmark: how many chat lines per second peerchat delivers, and the same
//! for Redis pub/sub driven by the same load generator in the same run.
//!
//! ```text
//! cargo bench --bench broadcast                          # default scenarios, peerchat only
//! cargo bench --bench broadcast -- --peer redis --runs 3 # side by side with redis-server
//! cargo bench --bench broadcast -- --quick               # tiny run (CI)
//! cargo bench --bench broadcast -- -n 100 -p 10 -s 64 -m 20000 --window 64,256
//! cargo bench --bench broadcast -- --idle 1000,10000     # idle memory per connection only
//! ```
//! Flags: `-n` receivers, `-p` senders, `-s` message bytes, `-m` messages per sender, `--window`
//! messages in flight per sender (a list runs every scenario with each), `--threads` receiving threads, `--runs` runs per server (the
//! best is kept), `--peer redis`, `--persist` (peerchat stores every message in a SecantusDB the
//! bench starts), `--idle` counts, `--quick`.
//!
//! Each run is printed as it finishes; then, per scenario, the best run of each server side by
//! side with the ratios and goals. Every run is appended as a JSON line to
//! `target/bench-results/broadcast.jsonl`.

mod support;

use support::load::{self, Outcome, Scenario};
use support::servers::{redis_available, Kind, ServerProcess, REDIS_MISSING};
use support::stats::{append_json, json_str};
use support::{die, raise_open_file_limit};

/// Deliveries per scenario: a few seconds each on a 2-core machine.
const DELIVERIES: u64 = 30_000_000;
const QUICK_DELIVERIES: u64 = 200_000;

/// What the command line asked for.
struct Options {
    scenarios: Vec<Scenario>,
    servers: Vec<Kind>,
    runs: usize,
    persist: bool,
    idle_counts: Vec<usize>,
}

fn main() {
    let open_file_limit = raise_open_file_limit();
    let options = parse_options();
    let mut failed = false;
    if !options.scenarios.is_empty() {
        failed |= fan_out(&options);
    }
    if !options.idle_counts.is_empty() {
        support::idle::report(&options.idle_counts, &options.servers, open_file_limit);
    }
    if failed {
        eprintln!(
            "\n!!! BENCH FAILURE: some receiver missed messages or saw them out of order !!!"
        );
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
        let mut best: Vec<(Kind, Outcome)> = Vec::new();
        for run in 1..=options.runs {
            for &kind in &options.servers {
                let server = match (kind, &persist_flags) {
                    (Kind::Peerchat, Some(flags)) => ServerProcess::peerchat(
                        &flags.iter().map(String::as_str).collect::<Vec<_>>(),
                    ),
                    _ => ServerProcess::start(kind),
                };
                let outcome = load::run(&server, scenario);
                drop(server);
                print_run(kind, scenario, run, &outcome);
                save_run(kind, scenario, run, options.persist, &outcome);
                failed |= !outcome.complete();
                keep_best(&mut best, kind, outcome);
            }
        }
        summary.push((scenario.clone(), best));
    }
    if options.servers.len() > 1 || options.runs > 1 {
        print_summary(&summary);
    }
    failed
}

fn keep_best(best: &mut Vec<(Kind, Outcome)>, kind: Kind, outcome: Outcome) {
    match best.iter_mut().find(|(k, _)| *k == kind) {
        Some((_, kept)) if kept.delivered_per_sec() >= outcome.delivered_per_sec() => {}
        Some((_, kept)) => *kept = outcome,
        None => best.push((kind, outcome)),
    }
}

// ---------------------------------------------------------------------------------------------
// Options

fn parse_options() -> Options {
    let mut args = pico_args::Arguments::from_env();
    let _ = args.contains("--bench"); // cargo bench passes it
    let quick = args.contains("--quick");
    let persist = args.contains("--persist");
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
    let rest = args.finish();
    if !rest.is_empty() {
        die(&format!("unknown arguments: {rest:?}"));
    }
    if size < 48 {
        die("-s must be at least 48 bytes (sender, sequence number and timestamp)");
    }
    let servers = servers(peer.as_deref());
    let pairs: Vec<(usize, usize)> = match (receivers, senders) {
        (Some(n), Some(p)) => vec![(n as usize, p as usize)],
        (None, None) if quick => vec![(10, 1), (10, 10)],
        (None, None) => [10, 100, 1000]
            .into_iter()
            .flat_map(|n| [(n, 1), (n, 10)])
            .collect(),
        _ => die("give both -n RECEIVERS and -p SENDERS, or neither"),
    };
    let windows = number_list("--window", windows.as_deref().unwrap_or("64"));
    let deliveries = if quick { QUICK_DELIVERIES } else { DELIVERIES };
    let only_idle = idle.is_some() && receivers.is_none();
    let scenarios = if only_idle {
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
    // Idle memory is part of the default run, not of a single chosen scenario.
    let idle_counts = match idle {
        Some(list) => number_list("--idle", &list),
        None if receivers.is_some() => Vec::new(),
        None if quick => vec![1000],
        None => vec![1000, 10_000],
    };
    Options {
        scenarios,
        servers,
        runs,
        persist,
        idle_counts,
    }
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
        "{:<9} {:<22} {:>3} {:>11} {:>7} {:>6} {:>6} {:>6} {:>7} {:>6} {:>11} {:>6} {:>6} {:<10} complete",
        "server", "scenario", "run", "deliv/s", "MB/s", "p50µs", "p99µs", "p99.9", "max µs",
        "cpu s", "deliv/cpu-s", "rss MB", "gen s", "limit"
    );
}

fn print_run(kind: Kind, scenario: &Scenario, run: usize, o: &Outcome) {
    let complete = if o.complete() {
        "yes".to_string()
    } else {
        format!(
            "NO: {} of {}, {} out of order",
            o.delivered, o.expected, o.out_of_order
        )
    };
    println!(
        "{:<9} {:<22} {:>3} {:>11.0} {:>7.1} {:>6} {:>6} {:>6} {:>7} {:>6.2} {:>11.0} {:>6.1} {:>6.2} {:<10} {}",
        kind.name(),
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

fn save_run(kind: Kind, scenario: &Scenario, run: usize, persist: bool, o: &Outcome) {
    append_json(
        "broadcast.jsonl",
        &[
            ("server", json_str(kind.name())),
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
            ("limit", json_str(o.limit())),
        ],
    );
}

/// Per scenario, the best run of each server side by side, with ratios and the goals.
fn print_summary(summary: &[(Scenario, Vec<(Kind, Outcome)>)]) {
    println!("\nBest run per server (by delivered/s), side by side:");
    for (scenario, best) in summary {
        println!(
            "\n{:<24} {:>10} {:>12} {:>7}  goal",
            scenario.label(),
            "peerchat",
            "redis",
            "ratio"
        );
        let get = |kind| best.iter().find(|(k, _)| *k == kind).map(|(_, o)| o);
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
