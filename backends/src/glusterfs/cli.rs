//! The gluster CLI as the controller's API to glusterd: argv only, `--mode=script --xml`, a
//! hard timeout, and the answer read from the XML (with `--xml` the exit status is 0 even when
//! the operation failed, so `opRet`/`opErrstr` are the truth).
//!
//! How the controller reaches glusterd: the CLI only manages over glusterd's unix socket (over
//! TCP, `--remote-host`, it is read-only). So either the controller runs beside glusterd on a
//! gluster server (socket mounted into its pod), or it runs the CLI there over SSH, as heketi
//! did ([`Executor::Ssh`]).
//!
//! glusterd refuses a second transaction on a volume while one is running ("Another
//! transaction is in progress"): commands on one volume are serialized here, and the refusal
//! (which other clients, e.g. an admin, can still cause) is retried with backoff until the
//! timeout.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use quick_xml::events::Event;

use crate::command;
use crate::error::{Error, Result};
use crate::locks::KeyLocks;

/// Where the CLI runs.
#[derive(Debug, Clone)]
pub enum Executor {
    /// On this machine, against glusterd's unix socket.
    Local { socket: PathBuf },
    /// On a gluster server over SSH (key authentication, no prompts); `socket` is glusterd's
    /// socket there when not the default.
    Ssh {
        host: String,
        socket: Option<PathBuf>,
        user: Option<String>,
        port: Option<u16>,
        identity_file: Option<PathBuf>,
        known_hosts_file: Option<PathBuf>,
    },
}

pub struct Cli {
    pub executor: Executor,
    pub program: String,
    pub timeout: Duration,
    /// CLI log (the CLI otherwise writes to /var/log/glusterfs/cli.log).
    pub log_file: Option<PathBuf>,
    volume_locks: KeyLocks,
}

/// The parts of a `<cliOutput>` every command has, plus the whole tree for the rest.
#[derive(Debug, Clone)]
pub struct Reply {
    pub op_ret: i64,
    pub op_errno: i64,
    pub op_errstr: String,
    pub root: Node,
}

/// A small element tree: enough for the CLI's XML (no attributes are used there).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Node {
    pub name: String,
    pub text: String,
    pub children: Vec<Node>,
}

impl Node {
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Text of the first element along `path` (e.g. `volQuota/limit/hard_limit`).
    pub fn text_at(&self, path: &str) -> Option<&str> {
        let mut cur = self;
        for part in path.split('/') {
            cur = cur.child(part)?;
        }
        Some(cur.text.as_str())
    }

    /// Every element named `name` anywhere below.
    pub fn find_all<'a>(&'a self, name: &str, out: &mut Vec<&'a Node>) {
        for c in &self.children {
            if c.name == name {
                out.push(c);
            }
            c.find_all(name, out);
        }
    }
}

/// Parses XML into a [`Node`] tree (the document element).
pub fn parse_xml(text: &str) -> std::result::Result<Node, String> {
    let mut reader = quick_xml::Reader::from_str(text);
    let mut stack: Vec<Node> = vec![Node::default()];
    loop {
        match reader.read_event() {
            Err(e) => return Err(format!("at byte {}: {e}", reader.buffer_position())),
            Ok(Event::Eof) => break,
            Ok(Event::Start(e)) => stack.push(Node {
                name: e.name().as_ref().to_owned(),
                ..Default::default()
            }),
            Ok(Event::Empty(e)) => {
                let n = Node {
                    name: e.name().as_ref().to_owned(),
                    ..Default::default()
                };
                if let Some(top) = stack.last_mut() {
                    top.children.push(n);
                }
            }
            Ok(Event::End(_)) => {
                if stack.len() < 2 {
                    return Err("unbalanced end tag".into());
                }
                let mut n = stack.pop().unwrap_or_default();
                n.text = n.text.trim().to_owned();
                if let Some(top) = stack.last_mut() {
                    top.children.push(n);
                }
            }
            Ok(Event::Text(t)) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t.xml10_content());
                }
            }
            Ok(Event::CData(t)) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t.into_inner());
                }
            }
            // Entities arrive as their own events: &amp; in an error string must survive.
            Ok(Event::GeneralRef(r)) => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    _ => {
                        let name = r.borrow().into_inner();
                        quick_xml::escape::resolve_predefined_entity(&name)
                            .map(str::to_owned)
                            .unwrap_or_else(|| format!("&{name};"))
                    }
                };
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&resolved);
                }
            }
            Ok(_) => {}
        }
    }
    if stack.len() != 1 {
        return Err("unclosed element".into());
    }
    let doc = stack.pop().unwrap_or_default();
    doc.children
        .into_iter()
        .next()
        .ok_or_else(|| "no document element".to_string())
}

/// Reads a `<cliOutput>` document.
pub fn parse_reply(text: &str) -> std::result::Result<Reply, String> {
    let root = parse_xml(text)?;
    if root.name != "cliOutput" {
        return Err(format!(
            "document element is <{}>, not <cliOutput>",
            root.name
        ));
    }
    let num = |name: &str| -> std::result::Result<i64, String> {
        root.text_at(name)
            .ok_or_else(|| format!("<{name}> missing"))?
            .parse::<i64>()
            .map_err(|_| format!("<{name}> is not a number"))
    };
    Ok(Reply {
        op_ret: num("opRet")?,
        op_errno: num("opErrno").unwrap_or(0),
        op_errstr: root.text_at("opErrstr").unwrap_or("").to_owned(),
        root,
    })
}

