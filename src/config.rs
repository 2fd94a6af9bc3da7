//! Command-line configuration of the server and the client: flags, defaults and limits.
//!
//! Every limit the server enforces is named here with its unit and default, so `--help`, the
//! README and the code agree. Parsing is separate from the binaries so it can be tested.

use std::ffi::OsString;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::log::Level;

/// Default listen host: loopback, so a fresh install is not open to the network by accident.
pub const DEFAULT_HOST: &str = "127.0.0.1";
/// Default port (the original design's).
pub const DEFAULT_PORT: u16 = 55556;
/// Longest accepted line in bytes, terminator excluded.
pub const DEFAULT_MAX_LINE: usize = 4096;
/// Output a client may have pending before it is cut off as a slow consumer, in bytes. Chat is
/// pushed to clients, so without a cap one client that never reads would grow without bound.
pub const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;
/// Overlong lines a client may send in a row; the next one disconnects it. A client that keeps sending
/// them is broken or hostile, and each one costs a read of up to the whole line.
pub const DEFAULT_MAX_OVERLONG: u32 = 3;
/// Lines per second a client may send on average (flood control), and how many it may send in
/// one burst: a person typing or pasting a paragraph never meets the limit, a script flooding
/// the room does.
pub const DEFAULT_FLOOD_RATE: u32 = 20;
pub const DEFAULT_FLOOD_BURST: u32 = 40;
/// Clients served at once; more are told the server is full. Also capped by the open-file limit.
pub const DEFAULT_MAX_CLIENTS: usize = 10_000;
/// How long a stopping server waits, in seconds, for clients to take their last output and for
/// accepted messages to be stored.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 10;
/// Connections the kernel may hold waiting for `accept`. After a restart every client reconnects
/// at once; a short queue drops the excess SYNs and the kernel retries them only after a second.
/// 1024 as Redis' `tcp-backlog` is 511 and nginx's is 511 (Linux) or more; like theirs, the
/// system's `net.core.somaxconn` caps it.
pub const DEFAULT_BACKLOG: u32 = 1024;
/// Joins (and leaves) within this interval of the last announced one are gathered into one
/// notice at its end, so a reconnect storm costs one line per client, not one per pair.
pub const DEFAULT_PRESENCE_INTERVAL: Duration = Duration::from_secs(1);
/// Idle seconds before TCP keepalive probes a silent peer. A client whose host vanished (power
/// loss, NAT timeout) sends no FIN or RST; without probes it would hold its slot and name
/// forever. Redis defaults to 300; a minute frees dead slots sooner at a negligible cost.
pub const DEFAULT_KEEPALIVE_SECS: u64 = 60;
/// Stored messages a client gets when it joins. UnrealIRCd plays 15 and recommends 10–50, Matrix
/// syncs 10: enough to see what the room is talking about, few enough to read at a glance.
pub const DEFAULT_HISTORY_ON_JOIN: usize = 20;
/// Most stored messages one `/history N` may ask for: a few screens, and a bounded query.
pub const DEFAULT_HISTORY_MAX: usize = 500;
/// Connections one IP address may hold at once: enough for a household or an office behind one
/// NAT, far too few for one host to take every slot. `0` turns the limit off.
pub const DEFAULT_MAX_PER_IP: usize = 32;
/// Addresses `--max-per-ip` does not apply to: the local host, where operators run tools,
/// benches and tests (ergo exempts localhost the same way). Other loopback addresses
/// (127.0.0.2) are limited like any other.
pub const DEFAULT_MAX_PER_IP_EXEMPT: &str = "127.0.0.1,::1";
/// Output pending over all clients together before the client with the most is disconnected
/// as a slow consumer. `--max-output` alone lets 10 000 clients that do not read hold 10 GiB.
pub const DEFAULT_MAX_OUTPUT_TOTAL: usize = 256 * 1024 * 1024;
/// Database used when `PEERCHAT_MONGO_URI` and `--mongo-uri` are absent.
pub const DEFAULT_MONGO_URI: &str = "mongodb://127.0.0.1:27017";
/// Environment variable that supplies the MongoDB URI.
pub const MONGO_URI_ENV: &str = "PEERCHAT_MONGO_URI";
/// Database and collection names.
pub const DEFAULT_MONGO_DB: &str = "peerchat";
pub const DEFAULT_MONGO_COLLECTION: &str = "messages";
/// How long an insert may wait for an unreachable database before failing, in milliseconds
/// (server selection and connect). The driver's own default is 30 s; 2 s keeps `! not saved`
/// reports timely.
pub const DEFAULT_MONGO_TIMEOUT_MS: u64 = 2000;
/// Messages waiting for the persistence thread. A full queue fails new messages at once
/// instead of blocking the event loop.
pub const DEFAULT_PERSIST_QUEUE: usize = 10_000;
/// Bytes of encoded documents waiting for the persistence thread. The count bound alone lets
/// the queue hold gigabytes at long lines (10 000 × a 1 MiB `--max-line`); 64 MiB holds the
/// whole count at ordinary lengths, and a full queue fails new messages the same way.
pub const DEFAULT_PERSIST_QUEUE_BYTES: u64 = 64 * 1024 * 1024;

/// How often a cluster node writes its heartbeat (`--heartbeat-interval`). A node silent for
/// `CLUSTER_SILENT_INTERVALS` of these is taken for gone, and so is a change stream (reopened).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Heartbeat intervals of silence after which a node (or the change stream) counts as gone.
pub const CLUSTER_SILENT_INTERVALS: u32 = 3;
/// Longest `--node-id`: it is stored in every message and shown in `/who`.
pub const MAX_NODE_ID_CHARS: usize = 32;

