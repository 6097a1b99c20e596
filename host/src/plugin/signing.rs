//! Signed plugins: an operator signs each plugin file with an Ed25519 key,
//! and a host started with `--trusted-key` loads only files whose detached
//! signature (`<plugin>.wasm.sig`) verifies under one of its trusted keys.
//!
//! Files are plain text so they can be read, copied and diffed:
//! - secret key: `ed25519-secret <32-byte seed in hex>` (owner-only
//!   permissions);
//! - public key: `ed25519-public <32-byte key in hex>`;
//! - signature: `ed25519 <public key hex> <signature hex>`, naming the signer
//!   so a refusal can say which key signed and which keys were expected.
//!
//! The labels keep the two keys from being swapped: `--trusted-key` refuses
//! a secret key (which would otherwise parse as a public key, both being 32
//! bytes, and later show up in messages) and `sign` refuses a public key.
//! Key files from before the labels (bare hex) are told apart by their
//! `.secret` / `.pub` file names. No message ever contains secret key
//! material: errors about a key file name the file, never its text.
//!
//! The signature covers the exact bytes the runtime compiles: the runtime
//! verifies after reading the file once, never a second read.
//!
//! How it fits: a [`Runtime`](super::Runtime) given keys with
//! [`require_signatures`](super::Runtime::require_signatures) calls
//! [`verify`] on every file it loads (swaps included) and refuses the file
//! with a [`SignatureError`]; the `keygen` and `sign` commands use
//! [`generate`], [`sign`] and [`signature_path`]. Only files and bytes here:
//! no wasm, no network.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// Suffix of the detached signature file.
pub const SIGNATURE_SUFFIX: &str = ".sig";

/// A key an operator trusts to sign plugins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey(VerifyingKey);

impl TrustedKey {
    /// The Ed25519 public key.
    pub fn key(&self) -> VerifyingKey {
        self.0
    }

    /// The key as hex, the form the files use.
    pub fn to_hex(&self) -> String {
        to_hex(self.0.as_bytes())
    }

    /// The first 16 hex digits of the key and `…`: how messages name a
    /// trusted key. Enough to tell keys apart, and never a whole secret
    /// seed when an operator passed one as bare hex by mistake (a seed and
    /// a public key are both 32 bytes; about half of all seeds also parse
    /// as a public key).
    pub fn short(&self) -> String {
        format!("{}…", &self.to_hex()[..16])
    }
}

/// Why a plugin's signature was not accepted; messages end with what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No readable signature file next to the plugin.
    #[error("not signed (no {sig}); sign it with `grenache-host sign {plugin} --key <secret key>` using a key the host trusts ({expected})")]
    Unsigned {
        /// The plugin file.
        plugin: String,
        /// The signature file that was looked for.
        sig: String,
        /// The trusted keys, [short](TrustedKey::short), joined with " or ".
        expected: String,
    },
    /// A well-formed signature by a key the host does not trust; it is
    /// refused before the signature itself is checked.
    #[error("signed by key {signer}, which this host does not trust (expected {expected}); sign it with a trusted key or pass --trusted-key {signer}")]
    Untrusted {
        /// The signer's public key in hex, as the signature file names it.
        signer: String,
        /// The trusted keys, [short](TrustedKey::short), joined with " or ".
        expected: String,
    },
    /// A trusted key, but the signature is not over these bytes.
    #[error("its signature does not match its content (changed after signing?); sign it again with `grenache-host sign`")]
    Mismatch,
    /// The signature file is not `ed25519 <public key hex> <signature hex>`.
    #[error(
        "its signature file {sig} is malformed ({reason}); sign it again with `grenache-host sign`"
    )]
    Malformed {
        /// The signature file.
        sig: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The signature file that goes with `plugin`.
pub fn signature_path(plugin: &Path) -> PathBuf {
    let mut name = plugin.as_os_str().to_owned();
    name.push(SIGNATURE_SUFFIX);
    PathBuf::from(name)
}

use crate::units::hex as to_hex;

fn from_hex<const N: usize>(text: &str) -> Result<[u8; N], String> {
    let text = text.trim();
    if text.len() != N * 2 || !text.is_ascii() {
        return Err(format!("expected {} hex digits, got {}", N * 2, text.len()));
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        // The text may be a secret key: say where it is wrong, never what it is.
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("not hex at digit {}", 2 * i + 1))?;
    }
    Ok(out)
}

/// The label of a secret key file's line.
pub const SECRET_LABEL: &str = "ed25519-secret";
/// The label of a public key file's line.
pub const PUBLIC_LABEL: &str = "ed25519-public";

