//! The gRPC services Nomad calls: `BasePlugin`, `Driver` and go-plugin's
//! controller. Each method is a thin translation onto [`Plugin`]; the
//! streams end when the client goes away or the plugin shuts down.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use nomad_proto::base::{
    self, ConfigSchemaRequest, ConfigSchemaResponse, PluginInfoRequest, PluginInfoResponse,
    PluginType, SetConfigRequest, SetConfigResponse,
};
use nomad_proto::driver::{self as pb, driver_server::Driver};
use nomad_proto::plugin::{self as goplugin, grpc_controller_server::GrpcController};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::plugin_config::{Configured, PluginConfig};
use super::{Plugin, attributes, events, recover, schema, start};

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The default interval of `TaskStats` when Nomad gives none.
const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Service(pub Arc<Plugin>);

#[tonic::async_trait]
impl base::base_plugin_server::BasePlugin for Service {
    async fn plugin_info(
        &self,
        _: Request<PluginInfoRequest>,
    ) -> Result<Response<PluginInfoResponse>, Status> {
        Ok(Response::new(PluginInfoResponse {
            r#type: PluginType::Driver as i32,
            plugin_api_versions: vec![nomad_proto::handshake::DRIVER_API_VERSION.into()],
            plugin_version: env!("CARGO_PKG_VERSION").into(),
            name: super::PLUGIN_NAME.into(),
        }))
    }

    async fn config_schema(
        &self,
        _: Request<ConfigSchemaRequest>,
    ) -> Result<Response<ConfigSchemaResponse>, Status> {
        Ok(Response::new(ConfigSchemaResponse {
            spec: Some(schema::plugin_schema()),
        }))
    }

    async fn set_config(
        &self,
        request: Request<SetConfigRequest>,
    ) -> Result<Response<SetConfigResponse>, Status> {
        let request = request.into_inner();
        let invalid = |e: &dyn std::error::Error| Status::invalid_argument(crate::error_chain(e));
        let config = PluginConfig::decode(&request.msgpack_config).map_err(|e| invalid(&e))?;
        let configured = Configured::build(&config, &self.0.defaults)
            .await
            .map_err(|e| invalid(&e))?;
        tracing::info!(
            policies = configured.pipeline.seam.chain.len(),
            state_dir = %configured.pipeline.state_dir.display(),
            cache_dir = %configured.pipeline.seam.cache.root().display(),
            "configured"
        );
        self.0.configure(configured);
        Ok(Response::new(SetConfigResponse {}))
    }
}

#[tonic::async_trait]
impl GrpcController for Service {
    async fn shutdown(
        &self,
        _: Request<goplugin::Empty>,
    ) -> Result<Response<goplugin::Empty>, Status> {
        tracing::info!("Nomad asked the plugin to exit; the VMs keep running");
        self.0.shutdown.cancel();
        Ok(Response::new(goplugin::Empty {}))
    }
}

#[tonic::async_trait]
impl Driver for Service {
    async fn task_config_schema(
        &self,
        _: Request<pb::TaskConfigSchemaRequest>,
    ) -> Result<Response<pb::TaskConfigSchemaResponse>, Status> {
        Ok(Response::new(pb::TaskConfigSchemaResponse {
            spec: Some(schema::task_schema()),
        }))
    }

    async fn capabilities(
        &self,
        _: Request<pb::CapabilitiesRequest>,
    ) -> Result<Response<pb::CapabilitiesResponse>, Status> {
        use pb::driver_capabilities::{FsIsolation, MountConfigs};
        use pb::network_isolation_spec::NetworkIsolationMode;
        Ok(Response::new(pb::CapabilitiesResponse {
            capabilities: Some(pb::DriverCapabilities {
                send_signals: false,
                exec: false,
                // The guest has its own disk; nothing of the host is
                // mounted into it.
                fs_isolation: FsIsolation::None as i32,
                // qemu forwards host ports itself; it does not join a
                // group's network namespace.
                network_isolation_modes: vec![NetworkIsolationMode::Host as i32],
                must_create_network: false,
                mount_configs: MountConfigs::NoMounts as i32,
                disable_log_collection: false,
                dynamic_workload_users: false,
            }),
        }))
    }

