//! The local control channel: a Unix socket (owner-only) through which an
//! update agent swaps, rolls back and inspects a running host's plugins.
//!
//! One JSON object per line each way. Requests:
//! `{"op":"swap","target":"<plugin or service>","file":"<path>"}`,
//! `{"op":"rollback","target":"…","steps":1}` (`steps` optional, default
//! 1), `{"op":"status"}`. A swap's `file` is used as given: the client
//! resolves it against its own working directory first. Replies:
//! `{"ok":true,"message":"…"}` (plus `"status"` for status) or
//! `{"ok":false,"error":"…"}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::plugin::set::PluginSet;

/// Largest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// Most control connections served at once; more are closed at once (only
/// the owner can connect, but a stuck script must not use up descriptors).
pub const MAX_CONTROL_CONNECTIONS: usize = 16;
/// A control connection that sends no request for this long is closed.
pub const CONTROL_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a tool waits for the host's answer (a swap compiles a plugin:
/// seconds on a gateway).
pub const CONTROL_REPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The default socket path, per user and never in a directory others can
/// write (where another user could listen first and take the operator's
/// swaps): `$XDG_RUNTIME_DIR/grenache-host.sock` (the login session's
/// runtime directory, mode 0700), else for root `/run/grenache-host.sock`,
/// else `control.sock` in the state directory ([`super::default_state_dir`]);
/// `None` when there is none of them (no `$HOME`).
pub fn default_path() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("XDG_RUNTIME_DIR") {
        return Some(PathBuf::from(dir).join("grenache-host.sock"));
    }
    if effective_uid() == 0 {
        return Some(PathBuf::from("/run/grenache-host.sock"));
    }
    super::default_state_dir().map(|dir| dir.join("control.sock"))
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why the control socket cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The path is unsafe: another user could serve it or could have put
    /// something there. Always fatal, even for the default path.
    #[error("{0}")]
    Unsafe(String),
    /// Another host listens there, or the socket cannot be created.
    #[error("{0}")]
    Unavailable(String),
}

/// A request on the control channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ControlRequest {
    /// Swap in `file` (an absolute path: the host's working directory is
    /// not the caller's).
    Swap {
        target: String,
        file: PathBuf,
    },
    /// Go `steps` versions back (1: the previous version).
    Rollback {
        target: String,
        #[serde(default = "one_step")]
        steps: usize,
    },
    Status,
}

fn one_step() -> usize {
    1
}

/// A reply on the control channel.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

impl ControlReply {
    fn result(result: Result<String, String>) -> Self {
        match result {
            Ok(message) => ControlReply {
                ok: true,
                message: Some(message),
                ..Default::default()
            },
            Err(error) => ControlReply {
                ok: false,
                error: Some(error),
                ..Default::default()
            },
        }
    }
}

