//! Generates the message types and both server and client stubs: the
//! plugin serves them, the conformance harness in `tests/` calls them.

const PROTOS: &[&str] = &[
    "proto/hashicorp/nomad/plugins/shared/hclspec/hcl_spec.proto",
    "proto/hashicorp/nomad/plugins/shared/structs/proto/attribute.proto",
    "proto/hashicorp/nomad/plugins/shared/structs/proto/recoverable_error.proto",
    "proto/hashicorp/nomad/plugins/base/proto/base.proto",
    "proto/hashicorp/nomad/plugins/drivers/proto/driver.proto",
    "proto/plugin/grpc_controller.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(PROTOS, &["proto"])?;
    Ok(())
}
