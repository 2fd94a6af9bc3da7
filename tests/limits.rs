//! Limits that protect everyone from one host or many slow readers (`--max-per-ip`,
//! `--max-output-total`), and the figures of `/stats` and `--stats-interval`.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::process::spawn_server;
use common::{start_server, Chat, TestDb};
use peerchat::ServerConfig;
use socket2::{Domain, Socket, Type};

fn config_with(change: impl FnOnce(&mut ServerConfig)) -> ServerConfig {
    let mut config = ServerConfig::local(None);
    change(&mut config);
    config
}

/// A connection to `server` from the loopback address `from` (127.0.0.2 and so on).
fn connect_from(from: &str, server: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let source: SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&source.into()).expect("bind a loopback source");
    socket.connect(&server.into()).expect("connect");
    socket.into()
}

/// The one line a refused client gets; the server closes it after that line.
fn refusal(socket: TcpStream) -> String {
    socket.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let lines: Vec<String> = BufReader::new(socket)
        .lines()
        .map_while(Result::ok)
        .collect();
    assert_eq!(lines.len(), 1, "one line, then closed: {lines:?}");
    lines[0].trim_end().to_string()
}

#[test]
fn the_33rd_connection_from_one_address_is_refused_and_others_are_unaffected() {
    let server = start_server(ServerConfig::local(None));
    let mut crowd: Vec<Chat> = (0..32)
        .map(|_| Chat::over(connect_from("127.0.0.2", server.addr)))
        .collect();
    assert_eq!(
        refusal(connect_from("127.0.0.2", server.addr)),
        "! too many connections from your address (32)"
    );
    // Another address, and the exempt local host (33 of them), still get in.
    let mut other = Chat::over(connect_from("127.0.0.3", server.addr));
    let locals: Vec<Chat> = (0..33).map(|_| Chat::connect(server.addr)).collect();
    other.send("/who");
    let who = other.wait_for(|line| line.contains(" online: "));
    assert!(who.starts_with("* 66 online: "), "{who}");
    // The refused one never joined: nobody heard of it.
    let first = &mut crowd[0];
    assert!(first
        .sync()
        .iter()
        .all(|line| !line.contains("127.0.0.2") || line.ends_with(" joined")));

    // A slot given back can be taken again.
    crowd.pop().unwrap().send("/quit");
    let mut again = None;
    for _ in 0..100 {
        let socket = connect_from("127.0.0.2", server.addr);
        socket.set_read_timeout(Some(common::DEADLINE)).unwrap();
        let mut first_line = String::new();
        BufReader::new(socket).read_line(&mut first_line).unwrap();
        if first_line.starts_with("* welcome") {
            again = Some(first_line);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(again.is_some(), "the address got its slot back");
    drop(locals);
}

#[test]
fn max_per_ip_zero_turns_the_limit_off_and_the_exempt_list_is_configurable() {
    let server = start_server(config_with(|c| {
        c.max_per_ip = 2;
        c.max_per_ip_exempt = vec!["127.0.0.4".parse().unwrap()];
    }));
    let _held: Vec<Chat> = (0..2).map(|_| Chat::connect(server.addr)).collect();
    assert_eq!(
        refusal(TcpStream::connect(server.addr).unwrap()),
        "! too many connections from your address (2)",
        "127.0.0.1 is limited once it is not in the list"
    );
    let _exempt: Vec<Chat> = (0..3)
        .map(|_| Chat::over(connect_from("127.0.0.4", server.addr)))
        .collect();

    let unlimited = start_server(config_with(|c| {
        c.max_per_ip = 0;
        c.max_per_ip_exempt.clear();
    }));
    let _many: Vec<Chat> = (0..40).map(|_| Chat::connect(unlimited.addr)).collect();
}

/// A socket that takes little at a time, so the server's output for it piles up.
fn slow_reader(addr: SocketAddr) -> Chat {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).expect("connect");
    Chat::over(socket.into())
}

/// The `key=value` figures of a `/stats` line.
fn figures(line: &str) -> HashMap<String, String> {
    let rest = line.strip_prefix("* stats ").expect("a stats line");
    rest.split(' ')
        .map(|pair| {
            let (key, value) = pair.split_once('=').expect("key=value");
            (key.to_string(), value.to_string())
        })
        .collect()
}

fn stats(chat: &mut Chat) -> HashMap<String, String> {
    chat.send("/stats");
    figures(&chat.wait_for(|line| line.starts_with("* stats ")))
}

fn figure(stats: &HashMap<String, String>, key: &str) -> u64 {
    stats[key]
        .parse()
        .unwrap_or_else(|_| panic!("{key}={}", stats[key]))
}

#[test]
fn past_the_summed_output_cap_the_client_with_the_most_pending_is_cut_off_first() {
    const TOTAL: usize = 2 << 20;
    let server = start_server(config_with(|c| {
        c.limits.flood = None;
        c.limits.max_output = 64 << 20; // never the per-client limit here
        c.max_output_total = TOTAL;
    }));
    let mut watcher = Chat::connect(server.addr);
    let mut early = slow_reader(server.addr);
    let mut talker = Chat::named(server.addr, "talker");
    let line = "o".repeat(1000);
    // The early reader falls behind by this much before the late one even joins.
    for _ in 0..(TOTAL / 2 / 1000) {
        talker.send(&line);
    }
    talker.sync();
    let mut late = slow_reader(server.addr);
    let mut cut = false;
    for _ in 0..(4 * TOTAL / 1000) {
        talker.send(&line);
        let stats = stats(&mut watcher);
        if figure(&stats, "slow_consumers") > 0 {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "nobody was cut off although far more than the cap was sent"
    );
    // The early one, with the most pending, went; the late one is still here and gets its
    // lines once it reads.
    early.read_to_end();
    talker.send("last");
    late.wait_for(|l| l == "<talker> last");
    late.send("/who");
    let who = late.wait_for(|l| l.contains(" online: "));
    assert!(who.starts_with("* 3 online: "), "{who}");
    assert_eq!(figure(&stats(&mut watcher), "slow_consumers"), 1);
}

#[test]
fn stats_figures_follow_known_traffic() {
    let db = TestDb::start();
    let mut config = ServerConfig::local(Some(db.store_config()));
    config.max_clients = 3;
    let server = start_server(config);
    let mut alice = Chat::named(server.addr, "alice");
    let before = stats(&mut alice);
    let names: Vec<&str> = before.keys().map(String::as_str).collect();
    assert_eq!(names.len(), 17, "{names:?}");
    assert_eq!(figure(&before, "clients"), 1);
    assert_eq!(figure(&before, "clients_max"), 3);
    assert_eq!(figure(&before, "msgs_in"), 0);

    let mut bob = Chat::named(server.addr, "bob");
    let _carol = Chat::named(server.addr, "carol");
    // The fourth is refused: the server is full.
    let refused = TcpStream::connect(server.addr).unwrap();
    assert!(refusal(refused).starts_with("! server full"));
    alice.send("one");
    alice.send("two");
    alice.send("three");
    bob.send("/me waves");
    bob.send("/who"); // a command, not a message
    bob.wait_for(|l| l.contains(" online: "));
    alice.wait_for(|l| l == "* bob waves");

    // Saving is asynchronous: wait (bounded) until all four are stored.
    let mut after = stats(&mut alice);
    for _ in 0..200 {
        if figure(&after, "saved") == 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
        after = stats(&mut alice);
    }
    assert_eq!(figure(&after, "clients"), 3);
    assert_eq!(figure(&after, "connections_total"), 3);
    assert_eq!(figure(&after, "rejected_full"), 1);
    assert_eq!(figure(&after, "rejected_per_ip"), 0);
    assert_eq!(figure(&after, "msgs_in"), 4);
    assert_eq!(figure(&after, "deliveries_out"), 8, "4 messages × 2 others");
    assert_eq!(figure(&after, "saved"), 4);
    assert_eq!(figure(&after, "not_saved"), 0);
    assert_eq!(figure(&after, "save_queue"), 0);
    assert!(after["save_batch_ms_p99"].parse::<f64>().unwrap() > 0.0);
    assert!(figure(&after, "bytes_in") > figure(&before, "bytes_in"));
    assert!(figure(&after, "bytes_out") > figure(&before, "bytes_out"));
    assert_eq!(figure(&after, "slow_consumers"), 0);
    assert_eq!(figure(&after, "tls_handshake_failures"), 0);

    // A failed save counts as not saved.
    db.fail_inserts(Some(2));
    alice.send("lost");
    alice.wait_for(|l| l.starts_with("! not saved"));
    db.fail_inserts(None);
    assert_eq!(figure(&stats(&mut alice), "not_saved"), 1);
}

#[test]
fn flood_delays_are_counted() {
    let server = start_server(ServerConfig::local(None));
    let mut alice = Chat::connect(server.addr);
    let burst: String = (0..60).map(|n| format!("line {n}\n")).collect();
    alice.send_bytes(burst.as_bytes());
    alice.wait_for(|l| l.starts_with("! "));
    let stats = stats(&mut alice);
    assert!(figure(&stats, "flood_delayed") >= 1, "{stats:?}");
    assert_eq!(figure(&stats, "msgs_in"), 60);
}

#[test]
fn stats_interval_logs_the_stats_line() {
    let (server, _addr) = spawn_server("", "--no-persist --stats-interval 1");
    let logged = server.wait_for_log(|line| line.contains("* stats uptime_s="));
    assert!(logged.contains(" tls_handshake_failures=0"), "{logged}");
}

/// Output is written once per turn, so a burst queues far more than the sockets take at once:
/// clients that read are given what their sockets take before anyone is judged, and none of
/// them is cut off at the summed cap.
#[test]
fn clients_that_read_are_not_cut_off_at_the_summed_cap() {
    const READERS: usize = 8;
    const LINES: usize = 150;
    let server = start_server(config_with(|c| {
        c.limits.flood = None;
        c.limits.max_output = 256 << 10;
        c.max_output_total = 256 << 10;
    }));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let mut reader = Chat::connect(server.addr);
            reader.sync();
            std::thread::spawn(move || {
                let mut got = 0;
                while reader.line() != "<sender> end" {
                    got += 1;
                }
                got
            })
        })
        .collect();
    let mut sender = Chat::named(server.addr, "sender");
    let line = "b".repeat(3999);
    let burst: String = (0..LINES).map(|_| format!("{line}\n")).collect();
    sender.send_bytes(burst.as_bytes()); // 600 KB to each reader in one go
    sender.send("end");
    for reader in readers {
        let got = reader.join().expect("a reader was cut off");
        // Each also saw the sender's join and rename.
        assert!(got >= LINES, "{got} lines");
    }
    assert_eq!(figure(&stats(&mut sender), "slow_consumers"), 0);
}

/// Chat sent in the same write as `/stats` is counted as sent and delivered in the answer.
#[test]
fn stats_counts_the_askers_own_chat_of_the_same_read() {
    let server = start_server(ServerConfig::local(None));
    let (mut alice, mut bob) = common::alice_and_bob(server.addr);
    alice.send_bytes(b"one\ntwo\n/stats\n");
    let stats = figures(&alice.wait_for(|line| line.starts_with("* stats ")));
    assert_eq!(figure(&stats, "msgs_in"), 2);
    assert_eq!(figure(&stats, "deliveries_out"), 2);
    assert_eq!(bob.line(), "<alice> one");
}
