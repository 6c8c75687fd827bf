//! The world of one plugin test: a sandbox, an operator config that puts
//! the VMs' cgroups under a parent of the test's own, and a reaper. VMs
//! outlive the plugin by design (they run under shims in sessions of
//! their own), so killing the plugin's process group leaves them running:
//! the reaper kills every shim and qemu that names the sandbox, and
//! removes the test's cgroups, when the test ends, pass or fail.

use std::path::PathBuf;
use std::time::Duration;

use super::alloc::AllocDir;
use super::plugin::PluginUnderTest;
use crate::agent::{Reaper, cgroup_parent};
use crate::executor::Sandbox;
use crate::proc::wait_until;

pub struct NomadEnv {
    // Fields drop in order: the VMs go before their sandbox's files.
    reaper: Reaper,
    pub sandbox: Sandbox,
    pub cgroup_parent: String,
    /// The executor.toml given to the plugin with `--config`.
    pub config: PathBuf,
}

impl NomadEnv {
    /// A sandbox for test `name` whose executor.toml holds
    /// `[agent] cgroup_parent` and then `extra_toml`.
    pub fn new(name: &str, extra_toml: &str) -> NomadEnv {
        let sandbox = Sandbox::new();
        let parent = cgroup_parent(name);
        let reaper = Reaper::new(&sandbox, &parent);
        let config = sandbox.write(
            "executor.toml",
            &format!("[agent]\ncgroup_parent = \"{parent}\"\n\n{extra_toml}"),
        );
        NomadEnv {
            reaper,
            sandbox,
            cgroup_parent: parent,
            config,
        }
    }

    /// Starts a plugin on this sandbox and config, as Nomad would.
    pub async fn start_plugin(&self) -> PluginUnderTest {
        PluginUnderTest::start(&self.sandbox, Some(&self.config)).await
    }

    /// Starts a plugin and configures it as Nomad's driver manager does:
    /// SetConfig with `config` (cty msgpack) and the client's ports, then
    /// Init.
    pub async fn start_configured(&self, config: Vec<u8>) -> PluginUnderTest {
        let plugin = self.start_plugin().await;
        super::calls::set_config(&plugin, config, Some(super::calls::nomad_config()))
            .await
            .expect("SetConfig");
        plugin
            .driver()
            .init(nomad_proto::driver::InitRequest {})
            .await
            .expect("Init");
        plugin
    }

    /// A fresh allocation directory inside the sandbox.
    pub fn alloc(&self, task_name: &str) -> AllocDir {
        let parent = self.sandbox.path().join("allocs");
        std::fs::create_dir_all(&parent).expect("allocs dir");
        AllocDir::new(&parent, task_name)
    }

    /// Shims and qemu processes started from this sandbox, alive now.
    pub fn vm_processes(&self) -> Vec<(u32, String)> {
        self.reaper.vm_processes()
    }

    /// Fails unless every shim and qemu of the sandbox is gone (within a
    /// few seconds, for a parent to reap them).
    pub fn assert_no_vm(&self) {
        let gone = wait_until(Duration::from_secs(10), || {
            self.vm_processes().is_empty().then_some(())
        });
        assert!(
            gone.is_some(),
            "VM processes outlived their task: {:?}",
            self.vm_processes()
        );
    }
}