/// The control socket's file: removed when dropped, so a host that stops
/// leaves no stale socket behind.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the socket with owner-only permissions, replacing a stale socket
/// left by a host of ours that died. Creates the default state directory
/// (mode 0700) if the path is in it and it is missing.
///
/// Errors: [`BindError::Unsafe`] when the directory is writable by group or
/// others or owned by another user (not root), or the path exists and is
/// not a socket or belongs to another user; [`BindError::Unavailable`] when
/// a live host already listens there or the socket cannot be created.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), BindError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
    let me = effective_uid();
    let unsafe_path = |why: String| {
        BindError::Unsafe(format!(
            "refusing the control socket {}: {why}; pass --control <path> in a directory only you can write, or --control off",
            path.display()
        ))
    };
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir.to_path_buf(),
        None => PathBuf::from("."),
    };
    if !dir.exists() && super::default_state_dir().is_some_and(|d| d == dir) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| BindError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
    }
    // Judge, bind and later remove the socket in the directory the path
    // really names: a symlink in it could be repointed after the checks.
    let dir = std::fs::canonicalize(&dir)
        .map_err(|e| BindError::Unavailable(format!("cannot use {}: {e}", dir.display())))?;
    let Some(name) = path.file_name() else {
        return Err(BindError::Unavailable(format!(
            "{} names no file for the socket",
            path.display()
        )));
    };
    let path = &dir.join(name);
    let dir_meta = std::fs::metadata(&dir)
        .map_err(|e| BindError::Unavailable(format!("cannot use {}: {e}", dir.display())))?;
    if dir_meta.uid() != me && dir_meta.uid() != 0 {
        return Err(unsafe_path(format!(
            "its directory {} belongs to uid {}, not to you",
            dir.display(),
            dir_meta.uid()
        )));
    }
    if dir_meta.mode() & 0o022 != 0 {
        return Err(unsafe_path(format!(
            "its directory {} is writable by other users (mode {:o}), who could listen there first",
            dir.display(),
            dir_meta.mode() & 0o7777
        )));
    }
    if let Ok(existing) = std::fs::symlink_metadata(path) {
        if !existing.file_type().is_socket() {
            return Err(unsafe_path("it exists and is not a socket".into()));
        }
        if existing.uid() != me {
            return Err(unsafe_path(format!(
                "it belongs to uid {}, not to you",
                existing.uid()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::Unavailable(format!(
                "another host already listens on the control socket {}; pass --control <path> to use another",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| {
            BindError::Unavailable(format!("cannot replace {}: {e}", path.display()))
        })?;
    }
    // With the usual umask others cannot write (so cannot connect) even
    // before the chmod below; the chmod makes it owner-only whatever the umask.
    let listener = UnixListener::bind(path).map_err(|e| {
        BindError::Unavailable(format!(
            "cannot create the control socket {}: {e}",
            path.display()
        ))
    })?;
    let file = SocketFile(path.to_path_buf());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| BindError::Unavailable(format!("cannot restrict {}: {e}", path.display())))?;
    Ok((listener, file))
}

/// Serves the control channel until dropped; dropping it ends every
/// connection it accepted.
///
/// `host` makes the JSON object (pid, RPC address, identity, session
/// counts) that heads every `status` reply, so an operator sees which host
/// answered and what it has seen so far.
///
/// At most [`MAX_CONTROL_CONNECTIONS`] at once, each closed after
/// [`CONTROL_IDLE`] without a request; swaps run one at a time (each reads
/// and compiles a whole plugin).
pub async fn serve(listener: UnixListener, plugins: Arc<PluginSet>, host: HostStatus) {
    let swaps = Arc::new(tokio::sync::Mutex::new(()));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: wait instead of spinning.
                tracing::warn!("accepting a control connection failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if connections.len() >= MAX_CONTROL_CONNECTIONS {
            tracing::debug!("control connection closed: {MAX_CONTROL_CONNECTIONS} are open");
            continue;
        }
        let (plugins, host, swaps) = (plugins.clone(), host.clone(), swaps.clone());
        connections.spawn(async move {
            if let Err(e) = serve_one(stream, &plugins, &host, &swaps).await {
                tracing::debug!("control connection: {e}");
            }
        });
    }
}

async fn serve_one(
    stream: UnixStream,
    plugins: &PluginSet,
    host: &HostStatus,
    swaps: &tokio::sync::Mutex<()>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_REQUEST as u64)).lines();
    loop {
        let line = match tokio::time::timeout(CONTROL_IDLE, lines.next_line()).await {
            Ok(line) => line?,
            Err(_) => return Ok(()), // Idle: closed.
        };
        let Some(line) = line else {
            return Ok(());
        };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<ControlRequest>(&line) {
            Err(e) => ControlReply::result(Err(format!("not a control request ({e})"))),
            Ok(ControlRequest::Status) => {
                let mut status = plugins.status();
                status["host"] = host();
                ControlReply {
                    ok: true,
                    status: Some(status),
                    ..Default::default()
                }
            }
            Ok(ControlRequest::Swap { target, file }) => {
                let _one_at_a_time = swaps.lock().await;
                ControlReply::result(plugins.swap_and_log(&target, &file).await)
            }
            Ok(ControlRequest::Rollback { target, steps }) => {
                ControlReply::result(plugins.rollback_and_log(&target, steps))
            }
        };
        let mut text = serde_json::to_string(&reply).expect("replies serialise");
        text.push('\n');
        write.write_all(text.as_bytes()).await?;
    }
}

/// Makes the `host` object of a `status` reply, at each request.
pub type HostStatus = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Largest reply line read from a host (a `status` of many plugins fits).
pub const MAX_REPLY: u64 = 4 << 20;

/// Sends one request to the host listening on `path` and returns its reply.
///
/// Errors: nobody listens there; the socket is served by another user than
/// this one or root (checked with the socket's peer credentials, so a
/// socket someone else put there first is never told a swap); the reply is
/// missing, over [`MAX_REPLY`] bytes or not JSON.
pub async fn request(path: &Path, request: &ControlRequest) -> Result<ControlReply, String> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        format!("no host answers on the control socket {} ({e}); is `grenache-host run` running, with this --control path?", path.display())
    })?;
    let server = stream
        .peer_cred()
        .map_err(|e| format!("cannot tell who serves {}: {e}", path.display()))?
        .uid();
    let me = effective_uid();
    if server != me && server != 0 {
        return Err(format!(
            "the control socket {} is served by uid {server}, not by you (uid {me}) or root: refusing to talk to it; another user may have put it there",
            path.display()
        ));
    }
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request).expect("requests serialise");
    text.push('\n');
    write
        .write_all(text.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(read.take(MAX_REPLY)).lines();
    let line = tokio::time::timeout(CONTROL_REPLY_WAIT, lines.next_line())
        .await
        .map_err(|_| {
            format!(
                "the host on {} did not answer within {}s",
                path.display(),
                CONTROL_REPLY_WAIT.as_secs()
            )
        })?
        .map_err(|e| e.to_string())?
        .ok_or(
            "the host closed the control connection without answering (or its reply was too long)",
        )?;
    serde_json::from_str(&line).map_err(|e| format!("unreadable reply from the host: {e}"))
}
