//! Where a plugin listens, or a client connects: a unix socket path or a
//! TCP address, parsed from the `--endpoint` flag / `CSI_ENDPOINT`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// What the error message calls the setting, so an operator knows where
/// to look.
const SETTING: &str = "--endpoint / CSI_ENDPOINT";

/// A parsed listen/connect address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A unix domain socket at an absolute path.
    Unix(PathBuf),
    /// A TCP address. The host is kept as written (name, IPv4, or IPv6
    /// without brackets) and resolved when binding or connecting.
    Tcp { host: String, port: u16 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    #[error(
        "invalid {SETTING} value {value:?}: {reason}; expected unix:///absolute/path.sock, \
         unix:/absolute/path.sock, /absolute/path.sock or tcp://host:port"
    )]
    Invalid { value: String, reason: &'static str },
}

impl Endpoint {
    /// Parses the forms the kubernetes-csi sidecars and our test VMs use:
    /// `unix:///abs/path`, `unix:/abs/path`, `/abs/path` and
    /// `tcp://host:port` (IPv6 hosts in brackets, `tcp://[::1]:10000`).
    pub fn parse(value: &str) -> Result<Self, EndpointError> {
        let invalid = |reason| EndpointError::Invalid {
            value: value.to_owned(),
            reason,
        };
        let value_trimmed = value.trim();
        if value_trimmed.is_empty() {
            return Err(invalid("empty"));
        }
        if let Some(rest) = value_trimmed.strip_prefix("unix:") {
            // `unix://host/path` would put a URI authority before the path;
            // gRPC's resolver does not support that, so only `unix:///` and
            // `unix:/` are accepted.
            let path = match rest.strip_prefix("//") {
                Some(after) if after.starts_with('/') => after,
                Some(_) => return Err(invalid("unix:// must be followed by an absolute path")),
                None => rest,
            };
            return Self::unix_path(path).map_err(invalid);
        }
        if let Some(rest) = value_trimmed.strip_prefix("tcp://") {
            return Self::tcp(rest).map_err(invalid);
        }
        if value_trimmed.starts_with('/') {
            return Self::unix_path(value_trimmed).map_err(invalid);
        }
        if value_trimmed.contains("://") {
            return Err(invalid("unsupported scheme"));
        }
        Err(invalid("relative paths are not accepted"))
    }

    fn unix_path(path: &str) -> Result<Self, &'static str> {
        if !path.starts_with('/') {
            return Err("the socket path must be absolute");
        }
        // A trailing slash names a directory, never a socket.
        if path.ends_with('/') {
            return Err("the socket path must name a file, not a directory");
        }
        Ok(Endpoint::Unix(PathBuf::from(path)))
    }

    fn tcp(rest: &str) -> Result<Self, &'static str> {
        if rest.contains('/') {
            return Err("tcp endpoints take no path");
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or("unterminated [ in IPv6 address")?;
            let port = after
                .strip_prefix(':')
                .ok_or("missing :port after IPv6 address")?;
            (host, port)
        } else {
            let (host, port) = rest.rsplit_once(':').ok_or("missing :port")?;
            if host.contains(':') {
                return Err("IPv6 addresses must be written in brackets, e.g. tcp://[::1]:10000");
            }
            (host, port)
        };
        if host.is_empty() {
            return Err("missing host");
        }
        let port: u16 = port.parse().map_err(|_| "port must be a number 0-65535")?;
        Ok(Endpoint::Tcp {
            host: host.to_owned(),
            port,
        })
    }

    /// The socket path for unix endpoints.
    pub fn unix_socket_path(&self) -> Option<&Path> {
        match self {
            Endpoint::Unix(path) => Some(path),
            Endpoint::Tcp { .. } => None,
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    /// Same as [`Endpoint::parse`]; lets clap use `Endpoint` as a flag type.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Endpoint::parse(value)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix://{}", path.display()),
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp://[{host}]:{port}")
            }
            Endpoint::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(p: &str) -> Endpoint {
        Endpoint::Unix(PathBuf::from(p))
    }

    #[test]
    fn unix_forms() {
        assert_eq!(
            Endpoint::parse("unix:///csi/csi.sock").unwrap(),
            unix("/csi/csi.sock")
        );
        assert_eq!(
            Endpoint::parse("unix:/csi/csi.sock").unwrap(),
            unix("/csi/csi.sock")
        );
        assert_eq!(
            Endpoint::parse("/var/lib/kubelet/plugins/x/csi.sock").unwrap(),
            unix("/var/lib/kubelet/plugins/x/csi.sock")
        );
        assert_eq!(Endpoint::parse("  /a.sock\n").unwrap(), unix("/a.sock"));
    }

    #[test]
    fn tcp_forms() {
        assert_eq!(
            Endpoint::parse("tcp://10.0.2.15:10000").unwrap(),
            Endpoint::Tcp {
                host: "10.0.2.15".into(),
                port: 10000
            }
        );
        assert_eq!(
            Endpoint::parse("tcp://localhost:0").unwrap(),
            Endpoint::Tcp {
                host: "localhost".into(),
                port: 0
            }
        );
        assert_eq!(
            Endpoint::parse("tcp://[::1]:9000").unwrap(),
            Endpoint::Tcp {
                host: "::1".into(),
                port: 9000
            }
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "unix:///csi/csi.sock",
            "tcp://10.0.2.15:10000",
            "tcp://[::1]:9000",
        ] {
            let e = Endpoint::parse(s).unwrap();
            assert_eq!(e.to_string(), s);
            assert_eq!(Endpoint::parse(&e.to_string()).unwrap(), e);
        }
    }

    #[test]
    fn rejects_with_flag_name() {
        for bad in [
            "",
            "csi.sock",
            "./csi.sock",
            "unix://csi.sock",
            "unix://host/csi.sock",
            "unix:csi.sock",
            "unix:///csi/",
            "tcp://host",
            "tcp://:10000",
            "tcp://host:99999",
            "tcp://host:port",
            "tcp://::1:9000",
            "tcp://[::1:9000",
            "tcp://host:1/path",
            "http://host:1",
        ] {
            let err = Endpoint::parse(bad).expect_err(bad).to_string();
            assert!(err.contains("--endpoint"), "{bad:?}: {err}");
            assert!(err.contains(&format!("{bad:?}")), "{bad:?}: {err}");
        }
    }

    #[test]
    fn from_str_matches_parse() {
        let e: Endpoint = "unix:///x.sock".parse().unwrap();
        assert_eq!(e.unix_socket_path(), Some(Path::new("/x.sock")));
    }
}
