//! The client binary over TLS against the real server's TLS listener, with a certificate made
//! at test time (`common::tls::TestCerts`): plain mode chatting with a plain client across the
//! two listeners, `--command`, terminal mode through a server restart, and certificates the
//! client must refuse. Every wait has a deadline.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use common::process::{run_bounded, spawn_piped_client, spawn_server_on, ServerProcess, CLIENT};
use common::pty::Pty;
use common::tls::TestCerts;
use common::{free_port, start_server, Chat};
use peerchat::config::TlsListen;
use peerchat::{RunningServer, ServerConfig};

/// A server without persistence, with a TLS listener beside the plain one.
fn server_with_tls(certs: &TestCerts) -> (RunningServer, SocketAddr) {
    let mut config = ServerConfig::local(None);
    config.tls = Some(TlsListen {
        port: 0,
        cert: certs.chain.clone(),
        key: certs.key.clone(),
    });
    let server = start_server(config);
    let tls_addr = server.tls_addr.expect("a TLS listener");
    (server, tls_addr)
}

fn ca_flag(certs: &TestCerts) -> [&str; 2] {
    ["--tls-ca", certs.ca.to_str().expect("UTF-8 temp path")]
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn plain_mode_over_tls_chats_with_a_plain_client_across_listeners() {
    let certs = TestCerts::new();
    let (server, tls_addr) = server_with_tls(&certs);
    let mut plain = Chat::named(server.addr, "plain");
    let flags = [&ca_flag(&certs)[..], &["--nick", "secure"]].concat();
    let mut client = spawn_piped_client(tls_addr.port(), &flags);
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(b"hello from inside TLS\n").unwrap();

    plain.wait_for(|line| line.ends_with(" is now secure"));
    assert_eq!(plain.line(), "<secure> hello from inside TLS");
    plain.send("hello from plain text");
    // Once plain's /who is answered, its line is on its way to secure, ahead of the goodbye.
    plain.sync();
    stdin.write_all(b"/quit\n").unwrap();
    assert_eq!(plain.line(), "* secure left");

    let out = run_bounded(client);
    drop(stdin);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("* welcome, you are "), "{stdout}");
    assert!(lines.contains(&"<plain> hello from plain text"), "{stdout}");
    assert_eq!(lines.last(), Some(&"* bye"), "{stdout}");
}

/// End of input over TLS: the client says so inside TLS (close_notify), the server answers
/// what it has and closes, and the client exits 0 having printed it.
#[test]
fn plain_mode_over_tls_ends_cleanly_at_the_end_of_its_input() {
    let certs = TestCerts::new();
    let (server, tls_addr) = server_with_tls(&certs);
    let mut plain = Chat::named(server.addr, "plain");
    let mut client = spawn_piped_client(tls_addr.port(), &ca_flag(&certs));
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(b"last words\n/who\n").unwrap();
    drop(stdin);
    plain.wait_for(|line| line.ends_with("> last words"));
    let out = run_bounded(client);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.lines().any(|line| line.starts_with("* 2 online: ")),
        "{stdout}"
    );
}

#[test]
fn command_over_tls_prints_the_who_line() {
    let certs = TestCerts::new();
    let (server, tls_addr) = server_with_tls(&certs);
    let _plain = Chat::named(server.addr, "plain");
    let flags = [
        &ca_flag(&certs)[..],
        &["--nick", "probe", "--command", "/who"],
    ]
    .concat();
    let client = spawn_piped_client(tls_addr.port(), &flags);
    let out = run_bounded(client);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let names = lines[0]
        .strip_prefix("* 2 online: ")
        .unwrap_or_else(|| panic!("{stdout}"));
    let mut names: Vec<&str> = names.split(", ").collect();
    names.sort();
    assert_eq!(names, ["plain", "probe"]);
}

