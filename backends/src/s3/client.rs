//! The S3 API side shared by controller and node: clients built from CSI secrets, error
//! mapping onto [`Error`], and the bulk operations (empty a bucket or prefix, copy a prefix).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    SharedHttpClient, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::types::{Delete, Object, ObjectIdentifier};

use super::{SECRET_ACCESS_KEY_ID, SECRET_SECRET_ACCESS_KEY, SECRET_SESSION_TOKEN, hash_hex};
use crate::error::{Error, Result};
use crate::types::Secrets;

/// Static credentials from CSI secrets. Debug never prints them.
#[derive(Clone, PartialEq, Eq)]
pub struct Creds {
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for Creds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Creds(***)")
    }
}

impl Creds {
    /// Reads `accessKeyID` and `secretAccessKey` (and optional `sessionToken`) from secrets;
    /// `which` names the secret in errors ("provisioner secret", "node-stage secret").
    pub fn from_secrets(which: &str, s: &Secrets) -> Result<Self> {
        let get = |k: &str| s.get(k).map(str::trim).filter(|v| !v.is_empty());
        let missing = |k: &str| {
            Error::invalid(
                "secrets",
                format!(
                    "{k} is missing from the {which} (S3 volumes need {SECRET_ACCESS_KEY_ID} and {SECRET_SECRET_ACCESS_KEY})"
                ),
            )
        };
        let access_key = get(SECRET_ACCESS_KEY_ID).ok_or_else(|| missing(SECRET_ACCESS_KEY_ID))?;
        let secret_key =
            get(SECRET_SECRET_ACCESS_KEY).ok_or_else(|| missing(SECRET_SECRET_ACCESS_KEY))?;
        // They end up in a mounter's credential file, one per line: no line breaks or colons.
        if access_key.contains([':', '\n', '\r', '\0']) || secret_key.contains(['\n', '\r', '\0']) {
            return Err(Error::invalid(
                "secrets",
                format!(
                    "{SECRET_ACCESS_KEY_ID} or {SECRET_SECRET_ACCESS_KEY} in the {which} contains characters no S3 key can"
                ),
            ));
        }
        Ok(Creds {
            access_key: access_key.to_owned(),
            secret_key: secret_key.to_owned(),
            session_token: get(SECRET_SESSION_TOKEN).map(str::to_owned),
        })
    }

    /// A key identifying these credentials without revealing them (client caches).
    pub fn fingerprint(&self) -> String {
        hash_hex(
            &format!(
                "{}\0{}\0{}",
                self.access_key,
                self.secret_key,
                self.session_token.as_deref().unwrap_or("")
            ),
            24,
        )
    }
}

/// How to reach one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// None = AWS's regional endpoint.
    pub url: Option<String>,
    pub region: String,
    pub path_style: bool,
    pub timeout: Duration,
}

impl Endpoint {
    /// What error messages call the endpoint.
    pub fn display(&self) -> String {
        self.url
            .clone()
            .unwrap_or_else(|| format!("AWS S3 ({})", self.region))
    }
}

/// Checks an endpoint URL: http(s), a host, no credentials or query in it.
pub fn check_endpoint_url(field: &'static str, u: &str) -> Result<()> {
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
        .ok_or_else(|| {
            Error::invalid(field, format!("{u:?} must start with http:// or https://"))
        })?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty()
        || host.contains('@')
        || u.contains(['?', '#', ' ', ',', '\n', '\0'])
        || u.len() > 512
    {
        return Err(Error::invalid(
            field,
            format!("{u:?} is not an endpoint URL such as http://rgw.example:7480"),
        ));
    }
    Ok(())
}

pub fn check_region(field: &'static str, r: &str) -> Result<()> {
    if r.is_empty()
        || r.len() > 64
        || !r
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        return Err(Error::invalid(
            field,
            format!("{r:?} is not a region name such as us-east-1"),
        ));
    }
    Ok(())
}

/// An HTTPS-capable connection pool. One per client, not per process: a pool's connections
/// belong to the Tokio runtime that opened them, and the controller keeps its clients (so
/// their pools) per set of credentials anyway.
fn http_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

