//! Patch markers: code changed while workflows of the old code are in
//! flight asks whether this execution's history predates the change.

use super::*;
use crate::{TEST_PATCH, TEST_REVISION_STEP};

/// The name of the checkpoint that marks a patch taken: `$patch:<name>`.
fn marker(patch: &str) -> String {
    format!("$patch:{patch}")
}

impl WorkflowContext {
    /// Whether this execution takes the new code path of `patch`: `false`
    /// when the workflow's history already went past this point without
    /// it (its earlier steps were run by code from before the change, so
    /// it keeps the old path), else `true`, recorded as a step of its own
    /// (`$patch:<name>`) so every later replay answers the same.
    ///
    /// ```ignore
    /// if ctx.patched("fraud-check").await? {
    ///     ctx.db_step("fraud_check", store::fraud_check(order_id)).await?;
    /// }
    /// ```
    ///
    /// The kind must declare the patch in
    /// [`Workflow::patches`](crate::Workflow::patches), which is also what lets workers of this
    /// version take over older histories; an undeclared name fails the
    /// workflow. Remove the marker, and the old path, once no workflow of
    /// the versions before it is in flight.
    pub async fn patched(&mut self, patch: &str) -> Result<bool, WorkflowError> {
        if !self.patches.contains(&patch) {
            return Err(WorkflowError::fatal(format!(
                "patch `{patch}` is not declared by {}'s Workflow::patches",
                self.kind.name
            )));
        }
        let marker = marker(patch);
        if self.cursor.predates(&marker) {
            return Ok(false);
        }
        let _: Option<bool> = self
            .db_step(&marker, Statement::new("SELECT true AS output"))
            .await?;
        Ok(true)
    }

    /// A test revision's inserted step, before the first call of the step
    /// it names ([`crate::TestRevision`]).
    pub(crate) async fn revise_before(&mut self, step: &str) -> Result<(), WorkflowError> {
        let Some(revision) = self
            .revision
            .take_if(|revision| revision.before_step == step)
        else {
            return Ok(());
        };
        if !revision.patched || Box::pin(self.patched(TEST_PATCH)).await? {
            let _: Option<bool> =
                Box::pin(self.db_step(TEST_REVISION_STEP, Statement::new("SELECT true AS output")))
                    .await?;
        }
        Ok(())
    }
}
