//! A host's long-lived identity: an Ed25519 key pair, created at the first
//! start and kept in a file only its owner can read. Its public key names
//! the host (the start log, `status`, `grenache-host id`).
//!
//! The file is a secret key file as `grenache-host keygen` writes them
//! (`ed25519-secret <64 hex digits>`), so an operator may also make one with
//! `keygen` and pass it with `--identity`. Default:
//! `identity.key` in the state directory ([`super::default_state_dir`]):
//! hosts that share a state directory share an identity.
//!
//! Safety: an existing file must be a regular file owned by this user with
//! no permissions for group or others (as ssh demands of its keys), else
//! the host refuses to start and says how to fix it; a new file is created
//! owner-only (0600, its directory 0700) and put in place atomically, so
//! two hosts starting at once end up with the same key. No message ever
//! contains secret key material.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use crate::plugin::signing;
use crate::units::hex;

/// The identity file's name in the state directory.
pub const FILE_NAME: &str = "identity.key";

/// A host's key pair.
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret half.
        write!(f, "Identity({})", self.public_hex())
    }
}

/// Why the identity could not be loaded or created; messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No `--identity` and no state directory to put one in.
    #[error("no place for the host's identity: pass --identity FILE or set $STATE_DIRECTORY, $XDG_STATE_HOME or $HOME")]
    NoPlace,
    /// The file exists but is not safe to use as a secret key.
    #[error("{path}: {problem}")]
    Unsafe { path: String, problem: String },
    /// Reading, creating or parsing failed.
    #[error("{path}: {problem}")]
    Unusable { path: String, problem: String },
}

impl Identity {
    /// The key pair of `key`.
    pub fn from_key(key: SigningKey) -> Self {
        Identity { key }
    }

    /// The public key, 32 bytes.
    pub fn public(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The public key as 64 hex digits: how logs, `status` and `id` show it.
    pub fn public_hex(&self) -> String {
        hex(&self.public())
    }

    /// The signing key, for handshakes that prove the identity.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// Where the identity lives: `explicit` (`--identity`), else
    /// [`FILE_NAME`] in `state_dir` (`--state-dir`), else in the default
    /// state directory ([`super::default_state_dir`]); `None` without any.
    pub fn path(explicit: Option<&Path>, state_dir: Option<&Path>) -> Option<PathBuf> {
        explicit.map(Path::to_path_buf).or_else(|| {
            state_dir
                .map(Path::to_path_buf)
                .or_else(super::default_state_dir)
                .map(|dir| dir.join(FILE_NAME))
        })
    }

    /// Loads the identity at `path`, creating it (and its directory) if
    /// missing; `true` with a new one.
    ///
    /// Errors: a file that is not a regular file, is owned by another user
    /// or readable by group or others ([`IdentityError::Unsafe`]); one that
    /// is not a secret key file, or cannot be read or written
    /// ([`IdentityError::Unusable`]).
    pub fn load_or_create(path: &Path) -> Result<(Identity, bool), IdentityError> {
        match Self::load(path) {
            Err(IdentityError::Unusable { .. }) if !path.exists() => {}
            other => return other.map(|id| (id, false)),
        }
        let unusable = |problem: String| IdentityError::Unusable {
            path: path.display().to_string(),
            problem,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| unusable(format!("cannot create its directory: {e}")))?;
        }
        // Written whole under a temporary name, then linked into place: a
        // host starting at the same moment reads either no file or a whole
        // one, and link() never replaces a key another host put there.
        let temp = path.with_extension(format!("tmp.{:016x}", rand::random::<u64>()));
        let (secret, _public) = signing::generate();
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .and_then(|mut file| {
                file.write_all(secret.as_bytes())?;
                file.sync_all()
            });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(unusable(format!("cannot create it: {e}")));
        }
        let linked = std::fs::hard_link(&temp, path);
        let _ = std::fs::remove_file(&temp);
        match linked {
            Ok(()) => Self::load(path).map(|id| (id, true)),
            // Another host made it first: use that one.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Self::load(path).map(|id| (id, false))
            }
            Err(e) => Err(unusable(format!("cannot create it: {e}"))),
        }
    }

    /// Loads an existing identity file, checking that only its owner (this
    /// user) can read it.
    pub fn load(path: &Path) -> Result<Identity, IdentityError> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| IdentityError::Unusable {
            path: shown.clone(),
            problem: format!("cannot read it: {e}"),
        })?;
        let unsafe_because = |problem: String| IdentityError::Unsafe {
            path: shown.clone(),
            problem,
        };
        if !meta.is_file() {
            return Err(unsafe_because(
                "not a regular file; pass a secret key file (grenache-host keygen writes one)"
                    .into(),
            ));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(unsafe_because(format!(
                "owned by uid {}, not this user (uid {me}); a host uses only its own secret key",
                meta.uid()
            )));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(unsafe_because(format!(
                "readable or writable by others (mode {mode:o}); run `chmod 600 {shown}`"
            )));
        }
        // In a directory others may write, the key could be swapped.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        if let Ok(dir_meta) = std::fs::metadata(dir) {
            let dir_mode = dir_meta.permissions().mode() & 0o7777;
            if dir_mode & 0o022 != 0 {
                return Err(unsafe_because(format!(
                    "its directory {} is writable by others (mode {dir_mode:o}), who could replace the key; run `chmod go-w {}` or keep the identity elsewhere",
                    dir.display(),
                    dir.display()
                )));
            }
        }
        let text = std::fs::read_to_string(path).map_err(|e| IdentityError::Unusable {
            path: shown.clone(),
            problem: format!("cannot read it: {e}"),
        })?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let key =
            signing::parse_secret_key(&text, &name).map_err(|problem| IdentityError::Unusable {
                path: shown.clone(),
                problem,
            })?;
        Ok(Identity { key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gh-identity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_new_identity_is_created_owner_only_and_the_same_one_loads_again() {
        let dir = temp_dir("new");
        let path = dir.join("sub").join(FILE_NAME);
        let (first, created) = Identity::load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        let (again, created) = Identity::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(first.public(), again.public());
        assert_eq!(first.public_hex().len(), 64);
        assert!(!format!("{first:?}").contains(&hex(first.key.as_bytes())));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn hosts_starting_at_once_get_one_identity() {
        let dir = temp_dir("race");
        let path = dir.join(FILE_NAME);
        let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| Identity::load_or_create(&path).unwrap().0.public()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_unsafe_or_wrong_file_is_refused_without_showing_its_text() {
        let dir = temp_dir("unsafe");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        let (secret, public) = signing::generate();
        std::fs::write(&path, &secret).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(
            !err.contains(secret.split(' ').nth(1).unwrap().trim()),
            "{err}"
        );

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Identity::load(&path).is_ok());

        std::fs::write(&path, &public).unwrap();
        let err = Identity::load(&path).unwrap_err().to_string();
        assert!(err.contains("is a public key"), "{err}");

        let err = Identity::load(&dir).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");

        // A directory others may write: the key could be swapped.
        std::fs::write(&path, &secret).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = Identity::load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod go-w"), "{err}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(Identity::load(&path).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
