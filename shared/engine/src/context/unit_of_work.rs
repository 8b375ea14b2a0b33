//! The unit of work: the transaction a step joins or opens, its commit,
//! the checkpoint insert that fences it, and the test-only crash points
//! around commits.

use super::*;

impl WorkflowContext {
    /// Opens the transaction the next database operation joins, if none is.
    pub(super) async fn open_transaction(&mut self) -> Result<(), WorkflowError> {
        if self.open.is_none() {
            self.open = Some(self.pool.begin().await?);
        }
        Ok(())
    }

    /// The test-only crash point, before the step's commit: the step has
    /// run in a transaction not yet committed.
    pub(super) fn crash_before_commit(&self, crash: Option<CrashWhen>, name: &str) {
        match crash {
            Some(CrashWhen::Before) => crash_now(&format!("before:{name} of {}", self.workflow_id)),
            Some(CrashWhen::Freeze) => {
                freeze_now(&format!("freeze:{name} of {}", self.workflow_id))
            }
            _ => {}
        }
    }

    /// The test-only crash point, after the step's commit: commits what is
    /// open (the step with the steps before it), then dies.
    pub(super) async fn crash_after_commit(
        &mut self,
        crash: Option<CrashWhen>,
        name: &str,
    ) -> Result<(), WorkflowError> {
        if crash == Some(CrashWhen::After) {
            self.commit_open().await?;
            crash_now(&format!("after:{name} of {}", self.workflow_id));
        }
        Ok(())
    }

    /// The transaction of the next database operation: the one still open
    /// from the steps before it, or a new one. The operation hands it back
    /// to [`WorkflowContext::keep`] when it succeeds, and drops it otherwise.
    ///
    /// A step takes no lock on the workflow row first: its checkpoint
    /// insert is the fence (a second execution of the step finds the
    /// checkpoint there, or waits on its uncommitted row and then finds it,
    /// and rolls back), and that same statement sees a cancellation or a
    /// finished workflow. Only a recv locks the row (in `workflow_recv()`).
    pub(super) async fn transaction(
        &mut self,
    ) -> Result<Transaction<'static, Postgres>, WorkflowError> {
        if self.cancel_requested {
            // The claim saw it.
            return Err(WorkflowError::Cancelled);
        }
        if let Some(tx) = self.open.take() {
            return Ok(tx);
        }
        Ok(self.pool.begin().await?)
    }

    /// After an operation succeeded: keep its transaction open for the next
    /// one, or commit it now when not batching.
    pub(super) async fn keep(
        &mut self,
        tx: Transaction<'static, Postgres>,
    ) -> Result<(), WorkflowError> {
        if self.batch {
            self.open = Some(tx);
        } else {
            tx.commit().await?;
        }
        Ok(())
    }

    /// Commits the operations still open.
    pub(super) async fn commit_open(&mut self) -> Result<(), WorkflowError> {
        if let Some(tx) = self.open.take() {
            tx.commit().await?;
        }
        Ok(())
    }

    /// Completes a step that succeeded in `tx`: its checkpoint, then the
    /// transaction kept open for the next step or committed (with the
    /// test-only crash points on either side of that commit).
    pub(super) async fn complete(
        &mut self,
        mut tx: Transaction<'static, Postgres>,
        seq: i32,
        name: &str,
        output: &Value,
        started: DateTime<Utc>,
        crash: Option<CrashWhen>,
    ) -> Result<(), WorkflowError> {
        self.checkpoint(&mut tx, seq, name, output, started).await?;
        self.crash_before_commit(crash, name);
        self.keep(tx).await?;
        self.crash_after_commit(crash, name).await?;
        self.step_done(name, seq, started);
        Ok(())
    }

    /// Inserts a checkpoint, after those of the in-process sleeps before it,
    /// through `workflow_checkpoint()`, which refuses it (an error, mapped by
    /// [`refusal`]) when another execution won this step (this one is fenced
    /// off) or the workflow was cancelled or has finished.
    pub(super) async fn checkpoint(
        &mut self,
        tx: &mut PgConnection,
        seq: i32,
        name: &str,
        output: &Value,
        started: DateTime<Utc>,
    ) -> Result<(), WorkflowError> {
        let mut rows = CheckpointRows::step(seq, name, started);
        rows.outputs.push(output.clone());
        let written = sqlx::query(sql::CHECKPOINT)
            .bind(&self.workflow_id)
            .bind(&rows.seqs)
            .bind(&rows.names)
            .bind(&rows.outputs)
            .bind(&*self.worker_id)
            .bind(&rows.starts)
            .execute(&mut *tx)
            .await;
        match written {
            Ok(_) => {
                // Written: every caller commits this transaction next, or
                // ends the execution (which then replays from the last
                // commit).
                Ok(())
            }
            Err(error) => Err(refusal(&error, seq, name).unwrap_or_else(|| error.into())),
        }
    }
}
