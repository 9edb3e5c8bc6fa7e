//! Progress output: indicatif bars when stderr is a terminal, plain log lines otherwise
//! (CI logs and captured test output should not fill up with carriage returns).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub(crate) struct Reporter {
    tty: bool,
    quiet: bool,
}

impl Reporter {
    pub(crate) fn new(quiet: bool) -> Self {
        Reporter {
            tty: std::io::stderr().is_terminal(),
            quiet,
        }
    }

    pub(crate) fn log(&self, msg: &str) {
        if !self.quiet {
            eprintln!("ember-hub: {msg}");
        }
    }

    /// A byte-count bar, or `None` when bars are not shown.
    pub(crate) fn bytes_bar(&self, len: u64, msg: &str) -> Option<ProgressBar> {
        if self.quiet || !self.tty {
            return None;
        }
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bar = ProgressBar::new(len).with_style(style);
        bar.set_message(msg.to_string());
        Some(bar)
    }

    /// A spinner for steps whose size we cannot see (pip's own download).
    pub(crate) fn spinner(&self, msg: &str) -> Option<ProgressBar> {
        if self.quiet || !self.tty {
            return None;
        }
        let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bar = ProgressBar::new_spinner().with_style(style);
        bar.set_message(msg.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Some(bar)
    }
}
