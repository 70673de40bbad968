//! The resize controller: external-resizer's duty for Stowage drivers with EXPAND_VOLUME.
//!
//! A bound claim of the driver whose request grew past its capacity, in a StorageClass that
//! allows expansion, gets ControllerExpandVolume; the PV's capacity follows, then the claim's
//! status the way Kubernetes 1.34 keeps it (`allocatedResources`, `allocatedResourceStatuses`,
//! conditions Resizing and FileSystemResizePending, `capacity` when the node has nothing to
//! do). A size the driver refuses (InvalidArgument, OutOfRange) is ControllerResizeInfeasible
//! with an event, and waits for the user, who may lower the request again (recovery). The
//! decisions are [`plan`]'s; this module reads, calls and writes.

pub mod plan;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::PostParams;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use stowage_csi::v1;
use tokio::time::Instant;
use tracing::{Instrument, info_span};

use crate::binder::Note;
use crate::controller::Settings;
use crate::driver::{Driver, DriverError};
use crate::duties::{Backoff, SecretError, read_secret};
use crate::events::Recorder;
use crate::metrics::Metrics;
use crate::objects as o;
use plan::{ExpandCall, ResizeInput, Step};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

impl Error {
    fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let what = what.into();
        move |source| Error::Api { what, source }
    }

    fn is_conflict(&self) -> bool {
        matches!(self, Error::Api { source: kube::Error::Api(s), .. } if s.is_conflict())
    }
}

struct Ctx {
    client: Client,
    driver: Driver,
    settings: Settings,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    backoff: Backoff,
    running: Arc<AtomicUsize>,
}

struct Running(Arc<AtomicUsize>);

impl Running {
    fn new(ctx: &Ctx) -> Self {
        ctx.running.fetch_add(1, Ordering::SeqCst);
        Running(ctx.running.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct ResizeRun<'a> {
    ctx: &'a Ctx,
    claim: PersistentVolumeClaim,
    pv: PersistentVolume,
    pvc_api: Api<PersistentVolumeClaim>,
    pv_api: Api<PersistentVolume>,
}

impl ResizeRun<'_> {
    async fn event(&self, note: Note) {
        self.ctx
            .recorder
            .publish(&self.claim.object_ref(&()), &note)
            .await;
    }

    /// Writes a new claim status, only when it differs: every write is a watch event that
    /// syncs the claim again, and an unchanged status must not make a loop.
    async fn set_status(
        &mut self,
        status: k8s_openapi::api::core::v1::PersistentVolumeClaimStatus,
        what: &str,
    ) -> Result<bool, Error> {
        if self.claim.status.as_ref() == Some(&status) {
            return Ok(false);
        }
        let mut c = self.claim.clone();
        c.status = Some(status);
        let name = o::name(&c.metadata).to_owned();
        self.claim = self
            .pvc_api
            .replace_status(&name, &PostParams::default(), &c)
            .await
            .map_err(Error::api(format!("{what} of claim {}", o::claim_key(&c))))?;
        Ok(true)
    }

    /// Raises the PV's capacity; KCM writes PVs too, so a conflict is retried on a fresh copy.
    async fn grow_volume(&mut self, bytes: u64) -> Result<(), Error> {
        let name = o::name(&self.pv.metadata).to_owned();
        for attempt in 0..5 {
            let Some(pv) = plan::grown_volume(&self.pv, bytes) else {
                return Ok(());
            };
            match self
                .pv_api
                .replace(&name, &PostParams::default(), &pv)
                .await
            {
                Ok(pv) => {
                    self.pv = pv;
                    return Ok(());
                }
                Err(kube::Error::Api(s)) if s.is_conflict() && attempt < 4 => {
                    self.pv = self
                        .pv_api
                        .get(&name)
                        .await
                        .map_err(Error::api(format!("reading volume {name}")))?;
                }
                Err(e) => return Err(Error::api(format!("growing volume {name}"))(e)),
            }
        }
        Ok(())
    }

    async fn expand(&mut self, call: ExpandCall) -> Result<Action, Error> {
        let ctx = self.ctx;
        let pv_name = o::name(&self.pv.metadata).to_owned();
        let started = Instant::now();
        // The size is recorded as allocated before the backend grows, so quota sees it and a
        // restart resumes at that size.
        let status = plan::in_progress(&self.claim, call.bytes);
        if self.set_status(status, "marking the resize").await? {
            self.event(Note::normal(
                "Resizing",
                format!("External resizer is resizing volume {pv_name}"),
            ))
            .await;
        }
        let secrets = match &call.secret {
            Some(r) => read_secret(&ctx.client, r).await?.into_iter().collect(),
            None => Default::default(),
        };
        let request = v1::ControllerExpandVolumeRequest {
            volume_id: call.volume_id.clone(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: i64::try_from(call.bytes).unwrap_or(i64::MAX),
                limit_bytes: 0,
            }),
            secrets,
            volume_capability: call.capability.clone(),
        };
        match ctx.driver.controller_expand(request).await {
            Ok((bytes, node_expansion_required)) => {
                // A driver reporting less than it was asked for would leave the claim asking
                // forever; the request is what it accepted.
                let bytes = bytes.max(call.bytes);
                self.grow_volume(bytes).await?;
                let status = plan::finished(&self.claim, bytes, node_expansion_required);
                self.set_status(status, "recording the resize").await?;
                ctx.metrics.record("expand", true, Some(started.elapsed()));
                if node_expansion_required {
                    self.event(Note::normal(
                        "FileSystemResizeRequired",
                        "Require file system resize of volume on node",
                    ))
                    .await;
                } else {
                    self.event(Note::normal(
                        "VolumeResizeSuccessful",
                        "Resize volume succeeded",
                    ))
                    .await;
                }
                tracing::info!(bytes, node_expansion_required, "volume expanded");
                Ok(Action::requeue(ctx.settings.resync))
            }
            Err(e) => {
                let infeasible = plan::is_infeasible(e.code());
                let message = e.to_string();
                let status = plan::failed(&self.claim, &message, infeasible);
                self.set_status(status, "recording the failed resize")
                    .await?;
                ctx.metrics.record("expand", false, None);
                self.event(Note::warning("VolumeResizeFailed", message.clone()))
                    .await;
                if infeasible {
                    // Retrying cannot help; the claim's next change (a new request) syncs it.
                    tracing::warn!(error = %message, "resize infeasible; waiting for a new request");
                    Ok(Action::requeue(ctx.settings.resync))
                } else {
                    Err(e.into())
                }
            }
        }
    }
}

