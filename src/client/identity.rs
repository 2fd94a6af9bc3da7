//! Who we are on the server, learnt from what it says: the name in the welcome line, then
//! `* OLD is now NEW` when OLD is us. Terminal mode needs it to highlight mentions of our nick
//! and to ask for our nick again after a reconnect. (Our own messages show as `<you> …`
//! whatever the nick: `display::OWN_NAME`.)
//!
//! Pure: it only reads lines.

/// The welcome notice up to the name (`protocol::welcome`).
const WELCOME: &str = "* welcome, you are ";
/// The rename notice between the two names (`protocol::renamed`).
const RENAMED: &str = " is now ";

/// What a server line changed about us.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// A new connection's welcome: the server gave us a name.
    Welcomed,
    /// The server confirmed a nick for us.
    Renamed,
}

#[derive(Debug, Default)]
pub struct Identity {
    /// The name the server knows us by on this connection (`IP:PORT` or a nick).
    name: Option<String>,
    /// `name` is a nick the server confirmed, not the address it gave us.
    chosen: bool,
    /// The nick to ask for after (re)connecting: the last one confirmed, else `--nick`.
    wanted: Option<String>,
}

impl Identity {
    pub fn new(wanted: Option<String>) -> Self {
        Identity {
            wanted,
            ..Identity::default()
        }
    }

    /// Learns from one (clean) server line.
    pub fn observe(&mut self, line: &str) -> Option<Change> {
        if let Some(rest) = line.strip_prefix(WELCOME) {
            let name = rest.split(' ').next().unwrap_or_default();
            self.name = Some(name.to_string());
            self.chosen = false;
            return Some(Change::Welcomed);
        }
        let (old, new) = line.strip_prefix("* ")?.split_once(RENAMED)?;
        // Only our own rename: the notice starts with the name we have, which nobody else can
        // have (names are unique), so another user's `/me` cannot fake it.
        if self.name.as_deref() != Some(old) || new.is_empty() || new.contains(' ') {
            return None;
        }
        self.name = Some(new.to_string());
        self.chosen = true;
        self.wanted = Some(new.to_string());
        Some(Change::Renamed)
    }

    /// Our nick, if we have one on this connection: what mentions are looked for.
    pub fn nick(&self) -> Option<&str> {
        self.name.as_deref().filter(|_| self.chosen)
    }

    /// The nick to ask for on a new connection.
    pub fn wanted(&self) -> Option<&str> {
        self.wanted.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WELCOME_LINE: &str = "* welcome, you are 127.0.0.1:5000 \u{2014} /help for commands";

    #[test]
    fn no_nick_until_one_is_confirmed() {
        let mut me = Identity::new(None);
        assert_eq!(me.nick(), None);
        assert_eq!(me.observe(WELCOME_LINE), Some(Change::Welcomed));
        assert_eq!(me.nick(), None, "the address is not a nick");
        assert_eq!(
            me.observe("* 127.0.0.1:5000 is now alice"),
            Some(Change::Renamed)
        );
        assert_eq!(me.nick(), Some("alice"));
        assert_eq!(me.observe("* alice is now al"), Some(Change::Renamed));
        assert_eq!(me.nick(), Some("al"));
        assert_eq!(me.wanted(), Some("al"));
    }

    #[test]
    fn other_peoples_renames_and_lookalike_lines_change_nothing() {
        let mut me = Identity::new(Some("alice".into()));
        me.observe(WELCOME_LINE);
        assert_eq!(me.observe("* 127.0.0.1:6000 is now bob"), None);
        assert_eq!(
            me.observe("<127.0.0.1:5000> * 127.0.0.1:5000 is now x"),
            None
        );
        assert_eq!(me.observe("* bob is now alice"), None);
        assert_eq!(me.nick(), None);
        assert_eq!(me.wanted(), Some("alice"), "--nick until one is confirmed");
    }

    #[test]
    fn a_new_welcome_starts_over_but_keeps_the_nick_to_ask_for() {
        let mut me = Identity::new(None);
        me.observe(WELCOME_LINE);
        me.observe("* 127.0.0.1:5000 is now alice");
        let again = "* welcome, you are 127.0.0.1:7000 \u{2014} /help for commands";
        assert_eq!(me.observe(again), Some(Change::Welcomed));
        assert_eq!(me.nick(), None);
        assert_eq!(me.wanted(), Some("alice"));
        me.observe("* 127.0.0.1:7000 is now alice");
        assert_eq!(me.nick(), Some("alice"));
    }
}
