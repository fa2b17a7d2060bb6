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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_become_bearer_headers() {
        assert_eq!(bearer("s3cret").unwrap().to_str().unwrap(), "Bearer s3cret");
        assert!(bearer("new\nline").is_err());
    }
}
