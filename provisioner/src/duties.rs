//! The provisioner's duties (provisioning, attaching, resizing, snapshots), which run side by
//! side in one process with one client and one leader lease, each started only when the driver
//! can do it: attach needs PUBLISH_UNPUBLISH_VOLUME, resize EXPAND_VOLUME, snapshot
//! CREATE_DELETE_SNAPSHOT. Also what the duties share:
//! retry backoff and secret reading.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::controller::Settings;
use crate::driver::Driver;
use crate::metrics::Metrics;
use crate::plan::{DriverCaps, SecretRef};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duty {
    Provision,
    Attach,
    Resize,
    Snapshot,
}

impl Duty {
    pub fn as_str(self) -> &'static str {
        match self {
            Duty::Provision => "provision",
            Duty::Attach => "attach",
            Duty::Resize => "resize",
            Duty::Snapshot => "snapshot",
        }
    }
}

impl FromStr for Duty {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "provision" => Ok(Duty::Provision),
            "attach" => Ok(Duty::Attach),
            "resize" => Ok(Duty::Resize),
            "snapshot" => Ok(Duty::Snapshot),
            other => Err(format!(
                "unknown controller {other:?} (known: provision, attach, resize, snapshot)"
            )),
        }
    }
}

/// The duties asked for, less those the driver cannot do (with the reason, for the log).
pub fn select(asked: &[Duty], caps: DriverCaps) -> (Vec<Duty>, Vec<(Duty, &'static str)>) {
    let mut on = Vec::new();
    let mut off = Vec::new();
    for &d in asked {
        if on.contains(&d) || off.iter().any(|(x, _)| *x == d) {
            continue;
        }
        match d {
            Duty::Attach if !caps.publish_unpublish => {
                off.push((d, "the driver has no PUBLISH_UNPUBLISH_VOLUME capability"))
            }
            Duty::Resize if !caps.expand => {
                off.push((d, "the driver has no EXPAND_VOLUME capability"))
            }
            Duty::Snapshot if !caps.snapshot => {
                off.push((d, "the driver has no CREATE_DELETE_SNAPSHOT capability"))
            }
            _ => on.push(d),
        }
    }
    (on, off)
}

/// Runs the chosen duties until `shutdown` resolves; each gets the same stop signal.
pub async fn run(
    client: Client,
    driver: Driver,
    settings: Settings,
    metrics: Arc<Metrics>,
    host: String,
    duties: Vec<Duty>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = move || {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = Vec::new();
    let mut names = Vec::new();
    for d in duties {
        tracing::info!(controller = d.as_str(), driver = %driver.name, "starting controller");
        let (c, dr, s, m, h) = (
            client.clone(),
            driver.clone(),
            settings.clone(),
            metrics.clone(),
            host.clone(),
        );
        let fut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match d {
            Duty::Provision => Box::pin(crate::controller::run(c, dr, s, m, h, stop())),
            Duty::Attach => Box::pin(crate::attach::run(c, dr, s, m, h, stop())),
            Duty::Resize => Box::pin(crate::resize::run(c, dr, s, m, h, stop())),
            Duty::Snapshot => Box::pin(crate::snapshot::run(c, dr, s, m, h, stop())),
        };
        tasks.push(tokio::spawn(fut));
        names.push(d.as_str());
    }
    if tasks.is_empty() {
        shutdown.await;
        return;
    }
    // A duty that ends by itself (a watch that cannot go on) ends the process, as the
    // provisioner alone did, so that it is restarted whole instead of running with a duty
    // missing.
    tokio::pin!(shutdown);
    let finished = {
        let any = futures::future::select_all(tasks.iter_mut());
        tokio::select! {
            _ = &mut shutdown => None,
            (_, i, _) = any => Some(i),
        }
    };
    if let Some(i) = finished {
        tracing::error!(
            controller = names[i],
            "controller stopped by itself; stopping the others"
        );
        names.remove(i);
        tasks.remove(i);
    }
    let _ = tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
}

/// Failure counts per object key: 1 s doubling up to a maximum, reset on success.
pub struct Backoff {
    failures: std::sync::Mutex<HashMap<String, u32>>,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        Backoff {
            failures: Default::default(),
            max,
        }
    }

    pub fn succeeded(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }

    /// The delay before the next try; a conflict (a cache behind an API write) retries soon
    /// without growing the delay.
    pub fn next(&self, key: &str, conflict: bool) -> Duration {
        if conflict {
            return Duration::from_millis(100);
        }
        let n = match self.failures.lock() {
            Ok(mut f) => {
                let n = f.entry(key.to_owned()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        Duration::from_secs(1u64 << (n - 1).min(16)).min(self.max)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("secret {namespace}/{name}: {reason}")]
pub struct SecretError {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

/// A secret's data as strings (CSI secrets are string maps).
pub async fn read_secret(
    client: &Client,
    r: &SecretRef,
) -> Result<BTreeMap<String, String>, SecretError> {
    let err = |reason: String| SecretError {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        reason,
    };
    let s = Api::<Secret>::namespaced(client.clone(), &r.namespace)
        .get_opt(&r.name)
        .await
        .map_err(|e| err(e.to_string()))?
        .ok_or_else(|| err("not found".into()))?;
    let mut out = BTreeMap::new();
    for (k, v) in s.data.unwrap_or_default() {
        let v = String::from_utf8(v.0).map_err(|_| err(format!("key {k:?} is not UTF-8")))?;
        out.insert(k, v);
    }
    for (k, v) in s.string_data.unwrap_or_default() {
        out.insert(k, v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duties_parse() {
        assert_eq!("attach".parse(), Ok(Duty::Attach));
        assert_eq!(" resize".parse(), Ok(Duty::Resize));
        assert_eq!("snapshot".parse(), Ok(Duty::Snapshot));
        assert!("snapshots".parse::<Duty>().is_err());
    }

    #[test]
    fn duties_follow_the_capabilities() {
        let all = [
            Duty::Provision,
            Duty::Attach,
            Duty::Resize,
            Duty::Snapshot,
            Duty::Attach,
        ];
        let none = DriverCaps::default();
        let (on, off) = select(&all, none);
        assert_eq!(on, [Duty::Provision]);
        assert_eq!(
            off.iter().map(|(d, _)| *d).collect::<Vec<_>>(),
            [Duty::Attach, Duty::Resize, Duty::Snapshot]
        );
        let caps = DriverCaps {
            publish_unpublish: true,
            expand: true,
            snapshot: true,
            ..none
        };
        assert_eq!(
            select(&all, caps).0,
            [Duty::Provision, Duty::Attach, Duty::Resize, Duty::Snapshot]
        );
        assert_eq!(select(&[Duty::Resize], caps).0, [Duty::Resize]);
    }

    #[test]
    fn backoff_doubles_and_resets() {
        let b = Backoff::new(Duration::from_secs(5));
        let d: Vec<u64> = (0..5).map(|_| b.next("k", false).as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 5, 5]);
        assert_eq!(b.next("k", true), Duration::from_millis(100));
        b.succeeded("k");
        assert_eq!(b.next("k", false), Duration::from_secs(1));
        assert_eq!(b.next("other", false), Duration::from_secs(1));
    }
}
