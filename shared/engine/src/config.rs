//! The runtime's settings: one struct that is both the configuration a
//! [`Runtime`](crate::Runtime) takes and the flags (with their environment
//! variables) a worker binary flattens into its own command line. Each
//! default is written once, below, for both.

use std::time::Duration;

use crate::{CrashPoint, TestRevision};

/// The defaults, as a flag takes them.
mod defaults {
    pub const HEARTBEAT: &str = "1s";
    pub const REAP_INTERVAL: &str = "200ms";
    pub const STALE_AFTER: &str = "3s";
    pub const POLL_INTERVAL: &str = "200ms";
    pub const HOLD_THRESHOLD: &str = "5s";
    pub const DRAIN_TIMEOUT: &str = "10s";
    pub const PRUNE_AFTER: &str = "5m";
    pub const MAX_EXECUTIONS: i32 = 100;
    pub const RETENTION: &str = "7d";
    pub const RETENTION_FAILED: &str = "30d";
}

/// One queue a worker consumes.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// The queue name (a workflow kind's `queue`).
    pub name: String,
    /// Workflows of this queue executing at once in this process. Also the
    /// fetch batch size: a larger batch would hold jobs a sibling could run.
    pub concurrency: usize,
}

/// Settings of a worker process's runtime. Flatten it into a binary's
/// `clap::Parser` (`#[command(flatten)]`); the queues are the binary's to
/// set. Durations are written as `30s`, `200ms`, `5m`.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeConfig {
    /// Queues to consume (set by the binary from its own flags).
    #[arg(skip)]
    pub queues: Vec<QueueConfig>,
    /// Fleet registry heartbeat.
    #[arg(long, env = "WORKER_HEARTBEAT", default_value = defaults::HEARTBEAT, value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// How often live workers look for dead ones (bounds takeover time).
    #[arg(long, env = "WORKER_REAP_INTERVAL", default_value = defaults::REAP_INTERVAL, value_parser = humantime::parse_duration)]
    pub reap_interval: Duration,
    /// A worker whose heartbeat is older than this is presumed hung and its
    /// work taken over, although its connection lives.
    #[arg(long, env = "WORKER_STALE_AFTER", default_value = defaults::STALE_AFTER, value_parser = humantime::parse_duration)]
    pub stale_after: Duration,
    /// Fallback poll of the queue, for scheduled jobs (no NOTIFY for them).
    #[arg(long, env = "WORKER_POLL_INTERVAL", default_value = defaults::POLL_INTERVAL, value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// Sleeps up to this long wait in-process; longer ones park.
    #[arg(long, env = "WORKER_HOLD_THRESHOLD", default_value = defaults::HOLD_THRESHOLD, value_parser = humantime::parse_duration)]
    pub hold_threshold: Duration,
    /// On SIGTERM, how long running steps get to finish.
    #[arg(long, env = "WORKER_DRAIN_TIMEOUT", default_value = defaults::DRAIN_TIMEOUT, value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Finished queue jobs older than this are deleted.
    #[arg(long, env = "WORKER_PRUNE_AFTER", default_value = defaults::PRUNE_AFTER, value_parser = humantime::parse_duration)]
    pub prune_after: Duration,
    /// A workflow started this many times without finishing is failed (a
    /// crash loop is a dead letter, not an endless loop).
    #[arg(long, env = "WORKER_MAX_EXECUTIONS", default_value_t = defaults::MAX_EXECUTIONS)]
    pub max_executions: i32,
    /// Finished workflows (succeeded or cancelled) are deleted this long
    /// after they ended, with their steps, events and messages (0: kept for
    /// ever). Business records (orders, payments) are the store's and stay.
    #[arg(long, env = "WORKFLOW_RETENTION", default_value = defaults::RETENTION, value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// Failed workflows are deleted this long after they failed (0: kept
    /// for ever).
    #[arg(long, env = "WORKFLOW_RETENTION_FAILED", default_value = defaults::RETENTION_FAILED, value_parser = humantime::parse_duration)]
    pub retention_failed: Duration,
    /// Tests only: die with SIGKILL right before or after a step commits,
    /// `before:<step>[#n]` or `after:<step>[#n]` ([`CrashPoint`]). Ignored
    /// by release builds.
    #[arg(long, env = "WORKER_CRASH_AT", hide = true)]
    pub crash_at: Option<CrashPoint>,
    /// The code version this worker runs: a workflow is pinned to the
    /// version of the worker that first executes it, and runs only on
    /// workers of that version unless their code declares patches for its
    /// kind ([`Workflow::patches`](crate::Workflow::patches)). A binary
    /// sets its build's version when the variable is unset; without one,
    /// `unversioned`.
    #[arg(long, env = "APP_VERSION")]
    pub app_version: Option<String>,
    /// Tests only: run a later revision of one kind's code, one step
    /// inserted ([`TestRevision`]). Ignored by release builds.
    #[arg(long, env = "WORKER_TEST_REVISION", hide = true)]
    pub test_revision: Option<TestRevision>,
}

impl RuntimeConfig {
    /// What retention deletes, and after how long.
    pub(crate) fn retention(&self) -> crate::retention::Retention {
        let kept = |d: Duration| (!d.is_zero()).then_some(d);
        crate::retention::Retention {
            finished: kept(self.retention),
            failed: kept(self.retention_failed),
        }
    }
}

impl Default for RuntimeConfig {
    /// The flags' defaults, without reading the environment.
    fn default() -> Self {
        let duration = |text: &str| humantime::parse_duration(text).expect("a valid default");
        Self {
            queues: Vec::new(),
            heartbeat: duration(defaults::HEARTBEAT),
            reap_interval: duration(defaults::REAP_INTERVAL),
            stale_after: duration(defaults::STALE_AFTER),
            poll_interval: duration(defaults::POLL_INTERVAL),
            hold_threshold: duration(defaults::HOLD_THRESHOLD),
            drain_timeout: duration(defaults::DRAIN_TIMEOUT),
            prune_after: duration(defaults::PRUNE_AFTER),
            max_executions: defaults::MAX_EXECUTIONS,
            retention: duration(defaults::RETENTION),
            retention_failed: duration(defaults::RETENTION_FAILED),
            crash_at: None,
            app_version: None,
            test_revision: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        runtime: RuntimeConfig,
    }

    #[test]
    fn the_defaults_are_the_flags_defaults() {
        let parsed = Flags::parse_from(["worker"]).runtime;
        let default = RuntimeConfig::default();
        assert_eq!(format!("{parsed:?}"), format!("{default:?}"));
    }

    #[test]
    fn durations_read_as_people_write_them() {
        let parsed =
            Flags::parse_from(["worker", "--stale-after", "3s", "--poll-interval", "50ms"]);
        assert_eq!(parsed.runtime.stale_after, Duration::from_secs(3));
        assert_eq!(parsed.runtime.poll_interval, Duration::from_millis(50));
        assert!(Flags::try_parse_from(["worker", "--stale-after", "soon"]).is_err());
    }
}
