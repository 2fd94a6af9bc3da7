//! The terminal itself: whether we have one, raw mode (keys one at a time, no echo, Ctrl-C as
//! a byte), its width, and putting it back as it was whatever way the client ends: a normal
//! return (the guard's `Drop`), an error (the same), a panic (a hook), SIGINT/SIGTERM/SIGHUP
//! (the session turns them into a normal return).
//!
//! The only unsafe code of the client, each call on a descriptor we own for its duration.

use std::io::{self, IsTerminal};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

/// Width assumed when the terminal does not say (some serial lines, some emulators).
const DEFAULT_WIDTH: usize = 80;

/// The settings raw mode replaced, for the panic hook, which has no access to the guard.
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// Terminal mode needs both: keys from a terminal, and a terminal to draw the input line on.
/// With either one a file or pipe, the client is the plain line pipe scripts rely on.
pub fn is_interactive() -> bool {
    io::stdin().is_terminal() && io::stdout().is_terminal()
}

/// Raw mode on standard input while it lives.
pub struct RawMode {
    fd: RawFd,
    original: libc::termios,
}

impl RawMode {
    /// Switches standard input to raw mode: no line buffering, no echo, no signals from
    /// Ctrl-C/Ctrl-Z (they arrive as bytes), no CR→NL or flow control. Output processing is
    /// left on, so anything printed outside our drawing (a panic message) still starts each
    /// line at the left edge.
    pub fn enter() -> io::Result<RawMode> {
        let fd = io::stdin().as_raw_fd();
        let original = get(fd)?;
        let mut raw = original;
        raw.c_iflag &= !(libc::BRKINT | libc::ICRNL | libc::INPCK | libc::ISTRIP | libc::IXON);
        raw.c_cflag |= libc::CS8;
        raw.c_lflag &= !(libc::ECHO | libc::ICANON | libc::IEXTEN | libc::ISIG);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        set(fd, &raw)?;
        if let Ok(mut saved) = SAVED.lock() {
            *saved = Some((fd, original));
        }
        install_panic_hook();
        Ok(RawMode { fd, original })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = set(self.fd, &self.original);
        if let Ok(mut saved) = SAVED.lock() {
            *saved = None;
        }
    }
}

/// Restores the terminal before the default hook prints the panic, so the message is readable
/// and the shell is usable afterwards.
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // `try_lock`: the panic may have happened while the lock was held.
        if let Ok(saved) = SAVED.try_lock() {
            if let Some((fd, original)) = *saved {
                let _ = set(fd, &original);
            }
        }
        previous(info);
    }));
}

/// Columns of the terminal on standard output.
pub fn width() -> usize {
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass; the descriptor is open.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let status = unsafe { libc::ioctl(io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    if status == 0 && size.ws_col > 0 {
        usize::from(size.ws_col)
    } else {
        DEFAULT_WIDTH
    }
}

fn get(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: tcgetattr fills the struct we pass; `termios` is plain data, zero is a valid value.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(fd, &mut termios) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(termios)
}

fn set(fd: RawFd, termios: &libc::termios) -> io::Result<()> {
    // SAFETY: tcsetattr only reads the struct. TCSADRAIN: what we wrote is shown before the
    // mode changes, and keys typed ahead are kept.
    if unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, termios) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
