//! The attach controller: external-attacher's duty for Stowage drivers that publish volumes to
//! nodes (PUBLISH_UNPUBLISH_VOLUME, e.g. RBD, which fences an RWO image to one node).
//!
//! VolumeAttachments whose `spec.attacher` is the driver are attached with
//! ControllerPublishVolume and detached with ControllerUnpublishVolume; [`plan::next`] decides
//! each step from what the API shows, this module executes it. The attachment and its PV carry
//! external-attacher's finalizer while a volume may be published, so neither goes before the
//! detach; the node ID is recorded on the attachment before any publish, so a detach works even
//! after the Node and its CSINode are gone. Failures land in `status.attachError` /
//! `status.detachError` and an event, and are retried with backoff: a node without the node
//! plugin, a PV that is gone or an RWO volume attached elsewhere never makes a crash loop.

pub mod plan;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::{CSINode, VolumeAttachment, VolumeError};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, PostParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
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
use crate::plan::SecretRef;
use plan::{AttachInput, Step};

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
    #[error("attach failed: {0}")]
    Attach(String),
    #[error("detach failed: {0}")]
    Detach(String),
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

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

struct Ctx {
    client: Client,
    driver: Driver,
    settings: Settings,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    backoff: Backoff,
    volumes: Store<PersistentVolume>,
    running: Arc<AtomicUsize>,
}

/// Counts a running sync for as long as it lives (shutdown waits for them, bounded).
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

fn now_error(message: &str) -> VolumeError {
    VolumeError {
        message: Some(message.to_owned()),
        time: Some(Time(Timestamp::now())),
        error_code: None,
    }
}

fn same_message(e: Option<&VolumeError>, message: &str) -> bool {
    e.and_then(|e| e.message.as_deref()) == Some(message)
}

/// One attachment's sync: working copies that each write replaces, so the next write carries
/// the resourceVersion the previous one returned.
struct AttachRun<'a> {
    ctx: &'a Ctx,
    va: VolumeAttachment,
    pv: Option<PersistentVolume>,
    csinode: Option<CSINode>,
    va_api: Api<VolumeAttachment>,
    pv_api: Api<PersistentVolume>,
}

