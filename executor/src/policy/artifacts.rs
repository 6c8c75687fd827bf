//! The on-disk cache of compiled policies: native code that wasmtime
//! produced from a component, keyed by the sha256 of the component's bytes
//! and by the engine's compatibility hash (a new wasmtime or other engine
//! settings never read an old artifact), written atomically.

use std::fs;
use std::hash::Hasher;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::{PolicyError, cause};

pub(crate) struct ArtifactCache {
    dir: PathBuf,
    engine_hash: String,
}

/// Where a component came from, for logs and the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Cache,
    Compiled,
}

impl ArtifactCache {
    /// Opens (creating it, mode 0700) the cache directory and checks that
    /// nobody but this user can write into it: the soundness of loading
    /// compiled code from it rests on that.
    pub fn open(dir: &Path, engine: &Engine) -> Result<Self, PolicyError> {
        let io_err = |source| PolicyError::ArtifactDir {
            path: dir.to_path_buf(),
            source,
        };
        if let Some(parent) = dir.parent() {
            fs::create_dir_all(parent).map_err(io_err)?;
        }
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(e)),
        }
        let meta = fs::metadata(dir).map_err(io_err)?;
        let unsafe_dir = |problem: String| PolicyError::ArtifactDirUnsafe {
            path: dir.to_path_buf(),
            problem,
        };
        if !meta.is_dir() {
            return Err(unsafe_dir("it is not a directory".into()));
        }
        let euid = nix::unistd::geteuid().as_raw();
        if meta.uid() != euid {
            return Err(unsafe_dir(format!(
                "it belongs to uid {}, not to this user (uid {euid})",
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(unsafe_dir(format!(
                "its mode {:o} lets others write into it",
                meta.mode() & 0o7777
            )));
        }
        Ok(ArtifactCache {
            dir: dir.to_path_buf(),
            engine_hash: engine_hash(engine),
        })
    }

    pub fn path_for(&self, module_sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{module_sha256}-{}.cwasm", self.engine_hash))
    }

    /// The compiled form of `bytes` (whose sha256 is `digest`): read back
    /// from the cache, or compiled now and stored for next time.
    pub fn component(
        &self,
        engine: &Engine,
        module: &Path,
        bytes: &[u8],
        digest: &str,
    ) -> Result<(Component, Origin), PolicyError> {
        let artifact = self.path_for(digest);
        if artifact.exists() {
            // SAFETY: `deserialize_file` maps the file and runs the native
            // code in it, so it is only sound on bytes that `serialize` of
            // this wasmtime produced. This path lies in a directory that
            // `open` checked belongs to this user and is writable by nobody
            // else, and the only writer of `*.cwasm` files there is
            // `store` below, which writes what `Component::serialize` gave
            // for the component whose sha256 names the file. Files are
            // renamed into place whole, so a crash never leaves a torn one,
            // and wasmtime itself checks the header and the engine's
            // compatibility before using the code.
            match unsafe { Component::deserialize_file(engine, &artifact) } {
                Ok(component) => return Ok((component, Origin::Cache)),
                Err(err) => tracing::warn!(
                    artifact = %artifact.display(),
                    error = %err,
                    "Compiled policy unusable, compiling again"
                ),
            }
        }
        let component =
            Component::from_binary(engine, bytes).map_err(|err| PolicyError::Compile {
                path: module.to_path_buf(),
                source: cause(err),
            })?;
        let serialized = component.serialize().map_err(|err| PolicyError::Compile {
            path: module.to_path_buf(),
            source: cause(err),
        })?;
        self.store(&artifact, &serialized)?;
        Ok((component, Origin::Compiled))
    }

    /// Temp file in the same directory, fsync, rename, fsync the directory:
    /// readers see the old state or the whole new file, never part of it.
    fn store(&self, artifact: &Path, bytes: &[u8]) -> Result<(), PolicyError> {
        let err = |source| PolicyError::ArtifactWrite {
            path: artifact.to_path_buf(),
            source,
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".artifact-")
            .suffix(".tmp")
            .tempfile_in(&self.dir)
            .map_err(err)?;
        tmp.write_all(bytes).map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(artifact).map_err(|e| err(e.error))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }
}

/// Lower-case hex sha256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The engine's compatibility hash (wasmtime version, compiler settings,
/// CPU features), reduced to 16 hex digits through sha256 so that it is
/// stable across Rust releases, unlike `DefaultHasher`.
fn engine_hash(engine: &Engine) -> String {
    struct Sha256Hasher(Sha256);
    impl Hasher for Sha256Hasher {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        fn finish(&self) -> u64 {
            // Only `write` is used; the digest is read from the inner state.
            0
        }
    }
    let mut hasher = Sha256Hasher(Sha256::new());
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
    hex::encode(&hasher.0.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn directory_is_created_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/policy-artifacts");
        let engine = Engine::default();
        let cache = ArtifactCache::open(&dir, &engine).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let path = cache.path_for(&"ab".repeat(32));
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(&"ab".repeat(32)), "{name}");
        assert!(name.ends_with(".cwasm"), "{name}");
        // Same engine settings, same key.
        assert_eq!(engine_hash(&engine), engine_hash(&Engine::default()));
    }

    #[test]
    fn directory_writable_by_others_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("shared");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = ArtifactCache::open(&dir, &Engine::default())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("lets others write"), "{err}");
    }

    #[test]
    fn digest_is_lower_hex() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
