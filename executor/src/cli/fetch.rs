//! `qemu-executor fetch URL --checksum SUM`: fetch and verify one image
//! into the cache and print where it is.

use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use policy_sdk::Checksum;
use qemu_executor::fetch::Fetcher;

use super::GlobalOpts;

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Image URL: http://, https:// or file://.
    pub url: String,
    /// Expected digest: md5:HEX, sha256:HEX, sha512:HEX, or 32 bare hex
    /// digits (MD5).
    #[arg(long)]
    pub checksum: Checksum,
}

pub async fn run(args: FetchArgs, global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let config = super::load_config(global)?;
    let cache = super::open_cache(global)?;
    // The URL is the operator's own, typed on the command line: a local
    // file named here may be read, wherever it is.
    let mut fetcher = Fetcher::new(config.fetch)?;
    let named = reqwest::Url::parse(&args.url)
        .ok()
        .filter(|u| u.scheme() == "file")
        .and_then(|u| u.to_file_path().ok());
    if let Some(path) = named {
        fetcher = fetcher.granting(path);
    }
    let fetched = tokio::select! {
        fetched = fetcher.fetch(&cache, &args.url, &args.checksum) => fetched?,
        // Returning drops the download, and with it the partial file.
        signal = super::interrupted() => bail!("Interrupted by {signal}; nothing was cached"),
    };
    println!("{}", fetched.path.display());
    Ok(ExitCode::SUCCESS)
}