/// Quotes one argument for the remote shell ssh hands the command line to.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// glusterd is busy with another transaction on the volume (or cluster-wide lock): retry.
pub fn is_busy(errstr: &str) -> bool {
    let e = errstr.to_ascii_lowercase();
    e.contains("another transaction is in progress")
        || e.contains("locking failed")
        || e.contains("lock acquisition failed")
        || e.contains("is busy")
}

impl Cli {
    pub fn new(executor: Executor, program: Option<String>, timeout: Duration) -> Self {
        Cli {
            executor,
            program: program.unwrap_or_else(|| "gluster".into()),
            timeout,
            log_file: None,
            volume_locks: KeyLocks::default(),
        }
    }

    /// Where glusterd is, for messages.
    pub fn target(&self) -> String {
        match &self.executor {
            Executor::Local { socket } => format!("glusterd at {}", socket.display()),
            Executor::Ssh { host, .. } => format!("glusterd on {host} (over ssh)"),
        }
    }

    /// The program and argv for one CLI call.
    pub fn argv(&self, args: &[&str], timeout: Duration) -> (String, Vec<String>) {
        let mut cli: Vec<String> = vec![self.program.clone(), "--mode=script".into()];
        match &self.executor {
            Executor::Local { socket }
            | Executor::Ssh {
                socket: Some(socket),
                ..
            } => cli.push(format!("--glusterd-sock={}", socket.display())),
            Executor::Ssh { socket: None, .. } => {}
        }
        if let (Some(l), Executor::Local { .. }) = (&self.log_file, &self.executor) {
            cli.push(format!("--log-file={}", l.display()));
        }
        // The CLI's own wait for glusterd, a little under ours so that it reports first.
        cli.push(format!(
            "--timeout={}",
            timeout.as_secs().saturating_sub(2).max(1)
        ));
        cli.extend(args.iter().map(|s| s.to_string()));
        cli.push("--xml".into());
        match &self.executor {
            Executor::Local { .. } => {
                let prog = cli.remove(0);
                (prog, cli)
            }
            Executor::Ssh {
                host,
                user,
                port,
                identity_file,
                known_hosts_file,
                ..
            } => {
                let mut a: Vec<String> = vec![
                    "-o".into(),
                    "BatchMode=yes".into(),
                    "-o".into(),
                    format!("ConnectTimeout={}", timeout.as_secs().clamp(1, 30)),
                    "-T".into(),
                ];
                if let Some(p) = port {
                    a.extend(["-p".into(), p.to_string()]);
                }
                if let Some(i) = identity_file {
                    a.extend(["-i".into(), i.display().to_string()]);
                }
                if let Some(k) = known_hosts_file {
                    a.extend(["-o".into(), format!("UserKnownHostsFile={}", k.display())]);
                }
                if let Some(u) = user {
                    a.extend(["-l".into(), u.clone()]);
                }
                a.extend(["--".into(), host.clone()]);
                // ssh joins its arguments into one line for the remote shell: quote each.
                a.push(
                    cli.iter()
                        .map(|s| shell_quote(s))
                        .collect::<Vec<_>>()
                        .join(" "),
                );
                ("ssh".into(), a)
            }
        }
    }

    /// One CLI call, once. Err(Unavailable) when glusterd cannot be reached at all; a reply
    /// (maybe with opRet != 0) otherwise.
    async fn call_once(&self, args: &[&str], timeout: Duration) -> Result<Reply> {
        if let (Some(dir), Executor::Local { .. }) = (
            self.log_file.as_ref().and_then(|l| l.parent()),
            &self.executor,
        ) {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let (prog, argv) = self.argv(args, timeout);
        let out = command::run_status(&prog, &argv, timeout)
            .await
            .map_err(|e| match e {
                Error::Unavailable(m) => {
                    Error::Unavailable(format!("{} did not answer: {m}", self.target()))
                }
                other => other,
            })?;
        match parse_reply(&out.stdout) {
            Ok(r) => Ok(r),
            Err(why) => {
                let msg = [out.stderr.trim(), out.stdout.trim()]
                    .into_iter()
                    .find(|s| !s.is_empty())
                    .unwrap_or("no output")
                    .lines()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" ");
                // Without XML the CLI never reached glusterd ("Connection failed. Please
                // check if gluster daemon is operational."), or ssh failed (exit 255).
                if out.status != 0 {
                    Err(Error::Unavailable(format!(
                        "{} is not reachable (gluster {} exited {}): {msg}",
                        self.target(),
                        args.iter().take(3).copied().collect::<Vec<_>>().join(" "),
                        out.status
                    )))
                } else {
                    Err(Error::Internal(format!(
                        "gluster {}: unreadable XML reply ({why}): {msg}",
                        args.join(" ")
                    )))
                }
            }
        }
    }

