//! A test-only switch that makes a worker run a later revision of a
//! workflow's code: one extra step inserted before a named step, guarded by
//! a patch marker or not. Tests of versioned workflows (a rolling deploy
//! from the plain code to this revision) use it instead of two builds.
//!
//! Written `patched:<kind>/<step>` or `unguarded:<kind>/<step>`:
//!
//! - **patched**: before the first call of `<step>` in an execution, the
//!   workflow runs `if ctx.patched("test-revision") { step "test_revision" }`,
//!   and its kind declares that patch, so this worker adopts histories of
//!   other versions (those from before the change keep the old path);
//! - **unguarded**: the step always runs, no patch is declared: the worker
//!   runs only histories of its own version.
//!
//! Debug builds only: a release build ignores the switch (with a warning).

use std::fmt;
use std::str::FromStr;

/// The patch a `patched` revision declares and asks for.
pub const TEST_PATCH: &str = "test-revision";

/// The step a revision inserts.
pub const TEST_REVISION_STEP: &str = "test_revision";

/// A later revision of one workflow kind: see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRevision {
    /// Whether the inserted step is guarded by [`TEST_PATCH`].
    pub patched: bool,
    /// The workflow kind whose code changes.
    pub kind: String,
    /// The step the new one goes before.
    pub before_step: String,
}

impl TestRevision {
    /// The patches this revision declares for `kind`.
    pub(crate) fn patches_of(&self, kind: &str) -> &'static [&'static str] {
        if self.patched && self.kind == kind {
            &[TEST_PATCH]
        } else {
            &[]
        }
    }
}

impl FromStr for TestRevision {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let usage =
            || format!("{text:?}: expected patched:<kind>/<step> or unguarded:<kind>/<step>");
        let (mode, rest) = text.split_once(':').ok_or_else(usage)?;
        let patched = match mode {
            "patched" => true,
            "unguarded" => false,
            _ => return Err(usage()),
        };
        let (kind, step) = rest.split_once('/').ok_or_else(usage)?;
        if kind.is_empty() || step.is_empty() {
            return Err(usage());
        }
        Ok(TestRevision {
            patched,
            kind: kind.to_owned(),
            before_step: step.to_owned(),
        })
    }
}

impl fmt::Display for TestRevision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = if self.patched { "patched" } else { "unguarded" };
        write!(f, "{mode}:{}/{}", self.kind, self.before_step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_modes_and_refuses_the_rest() {
        let revision: TestRevision = "patched:checkout/create_order".parse().unwrap();
        assert!(revision.patched);
        assert_eq!(revision.to_string(), "patched:checkout/create_order");
        assert_eq!(revision.patches_of("checkout"), &[TEST_PATCH]);
        assert!(revision.patches_of("dispatch").is_empty());
        let unguarded: TestRevision = "unguarded:checkout/create_order".parse().unwrap();
        assert!(unguarded.patches_of("checkout").is_empty());
        for bad in [
            "",
            "patched",
            "patched:checkout",
            "later:a/b",
            "patched:/b",
            "patched:a/",
        ] {
            assert!(bad.parse::<TestRevision>().is_err(), "{bad:?}");
        }
    }
}
