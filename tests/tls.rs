//! The TLS listener: same chat inside TLS, across listeners; certificate errors at start; the
//! handshake deadline; `--no-plain`.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{run_bounded, spawn_server_with_ports, SERVER};
use common::tls::{closed_within, TestCerts, TlsChat};
use common::{start_server, Chat, DEADLINE};
use peerchat::config::TlsListen;
use peerchat::ServerConfig;

/// A server without persistence with a TLS listener beside the plain one.
fn config_with_tls(certs: &TestCerts) -> ServerConfig {
    let mut config = ServerConfig::local(None);
    config.tls = Some(TlsListen {
        port: 0,
        cert: certs.chain.clone(),
        key: certs.key.clone(),
    });
    config
}

#[test]
fn a_tls_client_chats_with_a_plain_client_across_listeners() {
    let certs = TestCerts::new();
    let server = start_server(config_with_tls(&certs));
    let tls_addr = server.tls_addr.expect("TLS listener");

    let mut plain = Chat::named(server.addr, "plain");
    let mut secure = TlsChat::connect(tls_addr, &certs);
    assert_eq!(
        plain.line(),
        format!("* {} joined", secure.name),
        "a TLS client joins like any other once its handshake is done"
    );
    secure.send("/nick secure");
    let renamed = format!("* {} is now secure", secure.name);
    secure.wait_for(|line| line == renamed);
    plain.wait_for(|line| line.ends_with("is now secure"));

    plain.send("hello from plain text");
    assert_eq!(secure.line(), "<plain> hello from plain text");
    secure.send("hello from inside TLS");
    assert_eq!(plain.line(), "<secure> hello from inside TLS");
    secure.send("/me waves");
    assert_eq!(plain.line(), "* secure waves");

    // Same protocol and limits inside TLS.
    secure.send("/who");
    assert_eq!(secure.line(), "* 2 online: plain, secure");
    secure.send(&"x".repeat(5000));
    assert_eq!(secure.line(), "! line too long (max 4096 bytes)");
    secure.send("/quit");
    assert_eq!(secure.line(), "* bye");
    assert_eq!(plain.line(), "* secure left");
}

#[test]
fn a_missing_or_bad_certificate_or_key_stops_the_server_with_exit_2_naming_the_file() {
    let certs = TestCerts::new();
    let missing = certs.dir.join("missing.pem");
    let other = TestCerts::new(); // a key that does not go with `certs`' certificate
    let key_as_cert = certs.dir.join("key-as-cert.pem");
    std::fs::copy(&certs.key, &key_as_cert).unwrap();
    let cert_as_key = certs.dir.join("cert-as-key.pem");
    std::fs::copy(&certs.chain, &cert_as_key).unwrap();
    let cases = [
        (missing.clone(), certs.key.clone(), missing.clone()),
        (certs.chain.clone(), missing.clone(), missing.clone()),
        (key_as_cert.clone(), certs.key.clone(), key_as_cert.clone()),
        (
            certs.chain.clone(),
            cert_as_key.clone(),
            cert_as_key.clone(),
        ),
        (certs.chain.clone(), other.key.clone(), other.key.clone()),
    ];
    for (cert, key, named) in cases {
        let child = Command::new(SERVER)
            .args(["--no-persist", "--port", "0", "--tls-port", "0"])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start server");
        let output = run_bounded(child);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&named.display().to_string()),
            "the error names {}: {stderr}",
            named.display()
        );
    }
}

