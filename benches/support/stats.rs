//! Figures: a latency histogram, CPU time from /proc, and JSON lines for the results file.

use std::fs::{self, OpenOptions};
use std::io::Write;

/// 1 µs buckets up to this many µs...
const FINE_UNTIL: u64 = 100_000;
/// ...then 1 ms buckets up to this many µs; anything slower lands in the last one.
const COARSE_UNTIL: u64 = 100_000_000;
const BUCKETS: usize = (FINE_UNTIL + (COARSE_UNTIL - FINE_UNTIL) / 1000) as usize + 1;

/// Latencies in microseconds: exact below 100 ms, to the millisecond up to 100 s.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
        }
    }
}

impl Histogram {
    pub fn record(&mut self, micros: u64) {
        let bucket = if micros < FINE_UNTIL {
            micros
        } else {
            FINE_UNTIL + (micros.min(COARSE_UNTIL) - FINE_UNTIL) / 1000
        };
        self.counts[bucket as usize] += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
    }

    /// p50, p99, p99.9 and max, in µs.
    pub fn percentiles(&self) -> [u64; 4] {
        let total: u64 = self.counts.iter().sum();
        let at = |fraction: f64| -> u64 {
            let target = ((total as f64 * fraction).ceil() as u64).max(1);
            let mut seen = 0;
            for (bucket, count) in self.counts.iter().enumerate() {
                seen += count;
                if seen >= target {
                    return micros_of(bucket);
                }
            }
            0
        };
        let max = self.counts.iter().rposition(|&c| c > 0).unwrap_or(0);
        [at(0.50), at(0.99), at(0.999), micros_of(max)]
    }
}

/// The lowest latency in µs that `bucket` holds.
fn micros_of(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < FINE_UNTIL {
        bucket
    } else {
        FINE_UNTIL + (bucket - FINE_UNTIL) * 1000
    }
}

/// User + system CPU seconds of the process whose `/proc/PID/stat` is at `stat_path`.
pub fn cpu_seconds(stat_path: &str) -> f64 {
    let stat = fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0 // USER_HZ is 100 on Linux
}

/// CPU seconds of this process (the load generator, all its threads).
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds("/proc/self/stat")
}

/// Appends one JSON object, given as `(key, value)` pairs whose values are already JSON, to
/// `target/bench-results/<file>`.
pub fn append_json(file: &str, fields: &[(&str, String)]) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-results");
    let _ = fs::create_dir_all(dir);
    let body: Vec<String> = fields
        .iter()
        .map(|(key, value)| format!("\"{key}\":{value}"))
        .collect();
    let line = format!("{{{}}}\n", body.join(","));
    let opened = OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{dir}/{file}"));
    match opened {
        Ok(mut out) => {
            let _ = out.write_all(line.as_bytes());
        }
        Err(err) => eprintln!("cannot write {dir}/{file}: {err}"),
    }
}

/// A JSON string value.
pub fn json_str(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}
