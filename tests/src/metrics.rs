//! Scraping a plugin's `/metrics` in tests: the address it bound (port 0 in tests, read from
//! its log), one HTTP GET, and sample lookup in the Prometheus text.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Plugin;

/// The address of the plugin's server whose start line (`serving /metrics`, `serving /healthz`)
/// is `what`, waiting (bounded) for the line to appear in its log.
pub async fn bound_addr(plugin: &Plugin, what: &str) -> Result<SocketAddr> {
    bound_addr_nth(plugin, what, 1).await
}

/// Like [`bound_addr`], from the `nth` (1-based) such line: a plugin restarted on the same log
/// file logs one per start.
pub async fn bound_addr_nth(plugin: &Plugin, what: &str, nth: usize) -> Result<SocketAddr> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = plugin.log_text();
        if let Some(line) = log
            .lines()
            .filter(|l| l.contains(what))
            .nth(nth.saturating_sub(1))
        {
            let addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .with_context(|| format!("no addr= in {line:?}"))?;
            return addr.parse().with_context(|| format!("address in {line:?}"));
        }
        if Instant::now() > deadline {
            bail!("no {what:?} line within 30s; log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET <path>` over HTTP/1.1; the status code and body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        anyhow::Ok(String::from_utf8(raw)?)
    };
    let text = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .context("GET timed out")??;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    Ok((code, body.to_string()))
}

/// `/metrics` of the server at `addr`, which must answer 200.
pub async fn scrape(addr: SocketAddr) -> Result<String> {
    let (code, body) = get(addr, "/metrics").await?;
    if code != 200 {
        bail!("/metrics answered {code}: {body}");
    }
    Ok(body)
}

/// The value of the sample `series` (name and labels exactly as exposed, e.g.
/// `stowage_csi_operations_total{driver="local.stowage.io",method="Probe",code="OK"}`); 0 when
/// the series is absent (a counter that never moved is not exposed).
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
