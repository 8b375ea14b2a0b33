//! The replay cursor: steps numbered in call order, each answered from its
//! checkpoint when an earlier execution wrote one.

use super::*;

/// Where a step's value comes from.
pub(super) enum Replay<T> {
    Done(T),
    Run,
}

impl WorkflowContext {
    pub(super) fn take_seq(&mut self) -> i32 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// The checkpoint of step `seq`, if it completed before.
    pub(super) fn replay<T: DeserializeOwned>(
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

    pub(super) fn check_draining(&self) -> Result<(), WorkflowError> {
        if *self.draining.borrow() {
            Err(WorkflowError::Draining)
        } else {
            Ok(())
        }
    }
}
