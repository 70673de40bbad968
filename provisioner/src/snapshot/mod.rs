//! VolumeSnapshots: the duties of the upstream snapshot-controller (the common controller:
//! snapshot ↔ content binding, finalizers, status) and of the external-snapshotter sidecar
//! (the driver's side: CreateSnapshot / DeleteSnapshot for contents of this driver), for
//! drivers with CREATE_DELETE_SNAPSHOT.
//!
//! [`plan`] decides each step from what the API shows; this module executes it and syncs
//! again. The common part can be turned off (`--snapshot-common=false`) where the cluster
//! already runs a snapshot-controller; the driver's part then works with the contents that
//! controller makes (same names, annotations and finalizers as upstream).

pub mod plan;
pub mod restore;
pub mod types;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim};
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
use plan::{ContentInput, ContentStep, SnapshotInput, SnapshotStep};
use types::{VolumeSnapshot, VolumeSnapshotClass, VolumeSnapshotContent, VolumeSnapshotError};

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
    #[error("{0}")]
    Failed(String),
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

fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists")
}

/// A snapshot that is not ready yet is asked about again this soon (CreateSnapshot is
/// idempotent by name).
const NOT_READY_POLL: Duration = Duration::from_secs(1);

/// How long running syncs may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

struct Ctx {
    client: Client,
    driver: Driver,
    settings: Settings,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    backoff: Backoff,
    snapshots: Store<VolumeSnapshot>,
    contents: Store<VolumeSnapshotContent>,
    classes: Store<VolumeSnapshotClass>,
    /// When each content's CreateSnapshot was first tried (for the metric).
    started: tokio::sync::Mutex<HashMap<String, Instant>>,
}

impl Ctx {
    fn classes(&self) -> Vec<VolumeSnapshotClass> {
        self.classes.state().iter().map(|c| (**c).clone()).collect()
    }

    async fn secrets(
        &self,
        r: Option<&SecretRef>,
    ) -> Result<std::collections::HashMap<String, String>, Error> {
        Ok(match r {
            Some(r) => read_secret(&self.client, r).await?.into_iter().collect(),
            None => Default::default(),
        })
    }
}

fn now_error(message: &str) -> VolumeSnapshotError {
    VolumeSnapshotError {
        time: Some(Time(Timestamp::now())),
        message: Some(message.to_owned()),
    }
}

fn error_message(e: Option<&VolumeSnapshotError>) -> Option<&str> {
    e.and_then(|e| e.message.as_deref())
}

fn snapshot_ref_of(c: &VolumeSnapshotContent) -> ObjectReference {
    let mut r = c.spec.volume_snapshot_ref.clone();
    r.kind.get_or_insert_with(|| "VolumeSnapshot".into());
    r.api_version
        .get_or_insert_with(|| "snapshot.storage.k8s.io/v1".into());
    r
}

/// Writes `obj` back (its status with `status`), keeping the answer so the next write carries
/// its resourceVersion. An object gone meanwhile is fine for a spec write (a finalizer was the
/// last thing holding it), an error for a status write.
async fn put<K>(api: &Api<K>, obj: &mut K, status: bool, what: &str) -> Result<(), Error>
where
    K: Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    let name = o::name(obj.meta()).to_owned();
    let pp = PostParams::default();
    let r = if status {
        api.replace_status(&name, &pp, obj).await
    } else {
        api.replace(&name, &pp, obj).await
    };
    match r {
        Ok(new) => *obj = new,
        Err(e) if !status && is_not_found(&e) => {}
        Err(e) => return Err(Error::api(format!("{what} of {name}"))(e)),
    }
    Ok(())
}

// ---------------------------------------------------------------- the common controller

/// What a snapshot sync needs to read besides the snapshot: its content, and for a dynamic
/// snapshot the source claim and its PV (from the API: snapshots are few, and the claim
/// and volume caches belong to the provisioning duty).
async fn snapshot_world(
    ctx: &Ctx,
    s: &VolumeSnapshot,
) -> Result<
    (
        Option<PersistentVolumeClaim>,
        Option<PersistentVolume>,
        Option<VolumeSnapshotContent>,
    ),
    Error,
