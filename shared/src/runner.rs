//! The trial runner kinds a sweep may ask for. The protocol carries the kind as a string
//! (`Lease.runner`) so that an old worker can name a kind it does not know; both sides parse it
//! at their edge and hold this type everywhere else.

use std::fmt;
use std::str::FromStr;

/// What a trial runs (a sweep's `task.kind`, a lease's `runner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunnerKind {
    /// Train the modular SAE.
    #[default]
    Sae,
    /// The analytic no-op runner (orchestration tests and benchmarks).
    Noop,
}

impl RunnerKind {
    /// Every kind, in the order error messages list them.
    pub const ALL: [RunnerKind; 2] = [RunnerKind::Sae, RunnerKind::Noop];

    /// The kind's name on the wire and in sweep files.
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerKind::Sae => "sae",
            RunnerKind::Noop => "noop",
        }
    }
}

impl fmt::Display for RunnerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A runner kind name that is none of [`RunnerKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown trial runner kind {0:?} (expected \"sae\" or \"noop\")")]
pub struct UnknownRunnerKind(pub String);

impl FromStr for RunnerKind {
    type Err = UnknownRunnerKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunnerKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| UnknownRunnerKind(s.to_string()))
    }
}

impl TryFrom<&str> for RunnerKind {
    type Error = UnknownRunnerKind;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in RunnerKind::ALL {
            assert_eq!(kind.as_str().parse::<RunnerKind>(), Ok(kind));
            assert_eq!(RunnerKind::try_from(kind.as_str()), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
        }
        assert_eq!(RunnerKind::Sae.as_str(), "sae");
        assert_eq!(RunnerKind::Noop.as_str(), "noop");
    }

    #[test]
    fn unknown_names_are_refused_with_the_name_and_the_choices() {
        let err = "quantum".parse::<RunnerKind>().unwrap_err();
        assert_eq!(err, UnknownRunnerKind("quantum".into()));
        assert_eq!(
            err.to_string(),
            r#"unknown trial runner kind "quantum" (expected "sae" or "noop")"#
        );
        // Exact names only: no case folding, no trimming, no empty default.
        for bad in ["SAE", " noop", "", "sae\n"] {
            assert!(RunnerKind::try_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_error_lists_every_kind() {
        let message = UnknownRunnerKind("x".into()).to_string();
        for kind in RunnerKind::ALL {
            assert!(message.contains(&format!("{:?}", kind.as_str())), "{message}");
        }
    }
}
