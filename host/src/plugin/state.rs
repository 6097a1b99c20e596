//! Plugin state: each plugin's key-value store (the WIT `state` interface),
//! kept on disk under the host's state directory, and the transaction each
//! call into a plugin reads and writes through.
//!
//! A [`StateDir`] hands out one [`PluginState`] per plugin name (the file
//! name without `.wasm`/`.cwasm`, or the name of the slot a swap replaces),
//! shared by every version of that plugin, so state survives swaps; it is
//! loaded from `DIR/NAME.state` when first opened, so it survives restarts.
//! Each call gets a [`Transaction`]: its writes are buffered, seen by its own
//! later reads, and [`commit`](Transaction::commit)ted by the runtime only
//! when the call returned without trapping. A commit applies every write of
//! the call at once, in memory and on disk (written to a temporary file,
//! synced, renamed over the old file, directory synced), so the file always
//! holds the state after some whole number of calls. Commits are serialized,
//! so when two calls write one key the one that returns last wins.
//!
//! Bounds: a key is 1 to [`MAX_KEY_BYTES`] bytes; the keys plus values of a
//! plugin are at most its quota (`state_quota` in the policy, default
//! [`DEFAULT_STATE_QUOTA`]), and a plugin has at most [`MAX_KEYS`] keys,
//! so a flood of tiny entries cannot cost the host more memory than the
//! quota suggests.
//!
//! A state directory that cannot be created leaves the plugin running
//! without state (its calls fail as `unavailable`); a state file that cannot
//! be read stops the plugin from loading, so that it never runs on as if it
//! had kept nothing.
//!
//! The file (`DIR/NAME.state`) is [`FILE_MAGIC`], then per entry the key's
//! and the value's lengths (u32, little-endian) and bytes, in key order, then
//! the SHA-1 of everything before it, which tells a damaged file from a good
//! one at load. One host per state directory: two hosts sharing one would
//! overwrite each other's commits.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use crate::units::format_size;

/// Longest key, in bytes (the WIT `state` interface's limit).
pub const MAX_KEY_BYTES: usize = 256;
/// Default quota of one plugin's state: bytes of keys plus values, 1 MiB.
pub const DEFAULT_STATE_QUOTA: u64 = 1 << 20;
/// Most keys one plugin may keep, whatever its quota: bounds the host's
/// bookkeeping per entry.
pub const MAX_KEYS: usize = 65_536;
/// The first bytes of a state file (format version 1).
pub const FILE_MAGIC: &[u8; 8] = b"GHSTATE1";
/// Bytes of the SHA-1 that ends a state file.
const DIGEST_BYTES: usize = 20;

/// Why a state operation failed; mirrors the WIT `state-error` variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The write would grow the plugin's state past its quota.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// A key or value the store does not take.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The plugin has no state here.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// The host's state directory: where every plugin's state file lives, and
/// the stores opened from it.
pub struct StateDir {
    root: PathBuf,
    /// Stores in use, by plugin name; a store lives while a version of its
    /// plugin is loaded.
    open: Mutex<HashMap<String, Weak<PluginState>>>,
}

impl StateDir {
    /// The state directory at `root`; nothing is read or created until a
    /// plugin's state is opened.
    pub fn new(root: PathBuf) -> Self {
        StateDir {
            root,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The state of plugin `name` under `quota` bytes: the one already open
    /// (every version of a plugin shares it), or the one loaded from its
    /// file, or an empty one. Creates the directory (owner-only) when
    /// missing. Each error names the file or directory and the fix.
    pub fn open(&self, name: &str, quota: u64) -> Result<Arc<PluginState>, OpenError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|_, state| state.strong_count() > 0);
        if let Some(state) = open.get(name).and_then(Weak::upgrade) {
            return Ok(state);
        }
        create_dir(&self.root).map_err(|e| {
            OpenError::NoDirectory(format!(
                "cannot create the state directory {}: {e}; pass a writable one with --state-dir",
                self.root.display()
            ))
        })?;
        check_private(&self.root).map_err(OpenError::File)?;
        let file = self.root.join(format!("{name}.state"));
        let lock = lock_file(&self.root, name)?;
        let entries = read_file(&file, quota).map_err(OpenError::File)?;
        let size = entries.iter().map(|(k, v)| entry_size(k, v)).sum();
        let state = Arc::new(PluginState {
            name: name.to_string(),
            file,
            _lock: lock,
            quota,
            committed: Mutex::new(Committed {
                entries: Arc::new(entries),
                size,
            }),
        });
        open.insert(name.to_string(), Arc::downgrade(&state));
        Ok(state)
    }
}