/// Without `--tls-ca` the client trusts only the system's roots (here `SSL_CERT_FILE`, naming
/// some other CA, so the test does not depend on the machine's store): the test certificate
/// fails verification, in every mode, with exit 1 and a hint. So do a CA that did not sign
/// it and TLS against the plain port. (A name the certificate is not for: `client::tls`'s
/// unit tests; every name for this loopback server is in it.)
#[test]
fn certificates_the_client_must_not_trust_fail_with_exit_1() {
    let certs = TestCerts::new();
    let someone_else = TestCerts::new();
    let (server, tls_addr) = server_with_tls(&certs);
    let tls_port = tls_addr.port().to_string();
    let plain_port = server.addr.port().to_string();
    let ca = certs.ca.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--port", &tls_port, "--tls"],
            "not signed by a CA this client trusts",
        ),
        (
            &["--port", &tls_port, "--tls", "--command", "/who"],
            "UnknownIssuer",
        ),
        (
            &["--port", &plain_port, "--tls-ca", ca],
            "is this its TLS port?",
        ),
        (
            &[
                "--port",
                &tls_port,
                "--tls-ca",
                someone_else.chain.to_str().unwrap(),
            ],
            "invalid peer certificate",
        ),
    ];
    for (flags, reason) in cases {
        let out = run_client(flags, &someone_else.ca);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{flags:?}: {}",
            text(&out.stderr)
        );
        let stderr = text(&out.stderr);
        assert!(
            stderr.starts_with("peerchat-client: TLS with "),
            "{flags:?}: {stderr}"
        );
        assert!(stderr.contains(reason), "{flags:?}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "{flags:?}: nothing from the server is shown"
        );
    }
}

/// A `--tls-ca` file that cannot be used is a command-line mistake: exit 2, naming the file,
/// before any connection is tried (nothing listens on the port).
#[test]
fn an_unusable_ca_file_exits_2_naming_it() {
    let certs = TestCerts::new();
    let port = free_port().to_string();
    let missing = certs.dir.join("missing.pem");
    for (file, reason) in [
        (missing.as_path(), "cannot read it"),
        (certs.key.as_path(), "no PEM certificate in it"),
    ] {
        let path = file.to_str().unwrap();
        let out = run_client(
            &["--port", &port, "--tls-ca", path, "--command", "/who"],
            &certs.ca,
        );
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        let stderr = text(&out.stderr);
        let expected = format!("peerchat-client: error: --tls-ca {path}: {reason}");
        assert!(stderr.starts_with(&expected), "{stderr}");
    }
}

/// Runs the client to its end with `flags`, standard input closed and `system_roots` as the
/// only system root certificate.
fn run_client(flags: &[&str], system_roots: &Path) -> Output {
    let child = Command::new(CLIENT)
        .args(flags)
        .env("SSL_CERT_FILE", system_roots)
        .env_remove("SSL_CERT_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start client");
    run_bounded(child)
}

// ---------------------------------------------------------------------------------------------
// Terminal mode

/// The server binary with both listeners on fixed ports, so it can be started again on them.
fn server_binary(certs: &TestCerts, port: u16, tls_port: u16) -> ServerProcess {
    let (port, tls_port) = (port.to_string(), tls_port.to_string());
    let args = [
        "--no-persist".as_ref(),
        "--port".as_ref(),
        port.as_ref(),
        "--tls-port".as_ref(),
        tls_port.as_ref(),
        "--tls-cert".as_ref(),
        certs.chain.as_os_str(),
        "--tls-key".as_ref(),
        certs.key.as_os_str(),
    ];
    spawn_server_on(tls_port.parse().unwrap(), &args)
}

/// The client process, killed if the test fails before it exits.
struct Client(Child);

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Terminal mode over TLS, through a restart of the server: the reconnect makes a new TLS
/// session (a new handshake) and the nick comes back.
#[test]
fn terminal_mode_over_tls_reconnects_after_a_server_restart() {
    let certs = TestCerts::new();
    let (port, tls_port) = (free_port(), free_port());
    let server = server_binary(&certs, port, tls_port);
    let mut pty = Pty::open(24, 80);
    let child = pty
        .command(CLIENT)
        .args([
            "--port",
            &tls_port.to_string(),
            "--nick",
            "alice",
            "--no-time",
        ])
        .args(ca_flag(&certs))
        .spawn()
        .expect("start client");
    let _client = Client(child);
    pty.wait_for_text("is now alice");

    drop(server); // killed: no close_notify
    pty.wait_for_text("connection lost (connection cut without a TLS close_notify)");
    pty.wait_for_text("reconnecting in");
    let _server = server_binary(&certs, port, tls_port);
    pty.wait_for_text(&format!("reconnected to 127.0.0.1:{tls_port}"));
    pty.wait_for_output("is now alice", 2);

    let mut bob = Chat::named(SocketAddr::from(([127, 0, 0, 1], port)), "bob");
    pty.wait_for_text("is now bob");
    bob.send("over plain TCP");
    pty.wait_for_row("<bob> over plain TCP");
    pty.type_keys(b"and back inside TLS\r");
    bob.wait_for(|line| line == "<alice> and back inside TLS");
    pty.wait_for_row("<you> and back inside TLS");
}
