//! `qemu-executor nomad-plugin`: the executor as a Nomad task-driver
//! plugin. Nomad starts it with its magic cookie, reads the go-plugin
//! handshake line from its stdout, and drives it over gRPC on a Unix
//! socket (`nomad_proto` declares the protocol). Tasks run the executor's
//! pipeline (policies, cache, KVM handling) and their VMs run under shims
//! in sessions of their own, because Nomad kills driver plugins when its
//! agent stops and later hands a fresh one only the task handles.

mod attributes;
pub mod cty;
mod driver;
pub mod events;
pub mod hclog;
pub mod plugin_config;
mod recover;
pub mod schema;
mod start;
pub mod state;
mod stats;
pub mod status;
pub mod task_config;
mod tasks;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use nomad_proto::handshake::{
    APP_PROTOCOL_VERSION, CORE_PROTOCOL_VERSION, HEALTH_SERVICE, MAGIC_COOKIE_KEY,
    MAGIC_COOKIE_VALUE,
};
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub use plugin_config::{Configured, Defaults, PluginConfig};

/// The name jobs use: `driver = "qemu-executor"`. It differs from Nomad's
/// built-in `qemu` on purpose: both can be installed side by side, and a
/// job moves over by changing its driver line.
pub const PLUGIN_NAME: &str = "qemu-executor";

/// How long in-flight calls get once Nomad asked the plugin to exit;
/// Nomad kills it 2 s after asking anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum NomadError {
    #[error(
        "This is a Nomad task-driver plugin: Nomad's client starts it, it is not run by hand.\n\
         Install it in the client's plugin_dir and enable it with\n\n\
         plugin \"qemu-executor\" {{\n  args = [\"nomad-plugin\"]\n}}\n\n\
         (see the README). To run a VM without Nomad, use `qemu-executor run`."
    )]
    NotUnderNomad,
    #[error("Cannot create the plugin's socket in {}", dir.display())]
    Socket {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot write the handshake line")]
    Handshake(#[source] std::io::Error),
    #[error("The gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// Whether Nomad started us: its cookie is in the environment.
pub fn started_by_nomad() -> bool {
    std::env::var(MAGIC_COOKIE_KEY).is_ok_and(|v| v == MAGIC_COOKIE_VALUE)
}

/// The go-plugin handshake line for a Unix socket.
pub fn handshake_line(socket: &std::path::Path) -> String {
    format!(
        "{CORE_PROTOCOL_VERSION}|{APP_PROTOCOL_VERSION}|unix|{}|grpc|",
        socket.display()
    )
}

/// What the services share.
pub struct Plugin {
    pub defaults: Defaults,
    configured: RwLock<Option<Arc<Configured>>>,
    tasks: tasks::Tasks,
    events: events::Events,
    pub shutdown: CancellationToken,
}

impl Plugin {
    pub fn new(defaults: Defaults, shutdown: CancellationToken) -> Plugin {
        Plugin {
            defaults,
            configured: RwLock::new(None),
            tasks: tasks::Tasks::default(),
            events: events::Events::default(),
            shutdown,
        }
    }

    /// The configuration Nomad set last. Nomad always calls SetConfig
    /// before it uses a driver.
    fn configured(&self) -> Result<Arc<Configured>, Status> {
        self.configured
            .read()
            .expect("config poisoned")
            .clone()
            .ok_or_else(|| Status::failed_precondition("The plugin has no config yet (SetConfig)"))
    }

    fn configure(&self, configured: Configured) {
        *self.configured.write().expect("config poisoned") = Some(Arc::new(configured));
    }

    /// A probe for fingerprints before the first SetConfig.
    fn default_probe(&self) -> crate::host::probe::Probe {
        crate::host::probe::Probe::new(self.defaults.state_dir.clone())
    }
}

/// Serves the plugin until `shutdown` fires (Nomad's controller Shutdown,
/// or a signal): binds a socket in a fresh private directory, prints the
/// handshake line as the only output on stdout, and serves gRPC.
pub async fn serve(defaults: Defaults, shutdown: CancellationToken) -> Result<(), NomadError> {
    use std::io::Write as _;
    // go-plugin's hosts may name the directory (Nomad does not).
    let tmp = std::env::var_os("PLUGIN_UNIX_SOCKET_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
        .unwrap_or_else(std::env::temp_dir);
    let socket_err = |source| NomadError::Socket {
        dir: tmp.clone(),
        source,
    };
    // A 0700 directory of our own: only Nomad's user can connect.
    let dir = tempfile::Builder::new()
        .prefix("qemu-executor-plugin-")
        .tempdir_in(&tmp)
        .map_err(socket_err)?;
    let socket = dir.path().join("plugin.sock");
    let listener = tokio::net::UnixListener::bind(&socket).map_err(socket_err)?;

    let plugin = Arc::new(Plugin::new(defaults, shutdown.clone()));
    let service = driver::Service(plugin);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(HEALTH_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(
            nomad_proto::plugin::grpc_controller_server::GrpcControllerServer::new(service.clone()),
        )
        .add_service(
            nomad_proto::base::base_plugin_server::BasePluginServer::new(service.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            nomad_proto::driver::driver_server::DriverServer::new(service)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        );

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", handshake_line(&socket)).map_err(NomadError::Handshake)?;
        out.flush().map_err(NomadError::Handshake)?;
    }
    tracing::info!(socket = %socket.display(), "serving Nomad");
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = server => served.map_err(NomadError::Serve)?,
        () = grace => tracing::warn!("calls still in flight at exit"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_line_is_go_plugins() {
        assert_eq!(
            handshake_line(std::path::Path::new("/tmp/p/plugin.sock")),
            "1|2|unix|/tmp/p/plugin.sock|grpc|"
        );
    }
}
