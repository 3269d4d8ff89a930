//! HAProxy's files on disk: written atomically, the staged set written by one function, the
//! last good version of each kept beside it.

use std::path::{Path, PathBuf};

use tracing::warn;

use crate::render::{Rendered, CERTS_DIR, EMPTY_SERVER_STATE, SERVER_STATE_FILE};

/// The directory inside `run_dir` where candidates are checked before they are installed.
pub const STAGING_DIR: &str = "staging";
/// The master's pid file, inside `run_dir`.
pub const PID_FILE: &str = "haproxy.pid";

#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Writes every file of `rendered` into `dir`, with an empty server state: the set that
/// `haproxy -c -f dir/haproxy.cfg` checks when `rendered` was rendered for `dir`.
///
/// The files are written on weft's worker threads at once (rayon's pool, one per core): each
/// is synced before it is renamed into place, and the disk takes several syncs at once about
/// as fast as one.
pub fn stage(dir: &Path, rendered: &Rendered) -> Result<(), WriteError> {
    use rayon::iter::{IntoParallelRefIterator, ParallelIterator};
    create_dir(dir)?;
    let mut files = rendered.files();
    files.push((SERVER_STATE_FILE.to_string(), EMPTY_SERVER_STATE));
    files
        .par_iter()
        .try_for_each(|(name, content)| write_atomic(&dir.join(name), content))?;
    prune_certs(dir, rendered);
    Ok(())
}

/// Removes the installed (or staged) certificates `rendered` no longer names (a removed one is
/// deleted from HAProxy at runtime, or gone after the reload): the directory holds what runs,
/// and no private key it no longer needs.
pub fn prune_certs(run_dir: &Path, rendered: &Rendered) {
    let Ok(entries) = std::fs::read_dir(run_dir.join(CERTS_DIR)) else {
        return;
    };
    let wanted = |name: &str| {
        crate::model::certs::cert_name(name).is_some_and(|cert| {
            rendered
                .tls
                .as_ref()
                .is_some_and(|tls| tls.certs.contains_key(cert))
        })
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let keep = name.to_str().is_some_and(wanted);
        if !keep && entry.file_type().is_ok_and(|t| t.is_file()) {
            if let Err(err) = std::fs::remove_file(entry.path()) {
                warn!(path = %entry.path().display(), error = %err, "cannot remove a certificate no longer served");
            }
        }
    }
}

/// Why run_dir cannot be used: whoever can write it can replace haproxy.cfg (and so run code
/// as HAProxy's user) or the claims ledger.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("cannot create run_dir {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("run_dir {path} is not a directory weft may use: {reason}")]
    Unsafe { path: PathBuf, reason: String },
    #[error("another weft ({holder}) runs on run_dir {path}: two would fight over one HAProxy")]
    Busy { path: PathBuf, holder: String },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The lock one weft holds on its run_dir while it runs (an exec or a death releases it).
pub const LOCK_FILE: &str = "weft.lock";

/// Who holds run_dir: the lock, kept for as long as weft runs.
pub type RunDirLock = nix::fcntl::Flock<std::fs::File>;

/// Takes run_dir's lock, or says which weft holds it; writes weft's pid into the lock file
/// (best effort: only for that message).
pub fn lock_run_dir(dir: &Path) -> Result<RunDirLock, RunDirError> {
    let path = dir.join(LOCK_FILE);
    let lock_err = |source| RunDirError::Lock {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(lock_err)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            use std::io::{Seek, Write};
            let _ = lock.set_len(0);
            let _ = lock.rewind();
            let _ = write!(lock, "{}", std::process::id());
            Ok(lock)
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(RunDirError::Busy {
            path: dir.to_path_buf(),
            holder: match std::fs::read_to_string(&path) {
                Ok(pid) if !pid.trim().is_empty() => format!("pid {}", pid.trim()),
                _ => "pid unknown".into(),
            },
        }),
        Err((_, errno)) => Err(lock_err(errno.into())),
    }
}