impl AttachRun<'_> {
    fn name(&self) -> String {
        o::name(&self.va.metadata).to_owned()
    }

    async fn secrets(
        &self,
        r: Option<&SecretRef>,
    ) -> Result<std::collections::HashMap<String, String>, Error> {
        Ok(match r {
            Some(r) => read_secret(&self.ctx.client, r)
                .await?
                .into_iter()
                .collect(),
            None => Default::default(),
        })
    }

    async fn replace_va(&mut self, what: &str) -> Result<(), Error> {
        let name = self.name();
        match self
            .va_api
            .replace(&name, &PostParams::default(), &self.va)
            .await
        {
            Ok(va) => self.va = va,
            // Gone already: the finalizer was the last thing holding it.
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(Error::api(format!("{what} of attachment {name}"))(e)),
        }
        Ok(())
    }

    async fn write_status(&mut self, what: &str) -> Result<(), Error> {
        let name = self.name();
        self.va = self
            .va_api
            .replace_status(&name, &PostParams::default(), &self.va)
            .await
            .map_err(Error::api(format!("{what} of attachment {name}")))?;
        Ok(())
    }

    /// Records a failed attach (status and event) and returns the error for the backoff.
    async fn attach_failed(&mut self, message: String) -> Error {
        let st = self.va.status.get_or_insert_with(Default::default);
        // The same error again keeps its first time: every status write is a watch event
        // that would sync the attachment at once, and the retry must wait for its backoff.
        if st.attached || !same_message(st.attach_error.as_ref(), &message) {
            st.attached = false;
            st.attach_error = Some(now_error(&message));
            if let Err(e) = self.write_status("recording the attach error").await {
                tracing::warn!(error = %e, "could not record the attach error");
            }
        }
        self.ctx.metrics.record("attach", false, None);
        self.ctx
            .recorder
            .publish(
                &self.va.object_ref(&()),
                &Note::warning("AttachFailed", message.clone()),
            )
            .await;
        Error::Attach(message)
    }

    async fn detach_failed(&mut self, message: String) -> Error {
        let st = self.va.status.get_or_insert_with(Default::default);
        if !same_message(st.detach_error.as_ref(), &message) {
            st.detach_error = Some(now_error(&message));
            if let Err(e) = self.write_status("recording the detach error").await {
                tracing::warn!(error = %e, "could not record the detach error");
            }
        }
        self.ctx.metrics.record("detach", false, None);
        self.ctx
            .recorder
            .publish(
                &self.va.object_ref(&()),
                &Note::warning("DetachFailed", message.clone()),
            )
            .await;
        Error::Detach(message)
    }

    async fn remove_finalizer(&mut self) -> Result<(), Error> {
        let fin = plan::finalizer(&self.ctx.driver.name);
        if let Some(f) = self.va.metadata.finalizers.as_mut() {
            f.retain(|x| *x != fin);
        }
        self.replace_va("removing the finalizer").await
    }

    /// Applies one step; Ok(true) when the sync is finished.
    async fn apply(&mut self, step: Step) -> Result<bool, Error> {
        let ctx = self.ctx;
        match step {
            Step::Done => return Ok(true),
            Step::AttachError(m) => return Err(self.attach_failed(m).await),
            Step::DetachError(m) => return Err(self.detach_failed(m).await),
            Step::AddVolumeFinalizer => {
                let Some(mut pv) = self.pv.clone() else {
                    return Ok(true);
                };
                let name = o::name(&pv.metadata).to_owned();
                pv.metadata
                    .finalizers
                    .get_or_insert_with(Vec::new)
                    .push(plan::finalizer(&ctx.driver.name));
                self.pv = Some(
                    self.pv_api
                        .replace(&name, &PostParams::default(), &pv)
                        .await
                        .map_err(Error::api(format!("protecting volume {name}")))?,
                );
            }
            Step::AddFinalizer { node_id } => {
                let fin = plan::finalizer(&ctx.driver.name);
                let f = self.va.metadata.finalizers.get_or_insert_with(Vec::new);
                if !f.contains(&fin) {
                    f.push(fin);
                }
                o::set_annotation(&mut self.va.metadata, plan::ANN_NODE_ID, &node_id);
                self.replace_va("protecting").await?;
            }
            Step::Publish(call) => {
                tracing::Span::current().record("volume_id", call.volume_id.as_str());
                let started = Instant::now();
                let secrets = match self.secrets(call.secret.as_ref()).await {
                    Ok(s) => s,
                    Err(e) => return Err(self.attach_failed(e.to_string()).await),
                };
                let request = v1::ControllerPublishVolumeRequest {
                    volume_id: call.volume_id.clone(),
                    node_id: call.node_id.clone(),
                    volume_capability: Some(call.capability),
                    readonly: call.readonly,
                    secrets,
                    volume_context: call.context.into_iter().collect(),
                };
                let publish_context = match ctx.driver.controller_publish(request).await {
                    Ok(c) => c,
                    Err(e) => return Err(self.attach_failed(e.to_string()).await),
                };
                let st = self.va.status.get_or_insert_with(Default::default);
                st.attached = true;
                st.attachment_metadata = (!publish_context.is_empty()).then_some(publish_context);
                st.attach_error = None;
                self.write_status("marking attached").await?;
                ctx.metrics.record("attach", true, Some(started.elapsed()));
                tracing::info!(node_id = %call.node_id, "volume attached");
                return Ok(true);
            }
            Step::Unpublish(call) => {
                tracing::Span::current().record("volume_id", call.volume_id.as_str());
                let started = Instant::now();
                let secrets = match self.secrets(call.secret.as_ref()).await {
                    Ok(s) => s,
                    Err(e) => return Err(self.detach_failed(e.to_string()).await),
                };
                let request = v1::ControllerUnpublishVolumeRequest {
                    volume_id: call.volume_id.clone(),
                    node_id: call.node_id.clone(),
                    secrets,
                };
                if let Err(e) = ctx.driver.controller_unpublish(request).await {
                    return Err(self.detach_failed(e.to_string()).await);
                }
                self.remove_finalizer().await?;
                ctx.metrics.record("detach", true, Some(started.elapsed()));
                tracing::info!(node_id = %call.node_id, "volume detached");
                return Ok(true);
            }
            Step::RemoveFinalizer => {
                self.remove_finalizer().await?;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

async fn reconcile_attachment(va: Arc<VolumeAttachment>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    // Other drivers' attachments: not ours, never looked at again unless they change.
    if va.spec.attacher != ctx.driver.name {
        return Ok(Action::await_change());
    }
    let _running = Running::new(&ctx);
    let name = o::name(&va.metadata).to_owned();
    let span = info_span!(
        "attachment",
        attachment = %name,
        node = %va.spec.node_name,
        volume_id = tracing::field::Empty
    );
    async {
        let pv_api: Api<PersistentVolume> = Api::all(ctx.client.clone());
        // The cache first; a miss is checked with the API (the cache may not have filled yet,
        // and "PV not found" must not be said of a PV that exists).
        let pv = match va.spec.source.persistent_volume_name.as_deref() {
            Some(n) => match ctx.volumes.get(&ObjectRef::new(n)) {
                Some(pv) => Some((*pv).clone()),
                None => pv_api
                    .get_opt(n)
                    .await
                    .map_err(Error::api(format!("reading volume {n}")))?,
            },
            None => None,
        };
        if let Some(h) = pv.as_ref().and_then(o::volume_handle) {
            tracing::Span::current().record("volume_id", h);
        }
        // The node ID comes from the CSINode until it is recorded on the attachment.
        let csinode = if o::annotation(&va.metadata, plan::ANN_NODE_ID).is_none() {
            Api::<CSINode>::all(ctx.client.clone())
                .get_opt(&va.spec.node_name)
                .await
                .map_err(Error::api(format!("reading CSINode {}", va.spec.node_name)))?
        } else {
            None
        };
        let mut run = AttachRun {
            ctx: &ctx,
            va: (*va).clone(),
            pv,
            csinode,
            va_api: Api::all(ctx.client.clone()),
            pv_api,
        };
        // Each step changes one object; a handful covers the longest path (PV finalizer,
        // attachment finalizer, publish).
        for _ in 0..6 {
            let step = plan::next(&AttachInput {
                driver: &ctx.driver.name,
                caps: ctx.driver.caps,
                va: &run.va,
                pv: run.pv.as_ref(),
                csinode: run.csinode.as_ref(),
            });
            tracing::debug!(?step, "attachment sync");
            if run.apply(step).await? {
                break;
            }
        }
        ctx.backoff.succeeded(&name);
        Ok(Action::requeue(ctx.settings.resync))
    }
    .instrument(span)
    .await
}

/// A PV keeps the attach finalizer while any attachment refers to it; once it is being
/// deleted and the last attachment is gone, the finalizer goes.
async fn reconcile_volume(pv: Arc<PersistentVolume>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let fin = plan::finalizer(&ctx.driver.name);
    if pv.metadata.deletion_timestamp.is_none() || !o::has_finalizer(&pv.metadata, &fin) {
        return Ok(Action::await_change());
    }
    let _running = Running::new(&ctx);
    let name = o::name(&pv.metadata).to_owned();
    let span =
        info_span!("volume", volume = %name, volume_id = o::volume_handle(&pv).unwrap_or(""));
    async {
        // The live list, not a cache: dropping the finalizer while an attachment exists would
        // let the PV go before its detach.
        let vas = Api::<VolumeAttachment>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(Error::api("listing VolumeAttachments"))?;
        if !plan::volume_finalizer_removable(&ctx.driver.name, &pv, &vas.items) {
            return Ok(Action::requeue(ctx.settings.resync));
        }
        let mut pv = (*pv).clone();
        if let Some(f) = pv.metadata.finalizers.as_mut() {
            f.retain(|x| *x != fin);
        }
        match Api::<PersistentVolume>::all(ctx.client.clone())
            .replace(&name, &PostParams::default(), &pv)
            .await
        {
            Ok(_) => tracing::info!("no attachment left; attach finalizer removed"),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(Error::api(format!("releasing volume {name}"))(e)),
        }
        Ok(Action::await_change())
    }
    .instrument(span)
    .await
}

fn error_policy_attachment(va: Arc<VolumeAttachment>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let name = o::name(&va.metadata);
    let d = ctx.backoff.next(name, err.is_conflict());
    tracing::warn!(attachment = %name, node = %va.spec.node_name, error = %err, retry_in = ?d, "attachment sync failed");
    Action::requeue(d)
}

fn error_policy_volume(pv: Arc<PersistentVolume>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = format!("pv/{}", o::name(&pv.metadata));
    let d = ctx.backoff.next(&key, err.is_conflict());
    tracing::warn!(volume = %o::name(&pv.metadata), volume_id = o::volume_handle(&pv).unwrap_or(""), error = %err, retry_in = ?d, "volume sync failed (attach finalizer)");
    Action::requeue(d)
}

/// How long running syncs may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the attachment and volume controllers until `shutdown` resolves.
pub async fn run(
    client: Client,
    driver: Driver,
    settings: Settings,
    metrics: Arc<Metrics>,
    host: String,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let wc = watcher::Config::default();
    let va_api: Api<VolumeAttachment> = Api::all(client.clone());
    let pv_api: Api<PersistentVolume> = Api::all(client.clone());
    let workers = ControllerConfig::default().concurrency(settings.workers);
    // Caches without managedFields (see objects::drop_managed_fields): this duty adds a PV
    // and an attachment cache to the provisioner's own, and should cost little memory.
    let (pv_reader, pv_writer) = reflector::store::<PersistentVolume>();
    let pv_stream = watcher(pv_api, wc.clone())
        .default_backoff()
        .modify(o::drop_managed_fields)
        .reflect(pv_writer)
        .touched_objects();
    let (va_reader, va_writer) = reflector::store::<VolumeAttachment>();
    let va_stream = watcher(va_api.clone(), wc.clone())
        .default_backoff()
        .modify(o::drop_managed_fields)
        .reflect(va_writer)
        .touched_objects();
    let volumes_ctl = Controller::for_stream(pv_stream, pv_reader)
        .with_config(workers.clone())
        .watches(va_api.clone(), wc.clone(), |va| {
            va.spec
                .source
                .persistent_volume_name
                .as_deref()
                .map(ObjectRef::new)
        });
    let attachments_ctl = Controller::for_stream(va_stream, va_reader).with_config(workers);
    let ctx = Arc::new(Ctx {
        recorder: Recorder::new(client.clone(), "stowage-provisioner", host),
        client,
        backoff: Backoff::new(settings.max_backoff),
        volumes: volumes_ctl.store(),
        driver,
        settings,
        metrics,
        running: Default::default(),
    });
    let running = ctx.running.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let attachments = attachments_ctl
        .graceful_shutdown_on(stopped(stop_rx.clone()))
        .run(reconcile_attachment, error_policy_attachment, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "attachment controller");
            }
        });
    let volumes = volumes_ctl
        .graceful_shutdown_on(stopped(stop_rx))
        .run(reconcile_volume, error_policy_volume, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "attach volume controller");
            }
        });
    tokio::pin!(shutdown);
    tokio::select! {
        _ = async { tokio::join!(attachments, volumes) } => {}
        _ = async {
            (&mut shutdown).await;
            let _ = stop_tx.send(true);
            // A publish cut in half is safe (it is idempotent and retried); waiting bounds it.
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            while running.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } => tracing::info!("attach controller stopped"),
    }
}
