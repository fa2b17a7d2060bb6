//! The shared-token scheme of the protocol: `authorization: Bearer TOKEN` on every call.

use tonic::metadata::{Ascii, MetadataValue};

/// The metadata key the token travels in.
pub const AUTHORIZATION: &str = "authorization";

/// The header text for `token`: `Bearer TOKEN` (what a server compares against).
pub fn bearer_text(token: &str) -> String {
    format!("Bearer {token}")
}

/// A token that cannot travel in a header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the token contains characters not allowed in a header (visible ASCII only)")]
pub struct BadToken;

/// The metadata value for `token`.
pub fn bearer(token: &str) -> Result<MetadataValue<Ascii>, BadToken> {
    bearer_text(token).parse().map_err(|_| BadToken)
}

/// Why a token file gave no token.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read the token file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("the token file {path} is empty")]
    Empty { path: String },
    #[error("the token in {path} must be one line of visible ASCII")]
    Bad { path: String },
}

/// The token in `path` (surrounding whitespace and a final newline ignored). A file others can
/// read is accepted with a warning: the point of a file is to keep the token private.
pub fn read_token_file(path: &std::path::Path) -> Result<String, TokenFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|error| TokenFileError::Read { path: shown.clone(), error })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenFileError::Empty { path: shown });
    }
    if token.lines().count() > 1 || bearer(token).is_err() {
        return Err(TokenFileError::Bad { path: shown });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %shown, "the token file is readable by other users (chmod 600 it)");
        }
    }
    Ok(token.to_string())
}

/// The token given inline or in a file (at most one of the two is set: the CLIs make them
/// conflict).
pub fn resolve(
    inline: Option<&str>,
    file: Option<&std::path::Path>,
) -> Result<Option<String>, TokenFileError> {
    match (inline, file) {
        (_, Some(path)) => read_token_file(path).map(Some),
        (Some(t), None) => Ok(Some(t.to_string())),
        (None, None) => Ok(None),
    }
}

/// The token flags of the client commands that talk to a running coordinator (`report`,
/// `status`, `list`, `export`).
#[cfg(feature = "clap")]
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTokenArgs {
    /// Token of the running coordinator.
    #[arg(long, env = "MSAE_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// Read the token from FILE (keeps it out of process listings and the environment).
    #[arg(long, value_name = "FILE", env = "MSAE_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
}

#[cfg(feature = "clap")]
impl ClientTokenArgs {
    /// The token to send, if any ([`resolve`]).
    pub fn resolve(&self) -> Result<Option<String>, TokenFileError> {
        resolve(self.token.as_deref(), self.token_file.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_are_trimmed_and_bad_ones_named() {
        let dir = std::env::temp_dir().join(format!("msae-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "  s3cret\n").unwrap();
        assert_eq!(read_token_file(&good).unwrap(), "s3cret");
        let empty = dir.join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(read_token_file(&empty).unwrap_err().to_string().contains("is empty"));
        let two = dir.join("two");
        std::fs::write(&two, "a\nb\n").unwrap();
        assert!(read_token_file(&two).unwrap_err().to_string().contains("one line"));
        let e = read_token_file(&dir.join("missing")).unwrap_err().to_string();
        assert!(e.contains("cannot read the token file") && e.contains("missing"), "{e}");
        assert_eq!(resolve(Some("x"), None).unwrap().as_deref(), Some("x"));
        assert_eq!(resolve(None, Some(&good)).unwrap().as_deref(), Some("s3cret"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tokens_become_bearer_headers() {
        assert_eq!(bearer("s3cret").unwrap().to_str().unwrap(), "Bearer s3cret");
        assert!(bearer("new\nline").is_err());
    }
}