async fn reconcile(claim: Arc<PersistentVolumeClaim>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    // Most claims never resize: no reads, no requeue, until they change.
    if !plan::wants_more(&claim) {
        return Ok(Action::await_change());
    }
    let _running = Running::new(&ctx);
    let key = o::claim_key(&claim);
    let span = info_span!("resize", claim = %key, volume_id = tracing::field::Empty);
    async {
        let pv_api: Api<PersistentVolume> = Api::all(ctx.client.clone());
        let vn = o::claim_volume_name(&claim);
        let Some(pv) = pv_api
            .get_opt(vn)
            .await
            .map_err(Error::api(format!("reading volume {vn}")))?
        else {
            return Ok(Action::await_change());
        };
        if o::csi_driver(&pv) != Some(ctx.driver.name.as_str()) {
            return Ok(Action::await_change());
        }
        tracing::Span::current().record("volume_id", o::volume_handle(&pv).unwrap_or(""));
        let class_name = o::claim_class(&claim);
        let class = if class_name.is_empty() {
            None
        } else {
            Api::<StorageClass>::all(ctx.client.clone())
                .get_opt(class_name)
                .await
                .map_err(Error::api(format!("reading StorageClass {class_name}")))?
        };
        let step = plan::next(&ResizeInput {
            driver: &ctx.driver.name,
            caps: ctx.driver.caps,
            claim: &claim,
            pv: Some(&pv),
            class: class.as_ref(),
        });
        tracing::debug!(?step, "resize sync");
        let action = match step {
            Step::Done => Action::await_change(),
            Step::Skip(reason) => {
                tracing::info!(%reason, "claim asks for more storage; not expanding");
                Action::await_change()
            }
            Step::Expand(call) => {
                let mut run = ResizeRun {
                    ctx: &ctx,
                    claim: (*claim).clone(),
                    pv,
                    pvc_api: Api::namespaced(ctx.client.clone(), o::namespace(&claim.metadata)),
                    pv_api,
                };
                run.expand(call).await?
            }
        };
        ctx.backoff.succeeded(&key);
        Ok(action)
    }
    .instrument(span)
    .await
}

fn error_policy(claim: Arc<PersistentVolumeClaim>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = o::claim_key(&claim);
    let d = ctx.backoff.next(&key, err.is_conflict());
    tracing::warn!(claim = %key, error = %err, retry_in = ?d, "resize failed");
    Action::requeue(d)
}

const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the resize controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    driver: Driver,
    settings: Settings,
    metrics: Arc<Metrics>,
    host: String,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    // A claim cache of its own, without managedFields (see objects::drop_managed_fields), so
    // the duty costs little next to the provisioner's caches.
    let (reader, writer) = reflector::store::<PersistentVolumeClaim>();
    let stream = watcher(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(o::drop_managed_fields)
    .reflect(writer)
    .touched_objects();
    let ctl = Controller::for_stream(stream, reader)
        .with_config(ControllerConfig::default().concurrency(settings.workers));
    let ctx = Arc::new(Ctx {
        recorder: Recorder::new(client.clone(), "stowage-provisioner", host),
        client,
        backoff: Backoff::new(settings.max_backoff),
        driver,
        settings,
        metrics,
        running: Default::default(),
    });
    let running = ctx.running.clone();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let claims = ctl
        .graceful_shutdown_on(async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "resize controller");
            }
        });
    tokio::pin!(shutdown);
    tokio::select! {
        _ = claims => {}
        _ = async {
            (&mut shutdown).await;
            let _ = stop_tx.send(true);
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            while running.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } => tracing::info!("resize controller stopped"),
    }
}