    /// Runs a command until glusterd takes it (busy refusals retried with backoff, bounded
    /// by the timeout). Returns the reply, successful or not.
    pub async fn call(&self, args: &[&str]) -> Result<Reply> {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(100);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left < Duration::from_secs(1) {
                return Err(Error::Unavailable(format!(
                    "{} stayed busy for {}s (gluster {})",
                    self.target(),
                    self.timeout.as_secs(),
                    args.join(" ")
                )));
            }
            let r = self.call_once(args, left).await?;
            if r.op_ret != 0 && is_busy(&r.op_errstr) {
                tracing::debug!(errstr = %r.op_errstr, "glusterd busy; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            return Ok(r);
        }
    }

    /// Like [`Cli::call`], but a failed operation is an error naming the command.
    pub async fn ok(&self, args: &[&str]) -> Result<Reply> {
        let r = self.call(args).await?;
        if r.op_ret != 0 {
            return Err(op_error(args, &r));
        }
        Ok(r)
    }

    /// Commands that change one volume's configuration (quota, set): one at a time per volume
    /// from this process.
    pub async fn volume_call(&self, volume: &str, args: &[&str]) -> Result<Reply> {
        let _g = self.volume_locks.lock(volume).await;
        self.call(args).await
    }
}

/// An error for a failed operation: what the command was and what glusterd said.
pub fn op_error(args: &[&str], r: &Reply) -> Error {
    let what = format!(
        "gluster {} failed (opRet {}, opErrno {}): {}",
        args.join(" "),
        r.op_ret,
        r.op_errno,
        if r.op_errstr.is_empty() {
            "no message"
        } else {
            &r.op_errstr
        }
    );
    let e = r.op_errstr.to_ascii_lowercase();
    if e.contains("does not exist") || e.contains("not started") {
        Error::FailedPrecondition(what)
    } else if e.contains("quorum") || e.contains("not connected") || e.contains("is down") {
        Error::Unavailable(what)
    } else {
        Error::Internal(what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<cliOutput>
  <opRet>0</opRet>
  <opErrno>0</opErrno>
  <opErrstr/>
  <volQuota>
    <limit>
      <path>/a</path>
      <hard_limit>10485760</hard_limit>
      <used_space>0</used_space>
    </limit>
  </volQuota>
</cliOutput>"#;

    #[test]
    fn reads_replies() {
        let r = parse_reply(LIST).unwrap();
        assert_eq!(r.op_ret, 0);
        assert_eq!(r.op_errstr, "");
        assert_eq!(
            r.root.text_at("volQuota/limit/hard_limit"),
            Some("10485760")
        );
        let mut limits = Vec::new();
        r.root.find_all("limit", &mut limits);
        assert_eq!(limits.len(), 1);

        let busy = "<cliOutput><opRet>-1</opRet><opErrno>30800</opErrno><opErrstr>Another transaction is in progress for v. Please try again after some time.</opErrstr></cliOutput>";
        let r = parse_reply(busy).unwrap();
        assert_eq!(r.op_ret, -1);
        assert!(is_busy(&r.op_errstr));

        let ent = "<cliOutput><opRet>-2</opRet><opErrstr>a &amp; b &lt;c&gt; &#65;</opErrstr></cliOutput>";
        assert_eq!(parse_reply(ent).unwrap().op_errstr, "a & b <c> A");
    }

    #[test]
    fn refuses_what_is_not_a_reply() {
        for bad in [
            "",
            "Connection failed. Please check if gluster daemon is operational.",
            "<other><opRet>0</opRet></other>",
            "<cliOutput><opRet>x</opRet></cliOutput>",
            "<cliOutput><opRet>0</opRet>",
        ] {
            assert!(parse_reply(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn builds_argv_without_a_shell_locally_and_quotes_for_ssh() {
        let cli = Cli::new(
            Executor::Local {
                socket: "/run/g.sock".into(),
            },
            None,
            Duration::from_secs(30),
        );
        let (p, a) = cli.argv(
            &["volume", "quota", "v", "limit-usage", "/a b", "1"],
            cli.timeout,
        );
        assert_eq!(p, "gluster");
        assert!(a.contains(&"/a b".to_string()));
        assert_eq!(a.last().map(String::as_str), Some("--xml"));

        let ssh = Cli::new(
            Executor::Ssh {
                host: "g1".into(),
                socket: None,
                user: Some("stowage".into()),
                port: Some(2222),
                identity_file: Some("/k".into()),
                known_hosts_file: None,
            },
            None,
            Duration::from_secs(30),
        );
        let (p, a) = ssh.argv(
            &[
                "volume",
                "quota",
                "v",
                "limit-usage",
                "/it's; rm -rf /",
                "1",
            ],
            ssh.timeout,
        );
        assert_eq!(p, "ssh");
        let remote = a.last().unwrap();
        assert!(remote.contains(r"'/it'\''s; rm -rf /'"), "{remote}");
        assert!(a.contains(&"BatchMode=yes".to_string()));
        assert_eq!(shell_quote("plain-1.2"), "plain-1.2");
        assert_eq!(shell_quote(""), "''");
    }
}
