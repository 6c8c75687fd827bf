//! gRPC errors as a Nomad client reads them: the code, the message, and
//! the `RecoverableError` detail in `grpc-status-details-bin` that decides
//! whether the task's restart policy applies.

use std::fmt::Debug;

use nomad_proto::handshake::RECOVERABLE_ERROR_TYPE_URL;
use nomad_proto::structs::RecoverableError;
use prost::Message;
use tonic::{Code, Status};

/// `google.rpc.Status`, the message carried in the status details; the
/// three fields Nomad's client reads, declared here rather than pulled in
/// with a crate of Google's protos.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types::Any>,
}

/// The `RecoverableError` detail of `status`, if it has one. Panics if the
/// details are there but do not decode: Nomad would then see none.
pub fn recoverable(status: &Status) -> Option<RecoverableError> {
    if status.details().is_empty() {
        return None;
    }
    let rpc = RpcStatus::decode(status.details())
        .unwrap_or_else(|e| panic!("status details are not a google.rpc.Status ({e}): {status:?}"));
    let any = rpc
        .details
        .iter()
        .find(|a| a.type_url == RECOVERABLE_ERROR_TYPE_URL)?;
    Some(
        RecoverableError::decode(any.value.as_slice())
            .unwrap_or_else(|e| panic!("RecoverableError detail does not decode ({e})")),
    )
}

/// The error of a call that had to fail with `code`; panics with what it
/// got otherwise. `what` names the call in the failure message.
pub fn expect_code<T: Debug>(what: &str, result: Result<T, Status>, code: Code) -> Status {
    match result {
        Ok(v) => panic!("{what}: expected {code:?}, got Ok({v:?})"),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "{what}: expected {code:?}, got {:?}: {}",
                status.code(),
                status.message()
            );
            status
        }
    }
}

/// As [`expect_code`], and the message must mention each of `needles`
/// (in any case: "Checksum mismatch" mentions the checksum).
pub fn expect_error<T: Debug>(
    what: &str,
    result: Result<T, Status>,
    code: Code,
    needles: &[&str],
) -> Status {
    let status = expect_code(what, result, code);
    let message = status.message().to_lowercase();
    for needle in needles {
        assert!(
            message.contains(&needle.to_lowercase()),
            "{what}: the {code:?} message should mention {needle:?}: {}",
            status.message()
        );
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_recoverable_detail_from_status_details() {
        let detail = RpcStatus {
            code: Code::FailedPrecondition as i32,
            message: "Cannot fetch".into(),
            details: vec![prost_types::Any {
                type_url: RECOVERABLE_ERROR_TYPE_URL.into(),
                value: RecoverableError { recoverable: true }.encode_to_vec(),
            }],
        };
        let status = Status::with_details(
            Code::FailedPrecondition,
            "Cannot fetch",
            detail.encode_to_vec().into(),
        );
        assert_eq!(
            recoverable(&status),
            Some(RecoverableError { recoverable: true })
        );
        assert_eq!(recoverable(&Status::invalid_argument("checksum")), None);
        let other = RpcStatus {
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/other".into(),
                value: vec![],
            }],
            ..detail
        };
        let status = Status::with_details(Code::Internal, "x", other.encode_to_vec().into());
        assert_eq!(recoverable(&status), None);
    }
}
