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

/// The default socket path: per user, so two operators do not collide.
pub fn default_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("grenache-host.sock"),
        None => {
            let uid = std::fs::metadata("/proc/self")
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
                .unwrap_or(0);
            PathBuf::from(format!("/tmp/grenache-host-{uid}.sock"))
        }
    }
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

/// Binds the socket (replacing a stale one left by a host that died) with
/// owner-only permissions. Fails if a live host already listens there.
pub fn bind(path: &Path) -> anyhow::Result<(UnixListener, SocketFile)> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another host already listens on the control socket {}; pass --control <path> to use another",
                path.display()
            );
        }
        std::fs::remove_file(path)?;
    }
    // With the usual umask others cannot write (so cannot connect) even
    // before the chmod below; the chmod makes it owner-only whatever the umask.
    let listener = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot create the control socket {}: {e}", path.display()))?;
    let file = SocketFile(path.to_path_buf());
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok((listener, file))
}

/// Serves the control channel until dropped; dropping it ends every
/// connection it accepted.
pub async fn serve(listener: UnixListener, plugins: Arc<PluginSet>) {
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
        let plugins = plugins.clone();
        connections.spawn(async move {
            if let Err(e) = serve_one(stream, &plugins).await {
                tracing::debug!("control connection: {e}");
            }
        });
    }
}

async fn serve_one(stream: UnixStream, plugins: &PluginSet) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_REQUEST as u64)).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<ControlRequest>(&line) {
            Err(e) => ControlReply::result(Err(format!("not a control request ({e})"))),
            Ok(ControlRequest::Status) => ControlReply {
                ok: true,
                status: Some(plugins.status()),
                ..Default::default()
            },
            Ok(ControlRequest::Swap { target, file }) => {
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
    Ok(())
}

/// Sends one request to the host listening on `path` and returns its reply.
pub async fn request(path: &Path, request: &ControlRequest) -> Result<ControlReply, String> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        format!("no host answers on the control socket {} ({e}); is `grenache-host run` running, with this --control path?", path.display())
    })?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request).expect("requests serialise");
    text.push('\n');
    write
        .write_all(text.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let line = BufReader::new(read)
        .lines()
        .next_line()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the host closed the control connection without answering")?;
    serde_json::from_str(&line).map_err(|e| format!("unreadable reply from the host: {e}"))
}
