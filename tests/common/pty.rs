//! A pseudo-terminal for the client's terminal mode: the client runs with its standard streams
//! on the pty's slave side, the test types on the master side, and what the client writes goes
//! through a terminal emulator in memory (`vt100`), so tests check the screen a person would
//! see (rows, cursor) as well as the raw bytes. Every wait has a deadline.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use super::DEADLINE;

pub struct Pty {
    /// Keys are written here.
    master: File,
    /// Kept open after the child exits, to read the terminal settings it left behind.
    slave: File,
    output: Receiver<Vec<u8>>,
    parser: vt100::Parser,
    raw: Vec<u8>,
}

impl Pty {
    /// A pty of `rows` × `cols` (set with the window size, as a terminal emulator would).
    pub fn open(rows: u16, cols: u16) -> Pty {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two descriptors into the ints we pass and reads `size` only.
        let status = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(status, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors are new and owned by nothing else.
        let (master, slave) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
        let reader = master.try_clone().expect("clone pty master");
        let (tx, output) = mpsc::channel();
        thread::spawn(move || forward_output(reader, tx));
        Pty {
            master,
            slave,
            output,
            parser: vt100::Parser::new(
                std::num::NonZeroU16::new(rows).expect("rows"),
                std::num::NonZeroU16::new(cols).expect("cols"),
                0,
            ),
            raw: Vec::new(),
        }
    }

    /// A command with its standard streams on this terminal, `TERM=xterm`, and no `NO_COLOR`
    /// from the test's own environment.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .stdin(self.stdio())
            .stdout(self.stdio())
            .stderr(self.stdio())
            .env("TERM", "xterm")
            .env_remove("NO_COLOR");
        command
    }

    fn stdio(&self) -> Stdio {
        Stdio::from(self.slave.try_clone().expect("clone pty slave"))
    }

    /// Types `bytes` as keys.
    pub fn type_keys(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).expect("write to pty master");
    }

    /// Takes in what the program wrote so far, waiting at most `wait` for the first piece.
    fn pump(&mut self, wait: Duration) {
        let first = match self.output.recv_timeout(wait) {
            Ok(bytes) => bytes,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
        };
        self.take(&first);
        while let Ok(bytes) = self.output.try_recv() {
            self.take(&bytes);
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        self.parser.process(bytes);
        self.raw.extend_from_slice(bytes);
    }

    /// Waits until the screen shows what `wanted` looks for; fails the test with the screen
    /// after `DEADLINE`.
    pub fn wait_for(&mut self, what: &str, wanted: impl Fn(&vt100::Screen) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if wanted(self.parser.screen()) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{what}: not on screen within {DEADLINE:?}; the screen:\n{}",
                self.contents()
            );
            self.pump(left.min(Duration::from_millis(100)));
        }
    }

    /// Waits for a row equal to `row` (trailing spaces ignored).
    pub fn wait_for_row(&mut self, row: &str) {
        self.wait_for(row, |screen| screen_rows(screen).iter().any(|r| r == row));
    }

    /// Waits for `text` anywhere on the screen.
    pub fn wait_for_text(&mut self, text: &str) {
        self.wait_for(text, |screen| screen.contents().contains(text));
    }

    /// Waits until the program has written `text` at least `count` times (lines that have
    /// scrolled off the screen count too).
    pub fn wait_for_output(&mut self, text: &str, count: usize) {
        let deadline = Instant::now() + DEADLINE;
        while String::from_utf8_lossy(&self.raw).matches(text).count() < count {
            assert!(
                Instant::now() < deadline,
                "{text:?} not written {count} times within {DEADLINE:?}; the screen:\n{}",
                self.contents()
            );
            self.pump(Duration::from_millis(100));
        }
    }

    pub fn screen(&self) -> &vt100::Screen {
        self.parser.screen()
    }

    /// Each row of the screen, trailing spaces removed.
    pub fn rows(&self) -> Vec<String> {
        screen_rows(self.parser.screen())
    }

    pub fn contents(&self) -> String {
        self.parser.screen().contents()
    }

    /// Every byte the program wrote to the terminal so far.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Waits for the child to exit, taking in its output meanwhile; kills it after `DEADLINE`.
    pub fn wait_exit(&mut self, child: &mut Child) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("wait for child") {
                self.pump(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "process did not exit within {DEADLINE:?}; the screen:\n{}",
                    self.contents()
                );
            }
            self.pump(Duration::from_millis(20));
        }
    }

    /// Waits until the program has put the terminal in raw mode (not canonical); fails the test
    /// after `DEADLINE`.
    pub fn wait_for_raw_mode(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        while self.is_canonical() {
            assert!(
                Instant::now() < deadline,
                "the terminal not in raw mode within {DEADLINE:?}; the screen:\n{}",
                self.contents()
            );
            self.pump(Duration::from_millis(10));
        }
    }

    /// Whether the terminal is in canonical (line) mode with echo, as a shell leaves it and
    /// as the client must leave it when it exits.
    pub fn is_canonical(&self) -> bool {
        // SAFETY: tcgetattr fills the zeroed struct; the slave descriptor is open.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        let status = unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut termios) };
        assert_eq!(status, 0, "tcgetattr: {}", std::io::Error::last_os_error());
        let wanted = libc::ICANON | libc::ECHO | libc::ISIG;
        termios.c_lflag & wanted == wanted
    }
}

/// Each row of `screen`, trailing spaces removed.
pub fn screen_rows(screen: &vt100::Screen) -> Vec<String> {
    let (_, cols) = screen.size();
    screen
        .rows(0, cols.get())
        .map(|row| row.trim_end().to_string())
        .collect()
}

/// Copies the master's output to the test until the pty closes.
fn forward_output(mut master: File, tx: mpsc::Sender<Vec<u8>>) {
    let mut buffer = [0u8; 65536];
    loop {
        match master.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(buffer[..n].to_vec()).is_err() {
                    return;
                }
            }
        }
    }
}