/// What the server needs to run.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Requested listen backlog; the system may cap it.
    pub backlog: u32,
    pub limits: ClientLimits,
    pub max_clients: usize,
    pub shutdown_timeout: Duration,
    /// Zero announces every join and leave at once.
    pub presence_interval: Duration,
    /// `None` with `--keepalive 0`.
    pub keepalive: Option<Duration>,
    /// Log lines below this level are not written (`--log-level`).
    pub log_level: Level,
    /// Stored messages sent to a client when it joins; zero sends none.
    pub history_on_join: usize,
    /// Most stored messages one `/history` request gets.
    pub history_max: usize,
    /// Serve plain TCP on `port` (`--no-plain`: TLS only).
    pub plain: bool,
    /// A TLS listener beside the plain one, if asked for.
    pub tls: Option<TlsListen>,
    /// Connections one address may hold (`0`: no limit), except `max_per_ip_exempt`.
    pub max_per_ip: usize,
    pub max_per_ip_exempt: Vec<IpAddr>,
    /// Output pending over all clients before the largest backlog is cut off.
    pub max_output_total: usize,
    /// How often the `/stats` line is logged; `None`: never.
    pub stats_interval: Option<Duration>,
    /// `None` with `--no-persist`: no database at all.
    pub store: Option<StoreConfig>,
    /// `--cluster`: share the chat with other nodes through the database.
    pub cluster: Option<ClusterConfig>,
}

/// One node of several sharing a chat through MongoDB change streams (`--cluster`).
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    /// Stored in every message and presence document of this node, shown in `/who`.
    pub node_id: String,
    /// How often this node writes its heartbeat and refreshes its clients' presence.
    pub heartbeat: Duration,
}

/// The TLS listener: its port and the PEM files certbot writes (`fullchain.pem`, `privkey.pem`).
/// The files are read when the server starts, not here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsListen {
    pub port: u16,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What one client may send and leave unread before it is refused or disconnected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLimits {
    /// Longest line in bytes, terminator excluded.
    pub max_line: usize,
    /// Output pending for the client before it is cut off as a slow consumer, in bytes.
    pub max_output: usize,
    /// Overlong lines in a row tolerated; the next one disconnects.
    pub max_overlong: u32,
    /// `None` with `--flood-rate 0`: no flood control.
    pub flood: Option<FloodLimit>,
}

/// A token bucket: `burst` lines at once, refilled at `lines_per_sec`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FloodLimit {
    pub lines_per_sec: u32,
    pub burst: u32,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            max_line: DEFAULT_MAX_LINE,
            max_output: DEFAULT_MAX_OUTPUT,
            max_overlong: DEFAULT_MAX_OVERLONG,
            flood: Some(FloodLimit {
                lines_per_sec: DEFAULT_FLOOD_RATE,
                burst: DEFAULT_FLOOD_BURST,
            }),
        }
    }
}

/// Where and how chat messages are stored.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub uri: String,
    pub database: String,
    pub collection: String,
    pub timeout: Duration,
    pub queue_capacity: usize,
    /// Bound of the save queue in bytes of encoded documents.
    pub queue_bytes: usize,
}

/// Seconds the client waits for one connection attempt (per resolved address) before giving
/// up on it: long enough for a slow link, short enough that a dead route is reported while the
/// user is still looking.
pub const DEFAULT_CONNECT_TIMEOUT_SECS: f64 = 10.0;

/// What the client needs to run.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub host: String,
    pub port: u16,
    pub nick: Option<String>,
    /// Bound on each connect, the first and every reconnect.
    pub connect_timeout: Duration,
    /// Terminal mode shows the local time on each line (`--no-time` turns it off).
    pub time: bool,
    /// Terminal mode colours names, notices and errors (`--no-color` turns it off; the client
    /// also honours `NO_COLOR`, which is read where the client starts, not here).
    pub color: bool,
    /// Terminal mode reconnects when the server goes away (`--no-reconnect`: exit 1 instead).
    pub reconnect: bool,
    /// Speak TLS, and whose certificates to trust (`--tls`, `--tls-ca FILE`).
    pub tls: Option<TlsTrust>,
    /// `--command CMD`: send this one line, print its reply and exit (no terminal mode).
    pub command: Option<String>,
}

/// What a TLS client trusts. The file is read when the client starts, not here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsTrust {
    /// `--tls`: the system's root certificates, as a browser would.
    SystemRoots,
    /// `--tls-ca FILE`: only the CA certificates in this PEM file (a self-signed server's).
    CaFile(PathBuf),
}

impl ServerConfig {
    /// Loopback on an OS-chosen port with the given store: what tests and benches start.
    pub fn local(store: Option<StoreConfig>) -> Self {
        ServerConfig {
            host: DEFAULT_HOST.to_string(),
            port: 0,
            backlog: DEFAULT_BACKLOG,
            limits: ClientLimits::default(),
            max_clients: DEFAULT_MAX_CLIENTS,
            shutdown_timeout: Duration::from_secs(DEFAULT_SHUTDOWN_TIMEOUT_SECS),
            presence_interval: DEFAULT_PRESENCE_INTERVAL,
            keepalive: Some(Duration::from_secs(DEFAULT_KEEPALIVE_SECS)),
            log_level: Level::Info,
            history_on_join: DEFAULT_HISTORY_ON_JOIN,
            history_max: DEFAULT_HISTORY_MAX,
            plain: true,
            tls: None,
            max_per_ip: DEFAULT_MAX_PER_IP,
            max_per_ip_exempt: parse_addresses(DEFAULT_MAX_PER_IP_EXEMPT)
                .expect("default exempt addresses parse"),
            max_output_total: DEFAULT_MAX_OUTPUT_TOTAL,
            stats_interval: None,
            store,
            cluster: None,
        }
    }
}