/// A new key pair, as the text of its two files: (secret key file, public
/// key file), each one labelled line.
pub fn generate() -> (String, String) {
    let seed: [u8; 32] = rand::random();
    let key = SigningKey::from_bytes(&seed);
    (
        format!("{SECRET_LABEL} {}\n", to_hex(&seed)),
        format!(
            "{PUBLIC_LABEL} {}\n",
            to_hex(key.verifying_key().as_bytes())
        ),
    )
}

/// What a key file holds, by its label (or, for bare hex from before the
/// labels, by its file name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Secret,
    Public,
}

/// Splits a key file's text into its kind and its hex. `name` is the file's
/// name, used only for unlabelled files; `None` when the kind is unknown.
fn read_key_text<'a>(text: &'a str, name: &str) -> (Option<KeyKind>, &'a str) {
    let text = text.trim();
    if let Some(hex) = text.strip_prefix(SECRET_LABEL) {
        return (Some(KeyKind::Secret), hex.trim());
    }
    if let Some(hex) = text.strip_prefix(PUBLIC_LABEL) {
        return (Some(KeyKind::Public), hex.trim());
    }
    let kind = if name.ends_with(".secret") {
        Some(KeyKind::Secret)
    } else if name.ends_with(".pub") {
        Some(KeyKind::Public)
    } else {
        None
    };
    (kind, text)
}

/// Parses a public key given as hex (bare or labelled), or as the path of a
/// file holding one. A secret key file is refused, naming the file only.
pub fn parse_trusted_key(text: &str) -> Result<TrustedKey, String> {
    let (file_text, name) = if Path::new(text).is_file() {
        let content =
            std::fs::read_to_string(text).map_err(|e| format!("cannot read {text}: {e}"))?;
        (content, text)
    } else {
        (text.to_string(), "")
    };
    let (kind, hex) = read_key_text(&file_text, name);
    // Inline text may be a secret key pasted by mistake: never shown.
    let shown = if name.is_empty() {
        "the key given".to_string()
    } else {
        name.to_string()
    };
    if kind == Some(KeyKind::Secret) {
        return Err(format!(
            "{shown} is a secret key: pass the public key (the .pub file `grenache-host keygen` wrote beside it); a host never needs a secret key"
        ));
    }
    let bytes = from_hex::<32>(hex).map_err(|e| {
        format!("{shown} is not a public key ({e}); pass the .pub file `grenache-host keygen` wrote, or its hex")
    })?;
    VerifyingKey::from_bytes(&bytes)
        .map(TrustedKey)
        .map_err(|e| format!("{shown} is not a valid Ed25519 public key: {e}"))
}