pub fn build(ep: &Endpoint, creds: &Creds) -> Client {
    let mut b = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(ep.region.clone()))
        .force_path_style(ep.path_style)
        .credentials_provider(Credentials::new(
            creds.access_key.clone(),
            creds.secret_key.clone(),
            creds.session_token.clone(),
            None,
            "csi-secrets",
        ))
        // Checksums only where the API demands them: RGW and MinIO releases in the field
        // reject the newer flexible-checksum headers on ordinary PUTs.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5).min(ep.timeout))
                .operation_attempt_timeout(ep.timeout)
                .operation_timeout(ep.timeout.saturating_mul(2))
                .build(),
        )
        // Two quick retries absorb a blip; a server that is down answers Unavailable within
        // seconds and the CO retries the whole call later.
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(3)
                .with_initial_backoff(Duration::from_millis(200))
                .with_max_backoff(Duration::from_secs(2)),
        )
        .http_client(http_client());
    if let Some(u) = &ep.url {
        b = b.endpoint_url(u.clone());
    }
    Client::from_conf(b.build())
}

/// S3 error codes that mean "these credentials are wrong".
const BAD_CREDENTIALS: &[&str] = &[
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidSecurity",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
];

/// Maps an SDK error: unreachable or overloaded → Unavailable (retry later), rejected
/// credentials → InvalidArgument on `secrets`, missing bucket → NotFound; `what` says which
/// operation on what.
pub fn map_err<E>(
    what: impl fmt::Display,
    ep: &Endpoint,
    e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let epd = ep.display();
    match &e {
        SdkError::TimeoutError(_) => {
            Error::Unavailable(format!("{what}: S3 endpoint {epd} did not answer in time"))
        }
        SdkError::DispatchFailure(_) => Error::Unavailable(format!(
            "{what}: cannot reach S3 endpoint {epd}: {}",
            DisplayErrorContext(&e)
        )),
        SdkError::ResponseError(_) => Error::Unavailable(format!(
            "{what}: S3 endpoint {epd} sent an unreadable response: {}",
            DisplayErrorContext(&e)
        )),
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            let code = e.code().unwrap_or("").to_owned();
            let msg = e.message().unwrap_or("").to_owned();
            let detail = if msg.is_empty() {
                format!("{status} {code}")
            } else {
                format!("{status} {code}: {msg}")
            };
            if BAD_CREDENTIALS.contains(&code.as_str()) {
                return Error::invalid(
                    "secrets",
                    format!("{what}: S3 endpoint {epd} rejected the credentials ({code})"),
                );
            }
            match (code.as_str(), status) {
                ("AccessDenied" | "AllAccessDisabled", _) | ("", 403) => {
                    Error::FailedPrecondition(format!(
                        "{what}: S3 endpoint {epd} denied access ({detail}); check the credentials' permissions"
                    ))
                }
                ("NoSuchBucket", _) => Error::not_found("bucket", format!("{what}: {detail}")),
                ("SlowDown" | "ServiceUnavailable" | "RequestTimeout" | "InternalError", _) => {
                    Error::Unavailable(format!("{what}: S3 endpoint {epd} answered {detail}"))
                }
                (_, s) if s >= 500 => {
                    Error::Unavailable(format!("{what}: S3 endpoint {epd} answered {detail}"))
                }
                _ => Error::Internal(format!("{what}: S3 endpoint {epd} answered {detail}")),
            }
        }
        _ => Error::Internal(format!("{what}: {}", DisplayErrorContext(&e))),
    }
}

/// The S3 error code of a service error, if it is one.
pub fn code_of<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Option<&str> {
    match e {
        SdkError::ServiceError(_) => e.code(),
        _ => None,
    }
}

/// HTTP status of a service error, if it is one.
pub fn status_of<E>(e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    match e {
        SdkError::ServiceError(s) => Some(s.raw().status().as_u16()),
        _ => None,
    }
}

/// Codes with which servers refuse DeleteObjects itself (RGW/MinIO releases that demand a
/// Content-MD5 the SDK no longer sends, or gateways without the batch call).
fn batch_refused<E: ProvideErrorMetadata>(
    e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    matches!(
        code_of(e),
        Some(
            "NotImplemented"
                | "MissingContentMD5"
                | "InvalidDigest"
                | "BadDigest"
                | "InvalidRequest"
                | "MethodNotAllowed"
                | "XAmzContentChecksumMismatch"
        )
    ) || matches!(status_of(e), Some(405 | 501))
}

