//! Errors as gRPC statuses the way Nomad's client reads them: only the
//! message survives (its identity checks cannot match over gRPC), and an
//! error a retry could fix carries the `RecoverableError` detail, which is
//! what makes the job's restart policy apply.

use prost::Message as _;
use tonic::{Code, Status};

use crate::launch::{Kind, LaunchError};

/// The message Nomad's own drivers use for an unknown task id.
pub const TASK_NOT_FOUND: &str = "task not found for given id";

/// `google.rpc.Status`, the envelope of status details on the wire.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// An error a later attempt may not hit: Nomad restarts the task per the
/// job's restart block.
pub fn recoverable(message: impl Into<String>) -> Status {
    let message = message.into();
    let detail = nomad_proto::structs::RecoverableError { recoverable: true };
    let envelope = RpcStatus {
        code: Code::FailedPrecondition as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: nomad_proto::handshake::RECOVERABLE_ERROR_TYPE_URL.into(),
            value: detail.encode_to_vec(),
        }],
    };
    Status::with_details(
        Code::FailedPrecondition,
        message,
        envelope.encode_to_vec().into(),
    )
}

/// The status of a launch that failed, from its kind: what Nomad's
/// restart logic may retry is recoverable.
pub fn of_launch(e: &LaunchError) -> Status {
    let message = crate::error_chain(e);
    match e.kind() {
        Kind::Invalid | Kind::Fetch { retryable: false } => Status::invalid_argument(message),
        Kind::Rejected => Status::permission_denied(message),
        Kind::Unavailable => Status::failed_precondition(message),
        Kind::Fetch { retryable: true } | Kind::Qemu => recoverable(message),
        Kind::Interrupted => {
            Status::unavailable("The plugin is shutting down; start the task on the next one")
        }
        Kind::Internal => Status::internal(message),
    }
}

pub fn not_found() -> Status {
    Status::not_found(TASK_NOT_FOUND)
}

/// Whether `status` carries the recoverable detail (what Nomad's client
/// checks).
pub fn is_recoverable(status: &Status) -> bool {
    status.code() == Code::FailedPrecondition
        && RpcStatus::decode(status.details()).is_ok_and(|s| {
            s.details.iter().any(|d| {
                d.type_url == nomad_proto::handshake::RECOVERABLE_ERROR_TYPE_URL
                    && nomad_proto::structs::RecoverableError::decode(d.value.as_slice())
                        .is_ok_and(|r| r.recoverable)
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recoverable_errors_carry_the_detail_nomad_reads() {
        let s = recoverable("Cannot fetch the image: connection refused");
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(is_recoverable(&s));
        assert!(!is_recoverable(&Status::invalid_argument("bad checksum")));
        assert_eq!(not_found().message(), TASK_NOT_FOUND);
    }

    #[test]
    fn launch_failures_map_by_kind_and_say_each_cause_once() {
        let spawn = LaunchError::Start(crate::vm::SuperviseError::Process(
            crate::qemu::process::ProcessError::Spawn {
                binary: "/usr/bin/qemu-system-x86_64".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            },
        ));
        let status = of_launch(&spawn);
        assert!(is_recoverable(&status));
        assert_eq!(
            status.message().matches("Cannot launch qemu").count(),
            1,
            "{status:?}"
        );
        let rejected = LaunchError::Rejected {
            summary: "policy image-allowlist: reject (not allowed)".into(),
            fault: false,
        };
        assert_eq!(of_launch(&rejected).code(), Code::PermissionDenied);
        assert_eq!(
            of_launch(&LaunchError::NoQemu).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            of_launch(&LaunchError::Interrupted).code(),
            Code::Unavailable
        );
    }
}
