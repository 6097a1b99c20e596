//! The admin commands: `keygen` and `sign` for plugin signatures, and
//! `swap`, `rollback` and `status`, each one request on a running host's
//! control socket.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::output::{print_line, usage_error, EXIT_SERVICE_ERROR};
use crate::node::control::{self, ControlRequest};
use crate::plugin::signing;

/// `grenache-host swap | rollback | status`: one request on the control socket.
pub async fn control(socket: Option<PathBuf>, request: ControlRequest) -> ExitCode {
    let Some(path) = socket.or_else(control::default_path) else {
        return usage_error(
            "no default control socket: no $XDG_RUNTIME_DIR or $HOME; pass --control <path> as given to `run`",
        );
    };
    let reply = match control::request(&path, &request).await {
        Ok(reply) => reply,
        Err(e) => return usage_error(e),
    };
    if let Some(status) = reply.status {
        print_line(serde_json::to_string_pretty(&status).expect("status serialises"));
    }
    if let Some(message) = reply.message {
        print_line(message);
    }
    match reply.error {
        Some(error) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_SERVICE_ERROR)
        }
        None => ExitCode::SUCCESS,
    }
}

/// `grenache-host id`: prints the host's public key, creating the identity
/// (and saying so on stderr) if there is none.
pub fn id(identity: Option<&Path>, state_dir: Option<&Path>) -> ExitCode {
    let Some(path) = crate::node::identity::Identity::path(identity, state_dir) else {
        return usage_error(crate::node::identity::IdentityError::NoPlace.to_string());
    };
    match crate::node::identity::Identity::load_or_create(&path) {
        Ok((identity, created)) => {
            if created {
                eprintln!("created a new identity in {}", path.display());
            }
            print_line(format_args!("{}", identity.public_hex()));
            ExitCode::SUCCESS
        }
        Err(e) => usage_error(format!("cannot use the host's identity: {e}")),
    }
}

/// `grenache-host keygen`.
pub fn keygen(out: &Path) -> ExitCode {
    let (secret, public) = signing::generate();
    let with_ext = |ext: &str| {
        let mut name = out.as_os_str().to_owned();
        name.push(ext);
        PathBuf::from(name)
    };
    let (secret_path, public_path) = (with_ext(".secret"), with_ext(".pub"));
    for path in [&secret_path, &public_path] {
        if path.exists() {
            return usage_error(format!(
                "{} exists; refusing to overwrite a key (pick another --out)",
                path.display()
            ));
        }
    }
    let write_secret = || -> std::io::Result<()> {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(&secret_path)?.write_all(secret.as_bytes())
    };
    if let Err(e) = write_secret().and_then(|_| std::fs::write(&public_path, &public)) {
        return usage_error(format!("cannot write the key files: {e}"));
    }
    eprintln!(
        "wrote {} (keep it secret) and {}",
        secret_path.display(),
        public_path.display()
    );
    // The public key's hex, as `--trusted-key` takes it inline.
    print_line(
        public
            .trim()
            .trim_start_matches(signing::PUBLIC_LABEL)
            .trim(),
    );
    ExitCode::SUCCESS
}

/// `grenache-host sign`.
pub fn sign(plugin: &Path, key: &Path) -> ExitCode {
    let secret = match std::fs::read_to_string(key) {
        Ok(s) => s,
        Err(e) => return usage_error(format!("cannot read the secret key {}: {e}", key.display())),
    };
    let content = match std::fs::read(plugin) {
        Ok(c) => c,
        Err(e) => return usage_error(format!("cannot read {}: {e}", plugin.display())),
    };
    let name = key.to_string_lossy();
    let signature = match signing::sign(&content, &secret, &name) {
        Ok(s) => s,
        Err(e) => return usage_error(format!("{} {e}", key.display())),
    };
    let path = signing::signature_path(plugin);
    if let Err(e) = std::fs::write(&path, signature) {
        return usage_error(format!("cannot write {}: {e}", path.display()));
    }
    print_line(format_args!("wrote {}", path.display()));
    ExitCode::SUCCESS
}
