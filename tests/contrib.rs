//! contrib/peerchat.service agrees with the server it starts: the flags in its ExecStart= exist
//! and parse together, the credentials it loads are the files it names, and systemd waits for a
//! clean shutdown before killing.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use peerchat::config::{parse_server_args, Parsed};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/peerchat.service");
/// Where systemd puts the loaded credentials (`%d`) for this unit.
const CREDENTIALS_DIRECTORY: &str = "/run/credentials/peerchat.service";
/// How long the server may take after `--shutdown-timeout` to flush its log before it exits
/// (`LOG_FLUSH_TIMEOUT` in src/bin/peerchat-server.rs).
const LOG_FLUSH: Duration = Duration::from_secs(2);

/// The `[Service]` section as key → values, continuation lines joined and comments skipped,
/// as systemd reads it (no quoting is used in the unit, so none is handled).
fn service_section(unit: &str) -> HashMap<String, Vec<String>> {
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    let mut section = String::new();
    let mut logical = String::new();
    for line in unit.lines() {
        let line = line.trim();
        if logical.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
            continue;
        }
        if let Some(start) = line.strip_suffix('\\') {
            logical.push_str(start);
            logical.push(' ');
            continue;
        }
        logical.push_str(line);
        let whole = std::mem::take(&mut logical);
        if whole.starts_with('[') {
            section = whole;
        } else if section == "[Service]" {
            let (key, value) = whole.split_once('=').expect("key=value");
            keys.entry(key.trim().to_string())
                .or_default()
                .push(value.trim().to_string());
        }
    }
    keys
}

fn one<'a>(keys: &'a HashMap<String, Vec<String>>, key: &str) -> &'a str {
    match keys.get(key).map(Vec::as_slice) {
        Some([value]) => value,
        other => panic!("{key}= should be set once in the unit, found {other:?}"),
    }
}

#[test]
fn the_service_file_starts_the_server_it_describes() {
    let unit = std::fs::read_to_string(UNIT).expect("read contrib/peerchat.service");
    let keys = service_section(&unit);
    let exec_start = one(&keys, "ExecStart");
    let mut words = exec_start.split_whitespace();
    let program = words.next().expect("ExecStart has a program");
    assert!(program.ends_with("/peerchat-server"), "{program}");
    let args: Vec<&str> = words.collect();

    // Every flag is one `--help` documents (the README's install steps point there).
    let help = Command::new(env!("CARGO_BIN_EXE_peerchat-server"))
        .arg("--help")
        .output()
        .expect("run peerchat-server --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let documented: Vec<&str> = help.split_whitespace().collect();
    for flag in args.iter().filter(|arg| arg.starts_with("--")) {
        assert!(documented.contains(flag), "{flag} is not in --help");
    }

    // The arguments parse together (values in range, TLS complete for --no-plain), with `%d`
    // as systemd expands it. The password stays in the EnvironmentFile=, not in the unit.
    assert!(
        !args.contains(&"--mongo-uri"),
        "the URI belongs in the env file"
    );
    assert!(one(&keys, "EnvironmentFile").starts_with('/'));
    let expanded: Vec<OsString> = args
        .iter()
        .map(|arg| arg.replace("%d", CREDENTIALS_DIRECTORY).into())
        .collect();
    let config = match parse_server_args(expanded, None) {
        Ok(Parsed::Run(config)) => config,
        other => panic!("ExecStart's arguments do not parse: {other:?}"),
    };

    // The certificate and key are the credentials the unit loads.
    let tls = config.tls.expect("the unit serves TLS");
    let loaded: Vec<&str> = keys["LoadCredential"]
        .iter()
        .map(|entry| entry.split_once(':').expect("ID:PATH").0)
        .collect();
    for file in [&tls.cert, &tls.key] {
        assert_eq!(file.parent(), Some(Path::new(CREDENTIALS_DIRECTORY)));
        let name = file.file_name().and_then(|name| name.to_str()).unwrap();
        assert!(loaded.contains(&name), "{name} is not a LoadCredential=");
    }

    // SIGKILL only after the server has had its whole shutdown and log flush.
    assert_eq!(one(&keys, "KillSignal"), "SIGTERM");
    let stop = one(&keys, "TimeoutStopSec");
    let stop = Duration::from_secs(
        stop.trim_end_matches('s')
            .parse()
            .unwrap_or_else(|_| panic!("TimeoutStopSec={stop}: expected whole seconds")),
    );
    assert!(
        stop > config.shutdown_timeout + LOG_FLUSH,
        "TimeoutStopSec {stop:?} must exceed --shutdown-timeout {:?} + {LOG_FLUSH:?}",
        config.shutdown_timeout
    );
}
