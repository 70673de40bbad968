//! Progress bars for the long work the CLI drives (imports of many volumes, migrations), on
//! stderr and only when stderr is a terminal: scripts and CI logs see the same lines as
//! before and no escape codes. Report lines go through [`Bar::suspend`] (or a
//! [`Suspended`] writer) so they never land inside a half-drawn bar.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `total` steps, or nothing when stderr is not a terminal.
pub struct Bar {
    bar: Option<ProgressBar>,
    started: bool,
}

impl Bar {
    /// A bar for `what` ("importing", "migrating") when stderr is a terminal.
    pub fn new(what: &str) -> Bar {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(&format!(
                "{what} {{bar:30}} {{pos}}/{{len}} {{wide_msg}}"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            b.set_style(style);
            b
        });
        Bar {
            bar,
            started: false,
        }
    }

    pub fn start(&mut self, total: usize) {
        if let Some(b) = &self.bar {
            b.set_length(total as u64);
        }
    }

    /// Work on `item` begins; the item before it is done.
    pub fn step(&mut self, item: &str) {
        if let Some(b) = &self.bar {
            if self.started {
                b.inc(1);
            }
            b.set_message(item.to_string());
        }
        self.started = true;
    }

    pub fn finish(&mut self) {
        if let Some(b) = &self.bar {
            if self.started {
                b.inc(1);
            }
            b.finish_and_clear();
        }
    }

    /// Runs `f` (which prints) with the bar cleared, then redraws it.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }
}

impl stowage_provisioner::import::Progress for Bar {
    fn start(&mut self, total: usize) {
        Bar::start(self, total)
    }
    fn step(&mut self, volume_id: &str) {
        Bar::step(self, volume_id)
    }
    fn finish(&mut self) {
        Bar::finish(self)
    }
}

/// A writer whose writes clear the bar first (report lines printed while it is drawn).
pub struct Suspended<W> {
    pub bar: Option<ProgressBar>,
    pub inner: W,
}

impl Bar {
    /// A writer over `inner` that keeps clear of this bar.
    pub fn writer<W: Write>(&self, inner: W) -> Suspended<W> {
        Suspended {
            bar: self.bar.clone(),
            inner,
        }
    }
}

impl<W: Write> Write for Suspended<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.bar {
            Some(b) => b.suspend(|| self.inner.write(buf)),
            None => self.inner.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_terminal_nothing_is_drawn_and_lines_pass_through() {
        // Under `cargo test` stderr is captured, not a terminal.
        let mut bar = Bar::new("importing");
        assert!(bar.bar.is_none() || std::io::stderr().is_terminal());
        bar.start(2);
        bar.step("a");
        let mut w = bar.writer(Vec::new());
        writeln!(w, "created a").unwrap();
        bar.step("b");
        bar.finish();
        assert_eq!(w.inner, b"created a\n");
    }
}