    type FingerprintStream = Stream_<pb::FingerprintResponse>;

    async fn fingerprint(
        &self,
        _: Request<pb::FingerprintRequest>,
    ) -> Result<Response<Self::FingerprintStream>, Status> {
        let plugin = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                let (facts, policies, period) = match plugin.configured() {
                    Ok(configured) => (
                        configured.pipeline.seam.probe.host_facts().await,
                        configured.pipeline.seam.chain.len(),
                        configured.fingerprint_period,
                    ),
                    Err(_) => (
                        plugin.default_probe().host_facts().await,
                        0,
                        super::plugin_config::DEFAULT_FINGERPRINT_PERIOD,
                    ),
                };
                if tx
                    .send(Ok(attributes::fingerprint(&facts, policies)))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = tx.closed() => return,
                    _ = plugin.shutdown.cancelled() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn recover_task(
        &self,
        request: Request<pb::RecoverTaskRequest>,
    ) -> Result<Response<pb::RecoverTaskResponse>, Status> {
        let handle = request
            .into_inner()
            .handle
            .ok_or_else(|| Status::invalid_argument("RecoverTask without a task handle"))?;
        recover::recover(&self.0, handle).await?;
        Ok(Response::new(pb::RecoverTaskResponse {}))
    }

    async fn start_task(
        &self,
        request: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::StartTaskResponse>, Status> {
        let config = request
            .into_inner()
            .task
            .ok_or_else(|| Status::invalid_argument("StartTask without a task"))?;
        let id = config.id.clone();
        let handle = start::start(&self.0, config).await.inspect_err(|status| {
            tracing::warn!(task = %id, code = ?status.code(), "cannot start the task: {}", status.message());
        })?;
        Ok(Response::new(pb::StartTaskResponse {
            result: pb::start_task_response::Result::Success as i32,
            driver_error_msg: String::new(),
            handle: Some(handle),
            network_override: None,
        }))
    }

    async fn wait_task(
        &self,
        request: Request<pb::WaitTaskRequest>,
    ) -> Result<Response<pb::WaitTaskResponse>, Status> {
        let task = self.0.tasks.get(&request.into_inner().task_id)?;
        let end = tokio::select! {
            end = task.ended() => end,
            // Nomad waits again on the next plugin; this call must not
            // hold up the exit.
            _ = self.0.shutdown.cancelled() => {
                return Err(Status::unavailable("the plugin is shutting down"));
            }
        };
        Ok(Response::new(pb::WaitTaskResponse {
            result: Some(end.result),
            err: end.err,
        }))
    }

    async fn stop_task(
        &self,
        request: Request<pb::StopTaskRequest>,
    ) -> Result<Response<pb::StopTaskResponse>, Status> {
        let request = request.into_inner();
        let task = self.0.tasks.get(&request.task_id)?;
        let timeout = request
            .timeout
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or_else(|| Duration::from_secs(task.state().task.kill_timeout_s.into()));
        tracing::info!(task = %request.task_id, timeout_s = timeout.as_secs_f64(), signal = %request.signal, "stopping");
        tokio::select! {
            _ = task.stop_and_wait(timeout) => {}
            _ = self.0.shutdown.cancelled() => {
                return Err(Status::unavailable("the plugin is shutting down"));
            }
        }
        Ok(Response::new(pb::StopTaskResponse {}))
    }

    async fn destroy_task(
        &self,
        request: Request<pb::DestroyTaskRequest>,
    ) -> Result<Response<pb::DestroyTaskResponse>, Status> {
        let request = request.into_inner();
        let task = self.0.tasks.get(&request.task_id)?;
        if task.end().is_none() {
            if !request.force {
                return Err(Status::failed_precondition(
                    "cannot destroy running task: stop it first, or force",
                ));
            }
            task.kill().await?;
        }
        let configured = self.0.configured()?;
        self.0.tasks.remove(&request.task_id);
        task.remove_files(&configured);
        Ok(Response::new(pb::DestroyTaskResponse {}))
    }

    async fn inspect_task(
        &self,
        request: Request<pb::InspectTaskRequest>,
    ) -> Result<Response<pb::InspectTaskResponse>, Status> {
        let task = self.0.tasks.get(&request.into_inner().task_id)?;
        let end = task.end();
        let state = task.state();
        let status = pb::TaskStatus {
            id: task.subject.task_id.clone(),
            name: task.subject.task_name.clone(),
            state: if end.is_some() {
                pb::TaskState::Exited
            } else {
                pb::TaskState::Running
            } as i32,
            started_at: Some(events::timestamp(task.started_at())),
            completed_at: Some(
                end.as_ref()
                    .map_or(events::ZERO_TIME, |e| events::timestamp(e.at)),
            ),
            result: end.map(|e| e.result),
        };
        let attributes = [
            ("pid", state.qemu.pid.to_string()),
            ("accelerator", state.accelerator.to_string()),
            ("task_dir", state.task_dir.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Ok(Response::new(pb::InspectTaskResponse {
            task: Some(status),
            driver: Some(pb::TaskDriverStatus { attributes }),
            network_override: None,
        }))
    }

    type TaskStatsStream = Stream_<pb::TaskStatsResponse>;

    async fn task_stats(
        &self,
        request: Request<pb::TaskStatsRequest>,
    ) -> Result<Response<Self::TaskStatsStream>, Status> {
        let request = request.into_inner();
        let task = self.0.tasks.get(&request.task_id)?;
        let interval = request
            .collection_interval
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_STATS_INTERVAL);
        let shutdown = self.0.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut sampler =
                super::stats::Sampler::new(task.subject.task_id.clone(), task.state().qemu.pid);
            while task.end().is_none() {
                let Some(stats) = sampler.sample() else {
                    return;
                };
                let response = pb::TaskStatsResponse { stats: Some(stats) };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = task.ended() => return,
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type TaskEventsStream = Stream_<pb::DriverTaskEvent>;

    async fn task_events(
        &self,
        _: Request<pb::TaskEventsRequest>,
    ) -> Result<Response<Self::TaskEventsStream>, Status> {
        let mut events = self.0.events.subscribe();
        let shutdown = self.0.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    e = events.recv() => e,
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                };
                match event {
                    Ok(event) => {
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "a task event reader fell behind");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn signal_task(
        &self,
        _: Request<pb::SignalTaskRequest>,
    ) -> Result<Response<pb::SignalTaskResponse>, Status> {
        Err(Status::unimplemented(
            "a VM takes no signals: stop it (ACPI power button), or use its own services",
        ))
    }

    async fn exec_task(
        &self,
        _: Request<pb::ExecTaskRequest>,
    ) -> Result<Response<pb::ExecTaskResponse>, Status> {
        Err(Status::unimplemented("exec into a VM is not supported"))
    }

    type ExecTaskStreamingStream = Stream_<pb::ExecTaskStreamingResponse>;

    async fn exec_task_streaming(
        &self,
        _: Request<tonic::Streaming<pb::ExecTaskStreamingRequest>>,
    ) -> Result<Response<Self::ExecTaskStreamingStream>, Status> {
        Err(Status::unimplemented("exec into a VM is not supported"))
    }

    async fn create_network(
        &self,
        _: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::CreateNetworkResponse>, Status> {
        Err(Status::unimplemented(
            "this driver does not create networks",
        ))
    }

    async fn destroy_network(
        &self,
        _: Request<pb::DestroyNetworkRequest>,
    ) -> Result<Response<pb::DestroyNetworkResponse>, Status> {
        Err(Status::unimplemented(
            "this driver does not create networks",
        ))
    }

    async fn init(
        &self,
        _: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        Ok(Response::new(pb::InitResponse {}))
    }

    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        // The controller's Shutdown follows; the VMs stay either way.
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}
