//! Nomad's task-driver plugin protocol (go-plugin over gRPC), declared in
//! `proto/` from the published package names, message names and field
//! numbers: together they are the wire format, so they must match Nomad's
//! byte for byte. Modules follow the protobuf packages because gRPC method
//! paths and `Any` type URLs are built from them.

#![allow(clippy::all, missing_docs)]

pub mod hashicorp {
    pub mod nomad {
        pub mod plugins {
            pub mod base {
                pub mod proto {
                    tonic::include_proto!("hashicorp.nomad.plugins.base.proto");
                }
            }
            pub mod drivers {
                pub mod proto {
                    tonic::include_proto!("hashicorp.nomad.plugins.drivers.proto");
                }
            }
            pub mod shared {
                pub mod hclspec {
                    tonic::include_proto!("hashicorp.nomad.plugins.shared.hclspec");
                }
                pub mod structs {
                    tonic::include_proto!("hashicorp.nomad.plugins.shared.structs");
                }
            }
        }
    }
}

/// go-plugin's own services (package `plugin`).
pub mod plugin {
    tonic::include_proto!("plugin");
}

pub use hashicorp::nomad::plugins::base::proto as base;
pub use hashicorp::nomad::plugins::drivers::proto as driver;
pub use hashicorp::nomad::plugins::shared::hclspec;
pub use hashicorp::nomad::plugins::shared::structs;

/// The handshake values Nomad uses for every plugin.
pub mod handshake {
    /// The environment variable that proves the plugin was started by a
    /// Nomad client, and its value.
    pub const MAGIC_COOKIE_KEY: &str = "NOMAD_PLUGIN_MAGIC_COOKIE";
    pub const MAGIC_COOKIE_VALUE: &str =
        "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255";
    /// go-plugin's core protocol version: the first field of the line.
    pub const CORE_PROTOCOL_VERSION: u32 = 1;
    /// Nomad's plugin protocol version (gRPC): the second field.
    pub const APP_PROTOCOL_VERSION: u32 = 2;
    /// The driver API version a driver announces in `PluginInfo`.
    pub const DRIVER_API_VERSION: &str = "v0.1.0";
    /// The name of the health service go-plugin checks.
    pub const HEALTH_SERVICE: &str = "plugin";
    /// The `Any` type URL of the status detail that marks an error
    /// recoverable.
    pub const RECOVERABLE_ERROR_TYPE_URL: &str =
        "type.googleapis.com/hashicorp.nomad.plugins.shared.structs.RecoverableError";
}