> {
    let ns = o::namespace(&s.metadata);
    let content_name = s
        .status
        .as_ref()
        .and_then(|st| st.bound_volume_snapshot_content_name.clone())
        .or_else(|| s.spec.source.volume_snapshot_content_name.clone())
        .unwrap_or_else(|| plan::content_name(s));
    let settled = s.metadata.deletion_timestamp.is_none()
        && s.status.as_ref().and_then(|st| st.ready_to_use) == Some(true);
    let cached = ctx
        .contents
        .get(&ObjectRef::new(&content_name))
        .filter(|_| settled);
    let content = match cached {
        Some(c) => Some((*c).clone()),
        // Until the snapshot is ready, the content comes from the API: the content change
        // that triggered this sync reaches the content cache through another watch, maybe
        // later, and a stale copy would leave the status behind until the next resync.
        None => Api::<VolumeSnapshotContent>::all(ctx.client.clone())
            .get_opt(&content_name)
            .await
            .map_err(Error::api(format!("reading content {content_name}")))?,
    };
    let (mut claim, mut volume) = (None, None);
    if content.is_none()
        && let Some(cn) = s.spec.source.persistent_volume_claim_name.as_deref()
    {
        claim = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns)
            .get_opt(cn)
            .await
            .map_err(Error::api(format!("reading claim {ns}/{cn}")))?;
        let vn = claim.as_ref().map(o::claim_volume_name).unwrap_or("");
        if !vn.is_empty() {
            volume = Api::<PersistentVolume>::all(ctx.client.clone())
                .get_opt(vn)
                .await
                .map_err(Error::api(format!("reading volume {vn}")))?;
        }
    }
    Ok((claim, volume, content))
}

/// A claim in the snapshot's namespace, not bound yet, restoring from it (the source
/// protection holds the snapshot until it is provisioned).
async fn restoring_claim(ctx: &Ctx, s: &VolumeSnapshot) -> Result<Option<String>, Error> {
    let ns = o::namespace(&s.metadata);
    let claims = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(Error::api(format!("listing claims in {ns}")))?;
    Ok(claims
        .items
        .iter()
        .find(|c| {
            restore::snapshot_source_name(c) == Some(o::name(&s.metadata))
                && o::claim_volume_name(c).is_empty()
        })
        .map(o::claim_key))
}

struct SnapshotRun<'a> {
    ctx: &'a Ctx,
    s: VolumeSnapshot,
    api: Api<VolumeSnapshot>,
}