/// A bucket (or one prefix of it) on one endpoint, with one client.
pub struct Target<'a> {
    pub client: &'a Client,
    pub ep: &'a Endpoint,
    pub bucket: &'a str,
    /// "" = the whole bucket, else `prefix/`.
    pub prefix: &'a str,
}

impl Target<'_> {
    fn what(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    /// Whether versioning is (or was) on: then deletes must name every version.
    async fn versioned(&self) -> Result<bool> {
        let out = self
            .client
            .get_bucket_versioning()
            .bucket(self.bucket)
            .send()
            .await
            .map_err(|e| map_err(format!("GetBucketVersioning {}", self.bucket), self.ep, e))?;
        Ok(out.status().is_some())
    }

    /// Deletes every object under the target: every version and delete marker when the
    /// bucket is or was versioned, and unfinished multipart uploads. Returns how many
    /// objects (versions) went. `batch` is cleared the first time the server refuses
    /// DeleteObjects; from then on objects go one by one.
    pub async fn delete_all(&self, batch: &AtomicBool, keep: Option<&str>) -> Result<u64> {
        let mut n = 0u64;
        if self.versioned().await? {
            let mut key_marker: Option<String> = None;
            let mut vid_marker: Option<String> = None;
            loop {
                let out = self
                    .client
                    .list_object_versions()
                    .bucket(self.bucket)
                    .prefix(self.prefix)
                    .set_key_marker(key_marker.clone())
                    .set_version_id_marker(vid_marker.clone())
                    .max_keys(1000)
                    .send()
                    .await
                    .map_err(|e| {
                        map_err(format!("ListObjectVersions {}", self.what()), self.ep, e)
                    })?;
                let mut ids: Vec<(String, Option<String>)> = Vec::new();
                for v in out.versions() {
                    if let Some(k) = v.key() {
                        ids.push((k.to_owned(), v.version_id().map(str::to_owned)));
                    }
                }
                for m in out.delete_markers() {
                    if let Some(k) = m.key() {
                        ids.push((k.to_owned(), m.version_id().map(str::to_owned)));
                    }
                }
                ids.retain(|(k, _)| Some(k.as_str()) != keep);
                n += ids.len() as u64;
                self.delete_keys(ids, batch).await?;
                if out.is_truncated() != Some(true) {
                    break;
                }
                key_marker = out.next_key_marker().map(str::to_owned);
                vid_marker = out.next_version_id_marker().map(str::to_owned);
                if key_marker.is_none() {
                    break;
                }
            }
        } else {
            let mut token: Option<String> = None;
            loop {
                let (objects, next) = self.list_page(token).await?;
                let ids: Vec<(String, Option<String>)> = objects
                    .iter()
                    .filter_map(|o| o.key())
                    .filter(|k| Some(*k) != keep)
                    .map(|k| (k.to_owned(), None))
                    .collect();
                n += ids.len() as u64;
                self.delete_keys(ids, batch).await?;
                token = next;
                if token.is_none() {
                    break;
                }
            }
        }
        self.abort_uploads().await?;
        Ok(n)
    }

    async fn abort_uploads(&self) -> Result<()> {
        loop {
            let out = self
                .client
                .list_multipart_uploads()
                .bucket(self.bucket)
                .prefix(self.prefix)
                .send()
                .await
                .map_err(|e| {
                    map_err(format!("ListMultipartUploads {}", self.what()), self.ep, e)
                })?;
            let uploads = out.uploads();
            if uploads.is_empty() {
                return Ok(());
            }
            for u in uploads {
                let (Some(k), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                match self
                    .client
                    .abort_multipart_upload()
                    .bucket(self.bucket)
                    .key(k)
                    .upload_id(id)
                    .send()
                    .await
                {
                    Ok(_) => {}
                    Err(e) if code_of(&e) == Some("NoSuchUpload") => {}
                    Err(e) => {
                        return Err(map_err(format!("AbortMultipartUpload {k}"), self.ep, e));
                    }
                }
            }
            if out.is_truncated() != Some(true) {
                return Ok(());
            }
        }
    }

    /// Deletes up to any number of keys: DeleteObjects in batches of 1000 while the server
    /// accepts it, single DeleteObject calls otherwise.
    pub async fn delete_keys(
        &self,
        mut ids: Vec<(String, Option<String>)>,
        batch: &AtomicBool,
    ) -> Result<()> {
        while !ids.is_empty() {
            if batch.load(Ordering::Relaxed) && ids.len() > 1 {
                let chunk: Vec<(String, Option<String>)> =
                    ids.drain(..ids.len().min(1000)).collect();
                let objects = chunk
                    .iter()
                    .map(|(k, v)| {
                        ObjectIdentifier::builder()
                            .key(k)
                            .set_version_id(v.clone())
                            .build()
                            .map_err(|e| Error::Internal(format!("building DeleteObjects: {e}")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let del = Delete::builder()
                    .set_objects(Some(objects))
                    .quiet(true)
                    .build()
                    .map_err(|e| Error::Internal(format!("building DeleteObjects: {e}")))?;
                match self
                    .client
                    .delete_objects()
                    .bucket(self.bucket)
                    .delete(del)
                    .send()
                    .await
                {
                    Ok(out) => {
                        if let Some(err) = out.errors().first() {
                            return Err(Error::Internal(format!(
                                "DeleteObjects in {}: {} objects not deleted, first {:?}: {} {}",
                                self.what(),
                                out.errors().len(),
                                err.key().unwrap_or(""),
                                err.code().unwrap_or(""),
                                err.message().unwrap_or("")
                            )));
                        }
                        continue;
                    }
                    Err(e) if batch_refused(&e) => {
                        tracing::warn!(
                            endpoint = %self.ep.display(),
                            code = code_of(&e).unwrap_or(""),
                            "DeleteObjects refused; deleting objects one by one from now on"
                        );
                        batch.store(false, Ordering::Relaxed);
                        // Put the chunk back and take the single-delete path.
                        ids.splice(0..0, chunk);
                        continue;
                    }
                    Err(e) => {
                        return Err(map_err(
                            format!("DeleteObjects in {}", self.what()),
                            self.ep,
                            e,
                        ));
                    }
                }
            }
            let (k, v) = ids.remove(0);
            match self
                .client
                .delete_object()
                .bucket(self.bucket)
                .key(&k)
                .set_version_id(v)
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) if code_of(&e) == Some("NoSuchKey") => {}
                Err(e) => {
                    return Err(map_err(
                        format!("DeleteObject s3://{}/{k}", self.bucket),
                        self.ep,
                        e,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Server-side copy of every object under this target to `dest_prefix` in `dest_bucket`
    /// (archive: S3 has no rename; clones). Objects above 5 GiB go by multipart copy.
    pub async fn copy_all(&self, dest_bucket: &str, dest_prefix: &str) -> Result<u64> {
        let mut token: Option<String> = None;
        let mut n = 0u64;
        loop {
            let (objects, next) = self.list_page(token).await?;
            for o in &objects {
                let Some(k) = o.key() else { continue };
                let rest = k.strip_prefix(self.prefix).unwrap_or(k);
                let dest = format!("{dest_prefix}{rest}");
                let size = o.size().unwrap_or(0).max(0) as u64;
                self.copy_one(k, dest_bucket, &dest, size).await?;
                n += 1;
            }
            token = next;
            if token.is_none() {
                return Ok(n);
            }
        }
    }

    async fn copy_one(&self, src: &str, dest_bucket: &str, dest: &str, size: u64) -> Result<()> {
        const SINGLE_MAX: u64 = 5 << 30;
        const PART: u64 = 512 << 20;
        let source = format!("{}/{}", self.bucket, encode_key(src));
        let what = || {
            format!(
                "copying s3://{}/{src} to s3://{dest_bucket}/{dest}",
                self.bucket
            )
        };
        if size <= SINGLE_MAX {
            self.client
                .copy_object()
                .bucket(dest_bucket)
                .key(dest)
                .copy_source(&source)
                .send()
                .await
                .map_err(|e| map_err(what(), self.ep, e))?;
            return Ok(());
        }
        let up = self
            .client
            .create_multipart_upload()
            .bucket(dest_bucket)
            .key(dest)
            .send()
            .await
            .map_err(|e| map_err(what(), self.ep, e))?;
        let upload_id = up
            .upload_id()
            .ok_or_else(|| Error::Internal(format!("{}: no upload id", what())))?
            .to_owned();
        let res = async {
            let mut parts = Vec::new();
            let mut off = 0u64;
            let mut num = 1i32;
            while off < size {
                let end = (off + PART).min(size) - 1;
                let p = self
                    .client
                    .upload_part_copy()
                    .bucket(dest_bucket)
                    .key(dest)
                    .upload_id(&upload_id)
                    .part_number(num)
                    .copy_source(&source)
                    .copy_source_range(format!("bytes={off}-{end}"))
                    .send()
                    .await
                    .map_err(|e| map_err(what(), self.ep, e))?;
                let etag = p
                    .copy_part_result()
                    .and_then(|r| r.e_tag())
                    .unwrap_or("")
                    .to_owned();
                parts.push(
                    aws_sdk_s3::types::CompletedPart::builder()
                        .part_number(num)
                        .e_tag(etag)
                        .build(),
                );
                off = end + 1;
                num += 1;
            }
            self.client
                .complete_multipart_upload()
                .bucket(dest_bucket)
                .key(dest)
                .upload_id(&upload_id)
                .multipart_upload(
                    aws_sdk_s3::types::CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| map_err(what(), self.ep, e))?;
            Ok(())
        }
        .await;
        if res.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(dest_bucket)
                .key(dest)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        res
    }

    /// One page (up to 1000) of the objects under the target, and the token for the next
    /// page (None after the last).
    async fn list_page(&self, token: Option<String>) -> Result<(Vec<Object>, Option<String>)> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(self.bucket)
            .prefix(self.prefix)
            .set_continuation_token(token)
            .max_keys(1000)
            .send()
            .await
            .map_err(|e| map_err(format!("ListObjectsV2 {}", self.what()), self.ep, e))?;
        let next = match out.is_truncated() {
            Some(true) => out.next_continuation_token().map(str::to_owned),
            _ => None,
        };
        Ok((out.contents.unwrap_or_default(), next))
    }

    /// Bytes and objects under the target (usage: S3 has no quota to ask).
    pub async fn usage(&self) -> Result<(u64, u64)> {
        let mut token: Option<String> = None;
        let (mut bytes, mut objects) = (0u64, 0u64);
        loop {
            let (page, next) = self.list_page(token).await?;
            for o in &page {
                bytes = bytes.saturating_add(o.size().unwrap_or(0).max(0) as u64);
                objects += 1;
            }
            token = next;
            if token.is_none() {
                return Ok((bytes, objects));
            }
        }
    }
}

/// Percent-encodes an object key for x-amz-copy-source (slashes stay).
pub fn encode_key(k: &str) -> String {
    let mut out = String::with_capacity(k.len());
    for b in k.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_checked_and_never_printed() {
        let s = |kv: &[(&str, &str)]| {
            Secrets(
                kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let e =
            Creds::from_secrets("provisioner secret", &s(&[("accessKeyID", "AK")])).unwrap_err();
        assert!(e.to_string().contains("secretAccessKey"), "{e}");
        assert!(e.to_string().contains("provisioner secret"), "{e}");
        let c = Creds::from_secrets(
            "node-stage secret",
            &s(&[("accessKeyID", "AK"), ("secretAccessKey", "TOPSECRET")]),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("TOPSECRET"));
        assert!(!c.fingerprint().contains("TOPSECRET"));
        assert!(
            Creds::from_secrets("x", &s(&[("accessKeyID", "A:K"), ("secretAccessKey", "s")]))
                .is_err()
        );
    }

    #[test]
    fn endpoints_and_regions() {
        check_endpoint_url("endpoint", "http://127.0.0.1:7480").unwrap();
        check_endpoint_url("endpoint", "https://s3.example.com/").unwrap();
        for bad in [
            "ftp://x",
            "http://",
            "http://u:p@host",
            "http://h?x=1",
            "127.0.0.1:80",
            "http://a,b",
        ] {
            assert!(check_endpoint_url("endpoint", bad).is_err(), "{bad}");
        }
        check_region("region", "eu-west-1").unwrap();
        assert!(check_region("region", "").is_err());
        assert!(check_region("region", "us east").is_err());
    }

    #[test]
    fn copy_sources_are_encoded() {
        assert_eq!(encode_key("a b/ü+c.txt"), "a%20b/%C3%BC%2Bc.txt");
    }
}
