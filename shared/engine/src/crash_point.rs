//! A test-only switch that makes a worker die with SIGKILL right before or
//! right after a named step commits, so tests can put a crash on every step
//! boundary deterministically instead of leaving it to chance.
//!
//! Written `before:<step>` or `after:<step>`, optionally `#<n>` for the
//! n-th call of that step in an execution (1 by default; replayed calls
//! count, so `after:update_progress#10` is the tenth progress step however
//! many executions it took to get there):
//!
//! - **before**: the step has run inside a transaction that is not
//!   committed (its effect and checkpoint are not durable); the process
//!   dies and the database rolls it back.
//! - **after**: the step's checkpoint (and everything before it) has just
//!   been committed; the process dies before doing anything else.
//! - **freeze**: where `before` dies, the process stops itself with SIGSTOP
//!   instead, its transaction open and its locks held (a stalled VM), and
//!   goes on where it was after SIGCONT (once per process: the replay that
//!   follows runs through).
//!
//! A recv counts as completing when it takes a message or times out (a
//! recv that parks has not completed); a sleep dies before or after its
//! wait. To have a commit to die before, the engine runs the named step in
//! a transaction of its own even where it would otherwise be one statement
//! or part of a batch. Debug builds only: a release build ignores the
//! switch (with a warning), so production binaries cannot be told to die.

use std::fmt;
use std::str::FromStr;

/// Which side of the step's commit the process dies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashWhen {
    /// With the step run but not committed.
    Before,
    /// Right after the step's commit.
    After,
    /// Stopped (SIGSTOP) where `Before` dies.
    Freeze,
}

/// Where a test build's worker dies: see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashPoint {
    /// Before or after the commit.
    pub when: CrashWhen,
    /// The step's name as checkpointed (`reserve_inventory`,
    /// `recv:payment_status`, `sleep`, `set_event:payment_id`, ...).
    pub step: String,
    /// Which call of that step in an execution, from 1.
    pub occurrence: u32,
}

impl FromStr for CrashPoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!("{text:?}: expected before:<step>[#n], after:<step>[#n] or freeze:<step>[#n]")
        };
        let (when, rest) = text.split_once(':').ok_or_else(usage)?;
        let when = match when {
            "before" => CrashWhen::Before,
            "after" => CrashWhen::After,
            "freeze" => CrashWhen::Freeze,
            _ => return Err(usage()),
        };
        let (step, occurrence) = match rest.rsplit_once('#') {
            Some((step, n)) => (step, n.parse::<u32>().map_err(|_| usage())?),
            None => (rest, 1),
        };
        if step.is_empty() || occurrence == 0 {
            return Err(usage());
        }
        Ok(CrashPoint {
            when,
            step: step.to_owned(),
            occurrence,
        })
    }
}

impl fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let when = match self.when {
            CrashWhen::Before => "before",
            CrashWhen::After => "after",
            CrashWhen::Freeze => "freeze",
        };
        write!(f, "{when}:{}#{}", self.step, self.occurrence)
    }
}

/// Counts one execution's calls of the crash point's step.
#[derive(Debug, Clone, Default)]
pub(crate) struct CrashCounter {
    point: Option<CrashPoint>,
    seen: u32,
}

impl CrashCounter {
    /// A counter for `point`, or one that never fires.
    pub(crate) fn new(point: Option<CrashPoint>) -> Self {
        CrashCounter { point, seen: 0 }
    }

    /// Counts a call of step `name`: where to die if it is the crash point.
    pub(crate) fn call(&mut self, name: &str) -> Option<CrashWhen> {
        let point = self.point.as_ref()?;
        if point.step != name {
            return None;
        }
        self.seen += 1;
        (self.seen == point.occurrence).then_some(point.when)
    }
}

/// Dies now, as `kill -9` would kill the process: no destructor, no
/// graceful close of a connection, no drain.
pub(crate) fn crash_now(point: &str) -> ! {
    tracing::error!(
        crash_point = point,
        "crash point reached: dying with SIGKILL"
    );
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status();
    // Only if `kill` could not be run.
    std::process::abort()
}

/// Stops the process (SIGSTOP) until someone sends SIGCONT, the first time
/// only: the replay after it goes through.
pub(crate) fn freeze_now(point: &str) {
    static FROZE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if FROZE.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    tracing::error!(
        crash_point = point,
        "crash point reached: stopping with SIGSTOP"
    );
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_sides_and_an_occurrence() {
        assert_eq!(
            "before:reserve_inventory".parse(),
            Ok(CrashPoint {
                when: CrashWhen::Before,
                step: "reserve_inventory".into(),
                occurrence: 1
            })
        );
        let tenth: CrashPoint = "after:update_progress#10".parse().unwrap();
        assert_eq!((tenth.when, tenth.occurrence), (CrashWhen::After, 10));
        assert_eq!(tenth.to_string(), "after:update_progress#10");
        let recv: CrashPoint = "after:recv:payment_status".parse().unwrap();
        assert_eq!(recv.step, "recv:payment_status");
        let freeze: CrashPoint = "freeze:reserve_inventory".parse().unwrap();
        assert_eq!(freeze.when, CrashWhen::Freeze);
        for bad in ["", "during:x", "before:", "after:x#0", "after:x#ten", "x"] {
            assert!(bad.parse::<CrashPoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn fires_on_the_chosen_call_of_the_named_step_only() {
        let mut counter = CrashCounter::new(Some("after:tick#2".parse().unwrap()));
        assert_eq!(counter.call("tick"), None);
        assert_eq!(counter.call("other"), None);
        assert_eq!(counter.call("tick"), Some(CrashWhen::After));
        assert_eq!(counter.call("tick"), None);
        assert_eq!(CrashCounter::new(None).call("tick"), None);
    }
}