/// Why a plugin's state could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// Its file is damaged, larger than the quota or unreadable, or another
    /// running host holds its lock: the plugin must not run on without what
    /// it kept, nor overwrite another host's.
    File(String),
    /// Another running process (a host, or an `invoke`) holds the lock file
    /// `lock` of plugin `name`'s state in `dir`; what to do depends on who
    /// asks, so the message is the caller's to write.
    Locked {
        name: String,
        dir: PathBuf,
        lock: PathBuf,
    },
    /// The state directory cannot be created: the plugin runs, and its
    /// state calls fail as `unavailable` (as the WIT says).
    NoDirectory(String),
}

/// Refuses a state directory another user could write into: one not owned
/// by this process's user, or writable by its group or others. Whoever can
/// write there can replace the state, or plant a link where the host writes
/// (as `ssh` refuses such a home directory).
fn check_private(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir)
        .map_err(|e| format!("cannot read the state directory {}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "the state directory {} belongs to user {}, not to this host's user {me}; pass a directory of your own with --state-dir",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "the state directory {} is writable by other users (mode {:o}); make it owner-only (chmod 700 {}) or pass another with --state-dir",
            dir.display(),
            meta.mode() & 0o7777,
            dir.display()
        ));
    }
    Ok(())
}

/// Takes the exclusive lock `DIR/NAME.state.lock` (an advisory `flock`,
/// released when the file closes, also when the process dies), or
/// [`OpenError::Locked`] when another process holds it.
fn lock_file(dir: &Path, name: &str) -> Result<std::fs::File, OpenError> {
    let path = dir.join(format!("{name}.state.lock"));
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| OpenError::File(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::Locked {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            lock: path,
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(OpenError::File(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

/// Creates `dir` and its parents, owner-only, unless it exists.
fn create_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// What has been kept of one plugin's state.
struct Committed {
    /// Shared with readers; replaced whole by each commit.
    entries: Arc<BTreeMap<String, Vec<u8>>>,
    /// Bytes of keys plus values.
    size: u64,
}

/// One plugin's key-value state: what its calls have kept, and its file.
pub struct PluginState {
    name: String,
    file: PathBuf,
    /// `DIR/NAME.state.lock`, locked exclusively while this store is open,
    /// so a second host on the same directory cannot overwrite it.
    _lock: std::fs::File,
    quota: u64,
    committed: Mutex<Committed>,
}

impl PluginState {
    /// Its file, `DIR/NAME.state`.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Bytes of keys plus values kept now.
    pub fn size(&self) -> u64 {
        self.lock().size
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Committed> {
        self.committed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot(&self) -> (Arc<BTreeMap<String, Vec<u8>>>, u64) {
        let committed = self.lock();
        (committed.entries.clone(), committed.size)
    }

    /// Applies `writes` (a value, or `None` to delete) at once: checks the
    /// result against the quota, writes the file, then publishes it. On
    /// any error nothing changes, in memory or on disk. Blocks on disk I/O.
    fn apply(&self, writes: &Writes) -> Result<(), String> {
        let mut committed = self.lock();
        let mut entries = (*committed.entries).clone();
        let mut size = committed.size;
        for (key, value) in writes {
            if let Some(old) = entries.remove(key) {
                size -= entry_size(key, &old);
            }
            if let Some(value) = value {
                size += entry_size(key, value);
                entries.insert(key.clone(), value.clone());
            }
        }
        // Each call checked its own writes; calls running at once may
        // together still pass the quota, and the last to return loses.
        if size > self.quota || entries.len() > MAX_KEYS {
            return Err(format!(
                "with this call's writes the state of {} would hold {} in {} keys, more than its quota of {} (at most {MAX_KEYS} keys); raise state_quota in the policy or keep less",
                self.name,
                format_size(size),
                entries.len(),
                format_size(self.quota)
            ));
        }
        write_file(&self.file, &entries)?;
        *committed = Committed {
            entries: Arc::new(entries),
            size,
        };
        Ok(())
    }
}

fn entry_size(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

/// A call's buffered writes: a value, or `None` for a delete.
type Writes = BTreeMap<String, Option<Vec<u8>>>;

/// One call's view of its plugin's state: the writes it made, over what was
/// kept when it reads.
pub enum Transaction {
    /// The plugin has no state in this call; every operation fails with
    /// this reason.
    Unavailable(String),
    /// Reads and writes of the plugin's state.
    Open {
        state: Arc<PluginState>,
        /// `None`: deleted.
        writes: Writes,
        /// Bytes the writes add to the state, as it was kept when each was
        /// made (the commit checks the quota again, exactly).
        growth: i64,
        /// Keys the writes add, counted the same way.
        added: i64,
    },
}

impl Transaction {
    /// A transaction over `state`.
    pub fn new(state: Arc<PluginState>) -> Self {
        Transaction::Open {
            state,
            writes: BTreeMap::new(),
            growth: 0,
            added: 0,
        }
    }

    #[allow(clippy::type_complexity)] // the fields of `Open`, borrowed
    fn open(&mut self) -> Result<(&PluginState, &mut Writes, &mut i64, &mut i64), StateError> {
        match self {
            Transaction::Unavailable(reason) => Err(StateError::Unavailable(reason.clone())),
            Transaction::Open {
                state,
                writes,
                growth,
                added,
            } => Ok((state, writes, growth, added)),
        }
    }

    /// The size of `key`'s entry as this call sees it: its own write, or
    /// what is kept; `None` when there is no such key.
    fn entry_before(state: &PluginState, writes: &Writes, key: &str) -> Option<u64> {
        match writes.get(key) {
            Some(written) => written.as_ref().map(|v| entry_size(key, v)),
            None => state.snapshot().0.get(key).map(|v| entry_size(key, v)),
        }
    }

    /// The value under `key`: this call's write, or what is kept now.
    pub fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        check_key(key)?;
        let (state, writes, ..) = self.open()?;
        if let Some(written) = writes.get(key) {
            return Ok(written.clone());
        }
        Ok(state.snapshot().0.get(key).cloned())
    }

    /// Buffers `value` under `key`. Fails when the state, with this call's
    /// writes, would grow past the quota.
    pub fn set(&mut self, key: &str, value: Vec<u8>) -> Result<(), StateError> {
        check_key(key)?;
        let (state, writes, growth, added) = self.open()?;
        if value.len() as u64 > state.quota {
            return Err(StateError::Invalid(format!(
                "a value of {} is larger than the state quota of {}",
                format_size(value.len() as u64),
                format_size(state.quota)
            )));
        }
        let (kept, kept_size) = state.snapshot();
        let before = Self::entry_before(state, writes, key);
        let change = entry_size(key, &value) as i64 - before.unwrap_or(0) as i64;
        let projected = kept_size as i64 + *growth + change;
        if projected > state.quota as i64 {
            return Err(StateError::QuotaExceeded(format!(
                "storing {} under {key:?} would grow the state to {}, more than its quota of {}; delete keys or raise state_quota in the policy",
                format_size(value.len() as u64),
                format_size(projected.max(0) as u64),
                format_size(state.quota)
            )));
        }
        let new_key = i64::from(before.is_none());
        if kept.len() as i64 + *added + new_key > MAX_KEYS as i64 {
            return Err(StateError::QuotaExceeded(format!(
                "the state may hold at most {MAX_KEYS} keys; delete some"
            )));
        }
        *growth += change;
        *added += new_key;
        writes.insert(key.to_string(), Some(value));
        Ok(())
    }

    /// Buffers the removal of `key`. Removing a key this call does not see
    /// records nothing, and removing one only this call wrote (not kept)
    /// drops that write rather than recording a delete, so a call's writes
    /// hold at most its kept keys plus [`MAX_KEYS`] new ones however often
    /// it sets and deletes fresh keys.
    pub fn delete(&mut self, key: &str) -> Result<(), StateError> {
        check_key(key)?;
        let (state, writes, growth, added) = self.open()?;
        let Some(before) = Self::entry_before(state, writes, key) else {
            return Ok(());
        };
        *growth -= before as i64;
        *added -= 1;
        if state.snapshot().0.contains_key(key) {
            writes.insert(key.to_string(), None);
        } else {
            writes.remove(key);
        }
        Ok(())
    }

    /// The keys starting with `prefix`, kept or written by this call and not
    /// deleted by it, in byte order.
    pub fn list_keys(&mut self, prefix: &str) -> Result<Vec<String>, StateError> {
        let (state, writes, ..) = self.open()?;
        let kept = state.snapshot().0;
        let starting = |map_keys: &mut dyn Iterator<Item = &String>| -> Vec<String> {
            map_keys
                .skip_while(|k| k.as_str() < prefix)
                .take_while(|k| k.starts_with(prefix))
                .cloned()
                .collect()
        };
        let mut keys: std::collections::BTreeSet<String> =
            starting(&mut kept.range(prefix.to_string()..).map(|(k, _)| k))
                .into_iter()
                .collect();
        for key in starting(&mut writes.range(prefix.to_string()..).map(|(k, _)| k)) {
            match writes[&key] {
                Some(_) => keys.insert(key),
                None => keys.remove(&key),
            };
        }
        Ok(keys.into_iter().collect())
    }

    /// Keeps this call's writes: applies them all at once, in memory and on
    /// disk (off the async workers). Nothing to do for a call that wrote
    /// nothing. On error (the quota, passed by calls running at once; the
    /// disk) none of them is kept.
    pub async fn commit(self) -> Result<(), String> {
        let Transaction::Open { state, writes, .. } = self else {
            return Ok(());
        };
        if writes.is_empty() {
            return Ok(());
        }
        tokio::task::spawn_blocking(move || state.apply(&writes))
            .await
            .map_err(|e| format!("the state commit stopped: {e}"))?
    }
}

fn check_key(key: &str) -> Result<(), StateError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(StateError::Invalid(format!(
            "a key must be 1 to {MAX_KEY_BYTES} bytes, not {}",
            key.len()
        )));
    }
    Ok(())
}

/// The entries of the state file at `file`; none when there is no file. A
/// damaged file, or one holding more than `quota`, is an error naming the
/// file and the fix.
fn read_file(file: &Path, quota: u64) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let bytes = match std::fs::metadata(file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => {
            return Err(format!(
                "cannot read the state file {}: {e}",
                file.display()
            ))
        }
        Ok(meta) if meta.len() > max_file_size(quota) => {
            return Err(oversized(file, meta.len(), quota));
        }
        // Only a regular file: a FIFO would block the start for ever and a
        // device (a link to /dev/zero) would be read without end.
        Ok(meta) if !meta.is_file() => {
            return Err(format!(
                "the state file {} is not a regular file; move it away to start this plugin with empty state",
                file.display()
            ))
        }
        Ok(_) => read_at_most(file, max_file_size(quota) + 1)
            .map_err(|e| format!("cannot read the state file {}: {e}", file.display()))?,
    };
    if bytes.len() as u64 > max_file_size(quota) {
        // It grew between the look and the read.
        return Err(oversized(file, bytes.len() as u64, quota));
    }
    let damaged = |why: &str| {
        format!(
            "the state file {} is damaged ({why}); move it away to start this plugin with empty state, or put back a good copy",
            file.display()
        )
    };
    let body_len = bytes
        .len()
        .checked_sub(DIGEST_BYTES)
        .filter(|&n| n >= FILE_MAGIC.len())
        .ok_or_else(|| damaged("too short"))?;
    let (body, digest) = bytes.split_at(body_len);
    if !body.starts_with(FILE_MAGIC) {
        return Err(damaged("not a grenache-host state file"));
    }
    if sha1_smol::Sha1::from(body).digest().bytes() != digest {
        return Err(damaged("its checksum does not match"));
    }
    let mut entries = BTreeMap::new();
    let mut size = 0u64;
    let mut body_rest = &body[FILE_MAGIC.len()..];
    while !body_rest.is_empty() {
        let mut field = |n: usize| -> Result<&[u8], String> {
            if body_rest.len() < n {
                return Err(damaged("truncated entry"));
            }
            let (head, tail) = body_rest.split_at(n);
            body_rest = tail;
            Ok(head)
        };
        let key_len = u32::from_le_bytes(field(4)?.try_into().expect("4 bytes")) as usize;
        let value_len = u32::from_le_bytes(field(4)?.try_into().expect("4 bytes")) as usize;
        let key = std::str::from_utf8(field(key_len)?)
            .map_err(|_| damaged("a key is not UTF-8"))?
            .to_string();
        let value = field(value_len)?.to_vec();
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(damaged("a key of a length the store does not take"));
        }
        size += entry_size(&key, &value);
        if size > quota {
            return Err(oversized(file, size, quota));
        }
        entries.insert(key, value);
        if entries.len() > MAX_KEYS {
            return Err(damaged("more keys than a plugin may keep"));
        }
    }
    Ok(entries)
}

/// The largest state file a plugin with `quota` can have written: each
/// entry costs 8 bytes of lengths on top of its key and value.
fn max_file_size(quota: u64) -> u64 {
    quota
        .saturating_add(MAX_KEYS as u64 * 8)
        .saturating_add((FILE_MAGIC.len() + DIGEST_BYTES) as u64)
}

/// The first `limit` bytes of `file`.
fn read_at_most(file: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(file)?
        .take(limit)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn oversized(file: &Path, size: u64, quota: u64) -> String {
    format!(
        "the state file {} holds more than its plugin's state_quota of {} ({}); raise state_quota for this plugin in the policy, or move the file away to start with empty state",
        file.display(),
        format_size(quota),
        format_size(size)
    )
}

/// The bytes of a state file holding `entries`.
fn encode(entries: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let mut bytes = FILE_MAGIC.to_vec();
    for (key, value) in entries {
        // Keys are at most MAX_KEY_BYTES and values at most the quota,
        // which the policy keeps below 4 GiB.
        bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(value);
    }
    let digest = sha1_smol::Sha1::from(&bytes).digest().bytes();
    bytes.extend_from_slice(&digest);
    bytes
}

/// Replaces `file` with `entries`, atomically: a temporary file beside it,
/// synced, renamed over it, and the directory synced, so that after a crash
/// the file holds either the old state or the new one. Creates the directory
/// (owner-only) when missing.
fn write_file(file: &Path, entries: &BTreeMap<String, Vec<u8>>) -> Result<(), String> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let fail = |what: &str, e: std::io::Error| {
        format!(
            "cannot {what} the state file {}: {e}; check that the state directory {} is writable (run --state-dir)",
            file.display(),
            dir.display()
        )
    };
    // Made at open; made again if removed since.
    create_dir(dir).map_err(|e| fail("create the directory of", e))?;
    let mut temporary = file.as_os_str().to_owned();
    temporary.push(".partial");
    let temporary = PathBuf::from(temporary);
    let written = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        // A fresh file, never through a link left at its name: what was
        // there (a crash's leftover) goes first.
        match std::fs::remove_file(&temporary) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        out.write_all(&encode(entries))?;
        out.sync_all()?;
        std::fs::rename(&temporary, file)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        fail("write", e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(dir: &Path, quota: u64) -> (StateDir, Arc<PluginState>) {
        let states = StateDir::new(dir.join("state"));
        let state = states.open("p", quota).unwrap();
        (states, state)
    }

    #[tokio::test]
    async fn a_transaction_reads_its_own_writes_and_commits_them_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (states, state) = state(dir.path(), 1 << 10);
        let mut txn = Transaction::new(state.clone());
        txn.set("a", b"1".to_vec()).unwrap();
        txn.set("b", b"2".to_vec()).unwrap();
        txn.delete("b").unwrap();
        assert_eq!(txn.get("a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(txn.get("b").unwrap(), None);
        // Not kept yet: another call does not see it.
        assert_eq!(Transaction::new(state.clone()).get("a").unwrap(), None);
        txn.commit().await.unwrap();
        assert_eq!(
            Transaction::new(state.clone()).get("a").unwrap(),
            Some(b"1".to_vec())
        );
        // The same store for the same name while it is open; from the file
        // once it is not.
        assert!(Arc::ptr_eq(&states.open("p", 1 << 10).unwrap(), &state));
        drop(state);
        let reopened = StateDir::new(dir.path().join("state"))
            .open("p", 1 << 10)
            .unwrap();
        assert_eq!(reopened.size(), 2);
        assert_eq!(
            Transaction::new(reopened).list_keys("").unwrap(),
            vec!["a".to_string()]
        );
    }

    #[tokio::test]
    async fn a_dropped_transaction_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_states, state) = state(dir.path(), 1 << 10);
        let mut txn = Transaction::new(state.clone());
        txn.set("a", b"1".to_vec()).unwrap();
        drop(txn);
        assert_eq!(state.size(), 0);
        assert!(!state.file().exists());
    }

    #[tokio::test]
    async fn list_keys_merges_kept_keys_with_the_calls_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (_states, state) = state(dir.path(), 1 << 10);
        let mut txn = Transaction::new(state.clone());
        for key in ["r/1", "r/2", "s/1", "r"] {
            txn.set(key, vec![0]).unwrap();
        }
        txn.commit().await.unwrap();
        let mut txn = Transaction::new(state);
        txn.delete("r/1").unwrap();
        txn.set("r/3", vec![]).unwrap();
        assert_eq!(txn.list_keys("r/").unwrap(), ["r/2", "r/3"]);
        assert_eq!(txn.list_keys("").unwrap(), ["r", "r/2", "r/3", "s/1"]);
        assert!(txn.list_keys("x").unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_quota_counts_keys_and_values_and_a_delete_makes_room() {
        let dir = tempfile::tempdir().unwrap();
        let (_states, state) = state(dir.path(), 10);
        let mut txn = Transaction::new(state.clone());
        txn.set("k", vec![0; 9]).unwrap();
        assert!(matches!(
            txn.set("j", vec![0]),
            Err(StateError::QuotaExceeded(_))
        ));
        txn.set("k", vec![0; 4]).unwrap(); // replacing shrinks
        txn.set("j", vec![0; 4]).unwrap();
        txn.commit().await.unwrap();
        let mut txn = Transaction::new(state.clone());
        assert!(matches!(
            txn.set("x", vec![0]),
            Err(StateError::QuotaExceeded(_))
        ));
        txn.delete("k").unwrap();
        txn.set("x", vec![0; 4]).unwrap();
        assert!(matches!(
            txn.set("y", vec![0; 11]),
            Err(StateError::Invalid(_))
        ));
        assert!(matches!(txn.set("", vec![]), Err(StateError::Invalid(_))));
        assert!(matches!(
            txn.get(&"k".repeat(MAX_KEY_BYTES + 1)),
            Err(StateError::Invalid(_))
        ));
        txn.commit().await.unwrap();
        assert_eq!(state.size(), 10);
    }

    #[tokio::test]
    async fn deleting_what_is_not_there_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_states, state) = state(dir.path(), 100);
        let mut txn = Transaction::new(state);
        for i in 0..1000 {
            txn.delete(&format!("missing {i}")).unwrap();
        }
        let Transaction::Open { writes, .. } = &txn else {
            unreachable!()
        };
        assert!(writes.is_empty());
    }

    #[tokio::test]
    async fn setting_and_deleting_fresh_keys_cannot_grow_a_calls_writes() {
        // A hostile plugin churns set/delete of ever new keys in one call:
        // the quota and key count are never passed, so only the writes
        // buffered in the host could grow (by a tombstone per key).
        let dir = tempfile::tempdir().unwrap();
        let (_states, state) = state(dir.path(), 1 << 10);
        let mut kept = Transaction::new(state.clone());
        kept.set("kept", vec![1]).unwrap();
        kept.commit().await.unwrap();
        let mut txn = Transaction::new(state.clone());
        for i in 0..100_000 {
            let key = format!("{i:0>200}");
            txn.set(&key, vec![0; 100]).unwrap();
            txn.delete(&key).unwrap();
        }
        txn.delete("kept").unwrap();
        assert_eq!(txn.get("kept").unwrap(), None);
        let Transaction::Open { writes, .. } = &txn else {
            unreachable!()
        };
        assert_eq!(writes.len(), 1, "only the delete of the kept key");
        txn.commit().await.unwrap();
        assert_eq!(state.size(), 0);
    }

    #[tokio::test]
    async fn a_directory_others_can_write_is_refused_and_links_are_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        match StateDir::new(root.clone()).open("p", 1 << 10) {
            Err(OpenError::File(e)) => assert!(e.contains("chmod 700"), "{e}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        // Owner-only: a link left where the commit writes its temporary
        // file is replaced, not written through.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, root.join("p.state.partial")).unwrap();
        let state = StateDir::new(root.clone()).open("p", 1 << 10).unwrap();
        let mut txn = Transaction::new(state.clone());
        txn.set("k", b"v".to_vec()).unwrap();
        txn.commit().await.unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(read_file(state.file(), 1 << 10).unwrap().len(), 1);
    }

    #[test]
    fn a_state_file_that_is_not_a_regular_file_is_refused_at_once() {
        // A FIFO would block the open for ever, a link to /dev/zero be read
        // without end: each must be an error, within a deadline.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        std::fs::create_dir(&root).unwrap();
        let fifo = root.join("fifo.state");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        std::os::unix::fs::symlink("/dev/zero", root.join("zero.state")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("dir.state")).unwrap();
        for name in ["fifo", "zero", "dir"] {
            let (tx, rx) = std::sync::mpsc::channel();
            let root = root.clone();
            std::thread::spawn(move || {
                let opened = StateDir::new(root).open(name, 1 << 10).map(|_| ());
                let _ = tx.send(opened);
            });
            match rx.recv_timeout(std::time::Duration::from_secs(10)) {
                Ok(Err(OpenError::File(e))) => {
                    assert!(e.contains("not a regular file"), "{name}: {e}")
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn calls_committing_at_once_cannot_pass_the_quota_together() {
        let dir = tempfile::tempdir().unwrap();
        let (_states, state) = state(dir.path(), 10);
        let mut first = Transaction::new(state.clone());
        let mut second = Transaction::new(state.clone());
        first.set("a", vec![0; 8]).unwrap();
        second.set("b", vec![0; 8]).unwrap();
        first.commit().await.unwrap();
        let e = second.commit().await.unwrap_err();
        assert!(e.contains("quota"), "{e}");
        assert_eq!(state.size(), 9);
    }

    #[tokio::test]
    async fn the_last_call_to_return_wins_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let (_states, state) = state(dir.path(), 100);
        let mut first = Transaction::new(state.clone());
        let mut second = Transaction::new(state.clone());
        second.set("k", b"second".to_vec()).unwrap();
        first.set("k", b"first".to_vec()).unwrap();
        second.commit().await.unwrap();
        first.commit().await.unwrap();
        assert_eq!(
            Transaction::new(state).get("k").unwrap(),
            Some(b"first".to_vec())
        );
    }

    #[test]
    fn a_directory_that_cannot_be_made_leaves_the_plugin_without_state() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("a-file");
        std::fs::write(&blocker, b"").unwrap();
        match StateDir::new(blocker.join("state")).open("p", 1 << 10) {
            Err(OpenError::NoDirectory(e)) => assert!(e.contains("--state-dir"), "{e}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_damaged_or_oversized_file_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.state");
        let mut entries = BTreeMap::new();
        entries.insert("key".to_string(), vec![7u8; 100]);
        write_file(&file, &entries).unwrap();
        assert_eq!(read_file(&file, 1 << 10).unwrap(), entries);

        let e = read_file(&file, 50).unwrap_err();
        assert!(
            e.contains(&file.display().to_string()) && e.contains("state_quota"),
            "{e}"
        );

        let mut bytes = std::fs::read(&file).unwrap();
        bytes[12] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let e = read_file(&file, 1 << 10).unwrap_err();
        assert!(e.contains("damaged") && e.contains("move it away"), "{e}");
        for garbage in [&b""[..], b"GHSTATE1", b"hello world, not state at all"] {
            std::fs::write(&file, garbage).unwrap();
            let e = read_file(&file, 1 << 10).unwrap_err();
            assert!(e.contains("damaged"), "{e}");
        }
        // A checksum over a body whose lengths lie.
        let mut body = FILE_MAGIC.to_vec();
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        let digest = sha1_smol::Sha1::from(&body).digest().bytes();
        body.extend_from_slice(&digest);
        std::fs::write(&file, &body).unwrap();
        let e = read_file(&file, 1 << 10).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
    }
}
