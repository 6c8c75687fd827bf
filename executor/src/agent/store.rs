//! The agent's task store: a redb database under the state directory, one
//! row per task (its [`TaskRecord`] as JSON), each change committed (and
//! synced) in its own transaction before it takes effect.
//!
//! redb lets several processes open one database, so the store also holds
//! an exclusive lock file: one agent per state directory.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::record::TaskRecord;

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// Pages redb may keep in memory; the store is small and read once at
/// start, so a small cache keeps the agent's footprint small.
const CACHE_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Cannot create the state directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Another agent uses the state directory {} (its lock {} is held)", dir.display(), lock.display())]
    Locked { dir: PathBuf, lock: PathBuf },
    #[error("Cannot lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot open the task store {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("The task store failed")]
    Db(#[from] redb::Error),
    #[error("Task {id} in the store is unreadable")]
    Corrupt {
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

macro_rules! db_err {
    ($($ty:ty),*) => {$(
        impl From<$ty> for StoreError {
            fn from(e: $ty) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The open store. Cheap to share behind an `Arc`.
pub struct Store {
    db: Database,
    path: PathBuf,
    _lock: Flock<File>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (or creates) `<dir>/agent.redb`, holding `<dir>/agent.lock`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let lock_path = dir.join("agent.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| StoreError::Lock {
                path: lock_path.clone(),
                source,
            })?;
        let lock =
            Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| StoreError::Locked {
                dir: dir.to_path_buf(),
                lock: lock_path.clone(),
            })?;
        let path = dir.join("agent.redb");
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        // Create the table up front, so reads never meet a missing one.
        let txn = db.begin_write()?;
        txn.open_table(TASKS)?;
        txn.commit()?;
        Ok(Store {
            db,
            path,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `record`, replacing the task's row; durable on return.
    pub fn put(&self, record: &TaskRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).expect("a task record serializes");
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(TASKS)?;
            table.insert(record.id.as_str(), value.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TASKS)?;
        let Some(value) = table.get(id)? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                id: id.to_string(),
                source,
            })
    }

    /// Every task, in id order. An unreadable row is reported, not fatal:
    /// one bad row must not keep the other tasks from being recovered.
    pub fn all(&self) -> Result<Vec<Result<TaskRecord, StoreError>>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TASKS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            out.push(
                serde_json::from_slice(value.value()).map_err(|source| StoreError::Corrupt {
                    id: key.value().to_string(),
                    source,
                }),
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::record::TaskState;

    fn task() -> policy_sdk::Task {
        crate::task::parse_toml(&format!(
            "name = \"web\"\nimage_source = \"http://h/x\"\nchecksum = \"{}\"\nhost_port = 1\nguest_port = 2\n",
            "0".repeat(32)
        ))
        .unwrap()
        .into_task()
        .unwrap()
    }

    #[test]
    fn rows_survive_a_reopen_and_a_second_agent_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut record = TaskRecord::new("web-abc".into(), dir.path().join("t"), task(), 1);
        store.put(&record).unwrap();
        record.state = TaskState::Ready;
        store.put(&record).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Locked { .. })
        ));
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.get("web-abc").unwrap().unwrap().state,
            TaskState::Ready
        );
        assert_eq!(store.get("nope").unwrap(), None);
        let all = store.all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].as_ref().unwrap(), &record);
    }
}