#[test]
fn a_stalled_handshake_is_closed_after_ten_seconds_while_others_chat() {
    let certs = TestCerts::new();
    let server = start_server(config_with_tls(&certs));
    let tls_addr = server.tls_addr.unwrap();
    let mut alice = Chat::named(server.addr, "alice");
    let mut bob = TlsChat::connect(tls_addr, &certs);
    alice.wait_for(|line| line.ends_with(" joined"));

    let opened = Instant::now();
    // Connects to the TLS port and never says a word.
    let mut stalled = TcpStream::connect(tls_addr).unwrap();
    // Starts a handshake with half a ClientHello.
    let mut half = TcpStream::connect(tls_addr).unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    for round in 0..20 {
        alice.send(&format!("round {round}"));
        assert_eq!(bob.line(), format!("<alice> round {round}"));
    }
    alice.send("/who");
    assert_eq!(
        alice.line(),
        format!("* 2 online: alice, {}", bob.name),
        "a connection still in its handshake is not in the chat, and never announced"
    );
    assert!(closed_within(
        &mut stalled,
        DEADLINE + Duration::from_secs(10)
    ));
    assert!(
        opened.elapsed() >= Duration::from_millis(9_500),
        "closed after {:?}, before the 10 s deadline",
        opened.elapsed()
    );
    assert!(closed_within(&mut half, DEADLINE));
    alice.send("/stats");
    let stats = alice.wait_for(|line| line.starts_with("* stats "));
    assert!(stats.contains(" tls_handshake_failures=2"), "{stats}");
    assert!(stats.contains(" clients=2 "), "{stats}");
    alice.send("still here");
    assert_eq!(bob.line(), "<alice> still here");
    assert!(
        alice.sync().is_empty(),
        "no join or leave notice for connections that never finished their handshake"
    );
}

/// Joins are heard by those in the chat before them: a client that connected while a TLS
/// client was still in its handshake hears that TLS client join.
#[test]
fn a_tls_client_joining_after_its_handshake_is_announced_to_those_who_came_meanwhile() {
    let certs = TestCerts::new();
    let mut config = config_with_tls(&certs);
    config.presence_interval = Duration::from_secs(3600); // every join after the first waits
    let server = start_server(config);
    let mut first = Chat::connect(server.addr);
    let early_tcp = TcpStream::connect(server.tls_addr.unwrap()).unwrap();
    let mut plain = Chat::connect(server.addr);
    let mut secure = TlsChat::over(early_tcp, &certs);
    secure.send("hi");
    assert_eq!(plain.line(), format!("* {} joined", secure.name));
    assert_eq!(plain.line(), format!("<{}> hi", secure.name));
    first.wait_for(|line| line == format!("<{}> hi", secure.name));
}

/// Bulk output through TLS to a reader that pauses: every line arrives, in order.
#[test]
fn a_tls_reader_that_pauses_gets_every_line_in_order() {
    const LINES: usize = 500;
    let certs = TestCerts::new();
    let mut config = config_with_tls(&certs);
    config.limits.flood = None;
    config.limits.max_output = 64 << 20;
    let server = start_server(config);
    let mut reader = TlsChat::connect(server.tls_addr.unwrap(), &certs);
    let mut sender = Chat::named(server.addr, "sender");
    reader.wait_for(|line| line.ends_with("is now sender"));
    let payload = "p".repeat(3990);
    let all: String = (0..LINES).map(|n| format!("{n:05} {payload}\n")).collect();
    sender.send_bytes(all.as_bytes()); // 2 MB, more than the sockets hold
    sender.sync();
    std::thread::sleep(Duration::from_millis(300));
    for n in 0..LINES {
        assert_eq!(reader.line(), format!("<sender> {n:05} {payload}"));
    }
}

/// On the TLS port, a client over `--max-per-ip` is closed before any handshake.
#[test]
fn the_tls_port_refuses_past_max_per_ip_by_closing() {
    let certs = TestCerts::new();
    let mut config = config_with_tls(&certs);
    config.max_per_ip = 1;
    config.max_per_ip_exempt.clear();
    let server = start_server(config);
    let tls_addr = server.tls_addr.unwrap();
    let _held = TlsChat::connect(tls_addr, &certs);
    let mut refused = TcpStream::connect(tls_addr).unwrap();
    assert!(closed_within(&mut refused, DEADLINE));
}

#[test]
fn no_plain_serves_tls_only() {
    let certs = TestCerts::new();
    let port = common::free_port();
    let flags = format!(
        "--no-persist --no-plain --port {port} --tls-port 0 --tls-cert '{}' --tls-key '{}'",
        certs.chain.display(),
        certs.key.display()
    );
    let (server, tls_addr) = spawn_server_with_ports("", &flags);
    assert!(
        server
            .listening
            .ends_with(&format!("listening on {tls_addr} (TLS, backlog 1024)")),
        "the only listener is the TLS one: {}",
        server.listening
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on --port"
    );
    let mut alice = TlsChat::connect(tls_addr, &certs);
    alice.send("/who");
    assert_eq!(alice.line(), format!("* 1 online: {}", alice.name));
}
