//! Waits: a recv (a message, or its deadline) and a durable sleep, each
//! parking the workflow when it would wait long.

use super::*;

impl WorkflowContext {
    /// Waits for a message on `topic`, at most `timeout` from the first time
    /// this recv ran (the deadline is checkpointed). `None` means timed out.
    /// Consuming the message and checkpointing it are one transaction. While
    /// nothing is there the workflow parks (returns [`WorkflowError::Parked`]
    /// through `?`) and holds no worker slot.
    pub async fn recv(
        &mut self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Option<Value>, WorkflowError> {
        // Boxed: a workflow's future then stays small while it waits
        // (thousands of sleeping dispatches live in one worker).
        Box::pin(self.run_recv(topic, timeout)).await
    }

    pub(super) async fn run_recv(
        &mut self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Option<Value>, WorkflowError> {
        let deadline_name = format!("recv:{topic}:deadline");
        let deadline_seq = self.take_seq();
        let known_deadline: Option<DateTime<Utc>> =
            match self.replay::<DateTime<Utc>>(deadline_seq, &deadline_name)? {
                Replay::Done(at) => Some(at),
                Replay::Run => None,
            };
        let name = format!("recv:{topic}");
        let crash = self.crash.call(&name);
        let seq = self.take_seq();
        if let Replay::Done(outcome) = self.replay::<Value>(seq, &name)? {
            return Ok(outcome.get("message").cloned().filter(|m| !m.is_null()));
        }
        self.check_draining()?;
        if crash.is_some() {
            // A commit of its own to die before or after.
            self.open_transaction().await?;
        }
        let started = Utc::now();
        // The checkpoint written first: the deadline's, on the first run.
        let (deadline, rows, refused_seq, refused_name) = match known_deadline {
            Some(at) => (at, CheckpointRows::default(), seq, &name),
            None => {
                let at =
                    started + chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
                let mut rows = CheckpointRows::step(deadline_seq, &deadline_name, started);
                rows.outputs.push(json!(at));
                (at, rows, deadline_seq, &deadline_name)
            }
        };
        if self.cancel_requested {
            return Err(WorkflowError::Cancelled);
        }
        // One statement (`workflow_recv()`): those checkpoints, the row lock
        // a park needs, the look for the message (consumed if there), then
        // the outcome's checkpoint or the park. It joins the transaction
        // still open, or is its own commit.
        //
        // Its own commit of a message consumed ($15) waits for no WAL
        // flush: nothing outside acts on it but through this execution's
        // next commit (flushed, which carries this one: the WAL is one
        // sequence) or an effect (at least once, with its stable key).
        // A database crash before that drops the consumption with its
        // checkpoint, and the replay consumes the same message again. A
        // park's commit is flushed: it ends the execution.
        let query = sqlx::query_as::<_, (bool, Option<Value>, Option<String>)>(sql::RECV)
            .bind(&self.workflow_id)
            .bind(topic)
            .bind(deadline)
            .bind(&rows.seqs)
            .bind(&rows.names)
            .bind(&rows.outputs)
            .bind(&rows.starts)
            .bind(seq)
            .bind(&name)
            .bind(started)
            .bind(&*self.worker_id)
            .bind(self.kind.queue)
            .bind(new_job_id())
            .bind(JOB_MAX_ATTEMPTS)
            .bind(self.open.is_none());
        let received = match self.open.as_mut() {
            Some(tx) => query.fetch_one(&mut **tx).await,
            None => query.fetch_one(&self.pool).await,
        };
        let (done, message, _) = match received {
            Ok(received) => received,
            Err(error) => {
                // A failed statement aborts the transaction it was in.
                self.open = None;
                return Err(
                    refusal(&error, refused_seq, refused_name).unwrap_or_else(|| error.into())
                );
            }
        };
        if done {
            self.crash_before_commit(crash, &name);
            self.crash_after_commit(crash, &name).await?;
            return Ok(message);
        }
        self.commit_open().await?;
        Err(WorkflowError::Parked)
    }

    /// A durable sleep. Long sleeps (over the runtime's hold threshold)
    /// checkpoint their wake-up time and park until a job scheduled then.
    /// Short ones wait in-process and write no checkpoint: a replay that
    /// finds a checkpoint after such a sleep knows it is over, and one that
    /// stops at it counts it from when the step before it was written, so a
    /// takeover keeps the wake-up time. A sleep with no step before it (the
    /// first thing a workflow does) counts from when the workflow was
    /// started: a workflow that waited longer than that in the queue does
    /// not sleep at all.
    ///
    /// An in-process sleep gives the execution's queue slot back first, so a
    /// worker's concurrency bounds the steps it runs at once, not the
    /// workflows it has sleeping. From then on the workflow row's `owner` is
    /// what recovers it: the reaper re-enqueues the running workflows of a
    /// dead worker.
    pub async fn sleep(&mut self, duration: Duration) -> Result<(), WorkflowError> {
        let crash = self.crash.call("sleep");
        let seq = self.take_seq();
        // An in-process sleep leaves no checkpoint (but a first one): a
        // checkpoint after it shows that it is over.
        if self.cursor.passed(seq) {
            return Ok(());
        }
        self.crash_before_commit(crash, "sleep");
        let slept = self.run_sleep(seq, duration).await;
        if matches!(slept, Ok(()) | Err(WorkflowError::Parked)) {
            self.crash_after_commit(crash, "sleep").await?;
        }
        slept
    }

    pub(super) async fn run_sleep(
        &mut self,
        seq: i32,
        duration: Duration,
    ) -> Result<(), WorkflowError> {
        let wake_at = match self.replay::<DateTime<Utc>>(seq, "sleep")? {
            Replay::Done(at) => at,
            Replay::Run => {
                self.check_draining()?;
                let now = Utc::now();
                // Right after replay, this sleep began when the last replayed
                // step was written, or the workflow was started when no step
                // was (an in-process sleep writes no checkpoint): every
                // execution, a takeover's too, computes the same wake-up
                // time.
                let began = self.cursor.take_resumed_after().unwrap_or(now).min(now);
                let at =
                    began + chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX);
                if at - now
                    > chrono::Duration::from_std(self.hold_threshold)
                        .unwrap_or(chrono::Duration::MAX)
                {
                    Box::pin(self.park_sleep(Some((seq, now)), at)).await?;
                    return Err(WorkflowError::Parked);
                }
                at
            }
        };
        let remaining = (wake_at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        if remaining.is_zero() {
            return Ok(());
        }
        if remaining > self.hold_threshold {
            Box::pin(self.park_sleep(None, wake_at)).await?;
            return Err(WorkflowError::Parked);
        }
        // Nothing stays uncommitted (or locked) through the sleep.
        self.commit_open().await?;
        self.release_slot();
        let mut draining = self.draining.clone();
        tokio::select! {
            _ = tokio::time::sleep(remaining) => Ok(()),
            _ = crate::until_true(&mut draining) => Err(WorkflowError::Draining),
        }
    }

    /// Parks a sleep until `at`, first checkpointing it (`(seq, started)`)
    /// when it is new.
    pub(super) async fn park_sleep(
        &mut self,
        checkpoint: Option<(i32, DateTime<Utc>)>,
        at: DateTime<Utc>,
    ) -> Result<(), WorkflowError> {
        let mut tx = self.transaction().await?;
        if let Some((seq, started)) = checkpoint {
            self.checkpoint(&mut tx, seq, "sleep", &json!(at), started)
                .await?;
        }
        self.park(&mut tx, at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Hands the queue slot back (once); the execution continues.
    pub(super) fn release_slot(&mut self) {
        if let Some(slot) = self.slot.take() {
            let _ = slot.send(());
        }
    }

    /// Parks a sleeping workflow until `until`, with the job that wakes it
    /// then: one statement. (A recv parks inside `workflow_recv()`.)
    pub(super) async fn park(
        &self,
        tx: &mut PgConnection,
        until: DateTime<Utc>,
    ) -> Result<(), WorkflowError> {
        sqlx::query(sql::PARK_SLEEP)
            .bind(self.kind.queue)
            .bind(&self.workflow_id)
            .bind(until)
            .bind(new_job_id())
            .bind(JOB_MAX_ATTEMPTS)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}