impl SnapshotRun<'_> {
    fn name(&self) -> String {
        o::name(&self.s.metadata).to_owned()
    }

    async fn replace(&mut self, what: &str) -> Result<(), Error> {
        put(&self.api, &mut self.s, false, what).await
    }

    async fn write_status(&mut self, what: &str) -> Result<(), Error> {
        put(&self.api, &mut self.s, true, what).await
    }

    async fn failed(&mut self, message: String) -> Error {
        let st = self.s.status.get_or_insert_with(Default::default);
        // The same error again keeps its first time (and writes nothing): a status write is
        // a watch event that would sync the snapshot at once, past its backoff.
        if error_message(st.error.as_ref()) != Some(message.as_str()) {
            st.error = Some(now_error(&message));
            st.ready_to_use.get_or_insert(false);
            if let Err(e) = self.write_status("recording the error").await {
                tracing::warn!(error = %e, "could not record the snapshot error");
            }
        }
        self.ctx
            .recorder
            .publish(
                &self.s.object_ref(&()),
                &Note::warning("SnapshotFailed", message.clone()),
            )
            .await;
        Error::Failed(message)
    }

    /// Applies one step; Ok(Some(action)) when the sync is finished.
    async fn apply(&mut self, step: SnapshotStep) -> Result<Option<Action>, Error> {
        let ctx = self.ctx;
        match step {
            SnapshotStep::Ignore => return Ok(Some(Action::await_change())),
            SnapshotStep::Done => {
                let ready = self.s.status.as_ref().and_then(|s| s.ready_to_use) == Some(true);
                return Ok(Some(Action::requeue(if ready {
                    ctx.settings.resync
                } else {
                    NOT_READY_POLL * 2
                })));
            }
            SnapshotStep::Wait(why) => {
                tracing::info!(reason = %why, "snapshot deletion waits");
                return Ok(Some(Action::requeue(Duration::from_secs(2))));
            }
            SnapshotStep::Error(m) => return Err(self.failed(m).await),
            SnapshotStep::AddFinalizer(f) => {
                self.s
                    .metadata
                    .finalizers
                    .get_or_insert_with(Vec::new)
                    .push(f.to_owned());
                self.replace("adding a finalizer").await?;
            }
            SnapshotStep::SetClass(class) => {
                tracing::info!(class = %class, "snapshot names no class: the driver's default is written into its spec");
                self.s.spec.volume_snapshot_class_name = Some(class);
                self.replace("setting the default class").await?;
            }
            SnapshotStep::RemoveFinalizers => {
                if let Some(f) = self.s.metadata.finalizers.as_mut() {
                    f.retain(|x| x != plan::FIN_SOURCE && x != plan::FIN_BOUND);
                }
                self.replace("removing the finalizers").await?;
                tracing::info!("snapshot released");
                return Ok(Some(Action::await_change()));
            }
            SnapshotStep::CreateContent(c) => {
                let name = o::name(&c.metadata).to_owned();
                match Api::<VolumeSnapshotContent>::all(ctx.client.clone())
                    .create(&PostParams::default(), &c)
                    .await
                {
                    Ok(_) => {}
                    Err(e) if is_already_exists(&e) => {}
                    Err(e) => return Err(Error::api(format!("creating content {name}"))(e)),
                }
                tracing::info!(content = %name, "snapshot content created");
                ctx.recorder
                    .publish(
                        &self.s.object_ref(&()),
                        &Note::normal(
                            "CreatingSnapshot",
                            format!(
                                "Waiting for a snapshot {}/{} to be created by the CSI driver",
                                o::namespace(&self.s.metadata),
                                self.name()
                            ),
                        ),
                    )
                    .await;
                // The next sync sees the content (from the API when the cache is behind).
                return Ok(Some(Action::requeue(Duration::from_millis(200))));
            }
            SnapshotStep::BindContent(c) => {
                let name = o::name(&c.metadata).to_owned();
                Api::<VolumeSnapshotContent>::all(ctx.client.clone())
                    .replace(&name, &PostParams::default(), &c)
                    .await
                    .map_err(Error::api(format!("binding content {name}")))?;
                return Ok(Some(Action::requeue(Duration::from_millis(200))));
            }
            SnapshotStep::Status(st) => {
                let was_ready = self.s.status.as_ref().and_then(|s| s.ready_to_use) == Some(true);
                let ready = st.ready_to_use == Some(true);
                let new_error = error_message(st.error.as_ref())
                    .filter(|m| {
                        error_message(self.s.status.as_ref().and_then(|s| s.error.as_ref()))
                            != Some(*m)
                    })
                    .map(str::to_owned);
                self.s.status = Some(*st);
                self.write_status("updating the status").await?;
                if let Some(m) = new_error {
                    ctx.recorder
                        .publish(&self.s.object_ref(&()), &Note::warning("SnapshotFailed", m))
                        .await;
                }
                if ready && !was_ready {
                    tracing::info!("snapshot ready to use");
                    ctx.recorder
                        .publish(
                            &self.s.object_ref(&()),
                            &Note::normal(
                                "SnapshotReady",
                                format!(
                                    "Snapshot {}/{} is ready to use.",
                                    o::namespace(&self.s.metadata),
                                    self.name()
                                ),
                            ),
                        )
                        .await;
                }
            }
            SnapshotStep::DeleteContent(name) => {
                let api = Api::<VolumeSnapshotContent>::all(ctx.client.clone());
                // Upstream's marker first, so a sidecar knows the deletion was asked for.
                if let Some(c) = ctx.contents.get(&ObjectRef::new(&name))
                    && !o::has_annotation(&c.metadata, plan::ANN_BEING_DELETED)
                {
                    let mut c = (*c).clone();
                    o::set_annotation(&mut c.metadata, plan::ANN_BEING_DELETED, "yes");
                    match api.replace(&name, &PostParams::default(), &c).await {
                        Ok(_) => {}
                        Err(e) if is_not_found(&e) => {}
                        Err(e) => return Err(Error::api(format!("marking content {name}"))(e)),
                    }
                }
                match api.delete(&name, &Default::default()).await {
                    Ok(_) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(Error::api(format!("deleting content {name}"))(e)),
                }
                tracing::info!(content = %name, "snapshot content deleted (policy Delete)");
                return Ok(Some(Action::requeue(Duration::from_millis(200))));
            }
        }
        Ok(None)
    }
}