/// The key in a secret key file's text (`name` is the file's name, for
/// unlabelled keys). A public key is refused; errors never contain the
/// key's text.
pub fn parse_secret_key(secret: &str, name: &str) -> Result<SigningKey, String> {
    let (kind, hex) = read_key_text(secret, name);
    if kind == Some(KeyKind::Public) {
        return Err("is a public key; a secret key is needed here (the .secret file `grenache-host keygen` wrote)".into());
    }
    let seed = from_hex::<32>(hex).map_err(|e| {
        format!("not a secret key ({e}); pass the .secret file `grenache-host keygen` wrote")
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The signature file's text for `content`, signed with the secret key whose
/// file text is `secret` (`name` is that file's name, for unlabelled keys).
/// A public key is refused; errors never contain the key's text.
pub fn sign(content: &[u8], secret: &str, name: &str) -> Result<String, String> {
    let key = parse_secret_key(secret, name)?;
    let signature = key.sign(content);
    Ok(format!(
        "ed25519 {} {}\n",
        to_hex(key.verifying_key().as_bytes()),
        to_hex(&signature.to_bytes())
    ))
}

/// Checks `content` (the bytes of `plugin`) against its signature file and
/// the trusted keys.
pub fn verify(plugin: &Path, content: &[u8], trusted: &[TrustedKey]) -> Result<(), SignatureError> {
    let sig_path = signature_path(plugin);
    let expected = trusted
        .iter()
        .map(TrustedKey::short)
        .collect::<Vec<_>>()
        .join(" or ");
    let text = std::fs::read_to_string(&sig_path).map_err(|_| SignatureError::Unsigned {
        plugin: plugin.display().to_string(),
        sig: sig_path.display().to_string(),
        expected: expected.clone(),
    })?;
    let malformed = |reason: String| SignatureError::Malformed {
        sig: sig_path.display().to_string(),
        reason,
    };
    let fields: Vec<&str> = text.split_whitespace().collect();
    let [scheme, signer, signature] = fields[..] else {
        return Err(malformed(
            "expected `ed25519 <public key> <signature>`".into(),
        ));
    };
    if scheme != "ed25519" {
        return Err(malformed(format!("unknown scheme {scheme:?}")));
    }
    let signer_key = VerifyingKey::from_bytes(&from_hex::<32>(signer).map_err(&malformed)?)
        .map_err(|e| malformed(e.to_string()))?;
    let signature = Signature::from_bytes(&from_hex::<64>(signature).map_err(&malformed)?);
    if !trusted.iter().any(|k| k.0 == signer_key) {
        return Err(SignatureError::Untrusted {
            signer: signer.to_string(),
            expected,
        });
    }
    signer_key
        .verify_strict(content, &signature)
        .map_err(|_| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hex of a key file's text.
    fn hex(file: &str) -> String {
        file.split_whitespace().nth(1).unwrap().to_string()
    }

    fn signed(dir: &Path, content: &[u8], secret: &str) -> PathBuf {
        let plugin = dir.join("p.wasm");
        std::fs::write(&plugin, content).unwrap();
        let signature = sign(content, secret, "k.secret").unwrap();
        std::fs::write(signature_path(&plugin), signature).unwrap();
        plugin
    }

    #[test]
    fn a_signature_from_a_trusted_key_verifies_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = generate();
        let (other_secret, other_public) = generate();
        let trusted = [parse_trusted_key(&public).unwrap()];
        let plugin = signed(dir.path(), b"component bytes", &secret);
        assert_eq!(verify(&plugin, b"component bytes", &trusted), Ok(()));
        // The file changed after signing.
        assert_eq!(
            verify(&plugin, b"component bytez", &trusted),
            Err(SignatureError::Mismatch)
        );
        // Signed by someone else.
        let plugin = signed(dir.path(), b"component bytes", &other_secret);
        match verify(&plugin, b"component bytes", &trusted) {
            Err(SignatureError::Untrusted { signer, expected }) => {
                assert_eq!(
                    (signer, expected),
                    (hex(&other_public), format!("{}…", &hex(&public)[..16]))
                );
            }
            other => panic!("{other:?}"),
        }
        // Not signed at all.
        std::fs::remove_file(signature_path(&plugin)).unwrap();
        let err = verify(&plugin, b"component bytes", &trusted).unwrap_err();
        assert!(matches!(err, SignatureError::Unsigned { .. }));
        assert!(err.to_string().contains(&hex(&public)[..16]), "{err}");
        assert!(!err.to_string().contains(&hex(&public)[16..]), "{err}");
        // Garbage in the signature file.
        std::fs::write(signature_path(&plugin), "ed25519 zz zz").unwrap();
        assert!(matches!(
            verify(&plugin, b"x", &trusted),
            Err(SignatureError::Malformed { .. })
        ));
    }

    #[test]
    fn keys_parse_from_hex_or_files_and_bad_ones_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let (_, public) = generate();
        let file = dir.path().join("k.pub");
        std::fs::write(&file, &public).unwrap();
        let from_hex = parse_trusted_key(&hex(&public));
        assert!(from_hex.is_ok());
        assert_eq!(parse_trusted_key(file.to_str().unwrap()), from_hex);
        assert_eq!(parse_trusted_key(public.trim()), from_hex);
        // A key file from before the labels: bare hex in a .pub file.
        std::fs::write(&file, format!("{}\n", hex(&public))).unwrap();
        assert_eq!(parse_trusted_key(file.to_str().unwrap()), from_hex);
        assert!(parse_trusted_key("abc").unwrap_err().contains("keygen"));
    }

    #[test]
    fn a_secret_key_is_never_trusted_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = generate();
        let secret_hex = hex(&secret);
        // Labelled, under any name; and bare hex in a .secret file.
        for (name, text) in [
            ("ops.secret", secret.clone()),
            ("ops.key", secret.clone()),
            ("old.secret", format!("{secret_hex}\n")),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let err = parse_trusted_key(path.to_str().unwrap()).unwrap_err();
            assert!(
                err.contains("is a secret key") && err.contains(".pub"),
                "{err}"
            );
            assert!(!err.contains(&secret_hex), "{err}");
        }
        // A damaged secret key file's error does not echo its digits.
        let damaged = format!("{}zz{}", &secret_hex[..30], &secret_hex[32..]);
        let err = sign(b"x", &damaged, "ops.secret").unwrap_err();
        assert!(!err.contains(&secret_hex[..30]), "{err}");
        // Signing with a public key is refused, labelled or by name.
        assert!(sign(b"x", &public, "ops.key")
            .unwrap_err()
            .contains("public key"));
        let bare_public = format!("{}\n", hex(&public));
        assert!(sign(b"x", &bare_public, "ops.pub")
            .unwrap_err()
            .contains("public key"));
    }
}
