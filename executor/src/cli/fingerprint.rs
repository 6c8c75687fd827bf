//! `qemu-executor fingerprint [--json]`

use std::process::ExitCode;

use clap::Args;
use qemu_executor::host::probe::Probe;
use qemu_executor::host::verdict;

use super::GlobalOpts;

#[derive(Debug, Args)]
pub struct FingerprintArgs {
    /// Print one JSON object (the host facts policies receive).
    #[arg(long)]
    pub json: bool,
    /// Forget that a guest found KVM unusable (after fixing the host).
    #[arg(long)]
    pub forget_kvm_verdict: bool,
}

pub async fn run(args: FingerprintArgs, global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let state_dir = global.state_dir();
    if args.forget_kvm_verdict && verdict::forget(&state_dir)? {
        tracing::info!("forgot the recorded KVM verdict");
    }
    let facts = Probe::new(state_dir).host_facts().await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&facts)?);
    } else {
        let value = serde_json::to_value(&facts)?;
        for (key, value) in value.as_object().into_iter().flatten() {
            let shown = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("{key} = {shown}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