async fn reconcile_snapshot(s: Arc<VolumeSnapshot>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    // The cluster's snapshot-controller does this part; the controller still runs so the
    // snapshot cache tells the driver's duty which contents are in use.
    if !ctx.settings.snapshot_common {
        return Ok(Action::await_change());
    }
    let key = format!("{}/{}", o::namespace(&s.metadata), o::name(&s.metadata));
    let span = info_span!("snapshot", snapshot = %key, volume_id = tracing::field::Empty);
    async {
        let (claim, volume, content) = snapshot_world(&ctx, &s).await?;
        if let Some(h) = content
            .as_ref()
            .and_then(|c| c.spec.source.volume_handle.as_deref())
        {
            tracing::Span::current().record("volume_id", h);
        }
        let restoring = if s.metadata.deletion_timestamp.is_some() {
            restoring_claim(&ctx, &s).await?
        } else {
            None
        };
        let classes = ctx.classes();
        let mut run = SnapshotRun {
            ctx: &ctx,
            s: (*s).clone(),
            api: Api::namespaced(ctx.client.clone(), o::namespace(&s.metadata)),
        };
        // Each step changes one object; a handful covers the longest path.
        for _ in 0..6 {
            let step = plan::next_snapshot(&SnapshotInput {
                driver: &ctx.driver.name,
                snapshot: &run.s,
                claim: claim.as_ref(),
                volume: volume.as_ref(),
                classes: &classes,
                content: content.as_ref(),
                restoring: restoring.clone(),
            });
            tracing::debug!(?step, "snapshot sync");
            if let Some(action) = run.apply(step).await? {
                ctx.backoff.succeeded(&key);
                return Ok(action);
            }
        }
        ctx.backoff.succeeded(&key);
        Ok(Action::requeue(Duration::from_millis(200)))
    }
    .instrument(span)
    .await
}

// ---------------------------------------------------------------- the driver's duty

struct ContentRun<'a> {
    ctx: &'a Ctx,
    c: VolumeSnapshotContent,
    api: Api<VolumeSnapshotContent>,
}

