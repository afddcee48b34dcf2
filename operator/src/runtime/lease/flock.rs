//! The single-host lease: an exclusive `flock` on a file in the state
//! directory, released by the kernel if the process dies, so a crash never
//! leaves a stale lease. What `hangar run` holds without `--lease`; with a
//! distributed lease it still keeps two operators on one host from sharing
//! a state directory.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("another hangar (pid {holder}) already runs for owner `{owner}` (lease {})", path.display())]
    Held {
        owner: String,
        holder: String,
        path: PathBuf,
    },
    #[error("lease {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held for as long as the value lives.
#[derive(Debug)]
pub struct Lease {
    _file: File,
    path: PathBuf,
}

impl Lease {
    pub fn acquire(state_dir: &Path, owner: &str) -> Result<Lease, LeaseError> {
        let path = state_dir.join(format!("lease-{owner}.lock"));
        let io = |source| LeaseError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(LeaseError::Held {
                    owner: owner.to_string(),
                    holder: holder.trim().to_string(),
                    path,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Lease { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = Lease::acquire(dir.path(), "prod").unwrap();
        let err = Lease::acquire(dir.path(), "prod").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("owner `prod`"), "{msg}");
        assert!(
            msg.contains(&std::process::id().to_string()),
            "names the holder: {msg}"
        );
        // Another owner id is independent.
        let _other = Lease::acquire(dir.path(), "staging").unwrap();
        drop(first);
        Lease::acquire(dir.path(), "prod").unwrap();
    }
}
