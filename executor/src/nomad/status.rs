//! Errors as gRPC statuses the way Nomad's client reads them: only the
//! message survives (its identity checks cannot match over gRPC), and an
//! error a retry could fix carries the `RecoverableError` detail, which is
//! what makes the job's restart policy apply.

use prost::Message as _;
use tonic::{Code, Status};

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
}