impl ContentRun<'_> {
    fn name(&self) -> String {
        o::name(&self.c.metadata).to_owned()
    }

    async fn replace(&mut self, what: &str) -> Result<(), Error> {
        put(&self.api, &mut self.c, false, what).await
    }

    async fn write_status(&mut self, what: &str) -> Result<(), Error> {
        put(&self.api, &mut self.c, true, what).await
    }

    /// Records a failure on the content (the common controller copies it to the snapshot)
    /// and as events on both.
    async fn failed(&mut self, reason: &'static str, message: String) -> Error {
        let st = self.c.status.get_or_insert_with(Default::default);
        if error_message(st.error.as_ref()) != Some(message.as_str()) {
            st.error = Some(now_error(&message));
            st.ready_to_use.get_or_insert(false);
            if let Err(e) = self.write_status("recording the error").await {
                tracing::warn!(error = %e, "could not record the content error");
            }
        }
        self.ctx.metrics.record("snapshot", false, None);
        let note = Note::warning(reason, message.clone());
        self.ctx
            .recorder
            .publish(&self.c.object_ref(&()), &note)
            .await;
        self.ctx
            .recorder
            .publish(&snapshot_ref_of(&self.c), &note)
            .await;
        Error::Failed(message)
    }

    async fn apply(&mut self, step: ContentStep) -> Result<Option<Action>, Error> {
        let ctx = self.ctx;
        match step {
            ContentStep::Ignore => return Ok(Some(Action::await_change())),
            ContentStep::Done => return Ok(Some(Action::requeue(ctx.settings.resync))),
            ContentStep::Wait => return Ok(Some(Action::requeue(Duration::from_secs(5)))),
            ContentStep::Error(m) => return Err(self.failed("SnapshotCreationFailed", m).await),
            ContentStep::AddFinalizer => {
                self.c
                    .metadata
                    .finalizers
                    .get_or_insert_with(Vec::new)
                    .push(plan::FIN_CONTENT.to_owned());
                self.replace("adding the finalizer").await?;
            }
            ContentStep::RemoveFinalizer => {
                if let Some(f) = self.c.metadata.finalizers.as_mut() {
                    f.retain(|x| x != plan::FIN_CONTENT);
                }
                self.replace("removing the finalizer").await?;
                return Ok(Some(Action::await_change()));
            }
            ContentStep::Create(call) => {
                let started = *ctx
                    .started
                    .lock()
                    .await
                    .entry(self.name())
                    .or_insert_with(Instant::now);
                let secrets = match ctx.secrets(call.secret.as_ref()).await {
                    Ok(s) => s,
                    Err(e) => {
                        return Err(self.failed("SnapshotCreationFailed", e.to_string()).await);
                    }
                };
                let request = v1::CreateSnapshotRequest {
                    source_volume_id: call.source_volume_id.clone(),
                    name: call.name.clone(),
                    secrets,
                    parameters: call.parameters.into_iter().collect(),
                };
                let snap = match ctx.driver.create_snapshot(request).await {
                    Ok(s) => s,
                    Err(e) => {
                        return Err(self.failed("SnapshotCreationFailed", e.to_string()).await);
                    }
                };
                self.record(&snap).await?;
                if snap.ready_to_use {
                    ctx.started.lock().await.remove(&self.name());
                    ctx.metrics
                        .record("snapshot", true, Some(started.elapsed()));
                    tracing::info!(snapshot_id = %snap.snapshot_id, size = snap.size_bytes, "snapshot created and ready");
                    return Ok(Some(Action::requeue(ctx.settings.resync)));
                }
                tracing::info!(snapshot_id = %snap.snapshot_id, "snapshot created, not ready yet");
                return Ok(Some(Action::requeue(NOT_READY_POLL)));
            }
            ContentStep::Check(id) => {
                let snap = if ctx.driver.caps.list_snapshots {
                    match ctx.driver.get_snapshot(&id).await {
                        Ok(Some(s)) => s,
                        Ok(None) => {
                            return Err(self
                                .failed(
                                    "SnapshotCheckFailed",
                                    format!(
                                        "spec.source.snapshotHandle: {} has no snapshot {id:?}",
                                        ctx.driver.name
                                    ),
                                )
                                .await);
                        }
                        Err(e) => {
                            return Err(self.failed("SnapshotCheckFailed", e.to_string()).await);
                        }
                    }
                } else {
                    // Nothing to ask: the handle is taken at its word, as upstream does.
                    v1::Snapshot {
                        snapshot_id: id,
                        ready_to_use: true,
                        ..Default::default()
                    }
                };
                self.record(&snap).await?;
                return Ok(Some(Action::requeue(if snap.ready_to_use {
                    ctx.settings.resync
                } else {
                    NOT_READY_POLL
                })));
            }
            ContentStep::Delete {
                snapshot_id,
                secret,
            } => {
                let secrets = match ctx.secrets(secret.as_ref()).await {
                    Ok(s) => s,
                    Err(e) => return Err(self.failed("SnapshotDeleteError", e.to_string()).await),
                };
                if let Err(e) = ctx
                    .driver
                    .delete_snapshot(&snapshot_id, secrets.into_iter().collect())
                    .await
                {
                    return Err(self.failed("SnapshotDeleteError", e.to_string()).await);
                }
                tracing::info!(snapshot_id = %snapshot_id, "snapshot deleted on the backend");
                ctx.metrics.record("snapshot_delete", true, None);
                if let Some(f) = self.c.metadata.finalizers.as_mut() {
                    f.retain(|x| x != plan::FIN_CONTENT);
                }
                self.replace("removing the finalizer").await?;
                return Ok(Some(Action::await_change()));
            }
        }
        Ok(None)
    }

    async fn record(&mut self, snap: &v1::Snapshot) -> Result<(), Error> {
        let created = snap.creation_time.as_ref().map(|t| {
            t.seconds
                .saturating_mul(1_000_000_000)
                .saturating_add(i64::from(t.nanos))
        });
        let st = plan::content_status(
            self.c.status.as_ref(),
            &snap.snapshot_id,
            snap.size_bytes,
            created,
            snap.ready_to_use,
        );
        if self.c.status.as_ref() != Some(&st) {
            self.c.status = Some(st);
            self.write_status("recording the snapshot").await?;
        }
        Ok(())
    }
}

