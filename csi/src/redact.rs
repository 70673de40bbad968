//! Log-safe renderings of requests.
//!
//! The spec marks `secrets` fields with the `csi_secret` option, but prost
//! ignores custom options, so the derived `Debug` prints credentials in
//! full. [`Redact`] renders the same `Debug` output with every secret value
//! replaced by `***` (keys kept, since which credential was passed is
//! useful when debugging).
//!
//! The impls are generated from the proto descriptors by `build.rs`: every
//! message with a `secrets` map gets a redacting impl, every other
//! `*Request` a plain one, so handlers can log any request the same way.

use std::fmt;

/// What a secret value is replaced with.
pub const REDACTED: &str = "***";

/// A `Debug` rendering that never contains secret values.
pub trait Redact {
    /// The `{:?}` output with every secret value replaced by [`REDACTED`].
    fn redacted(&self) -> String;

    /// A lazy [`Display`](fmt::Display) wrapper, so that
    /// `tracing::debug!(request = %req.display_redacted())` only formats
    /// when the event is enabled.
    fn display_redacted(&self) -> DisplayRedacted<'_, Self>
    where
        Self: Sized,
    {
        DisplayRedacted(self)
    }
}

/// See [`Redact::display_redacted`].
pub struct DisplayRedacted<'a, T: Redact>(&'a T);

impl<T: Redact> fmt::Display for DisplayRedacted<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.redacted())
    }
}

impl<T: Redact> fmt::Debug for DisplayRedacted<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.redacted())
    }
}

macro_rules! secret_messages {
    ($($ty:path),* $(,)?) => {
        $(
            impl Redact for $ty {
                fn redacted(&self) -> String {
                    // A copy keeps the derived Debug layout exactly; these
                    // messages are small and only formatted when logging.
                    let mut copy = self.clone();
                    for value in copy.secrets.values_mut() {
                        *value = REDACTED.to_owned();
                    }
                    format!("{copy:?}")
                }
            }
        )*
    };
}

macro_rules! plain_requests {
    ($($ty:path),* $(,)?) => {
        $(
            impl Redact for $ty {
                fn redacted(&self) -> String {
                    format!("{self:?}")
                }
            }
        )*
    };
}

include!(concat!(env!("OUT_DIR"), "/secret_messages.rs"));
include!(concat!(env!("OUT_DIR"), "/plain_requests.rs"));

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{stowage_v1, v1};

    const SECRET: &str = "hunter2-do-not-log";

    fn secrets() -> HashMap<String, String> {
        HashMap::from([
            ("password".to_owned(), SECRET.to_owned()),
            ("userID".to_owned(), format!("admin-{SECRET}")),
        ])
    }

    fn assert_hidden(name: &str, rendered: &str) {
        assert!(!rendered.contains(SECRET), "{name} leaked: {rendered}");
        assert!(
            rendered.contains("password"),
            "{name} lost keys: {rendered}"
        );
        assert!(rendered.contains(REDACTED), "{name}: {rendered}");
    }

    /// Exercises every generated secret-bearing type, so a type the
    /// generator picks up but the macro mishandles fails here.
    #[test]
    fn every_secret_message_hides_values() {
        macro_rules! secret_messages {
            // `include!` sits in expression position here, so the
            // expansion must be a single block.
            ($($ty:path),* $(,)?) => {{
                $({
                    let mut message = <$ty>::default();
                    message.secrets = secrets();
                    let name = stringify!($ty);
                    assert!(format!("{message:?}").contains(SECRET), "{name}: Debug no longer prints secrets?");
                    assert_hidden(name, &message.redacted());
                    assert_hidden(name, &message.display_redacted().to_string());
                })*
            }};
        }
        include!(concat!(env!("OUT_DIR"), "/secret_messages.rs"));
    }

    /// The requests the spec gives secrets to, named explicitly so that a
    /// generator bug that drops one fails to compile.
    #[test]
    fn expected_types_are_covered() {
        fn has_impl<T: Redact>() {}
        has_impl::<v1::CreateVolumeRequest>();
        has_impl::<v1::DeleteVolumeRequest>();
        has_impl::<v1::ControllerPublishVolumeRequest>();
        has_impl::<v1::ControllerUnpublishVolumeRequest>();
        has_impl::<v1::ValidateVolumeCapabilitiesRequest>();
        has_impl::<v1::ListSnapshotsRequest>();
        has_impl::<v1::CreateSnapshotRequest>();
        has_impl::<v1::DeleteSnapshotRequest>();
        has_impl::<v1::GetSnapshotRequest>();
        has_impl::<v1::ControllerExpandVolumeRequest>();
        has_impl::<v1::ControllerModifyVolumeRequest>();
        has_impl::<v1::NodeStageVolumeRequest>();
        has_impl::<v1::NodePublishVolumeRequest>();
        has_impl::<v1::NodeExpandVolumeRequest>();
        has_impl::<v1::CreateVolumeGroupSnapshotRequest>();
        has_impl::<v1::DeleteVolumeGroupSnapshotRequest>();
        has_impl::<v1::GetVolumeGroupSnapshotRequest>();
        has_impl::<v1::GetMetadataAllocatedRequest>();
        has_impl::<v1::GetMetadataDeltaRequest>();
        has_impl::<stowage_v1::RecycleVolumeRequest>();
        has_impl::<stowage_v1::GetVolumeDetailsRequest>();
        // No secrets in the spec, but loggable the same way.
        has_impl::<v1::ControllerGetVolumeRequest>();
        has_impl::<v1::GetCapacityRequest>();
        has_impl::<v1::NodeUnpublishVolumeRequest>();
    }

    #[test]
    fn other_fields_survive() {
        let request = v1::NodePublishVolumeRequest {
            volume_id: "vol-1".into(),
            target_path: "/var/lib/kubelet/pods/x/mount".into(),
            secrets: secrets(),
            volume_context: HashMap::from([("share".to_owned(), "/export/a".to_owned())]),
            ..Default::default()
        };
        let rendered = request.redacted();
        assert_hidden("NodePublishVolumeRequest", &rendered);
        assert!(rendered.contains("vol-1"));
        assert!(rendered.contains("/export/a"));
        // Redaction works on a copy.
        assert_eq!(request.secrets["password"], SECRET);
    }

    #[test]
    fn stowage_requests_hide_values() {
        let request = stowage_v1::RecycleVolumeRequest {
            volume_id: "vol-2".into(),
            secrets: secrets(),
            volume_context: HashMap::new(),
        };
        assert_hidden("RecycleVolumeRequest", &request.redacted());
    }
}