impl StoreConfig {
    /// Default names, queue and timeout for the database at `uri`.
    pub fn new(uri: &str) -> Self {
        StoreConfig {
            uri: uri.to_string(),
            database: DEFAULT_MONGO_DB.to_string(),
            collection: DEFAULT_MONGO_COLLECTION.to_string(),
            timeout: Duration::from_millis(DEFAULT_MONGO_TIMEOUT_MS),
            queue_capacity: DEFAULT_PERSIST_QUEUE,
            queue_bytes: usize::try_from(DEFAULT_PERSIST_QUEUE_BYTES).unwrap_or(usize::MAX),
        }
    }
}

/// `--help` of `peerchat-server`.
pub const SERVER_HELP: &str = "\
peerchat-server: a line-based chat server that stores every message in MongoDB

Usage: peerchat-server [OPTIONS]

Options:
  --host HOST              address to listen on [default: 127.0.0.1]
  --port PORT              port to listen on, 0 for any free port [default: 55556]
  --backlog N              connections waiting to be accepted; capped by the system's
                           net.core.somaxconn [default: 1024]
  --max-line BYTES         longest accepted line, newline excluded [default: 4096]
  --max-output BYTES       output pending for one client before it is disconnected
                           as a slow consumer [default: 1048576]
  --max-overlong N         overlong lines a client may send in a row; the next one
                           disconnects it [default: 3]
  --flood-rate LINES       lines per second a client may send on average; a client over
                           it is read more slowly (its lines are delayed, never dropped),
                           with one warning per burst; 0 turns flood control off
                           [default: 20]
  --flood-burst LINES      lines a client may send at once before --flood-rate applies
                           [default: 40]
  --max-clients N          clients served at once; more are told the server is full.
                           Capped by the open-file limit, which the server raises to its
                           hard limit at start [default: 10000]
  --shutdown-timeout SECS  on SIGINT/SIGTERM, how long to wait for clients to take their
                           last output and for accepted messages to be stored [default: 10]
  --presence-interval SECS joins (and leaves) within this long of the last announced one
                           are gathered into one notice; 0 announces each at once
                           [default: 1]
  --keepalive SECS         idle seconds before TCP keepalive probes a silent client (then
                           3 probes SECS/3 apart); 0 turns it off [default: 60]
  --log-level LEVEL        debug (adds a line per connection), info, warn or error
                           [default: info]
  --history-on-join N      stored messages a client gets when it joins, as notices;
                           0 sends none; at most --history-max [default: 20]
  --history-max N          most stored messages one /history N shows (up to 10000)
                           [default: 500]
  --no-plain               serve TLS only: no plain listener (--port is not used)
  --tls-port PORT          also serve TLS on this port (needs --tls-cert and --tls-key)
  --tls-cert FILE          certificate chain, PEM (certbot's fullchain.pem)
  --tls-key FILE           private key, PEM (certbot's privkey.pem)
  --max-per-ip N           connections one IP address may hold; more are told so and
                           closed; 0 turns the limit off [default: 32]
  --max-per-ip-exempt LIST comma-separated addresses --max-per-ip does not apply to
                           [default: 127.0.0.1,::1]
  --max-output-total BYTES output pending over all clients; when a line would pass it, the
                           client with the most pending output is disconnected as a slow
                           consumer [default: 268435456]
  --stats-interval SECS    log the /stats line every SECS seconds; 0 never [default: 0]
  --mongo-uri URI          MongoDB to store messages in, e.g. mongodb+srv://… for Atlas
                           [default: $PEERCHAT_MONGO_URI, else mongodb://127.0.0.1:27017]
  --mongo-db NAME          database name [default: peerchat]
  --mongo-collection NAME  collection name [default: messages]
  --mongo-timeout-ms MS    how long a save waits for an unreachable database before the
                           sender is told it failed; a database that accepts connections
                           but does not answer is given 3 times this [default: 2000]
  --persist-queue N        messages waiting to be saved before new ones are refused
                           [default: 10000]
  --persist-queue-bytes BYTES
                           bytes of messages waiting to be saved before new ones are
                           refused [default: 67108864]
  --no-persist             run without a database (nothing is stored)
  --cluster                share one chat with the other servers on the same database
                           (MongoDB change streams: needs a replica set)
  --node-id ID             this server's name in the cluster, up to 32 letters, digits,
                           - _ . [default: 8 random hex digits, logged at start]
  --heartbeat-interval SECS
                           with --cluster: how often this server says it is alive; a
                           server silent for 3 intervals is taken for gone [default: 10]
  -h, --help               print this help
  -V, --version            print the version
";

/// `--help` of `peerchat-client`.
pub const CLIENT_HELP: &str = "\
peerchat-client: connect to a peerchat server, print what arrives, send what you type

Usage: peerchat-client [OPTIONS]

Options:
  --host HOST             server address [default: 127.0.0.1]; with TLS also the name
                          the server's certificate must carry (DNS name or IP address)
  --port PORT             server port [default: 55556]
  --nick NAME             set this nick after connecting (and again after a reconnect)
  --connect-timeout SECS  give up on a connection attempt, or a TLS handshake, after
                          this long [default: 10]
  --tls                   connect with TLS, trusting the system's root certificates
  --tls-ca FILE           connect with TLS, trusting only the CA certificate(s) in this
                          PEM file (for a self-signed server); implies --tls
  --command CMD           send the one line CMD (e.g. /who, /history 5), print the
                          server's reply, and exit: 0, or 1 when the client cannot
                          connect, the reply has an error line (! ...), or no complete
                          reply comes within 10 s. For scripts and health checks
  --no-time               terminal mode: no local time (HH:MM) before each line
  --no-color              terminal mode: no colours (a non-empty NO_COLOR does the same)
  --no-reconnect          terminal mode: exit 1 when the server goes away instead of
                          reconnecting (1 s, doubling to 30 s, with jitter)
  -h, --help              print this help
  -V, --version           print the version

When standard input and output are both terminals, incoming lines print above an input line
that you edit (arrows, Home/End, Up/Down for earlier lines, Ctrl-A/E/U/W); your own messages
show as <you> text (or <NICK> text once you have one). Otherwise the client is a plain line
pipe: every input line is sent, every server line printed as it came (cleaned of control
characters), and nothing after /quit is sent.
Type a line and press Enter to send it; /help lists the server's commands.
Exits 0 at end of input, after /quit or Ctrl-C, 1 when it cannot connect (TLS handshake and
certificate failures included), or when the connection is lost in plain mode or with
--no-reconnect; 2 for a bad command line or a --tls-ca file that cannot be used.
";

/// What the command line asked for.
#[derive(Debug)]
pub enum Parsed<T> {
    Run(T),
    Help,
    Version,
}

/// A bad command line; the binaries print it and exit with status 2.
#[derive(Debug, PartialEq, Eq)]
pub struct ArgError(pub String);

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ArgError {}

/// Turns a parse result into a config to run with, or the exit code after printing help,
/// the version, or a one-line error (status 2) for the binary called `program`.
pub fn config_or_exit<T>(
    program: &str,
    help: &str,
    parsed: Result<Parsed<T>, ArgError>,
) -> Result<T, std::process::ExitCode> {
    match parsed {
        Ok(Parsed::Run(config)) => Ok(config),
        Ok(Parsed::Help) => {
            print!("{help}");
            Err(std::process::ExitCode::SUCCESS)
        }
        Ok(Parsed::Version) => {
            println!("{program} {}", env!("CARGO_PKG_VERSION"));
            Err(std::process::ExitCode::SUCCESS)
        }
        Err(err) => {
            eprintln!("{program}: error: {err}");
            Err(std::process::ExitCode::from(2))
        }
    }
}

/// Parses the server's flags. `env_uri` is the value of `PEERCHAT_MONGO_URI`, if set.
pub fn parse_server_args(
    args: Vec<OsString>,
    env_uri: Option<String>,
) -> Result<Parsed<ServerConfig>, ArgError> {
    let mut args = pico_args::Arguments::from_vec(args);
    if let Some(other) = help_or_version(&mut args) {
        return Ok(other);
    }
    let host = optional(&mut args, "--host")?.unwrap_or_else(|| DEFAULT_HOST.to_string());
    let port = optional(&mut args, "--port")?.unwrap_or(DEFAULT_PORT);
    let backlog = bounded(&mut args, "--backlog", DEFAULT_BACKLOG, 1, 65_535)?;
    let max_line = bounded(&mut args, "--max-line", DEFAULT_MAX_LINE, 1, 1 << 20)?;
    let max_output = bounded(&mut args, "--max-output", DEFAULT_MAX_OUTPUT, 1024, 1 << 30)?;
    let max_overlong = bounded(&mut args, "--max-overlong", DEFAULT_MAX_OVERLONG, 0, 1_000)?;
    let flood_rate = bounded(&mut args, "--flood-rate", DEFAULT_FLOOD_RATE, 0, 1_000_000)?;
    let flood_burst = bounded(
        &mut args,
        "--flood-burst",
        DEFAULT_FLOOD_BURST,
        1,
        1_000_000,
    )?;
    let max_clients = bounded(
        &mut args,
        "--max-clients",
        DEFAULT_MAX_CLIENTS,
        1,
        1_000_000,
    )?;
    let shutdown_secs = bounded(
        &mut args,
        "--shutdown-timeout",
        DEFAULT_SHUTDOWN_TIMEOUT_SECS,
        0,
        3600,
    )?;
    let presence_secs = bounded(
        &mut args,
        "--presence-interval",
        DEFAULT_PRESENCE_INTERVAL.as_secs_f64(),
        0.0,
        3600.0,
    )?;
    if !presence_secs.is_finite() {
        return Err(ArgError(
            "--presence-interval: not a number of seconds".to_string(),
        ));
    }
    // Linux takes at most 32 767 s as the idle time (TCP_KEEPIDLE).
    let keepalive_secs = bounded(&mut args, "--keepalive", DEFAULT_KEEPALIVE_SECS, 0, 32_767)?;
    let log_level = optional(&mut args, "--log-level")?.unwrap_or(Level::Info);
    let history_on_join = bounded(
        &mut args,
        "--history-on-join",
        DEFAULT_HISTORY_ON_JOIN,
        0,
        10_000,
    )?;
    let history_max = bounded(&mut args, "--history-max", DEFAULT_HISTORY_MAX, 1, 10_000)?;
    let plain = !args.contains("--no-plain");
    let tls = tls_listen(&mut args, plain)?;
    let max_per_ip = bounded(&mut args, "--max-per-ip", DEFAULT_MAX_PER_IP, 0, 1_000_000)?;
    let exempt: Option<String> = optional(&mut args, "--max-per-ip-exempt")?;
    let max_per_ip_exempt = parse_addresses(exempt.as_deref().unwrap_or(DEFAULT_MAX_PER_IP_EXEMPT))
        .map_err(|bad| ArgError(format!("--max-per-ip-exempt: '{bad}' is not an IP address")))?;
    let max_output_total = bounded(
        &mut args,
        "--max-output-total",
        DEFAULT_MAX_OUTPUT_TOTAL,
        1024,
        1 << 40,
    )?;
    let stats_secs = bounded(&mut args, "--stats-interval", 0, 0, 86_400)?;
    let uri = optional(&mut args, "--mongo-uri")?;
    let database = optional(&mut args, "--mongo-db")?;
    let collection = optional(&mut args, "--mongo-collection")?;
    let timeout_ms = bounded(
        &mut args,
        "--mongo-timeout-ms",
        DEFAULT_MONGO_TIMEOUT_MS,
        1,
        600_000,
    )?;
    let queue = bounded(
        &mut args,
        "--persist-queue",
        DEFAULT_PERSIST_QUEUE,
        1,
        10_000_000,
    )?;
    let queue_bytes = bounded(
        &mut args,
        "--persist-queue-bytes",
        DEFAULT_PERSIST_QUEUE_BYTES,
        1024,
        1 << 40,
    )?;
    let no_persist = args.contains("--no-persist");
    let cluster = cluster(&mut args, no_persist)?;
    reject_leftovers(args)?;
    if max_output < max_line.saturating_mul(2) {
        return Err(ArgError(format!(
            "--max-output: must be at least twice --max-line ({max_line})"
        )));
    }
    // Below two longest lines, every line to a second recipient would cut off the first.
    if max_output_total < max_line.saturating_mul(2) {
        return Err(ArgError(format!(
            "--max-output-total: must be at least twice --max-line ({max_line})"
        )));
    }
    // A message's document is its text plus a few hundred bytes of fields: a bound below one
    // longest message would refuse such messages for good.
    let longest_document = max_line as u64 + 1024;
    if !no_persist && queue_bytes < longest_document {
        return Err(ArgError(format!(
            "--persist-queue-bytes: must hold at least one longest message ({longest_document} with --max-line {max_line})"
        )));
    }
    let store = if no_persist {
        None
    } else {
        let (uri, source) = match (uri, env_uri.filter(|uri| !uri.is_empty())) {
            (Some(uri), _) => (uri, "--mongo-uri"),
            (None, Some(uri)) => (uri, MONGO_URI_ENV),
            (None, None) => (DEFAULT_MONGO_URI.to_string(), "--mongo-uri"),
        };
        check_uri(&uri, source)?;
        Some(StoreConfig {
            uri,
            database: database.unwrap_or_else(|| DEFAULT_MONGO_DB.to_string()),
            collection: collection.unwrap_or_else(|| DEFAULT_MONGO_COLLECTION.to_string()),
            timeout: Duration::from_millis(timeout_ms),
            queue_capacity: queue,
            queue_bytes: usize::try_from(queue_bytes).unwrap_or(usize::MAX),
        })
    };
    let flood = (flood_rate > 0).then_some(FloodLimit {
        lines_per_sec: flood_rate,
        burst: flood_burst,
    });
    Ok(Parsed::Run(ServerConfig {
        host,
        port,
        backlog,
        limits: ClientLimits {
            max_line,
            max_output,
            max_overlong,
            flood,
        },
        max_clients,
        shutdown_timeout: Duration::from_secs(shutdown_secs),
        presence_interval: Duration::from_secs_f64(presence_secs),
        keepalive: (keepalive_secs > 0).then(|| Duration::from_secs(keepalive_secs)),
        log_level,
        // No more on join than any request may get: `--history-max 5` alone means 5 on join.
        history_on_join: history_on_join.min(history_max),
        history_max,
        plain,
        tls,
        max_per_ip,
        max_per_ip_exempt,
        max_output_total,
        stats_interval: (stats_secs > 0).then(|| Duration::from_secs(stats_secs)),
        store,
        cluster,
    }))
}

/// `--cluster`, `--node-id` and `--heartbeat-interval`. The last two mean nothing alone, and
/// a cluster shares its chat through the database, so `--no-persist` cannot go with it.
fn cluster(
    args: &mut pico_args::Arguments,
    no_persist: bool,
) -> Result<Option<ClusterConfig>, ArgError> {
    let on = args.contains("--cluster");
    let node_id: Option<String> = optional(args, "--node-id")?;
    let heartbeat_secs: Option<f64> = optional(args, "--heartbeat-interval")?;
    if !on {
        if node_id.is_some() || heartbeat_secs.is_some() {
            return Err(ArgError(
                "--node-id and --heartbeat-interval need --cluster".to_string(),
            ));
        }
        return Ok(None);
    }
    if no_persist {
        return Err(ArgError(
            "--cluster: servers share the chat through the database, so it cannot go with --no-persist".to_string(),
        ));
    }
    let node_id = match node_id {
        Some(id) => validate_node_id(id)?,
        None => random_node_id(),
    };
    let heartbeat_secs = heartbeat_secs.unwrap_or(DEFAULT_HEARTBEAT_INTERVAL.as_secs_f64());
    if !(0.1..=3600.0).contains(&heartbeat_secs) {
        return Err(ArgError(
            "--heartbeat-interval: must be between 0.1 and 3600 seconds".to_string(),
        ));
    }
    Ok(Some(ClusterConfig {
        node_id,
        heartbeat: Duration::from_secs_f64(heartbeat_secs),
    }))
}

fn validate_node_id(id: String) -> Result<String, ArgError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if id.is_empty() || id.len() > MAX_NODE_ID_CHARS || !id.chars().all(allowed) {
        return Err(ArgError(format!(
            "--node-id: '{id}' must be 1 to {MAX_NODE_ID_CHARS} ASCII letters, digits, - _ or ."
        )));
    }
    Ok(id)
}

/// Eight hex digits of the random value every process puts in its ObjectIds (bytes 4 to 8):
/// distinct across servers and restarts without a random-number crate.
fn random_node_id() -> String {
    let bytes = bson::oid::ObjectId::new().bytes();
    bytes[4..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// `--tls-port`, `--tls-cert` and `--tls-key` come together or not at all; `--no-plain` (plain
/// is false) needs them.
fn tls_listen(args: &mut pico_args::Arguments, plain: bool) -> Result<Option<TlsListen>, ArgError> {
    let port: Option<u16> = optional(args, "--tls-port")?;
    let cert: Option<PathBuf> = optional(args, "--tls-cert")?;
    let key: Option<PathBuf> = optional(args, "--tls-key")?;
    match (port, cert, key) {
        (Some(port), Some(cert), Some(key)) => Ok(Some(TlsListen { port, cert, key })),
        (None, None, None) if plain => Ok(None),
        (None, None, None) => Err(ArgError(
            "--no-plain: needs a TLS listener (--tls-port, --tls-cert, --tls-key)".to_string(),
        )),
        _ => Err(ArgError(
            "--tls-port, --tls-cert and --tls-key go together".to_string(),
        )),
    }
}

/// A comma-separated list of IP addresses (empty: none); the error is the first bad item.
fn parse_addresses(list: &str) -> Result<Vec<IpAddr>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| item.parse::<IpAddr>().map_err(|_| item.to_string()))
        .collect()
}

/// Rejects a URI the driver cannot parse (scheme, hosts, options), so a typo stops the server at
/// start instead of failing every message. Parsing only: no DNS lookup, no connection, so a
/// `mongodb+srv://` URI is accepted offline and an unreachable database is no error here.
fn check_uri(uri: &str, source: &str) -> Result<(), ArgError> {
    mongodb::options::ConnectionString::parse(uri)
        .map(drop)
        .map_err(|err| ArgError(format!("{source}: not a usable MongoDB URI: {}", err.kind)))
}

/// Parses the client's flags.
pub fn parse_client_args(args: Vec<OsString>) -> Result<Parsed<ClientConfig>, ArgError> {
    let mut args = pico_args::Arguments::from_vec(args);
    if let Some(other) = help_or_version(&mut args) {
        return Ok(other);
    }
    let host = optional(&mut args, "--host")?.unwrap_or_else(|| DEFAULT_HOST.to_string());
    let port = optional(&mut args, "--port")?.unwrap_or(DEFAULT_PORT);
    let nick = optional(&mut args, "--nick")?;
    let timeout_secs = bounded(
        &mut args,
        "--connect-timeout",
        DEFAULT_CONNECT_TIMEOUT_SECS,
        0.001,
        3600.0,
    )?;
    // `bounded` lets NaN through (it compares false both ways).
    if !timeout_secs.is_finite() {
        return Err(ArgError(
            "--connect-timeout: not a number of seconds".to_string(),
        ));
    }
    let time = !args.contains("--no-time");
    let color = !args.contains("--no-color");
    let reconnect = !args.contains("--no-reconnect");
    let tls = tls_trust(&mut args)?;
    let command = one_line_command(&mut args)?;
    reject_leftovers(args)?;
    Ok(Parsed::Run(ClientConfig {
        host,
        port,
        nick,
        connect_timeout: Duration::from_secs_f64(timeout_secs),
        time,
        color,
        reconnect,
        tls,
        command,
    }))
}

/// `--tls-ca FILE` implies `--tls`: naming a CA only makes sense for a TLS connection.
fn tls_trust(args: &mut pico_args::Arguments) -> Result<Option<TlsTrust>, ArgError> {
    let tls = args.contains("--tls");
    let ca: Option<PathBuf> = optional(args, "--tls-ca")?;
    Ok(match ca {
        Some(path) => Some(TlsTrust::CaFile(path)),
        None => tls.then_some(TlsTrust::SystemRoots),
    })
}

/// `--command CMD`: one line, since the protocol is one line per command and the client waits
/// for one reply; an empty one would be ignored by the server and answer nothing.
fn one_line_command(args: &mut pico_args::Arguments) -> Result<Option<String>, ArgError> {
    let command: Option<String> = optional(args, "--command")?;
    match &command {
        Some(line) if line.trim().is_empty() => Err(ArgError(
            "--command: empty; give a command such as /who".to_string(),
        )),
        Some(line) if line.contains(['\n', '\r']) => {
            Err(ArgError("--command: one line only".to_string()))
        }
        _ => Ok(command),
    }
}

/// Help wins over everything else, as in pico-args' own example.
fn help_or_version<T>(args: &mut pico_args::Arguments) -> Option<Parsed<T>> {
    if args.contains(["-h", "--help"]) {
        Some(Parsed::Help)
    } else if args.contains(["-V", "--version"]) {
        Some(Parsed::Version)
    } else {
        None
    }
}

/// An optional flag's value; errors name the flag.
fn optional<T>(args: &mut pico_args::Arguments, flag: &'static str) -> Result<Option<T>, ArgError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    args.opt_value_from_fn(flag, |value| value.parse::<T>())
        .map_err(|err| match err {
            pico_args::Error::OptionWithoutAValue(_) => ArgError(format!("{flag}: missing value")),
            other => ArgError(format!("{flag}: {other}")),
        })
}

/// An optional number flag that must lie in `min..=max`.
fn bounded<T>(
    args: &mut pico_args::Arguments,
    flag: &'static str,
    default: T,
    min: T,
    max: T,
) -> Result<T, ArgError>
where
    T: FromStr + PartialOrd + fmt::Display + Copy,
    T::Err: fmt::Display,
{
    let value = optional(args, flag)?.unwrap_or(default);
    if value < min || value > max {
        return Err(ArgError(format!(
            "{flag}: {value} is out of range ({min} to {max})"
        )));
    }
    Ok(value)
}

fn reject_leftovers(args: pico_args::Arguments) -> Result<(), ArgError> {
    match args.finish().first() {
        Some(arg) => Err(ArgError(format!(
            "unknown argument '{}' (see --help)",
            arg.to_string_lossy()
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(args: &[&str], env: Option<&str>) -> Result<Parsed<ServerConfig>, ArgError> {
        let args = args.iter().map(OsString::from).collect();
        parse_server_args(args, env.map(str::to_string))
    }

    fn run(parsed: Result<Parsed<ServerConfig>, ArgError>) -> ServerConfig {
        match parsed {
            Ok(Parsed::Run(config)) => config,
            other => panic!("expected a config, got {other:?}"),
        }
    }

    #[test]
    fn tls_limits_and_stats_flags() {
        let config = run(server(&[], None));
        assert!(config.plain && config.tls.is_none());
        assert_eq!(config.max_per_ip, 32);
        assert_eq!(
            config.max_per_ip_exempt,
            vec![
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(config.max_output_total, 256 * 1024 * 1024);
        assert_eq!(config.stats_interval, None);

        let tls = [
            "--tls-port",
            "6697",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ];
        let config = run(server(&tls, None));
        assert_eq!(
            config.tls,
            Some(TlsListen {
                port: 6697,
                cert: "c.pem".into(),
                key: "k.pem".into()
            })
        );
        let mut tls_only = tls.to_vec();
        tls_only.push("--no-plain");
        assert!(!run(server(&tls_only, None)).plain);
        assert!(server(&["--no-plain"], None).is_err());
        assert!(server(&["--tls-port", "6697"], None).is_err());

        let config = run(server(
            &[
                "--max-per-ip",
                "0",
                "--max-per-ip-exempt",
                "",
                "--stats-interval",
                "5",
            ],
            None,
        ));
        assert_eq!((config.max_per_ip, config.max_per_ip_exempt.len()), (0, 0));
        assert_eq!(config.stats_interval, Some(Duration::from_secs(5)));
        assert!(server(&["--max-output-total", "8191"], None).is_err());
        assert!(server(&["--max-output-total", "262144"], None).is_ok());
        let bad = server(&["--max-per-ip-exempt", "10.0.0.1,nope"], None).unwrap_err();
        assert!(bad.0.contains("'nope'"), "{bad}");
    }

    #[test]
    fn defaults() {
        let config = run(server(&[], None));
        assert_eq!((config.host.as_str(), config.port), ("127.0.0.1", 55556));
        assert_eq!(config.limits, ClientLimits::default());
        assert_eq!(config.limits.max_line, 4096);
        assert_eq!(
            config.limits.flood,
            Some(FloodLimit {
                lines_per_sec: 20,
                burst: 40
            })
        );
        assert_eq!(config.max_clients, 10_000);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(config.backlog, 1024);
        assert_eq!(config.presence_interval, Duration::from_secs(1));
        assert_eq!(config.keepalive, Some(Duration::from_secs(60)));
        assert_eq!(config.log_level, Level::Info);
        assert_eq!(config.history_on_join, 20);
        assert_eq!(config.history_max, 500);
        let store = config.store.expect("persistence is on by default");
        assert_eq!(store.uri, "mongodb://127.0.0.1:27017");
        assert_eq!(
            (store.database.as_str(), store.collection.as_str()),
            ("peerchat", "messages")
        );
        assert_eq!(store.timeout, Duration::from_secs(2));
        assert_eq!(store.queue_bytes, 64 * 1024 * 1024);
    }

    #[test]
    fn the_save_queue_is_bounded_in_bytes_too() {
        let config = run(server(&["--persist-queue-bytes", "100000"], None));
        assert_eq!(config.store.unwrap().queue_bytes, 100_000);
        let err = server(&["--persist-queue-bytes", "10"], None).unwrap_err();
        assert!(err.0.starts_with("--persist-queue-bytes: "), "{err}");
    }

    #[test]
    fn uri_flag_beats_environment_which_beats_default() {
        let from_env = run(server(&[], Some("mongodb://env:1")));
        assert_eq!(from_env.store.unwrap().uri, "mongodb://env:1");
        let from_flag = run(server(
            &["--mongo-uri", "mongodb://flag:2"],
            Some("mongodb://env:1"),
        ));
        assert_eq!(from_flag.store.unwrap().uri, "mongodb://flag:2");
    }

    #[test]
    fn uris_are_checked_without_touching_the_network() {
        let atlas = "mongodb+srv://app:pw@cluster0.example.invalid/?retryWrites=true&w=majority";
        assert_eq!(
            run(server(&["--mongo-uri", atlas], None))
                .store
                .unwrap()
                .uri,
            atlas
        );
        let err = server(&["--mongo-uri", "localhost:27017"], None).unwrap_err();
        assert!(err.0.starts_with("--mongo-uri: "), "{err}");
        let err = server(&["--mongo-uri", "mongodb://h/?w=banana&foo=bar"], None).unwrap_err();
        assert!(err.0.starts_with("--mongo-uri: "), "{err}");
        let err = server(&[], Some("nonsense")).unwrap_err();
        assert!(err.0.starts_with("PEERCHAT_MONGO_URI: "), "{err}");
        assert!(server(&["--no-persist"], Some("nonsense")).is_ok());
    }

    #[test]
    fn limits_can_be_tuned_and_flood_control_turned_off() {
        let config = run(server(
            &[
                "--flood-rate",
                "5",
                "--flood-burst",
                "7",
                "--max-overlong",
                "1",
                "--max-clients",
                "9",
                "--shutdown-timeout",
                "0",
            ],
            None,
        ));
        assert_eq!(
            config.limits.flood,
            Some(FloodLimit {
                lines_per_sec: 5,
                burst: 7
            })
        );
        assert_eq!(config.limits.max_overlong, 1);
        assert_eq!(config.max_clients, 9);
        assert_eq!(config.shutdown_timeout, Duration::ZERO);
        assert_eq!(run(server(&["--flood-rate", "0"], None)).limits.flood, None);
        let err = server(&["--flood-burst", "0"], None).unwrap_err();
        assert!(err.0.starts_with("--flood-burst"), "{err}");
    }

    #[test]
    fn history_flags() {
        let config = run(server(
            &["--history-on-join", "0", "--history-max", "3"],
            None,
        ));
        assert_eq!((config.history_on_join, config.history_max), (0, 3));
        let config = run(server(&["--history-max", "5"], None));
        assert_eq!(
            (config.history_on_join, config.history_max),
            (5, 5),
            "on join is never more than any request gets"
        );
        let config = run(server(&["--history-on-join", "50"], None));
        assert_eq!((config.history_on_join, config.history_max), (50, 500));
        for bad in [
            ["--history-max", "0"],
            ["--history-max", "10001"],
            ["--history-on-join", "x"],
        ] {
            let err = server(&bad, None).unwrap_err();
            assert!(err.0.starts_with(bad[0]), "{err}");
        }
    }

    #[test]
    fn connection_lifecycle_flags() {
        let config = run(server(
            &[
                "--backlog",
                "4096",
                "--presence-interval",
                "0.25",
                "--keepalive",
                "0",
                "--log-level",
                "debug",
            ],
            None,
        ));
        assert_eq!(config.backlog, 4096);
        assert_eq!(config.presence_interval, Duration::from_millis(250));
        assert_eq!(config.keepalive, None);
        assert_eq!(config.log_level, Level::Debug);
        let err = server(&["--log-level", "loud"], None).unwrap_err();
        assert!(err.0.starts_with("--log-level"), "{err}");
        let err = server(&["--backlog", "0"], None).unwrap_err();
        assert!(err.0.starts_with("--backlog"), "{err}");
        let err = server(&["--presence-interval", "NaN"], None).unwrap_err();
        assert!(err.0.starts_with("--presence-interval"), "{err}");
        let err = server(&["--keepalive", "40000"], None).unwrap_err();
        assert!(err.0.starts_with("--keepalive"), "{err}");
    }

    #[test]
    fn no_persist_means_no_store() {
        assert!(run(server(&["--no-persist"], None)).store.is_none());
    }

    #[test]
    fn errors_name_the_flag() {
        let err = server(&["--port", "http"], None).unwrap_err();
        assert!(err.0.contains("--port"), "{err}");
        let err = server(&["--max-line", "0"], None).unwrap_err();
        assert!(err.0.contains("--max-line"), "{err}");
        let err = server(&["--colour"], None).unwrap_err();
        assert!(err.0.contains("--colour"), "{err}");
        let err = server(&["--port"], None).unwrap_err();
        assert!(err.0.contains("--port"), "{err}");
    }

    fn client(args: &[&str]) -> Result<ClientConfig, ArgError> {
        let args = args.iter().map(OsString::from).collect();
        match parse_client_args(args)? {
            Parsed::Run(config) => Ok(config),
            other => panic!("expected a config, got {other:?}"),
        }
    }

    #[test]
    fn client_flags_default_to_time_colour_and_reconnect() {
        let config = client(&[]).unwrap();
        assert_eq!((config.host.as_str(), config.port), ("127.0.0.1", 55556));
        assert_eq!(config.nick, None);
        assert_eq!(config.connect_timeout, Duration::from_secs(10));
        assert!(config.time && config.color && config.reconnect);
    }

    #[test]
    fn client_flags_turn_each_feature_off() {
        let config = client(&[
            "--no-time",
            "--no-color",
            "--no-reconnect",
            "--connect-timeout",
            "2.5",
            "--nick",
            "alice",
        ])
        .unwrap();
        assert!(!config.time && !config.color && !config.reconnect);
        assert_eq!(config.connect_timeout, Duration::from_millis(2500));
        assert_eq!(config.nick.as_deref(), Some("alice"));
    }

    #[test]
    fn a_bad_connect_timeout_names_the_flag() {
        for value in ["0", "-1", "NaN", "inf", "soon", "3601"] {
            let err = client(&["--connect-timeout", value]).unwrap_err();
            assert!(err.0.starts_with("--connect-timeout: "), "{value}: {err}");
        }
    }

    #[test]
    fn client_tls_is_off_unless_asked_and_a_ca_file_implies_it() {
        assert_eq!(client(&[]).unwrap().tls, None);
        assert_eq!(client(&["--tls"]).unwrap().tls, Some(TlsTrust::SystemRoots));
        let ca = Some(TlsTrust::CaFile("ca.pem".into()));
        assert_eq!(client(&["--tls-ca", "ca.pem"]).unwrap().tls, ca);
        assert_eq!(client(&["--tls", "--tls-ca", "ca.pem"]).unwrap().tls, ca);
        let err = client(&["--tls-ca"]).unwrap_err();
        assert_eq!(err.0, "--tls-ca: missing value");
    }

    #[test]
    fn client_command_is_one_non_empty_line() {
        assert_eq!(client(&[]).unwrap().command, None);
        let config = client(&["--command", "/history 5", "--nick", "probe"]).unwrap();
        assert_eq!(config.command.as_deref(), Some("/history 5"));
        assert_eq!(config.nick.as_deref(), Some("probe"));
        for bad in ["", "  ", "/who\n/quit", "/who\r"] {
            let err = client(&["--command", bad]).unwrap_err();
            assert!(err.0.starts_with("--command: "), "{bad:?}: {err}");
        }
        let err = client(&["--command"]).unwrap_err();
        assert_eq!(err.0, "--command: missing value");
    }

    #[test]
    fn client_help_lists_every_flag() {
        for flag in [
            "--host",
            "--port",
            "--nick",
            "--connect-timeout",
            "--tls",
            "--tls-ca",
            "--command",
            "--no-time",
            "--no-color",
            "--no-reconnect",
        ] {
            assert!(CLIENT_HELP.contains(flag), "{flag} missing from --help");
        }
    }

    #[test]
    fn help_lists_every_flag() {
        for flag in [
            "--host",
            "--port",
            "--backlog",
            "--presence-interval",
            "--keepalive",
            "--log-level",
            "--max-line",
            "--max-output",
            "--max-overlong",
            "--flood-rate",
            "--flood-burst",
            "--max-clients",
            "--shutdown-timeout",
            "--mongo-uri",
            "--mongo-db",
            "--mongo-collection",
            "--mongo-timeout-ms",
            "--persist-queue",
            "--persist-queue-bytes",
            "--no-persist",
        ] {
            assert!(SERVER_HELP.contains(flag), "{flag} missing from --help");
        }
    }
}
