//! `stowage doctor`: checks that explain themselves. Each check is one line, OK, WARN or FAIL,
//! with what was seen and, unless OK, what to do; any FAIL makes the exit code non-zero.
//! [`node`] looks at this machine (and [`kernel`] at its kernel), [`backend`] probes each configured backend instance with the
//! backends' own code, [`cluster`] reads the API server.

pub mod backend;
pub mod cluster;
pub mod kernel;
pub mod node;

use std::io::Write;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Check {
    pub level: Level,
    /// node, backend or cluster.
    pub scope: &'static str,
    /// What was checked, e.g. "/dev/fuse" or "nfs/main: export".
    pub name: String,
    pub detail: String,
    /// The next step; empty when OK.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hint: String,
}

impl Check {
    pub fn ok(scope: &'static str, name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            level: Level::Ok,
            scope,
            name: name.into(),
            detail: detail.into(),
            hint: String::new(),
        }
    }
    pub fn warn(
        scope: &'static str,
        name: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Check {
        Check {
            level: Level::Warn,
            scope,
            name: name.into(),
            detail: detail.into(),
            hint: hint.into(),
        }
    }
    pub fn fail(
        scope: &'static str,
        name: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Check {
        Check {
            level: Level::Fail,
            scope,
            name: name.into(),
            detail: detail.into(),
            hint: hint.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Report {
    pub checks: Vec<Check>,
    pub ok: usize,
    pub warn: usize,
    pub fail: usize,
}

impl Report {
    pub fn new(checks: Vec<Check>) -> Report {
        let count = |l: Level| checks.iter().filter(|c| c.level == l).count();
        Report {
            ok: count(Level::Ok),
            warn: count(Level::Warn),
            fail: count(Level::Fail),
            checks,
        }
    }

    pub fn failed(&self) -> bool {
        self.fail > 0
    }
}

pub fn print(out: &mut dyn Write, r: &Report) -> std::io::Result<()> {
    for c in &r.checks {
        writeln!(
            out,
            "{:<4}  {:<7}  {}: {}",
            c.level.as_str(),
            c.scope,
            c.name,
            c.detail
        )?;
        if !c.hint.is_empty() {
            writeln!(out, "      {:<7}  fix: {}", "", c.hint)?;
        }
    }
    writeln!(out, "{} ok, {} warnings, {} failures", r.ok, r.warn, r.fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_lines() {
        let r = Report::new(vec![
            Check::ok("node", "/dev/fuse", "character device 10:229"),
            Check::fail(
                "backend",
                "nfs/main",
                "connection refused",
                "start the server",
            ),
        ]);
        assert!(r.failed());
        assert_eq!((r.ok, r.warn, r.fail), (1, 0, 1));
        let mut out = Vec::new();
        print(&mut out, &r).unwrap();
        let t = String::from_utf8(out).unwrap();
        assert!(
            t.contains("OK    node     /dev/fuse: character device 10:229\n"),
            "{t}"
        );
        assert!(
            t.contains("FAIL  backend  nfs/main: connection refused\n"),
            "{t}"
        );
        assert!(t.contains("fix: start the server"), "{t}");
        assert!(t.ends_with("1 ok, 0 warnings, 1 failures\n"), "{t}");
    }
}
