//! The Docker volume plugin protocol (HTTP POST + JSON on a unix socket): `/Plugin.Activate`
//! and `/VolumeDriver.*`. Errors travel as `{"Err": "..."}`, which Docker prints to the user.
//!
//! Bodies are parsed by hand rather than with axum's `Json` extractor: Docker sends no
//! Content-Type (only `Accept: application/vnd.docker.plugins.v1.2+json`), and List or
//! Capabilities may come with an empty body.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::Instrument;

use crate::driver::Driver;
use crate::error::DriverError;

pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NameRequest {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateRequest {
    name: String,
    #[serde(default)]
    opts: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct MountRequest {
    name: String,
    #[serde(rename = "ID", default)]
    id: String,
}

pub fn router(driver: Arc<Driver>) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/VolumeDriver.Capabilities", post(capabilities))
        .route("/VolumeDriver.Create", post(create))
        .route("/VolumeDriver.Remove", post(remove))
        .route("/VolumeDriver.Mount", post(mount))
        .route("/VolumeDriver.Unmount", post(unmount))
        .route("/VolumeDriver.Path", post(path))
        .route("/VolumeDriver.Get", post(get))
        .route("/VolumeDriver.List", post(list))
        .fallback(unknown)
        .with_state(driver)
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        body.to_string(),
    )
        .into_response()
}

/// Runs one call in a span naming the endpoint and volume, and turns its outcome into the
/// reply Docker expects: 200 with the result, or 500 with `{"Err": message}` (what the
/// reference plugin helpers send; Docker then reports `VolumeDriver.X: message`).
async fn call<T, F>(endpoint: &'static str, volume: &str, fut: F) -> Response
where
    T: Serialize,
    F: Future<Output = Result<T, DriverError>>,
{
    let span = tracing::info_span!("docker", endpoint, volume);
    let started = std::time::Instant::now();
    match fut.instrument(span.clone()).await {
        Ok(v) => {
            span.in_scope(|| {
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "{endpoint} done"
                )
            });
            reply(
                StatusCode::OK,
                serde_json::to_value(v).unwrap_or_else(|_| json!({})),
            )
        }
        Err(e) => {
            span.in_scope(|| {
                let level = e.level();
                if level == tracing::Level::WARN {
                    tracing::warn!(error = %e, "{endpoint} failed");
                } else if level == tracing::Level::INFO {
                    tracing::info!(error = %e, "{endpoint} refused");
                } else {
                    tracing::debug!(error = %e, "{endpoint} refused");
                }
            });
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({ "Err": e.to_string() }),
            )
        }
    }
}

fn parse<T: DeserializeOwned>(endpoint: &'static str, body: &Bytes) -> Result<T, DriverError> {
    serde_json::from_slice(body).map_err(|e| DriverError::BadRequest {
        endpoint,
        reason: e.to_string(),
    })
}

fn bad_request(e: DriverError) -> Response {
    reply(StatusCode::BAD_REQUEST, json!({ "Err": e.to_string() }))
}

async fn activate() -> Response {
    reply(StatusCode::OK, json!({ "Implements": ["VolumeDriver"] }))
}

async fn capabilities(State(d): State<Arc<Driver>>) -> Response {
    reply(
        StatusCode::OK,
        json!({ "Capabilities": { "Scope": d.scope() } }),
    )
}

async fn create(State(d): State<Arc<Driver>>, body: Bytes) -> Response {
    let r: CreateRequest = match parse("VolumeDriver.Create", &body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let opts = r.opts.unwrap_or_default();
    call("VolumeDriver.Create", &r.name, async {
        d.create(&r.name, &opts)
            .await
            .map(|()| json!({ "Err": "" }))
    })
    .await
}

async fn remove(State(d): State<Arc<Driver>>, body: Bytes) -> Response {
    let r: NameRequest = match parse("VolumeDriver.Remove", &body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    call("VolumeDriver.Remove", &r.name, async {
        d.remove(&r.name).await.map(|()| json!({ "Err": "" }))
    })
    .await
}

async fn mount(State(d): State<Arc<Driver>>, body: Bytes) -> Response {
    let r: MountRequest = match parse("VolumeDriver.Mount", &body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    call("VolumeDriver.Mount", &r.name, async {
        d.mount(&r.name, &r.id)
            .await
            .map(|p| json!({ "Mountpoint": p, "Err": "" }))
    })
    .await
}

async fn unmount(State(d): State<Arc<Driver>>, body: Bytes) -> Response {
    let r: MountRequest = match parse("VolumeDriver.Unmount", &body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    call("VolumeDriver.Unmount", &r.name, async {
        d.unmount(&r.name, &r.id)
            .await
            .map(|()| json!({ "Err": "" }))
    })
    .await
}

async fn path(State(d): State<Arc<Driver>>, body: Bytes) -> Response {
    let r: NameRequest = match parse("VolumeDriver.Path", &body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    call("VolumeDriver.Path", &r.name, async {
        d.path(&r.name)
            .await
            .map(|p| json!({ "Mountpoint": p, "Err": "" }))
    })
    .await
}

async fn get(State(d): State<Arc<Driver>>, body: Bytes) -> Response {
    let r: NameRequest = match parse("VolumeDriver.Get", &body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    call("VolumeDriver.Get", &r.name, async {
        d.get(&r.name)
            .await
            .map(|v| json!({ "Volume": v, "Err": "" }))
    })
    .await
}

async fn list(State(d): State<Arc<Driver>>) -> Response {
    call("VolumeDriver.List", "", async {
        d.list().await.map(|v| json!({ "Volumes": v, "Err": "" }))
    })
    .await
}

async fn unknown(uri: axum::http::Uri) -> Response {
    reply(
        StatusCode::NOT_FOUND,
        json!({ "Err": format!("{} is not part of the volume plugin API this driver serves", uri.path()) }),
    )
}
