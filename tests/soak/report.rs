//! The printed summary of everything the test measured, and the final checks on it.

use std::time::Duration;

use crate::accounting::Outcome;
use crate::resources::Resources;
use crate::run::Run;
use crate::server::ServerLog;
use crate::{SEATS, SOAK, WORKERS};

/// Everything the test measured, for the printed summary and the final checks.
pub struct Summary {
    pub fd_limit: u64,
    pub run: Run,
    pub resources: Resources,
    pub log: ServerLog,
    pub outcome: Outcome,
}

impl Summary {
    pub fn print(&self) {
        println!("soak summary");
        self.print_traffic();
        self.print_fates();
        self.print_server();
        self.print_problems();
    }

    /// How long the run took and how much chat it carried.
    fn print_traffic(&self) {
        let (run, clients_done) = (&self.run.totals, self.run.clients_done);
        println!(
            "  duration               {:.1} s ({} s sending, then the last sessions linger and leave)",
            clients_done.as_secs_f64(),
            SOAK.as_secs(),
        );
        println!(
            "  client seats           {SEATS} on {WORKERS} threads (fd limit {})",
            self.fd_limit
        );
        println!(
            "  sessions               {} ({} left with /quit, {} closed the socket, {} cut off)",
            run.sessions, run.quit, run.dropped, run.cut_off
        );
        println!(
            "  messages sent          {} ({:.0}/s over {} s)",
            run.sent,
            run.sent as f64 / SOAK.as_secs_f64(),
            SOAK.as_secs()
        );
        println!(
            "  deliveries received    {} ({:.0}/s); quietest second {} ({} deliveries); during the outage {:?}/s",
            run.deliveries,
            run.deliveries as f64 / clients_done.as_secs_f64(),
            self.run.quietest.1,
            self.run.quietest.0,
            self.run.during_outage
        );
    }

    /// What became of the messages sent, and of the order they arrived in.
    fn print_fates(&self) {
        let (run, outcome) = (&self.run.totals, &self.outcome);
        println!("  stored once            {}", outcome.stored_once);
        println!(
            "  reported not saved     {} (of which {} were stored after all)",
            outcome.reported, outcome.reported_and_stored
        );
        for (reason, count) in &run.report_reasons {
            println!("    {count:>8} × {reason}");
        }
        if !outcome.reported_and_stored_reasons.is_empty() {
            println!(
                "  reported but stored, by reason: {:?}",
                outcome.reported_and_stored_reasons
            );
        }
        if let (Some(first), Some(last)) = (run.first_report, run.last_report) {
            println!(
                "  reports arrived        {:.1} s .. {:.1} s into the run",
                first.as_secs_f64(),
                last.as_secs_f64()
            );
        }
        println!("  stored twice or more   {}", outcome.stored_twice);
        println!(
            "  third outcome          {} (neither stored nor reported: {} with the sender listening, {} of them sent in the 0.5 s before the kill; {} unknown because the sender was cut off)",
            outcome.lost + outcome.sender_left,
            outcome.lost,
            outcome.lost_before_kill,
            outcome.sender_left
        );
        println!("  unexpected documents   {}", outcome.unexpected_documents);
        println!(
            "  order violations       {} (plus {} lines from an older session after a newer one, {} own lines echoed)",
            run.order_violations, run.stale_generation, run.own_echo
        );
    }

    /// The server's memory, CPU time and log.
    fn print_server(&self) {
        let Resources {
            idle_rss,
            idle_settled,
            idle_anon,
            peak_rss,
            final_rss,
            final_settled,
            final_anon,
            rss_bound,
            rss_waited,
            cpu_secs,
        } = self.resources;
        let settled = |yes: bool| if yes { "settled" } else { "still falling" };
        println!(
            "  server RSS             idle {idle_rss} KiB ({}), peak {peak_rss} KiB, final {final_rss} KiB ({}, {:.1} s after the last client; bound {rss_bound} KiB); anonymous idle {idle_anon} KiB, final {final_anon} KiB",
            settled(idle_settled),
            settled(final_settled),
            rss_waited.as_secs_f64()
        );
        println!("  server CPU             {cpu_secs:.1} s");
        println!(
            "  server log             {} connections; database and warning lines:",
            self.log.connections
        );
        for line in self.log.lines.iter().take(40) {
            println!("    {line}");
        }
    }

    fn print_problems(&self) {
        let run = &self.run.totals;
        if !run.other_notices.is_empty() {
            println!("  other notices (not failures): {:?}", run.other_notices);
        }
        for (kind, (count, sample)) in &run.anomalies {
            println!("  PROBLEM {count} × {kind}: e.g. {sample}");
        }
        for sample in &self.outcome.samples {
            println!("  PROBLEM {sample}");
        }
    }

    pub fn assert_passed(&self) {
        self.assert_clients_saw_no_problem();
        self.assert_every_message_accounted_for();
        self.assert_chat_flowed_and_memory_came_back();
    }

    fn assert_clients_saw_no_problem(&self) {
        let run = &self.run.totals;
        assert!(
            run.anomalies.is_empty(),
            "client-side problems: see PROBLEM lines above"
        );
        assert_eq!(run.order_violations, 0, "messages out of per-sender order");
        assert_eq!(
            run.stale_generation, 0,
            "a seat's older session spoke after its newer one"
        );
        assert_eq!(run.own_echo, 0, "a client received its own message");
    }

    /// Every message stored exactly once or reported unsaved to its sender, and nothing else.
    fn assert_every_message_accounted_for(&self) {
        let outcome = &self.outcome;
        assert_eq!(outcome.stored_twice, 0, "messages stored more than once");
        assert!(
            outcome.lost == 0,
            "{} messages neither stored nor reported to a listening sender, {} of them sent in the \
             0.5 s before the database was killed (if most are: writes the database acknowledged but \
             had not yet journaled, lost with it; inserts must ask for `j: true`)",
            outcome.lost,
            outcome.lost_before_kill
        );
        assert_eq!(
            outcome.sender_left, 0,
            "messages with unknown fate (sender cut off)"
        );
        assert_eq!(outcome.unexpected_documents, 0, "documents nobody sent");
    }

    /// Chat never stalled, `not saved` reports came only around the outage, and the memory
    /// came back near idle.
    fn assert_chat_flowed_and_memory_came_back(&self) {
        let (run, outage) = (&self.run.totals, &self.run.outage);
        let quietest = self.run.quietest;
        assert!(
            quietest.0 > 0,
            "no chat delivered during second {} of the run",
            quietest.1
        );
        let window = outage.killed_at.saturating_sub(Duration::from_secs(1))
            ..outage.restarted_at + Duration::from_secs(15);
        let (first, last) = (run.first_report, run.last_report);
        assert!(
            first.is_none_or(|t| window.contains(&t)) && last.is_none_or(|t| window.contains(&t)),
            "`not saved` reports outside the outage ({window:?}): first {first:?}, last {last:?}"
        );
        let Resources {
            idle_rss,
            peak_rss,
            final_rss,
            rss_bound,
            ..
        } = self.resources;
        assert!(
            final_rss <= rss_bound,
            "server RSS {final_rss} KiB did not come back near idle {idle_rss} KiB (bound {rss_bound} KiB, peak {peak_rss} KiB)"
        );
    }
}