/// Makes run_dir (0750, whatever the umask) if it is missing, and checks it: a real directory
/// (not a symlink), owned by weft's user, writable by no group and no other user.
pub fn prepare_run_dir(dir: &Path) -> Result<(), RunDirError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let unsafe_dir = |reason: String| RunDirError::Unsafe {
        path: dir.to_path_buf(),
        reason,
    };
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)))
            .map_err(|source| RunDirError::Create {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|source| RunDirError::Create {
        path: dir.to_path_buf(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir(
            "it is a symlink; give the directory itself".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("it is not a directory".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(unsafe_dir(format!(
            "it is owned by uid {}, not by weft's user (uid {me}): chown it",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "its mode {mode:04o} lets a group or other users write it, and so replace \
             haproxy.cfg: chmod 750 {}",
            dir.display()
        )));
    }
    remove_stale_temporaries(dir);
    remove_stale_temporaries(&dir.join(STAGING_DIR));
    // HAProxy's workers' chroot (render::JAIL_DIR): empty, and theirs to read only.
    let jail = dir.join(crate::render::JAIL_DIR);
    if std::fs::symlink_metadata(&jail).is_err() {
        std::fs::DirBuilder::new()
            .mode(0o555)
            .create(&jail)
            .map_err(|source| RunDirError::Create {
                path: jail.clone(),
                source,
            })?;
    }
    Ok(())
}

/// The half-written files a weft killed mid-write left behind ([`write_atomic`]'s `.tmp*`):
/// never read, since only a rename installs a file, but they would pile up.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let stale = entry.file_name().to_string_lossy().starts_with(".tmp")
            && entry.file_type().is_ok_and(|t| t.is_file());
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

pub fn create_dir(dir: &Path) -> Result<(), WriteError> {
    std::fs::create_dir_all(dir).map_err(|source| WriteError {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes to a temporary file beside `path` and renames it over: readers see the old file or
/// the new one, never half of one.
pub fn write_atomic(path: &Path, content: &str) -> Result<(), WriteError> {
    let err = |source| WriteError {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.exists() {
        // `certs/` in run_dir or a staging directory.
        create_dir(dir)?;
    }
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    std::io::Write::write_all(&mut tmp, content.as_bytes()).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

/// Where the version of `path` that HAProxy last loaded successfully is kept.
pub fn last_good_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".last-good");
    path.with_file_name(name)
}

#[cfg(test)]
mod run_dir_tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn run_dir_is_made_private_and_an_open_one_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("run");
        prepare_run_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o750);

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare_run_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("mode 0777"), "{err}");

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        std::fs::write(dir.join(".tmpAbC123"), "half a config").unwrap();
        std::fs::write(dir.join("haproxy.cfg"), "kept").unwrap();
        prepare_run_dir(&dir).unwrap();
        assert!(!dir.join(".tmpAbC123").exists());
        assert!(dir.join("haproxy.cfg").exists());

        let link = base.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = prepare_run_dir(&link).unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_staged_set_is_every_file_and_an_empty_server_state() {
        let dir = tempfile::tempdir().unwrap();
        let rendered = Rendered {
            config: "global\n".into(),
            hosts_map: "a.example.com be_a\n".into(),
            paths_map: String::new(),
            wildcards_map: String::new(),
            challenges_map: None,
            tls: None,
            sections: Vec::new(),
        };
        let staging = dir.path().join(STAGING_DIR);
        stage(&staging, &rendered).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&staging)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "haproxy.cfg",
                "hosts.map",
                "paths.map",
                "server-state",
                "wildcards.map"
            ]
        );
        let read = |name: &str| std::fs::read_to_string(staging.join(name)).unwrap();
        assert_eq!(read("hosts.map"), rendered.hosts_map);
        assert_eq!(read(SERVER_STATE_FILE), EMPTY_SERVER_STATE);
        assert_eq!(
            last_good_path(&staging.join("hosts.map")),
            staging.join("hosts.map.last-good")
        );
    }
}