async fn reconcile_content(c: Arc<VolumeSnapshotContent>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if c.spec.driver != ctx.driver.name {
        return Ok(Action::await_change());
    }
    let name = o::name(&c.metadata).to_owned();
    let key = format!("content/{name}");
    let span = info_span!(
        "snapshot_content",
        content = %name,
        volume_id = tracing::field::Empty
    );
    if let Some(h) = c.spec.source.volume_handle.as_deref() {
        span.record("volume_id", h);
    }
    async {
        let snapshot = plan::snapshot_key_of(&c).and_then(|(ns, n)| {
            ctx.snapshots
                .get(&ObjectRef::new(&n).within(&ns))
                .map(|s| (*s).clone())
        });
        if ctx.settings.snapshot_common
            && plan::next_orphan(&ctx.driver.name, &c, snapshot.as_ref())
        {
            // Read again from the API: the cache may not have seen the snapshot yet.
            let live = match plan::snapshot_key_of(&c) {
                Some((ns, n)) => Api::<VolumeSnapshot>::namespaced(ctx.client.clone(), &ns)
                    .get_opt(&n)
                    .await
                    .map_err(Error::api(format!("reading snapshot {ns}/{n}")))?,
                None => None,
            };
            if plan::next_orphan(&ctx.driver.name, &c, live.as_ref()) {
                tracing::info!(
                    "the content's snapshot is gone; deleting the content (policy Delete)"
                );
                match Api::<VolumeSnapshotContent>::all(ctx.client.clone())
                    .delete(&name, &Default::default())
                    .await
                {
                    Ok(_) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(Error::api(format!("deleting content {name}"))(e)),
                }
            }
        }
        let uid = c.spec.volume_snapshot_ref.uid.as_deref();
        let snapshot_live = snapshot.as_ref().is_some_and(|s| {
            Some(o::uid(&s.metadata)) == uid && s.metadata.deletion_timestamp.is_none()
        });
        let class = c
            .spec
            .volume_snapshot_class_name
            .as_deref()
            .and_then(|n| ctx.classes.get(&ObjectRef::new(n)))
            .map(|c| (*c).clone());
        let mut run = ContentRun {
            ctx: &ctx,
            c: (*c).clone(),
            api: Api::all(ctx.client.clone()),
        };
        for _ in 0..4 {
            let step = plan::next_content(&ContentInput {
                driver: &ctx.driver.name,
                content: &run.c,
                class: class.as_ref(),
                snapshot_live,
            });
            tracing::debug!(?step, "content sync");
            if let Some(action) = run.apply(step).await? {
                ctx.backoff.succeeded(&key);
                return Ok(action);
            }
        }
        ctx.backoff.succeeded(&key);
        Ok(Action::requeue(Duration::from_millis(200)))
    }
    .instrument(span)
    .await
}

fn error_policy_snapshot(s: Arc<VolumeSnapshot>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = format!("{}/{}", o::namespace(&s.metadata), o::name(&s.metadata));
    let d = ctx.backoff.next(&key, err.is_conflict());
    tracing::warn!(snapshot = %key, error = %err, retry_in = ?d, "snapshot sync failed");
    Action::requeue(d)
}

