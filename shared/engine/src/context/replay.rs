//! The replay cursor: steps are numbered in the order the workflow calls
//! them, and a step an earlier execution completed is answered from its
//! checkpoint instead of running. Pure: no database, unit-tested below.

use std::collections::VecDeque;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::WorkflowError;

/// A checkpoint loaded at the start of an execution.
#[derive(Debug, serde::Deserialize, sqlx::FromRow)]
pub(crate) struct Checkpoint {
    pub(crate) step_seq: i32,
    pub(crate) name: String,
    pub(crate) output: Value,
    pub(crate) finished_at: DateTime<Utc>,
}

/// Where a step's value comes from.
#[derive(Debug, PartialEq)]
pub(crate) enum Replay<T> {
    /// From its checkpoint: the step completed in an earlier execution.
    Done(T),
    /// The step runs now.
    Run,
}

/// One execution's position in its workflow's history.
#[derive(Debug)]
pub(crate) struct ReplayCursor {
    /// The checkpoints not replayed yet, in step order.
    checkpoints: VecDeque<Checkpoint>,
    next_seq: i32,
    /// When the last replayed checkpoint was written, or the workflow was
    /// started when there is none.
    replayed_until: DateTime<Utc>,
    /// Set once the execution is past its replayed checkpoints.
    running: bool,
    /// `replayed_until`, for the operation that ran first after replay.
    resumed_after: Option<DateTime<Utc>>,
    /// This execution's last step ended the workflow.
    finished: bool,
}

impl ReplayCursor {
    /// A cursor at the start of a workflow started at `started_at` with
    /// these checkpoints.
    pub(crate) fn new(checkpoints: Vec<Checkpoint>, started_at: DateTime<Utc>) -> Self {
        ReplayCursor {
            checkpoints: checkpoints.into(),
            next_seq: 0,
            replayed_until: started_at,
            running: false,
            resumed_after: None,
            finished: false,
        }
    }

    /// A cursor for the steps after step `seq` (a compensation's, after
    /// the `$ending` step written at `marked_at`), with their checkpoints.
    pub(crate) fn after(seq: i32, checkpoints: Vec<Checkpoint>, marked_at: DateTime<Utc>) -> Self {
        ReplayCursor {
            next_seq: seq + 1,
            ..Self::new(checkpoints, marked_at)
        }
    }

    /// The next step's number, taken.
    pub(crate) fn take_seq(&mut self) -> i32 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Whether a checkpoint after step `seq` exists: a step that writes no
    /// checkpoint of its own (an in-process sleep) is then over.
    pub(crate) fn passed(&self, seq: i32) -> bool {
        self.checkpoints
            .front()
            .is_some_and(|front| front.step_seq > seq)
    }

    /// For the first operation that runs after the replayed steps: when the
    /// last of them was written (or the workflow started); `None` later.
    pub(crate) fn take_resumed_after(&mut self) -> Option<DateTime<Utc>> {
        self.resumed_after.take()
    }

    /// Whether the history went past the next step without a checkpoint
    /// named `marker` there: a patch the code that wrote it did not have.
    /// At the end of the history the patch is new to it: `false`.
    pub(crate) fn predates(&self, marker: &str) -> bool {
        self.checkpoints
            .front()
            .is_some_and(|front| !(front.step_seq == self.next_seq && front.name == marker))
    }

    /// The workflow's last step has ended it: no step may follow.
    pub(crate) fn finish(&mut self) {
        self.finished = true;
    }

