//! The progress line on stderr, refreshed at most once per second.
//!
//! On a terminal the line is redrawn in place; otherwise (a log file) one line per update.

use std::io::{IsTerminal, Write};
use std::time::Duration;
use tokio::task::JoinHandle;

/// A running progress display; stops when dropped or [`Progress::finish`]ed.
#[derive(Debug)]
pub struct Progress {
    task: Option<JoinHandle<()>>,
    tty: bool,
}

impl Progress {
    /// Calls `line` every `every` (at least one second) and prints what it returns. `enabled =
    /// false` prints nothing.
    pub fn start<F>(enabled: bool, every: Duration, mut line: F) -> Self
    where
        F: FnMut() -> String + Send + 'static,
    {
        let tty = std::io::stderr().is_terminal();
        if !enabled {
            return Self { task: None, tty };
        }
        let every = every.max(Duration::from_secs(1));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let text = line();
                let mut err = std::io::stderr().lock();
                let _ = if tty { write!(err, "\r\x1b[K{text}") } else { writeln!(err, "{text}") };
                let _ = err.flush();
            }
        });
        Self { task: Some(task), tty }
    }

    /// Stops the display and ends the line on a terminal.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            if self.tty {
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[K");
                let _ = err.flush();
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `1234567` → `1.23M`, for compact progress lines.
pub fn si(x: f64) -> String {
    let a = x.abs();
    if a >= 1e9 {
        format!("{:.2}G", x / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}