fn error_policy_content(c: Arc<VolumeSnapshotContent>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let name = o::name(&c.metadata);
    let d = ctx
        .backoff
        .next(&format!("content/{name}"), err.is_conflict());
    tracing::warn!(content = %name, volume_id = c.spec.source.volume_handle.as_deref().unwrap_or(""), error = %err, retry_in = ?d, "content sync failed");
    Action::requeue(d)
}

/// Runs the snapshot controllers (the common one unless `settings.snapshot_common` is off,
/// and the driver's) until `shutdown` resolves.
pub async fn run(
    client: Client,
    driver: Driver,
    settings: Settings,
    metrics: Arc<Metrics>,
    host: String,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    // Said once at start: without the CRDs every watch below fails and retries quietly.
    if let Err(e) = Api::<VolumeSnapshotClass>::all(client.clone())
        .list(&ListParams::default().limit(1))
        .await
    {
        tracing::warn!(error = %e, "cannot list VolumeSnapshotClasses: are the snapshot.storage.k8s.io CRDs installed (provisioner/deploy/crds/)? The snapshot controller waits for them");
    }
    let wc = watcher::Config::default();
    let snap_api: Api<VolumeSnapshot> = Api::all(client.clone());
    let content_api: Api<VolumeSnapshotContent> = Api::all(client.clone());
    let workers = ControllerConfig::default().concurrency(settings.workers);
    let (snap_reader, snap_writer) = reflector::store::<VolumeSnapshot>();
    let snap_stream = watcher(snap_api, wc.clone())
        .default_backoff()
        .modify(o::drop_managed_fields)
        .reflect(snap_writer)
        .touched_objects();
    let (content_reader, content_writer) = reflector::store::<VolumeSnapshotContent>();
    let content_stream = watcher(content_api.clone(), wc.clone())
        .default_backoff()
        .modify(o::drop_managed_fields)
        .reflect(content_writer)
        .touched_objects();
    let (class_reader, class_writer) = reflector::store::<VolumeSnapshotClass>();
    let classes = watcher(Api::<VolumeSnapshotClass>::all(client.clone()), wc.clone())
        .default_backoff()
        .reflect(class_writer)
        .for_each(|_| async {});
    // Contents follow their snapshot's changes (deleted snapshots release them) and
    // snapshots their content's (status mirrored).
    let contents_ctl = Controller::for_stream(content_stream, content_reader)
        .with_config(workers.clone())
        .watches(
            Api::<VolumeSnapshot>::all(client.clone()),
            wc.clone(),
            |s: VolumeSnapshot| {
                s.status
                    .and_then(|st| st.bound_volume_snapshot_content_name)
                    .map(|n| ObjectRef::new(&n))
            },
        );
    let snapshots_ctl = Controller::for_stream(snap_stream, snap_reader)
        .with_config(workers)
        .watches(content_api, wc, |c: VolumeSnapshotContent| {
            plan::snapshot_key_of(&c).map(|(ns, n)| ObjectRef::new(&n).within(&ns))
        });
    let ctx = Arc::new(Ctx {
        recorder: Recorder::new(client.clone(), "stowage-provisioner", host),
        client,
        backoff: Backoff::new(settings.max_backoff),
        snapshots: snapshots_ctl.store(),
        contents: contents_ctl.store(),
        classes: class_reader,
        driver,
        settings,
        metrics,
        started: Default::default(),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let contents = contents_ctl
        .graceful_shutdown_on(stopped(stop_rx.clone()))
        .run(reconcile_content, error_policy_content, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "snapshot content controller");
            }
        });
    let snapshots = snapshots_ctl
        .graceful_shutdown_on(stopped(stop_rx))
        .run(reconcile_snapshot, error_policy_snapshot, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "snapshot controller");
            }
        });
    let controllers = async {
        tokio::join!(contents, snapshots);
    };
    tokio::pin!(controllers);
    tokio::pin!(shutdown);
    tokio::select! {
        _ = &mut controllers => {}
        _ = classes => {}
        _ = &mut shutdown => {
            let _ = stop_tx.send(true);
            // A CreateSnapshot cut in half is safe (idempotent by name, retried); waiting
            // bounds the shutdown.
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, &mut controllers).await;
            tracing::info!("snapshot controller stopped");
        }
    }
}