    /// Whether a step of this execution ended the workflow.
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// Step `seq` named `name`: its checkpointed output if it completed
    /// before, else `Run`. A checkpoint of another name means the code and
    /// the history disagree: a loud error, never a silent mix.
    pub(crate) fn replay<T: DeserializeOwned>(
        &mut self,
        seq: i32,
        name: &str,
    ) -> Result<Replay<T>, WorkflowError> {
        if self.finished {
            // The workflow has ended: its row would refuse the step, and a
            // refusal inside the transaction of the final step would undo
            // that step and its end with it.
            return Err(WorkflowError::fatal(format!(
                "step {seq} ({name}) comes after the workflow's final step"
            )));
        }
        if self
            .checkpoints
            .front()
            .is_none_or(|front| front.step_seq != seq)
        {
            self.resumed_after = if self.running {
                None
            } else {
                Some(self.replayed_until)
            };
            self.running = true;
            return Ok(Replay::Run);
        }
        let checkpoint = self.checkpoints.pop_front().expect("front exists");
        self.replayed_until = checkpoint.finished_at;
        if checkpoint.name != name {
            return Err(WorkflowError::Nondeterministic {
                step: seq,
                found: checkpoint.name,
                expected: name.to_owned(),
            });
        }
        serde_json::from_value(checkpoint.output)
            .map(Replay::Done)
            .map_err(|e| {
                WorkflowError::fatal(format!(
                    "step {seq} ({name}): checkpoint does not decode: {e}"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    fn at(second: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, second).unwrap()
    }

    fn checkpoint(step_seq: i32, name: &str, output: Value, second: u32) -> Checkpoint {
        Checkpoint {
            step_seq,
            name: name.to_owned(),
            output,
            finished_at: at(second),
        }
    }

    #[test]
    fn a_patch_is_new_unless_the_history_went_past_it_without_its_marker() {
        let history = || {
            vec![
                checkpoint(0, "reserve", json!(true), 1),
                checkpoint(1, "$patch:audit", json!(true), 2),
                checkpoint(3, "create", json!(42), 3),
            ]
        };
        let mut cursor = ReplayCursor::new(history(), at(0));
        assert!(cursor.predates("$patch:audit"), "step 0 is another step");
        let seq = cursor.take_seq();
        cursor.replay::<bool>(seq, "reserve").unwrap();
        assert!(!cursor.predates("$patch:audit"), "its marker is next");
        assert!(cursor.predates("$patch:other"), "another patch's is not");
        let seq = cursor.take_seq();
        cursor.replay::<bool>(seq, "$patch:audit").unwrap();
        cursor.take_seq(); // an in-process sleep: no checkpoint
        assert!(
            cursor.predates("$patch:late"),
            "a checkpoint further on: the history went past this point"
        );
        let seq = cursor.take_seq();
        cursor.replay::<i64>(seq, "create").unwrap();
        assert!(
            !cursor.predates("$patch:late"),
            "at the end of the history a patch is new"
        );
    }

    #[test]
    fn completed_steps_answer_from_their_checkpoints_then_the_rest_run() {
        let mut cursor = ReplayCursor::new(
            vec![
                checkpoint(0, "reserve", json!(true), 1),
                checkpoint(1, "create", json!(42), 2),
            ],
            at(0),
        );
        let seq = cursor.take_seq();
        assert_eq!(
            cursor.replay::<bool>(seq, "reserve").unwrap(),
            Replay::Done(true)
        );
        let seq = cursor.take_seq();
        assert_eq!(
            cursor.replay::<i64>(seq, "create").unwrap(),
            Replay::Done(42)
        );
        let seq = cursor.take_seq();
        assert_eq!(seq, 2, "steps are numbered in call order");
        assert_eq!(cursor.replay::<Value>(seq, "pay").unwrap(), Replay::Run);
        assert_eq!(
            cursor.take_resumed_after(),
            Some(at(2)),
            "the first step to run resumes after the last checkpoint"
        );
        let seq = cursor.take_seq();
        assert_eq!(cursor.replay::<Value>(seq, "ship").unwrap(), Replay::Run);
        assert_eq!(cursor.take_resumed_after(), None, "only the first one");
    }

    #[test]
    fn a_workflow_with_no_checkpoint_resumes_after_its_start() {
        let mut cursor = ReplayCursor::new(Vec::new(), at(7));
        let seq = cursor.take_seq();
        assert_eq!(cursor.replay::<Value>(seq, "first").unwrap(), Replay::Run);
        assert_eq!(cursor.take_resumed_after(), Some(at(7)));
    }

    #[test]
    fn a_renamed_step_is_refused_loudly() {
        let mut cursor = ReplayCursor::new(vec![checkpoint(0, "reserve", json!(true), 1)], at(0));
        let seq = cursor.take_seq();
        match cursor.replay::<bool>(seq, "reserve_stock") {
            Err(WorkflowError::Nondeterministic {
                step,
                found,
                expected,
            }) => assert_eq!(
                (step, found.as_str(), expected.as_str()),
                (0, "reserve", "reserve_stock")
            ),
            other => panic!("expected a nondeterminism error, got {other:?}"),
        }
    }

    #[test]
    fn a_checkpoint_of_another_type_is_an_error_not_a_guess() {
        let mut cursor = ReplayCursor::new(vec![checkpoint(0, "count", json!("ten"), 1)], at(0));
        let seq = cursor.take_seq();
        assert!(cursor.replay::<i64>(seq, "count").is_err());
    }

    #[test]
    fn a_step_without_a_checkpoint_is_passed_once_a_later_one_exists() {
        // An in-process sleep (step 1) writes no checkpoint; step 2 did.
        let mut cursor = ReplayCursor::new(
            vec![
                checkpoint(0, "a", json!(1), 1),
                checkpoint(2, "b", json!(2), 3),
            ],
            at(0),
        );
        let seq = cursor.take_seq();
        assert_eq!(cursor.replay::<i64>(seq, "a").unwrap(), Replay::Done(1));
        let sleep = cursor.take_seq();
        assert!(cursor.passed(sleep), "the sleep is over");
        let seq = cursor.take_seq();
        assert_eq!(cursor.replay::<i64>(seq, "b").unwrap(), Replay::Done(2));
        assert!(!cursor.passed(cursor.next_seq), "nothing after the last");
    }

    #[test]
    fn no_step_may_follow_the_final_one() {
        let mut cursor = ReplayCursor::new(Vec::new(), at(0));
        cursor.finish();
        assert!(cursor.is_finished());
        let seq = cursor.take_seq();
        assert!(cursor.replay::<Value>(seq, "late").is_err());
    }
}
