//! The queue side: apalis' workers fetch jobs, notified jobs are taken at
//! once by one worker, and each runs its workflow in a queue slot.

use super::*;

/// Runs the job's workflow on a task of its own once the queue has a free
/// slot, and returns (acking the job) when the execution ends or gives the
/// slot back for an in-process sleep. An execution that outlives its job is
/// recovered through `workflows.owner` should this process die.
async fn handle_job(job: WorkflowJob, queue: Data<FetchedJobs>) -> Result<(), BoxDynError> {
    let permit = queue.slots.slots.clone().acquire_owned().await?;
    let runtime = Runtime {
        inner: queue.inner.clone(),
    };
    let (slot, released) = oneshot::channel();
    tokio::spawn(async move {
        runtime
            .execute_in_slot(&job.workflow_id, None, Some(slot))
            .await
    });
    // Fired, or dropped when the execution ended: either way, done here.
    let _ = released.await;
    drop(permit);
    Ok(())
}

/// What a queue's apalis handler needs.
#[derive(Clone)]
struct FetchedJobs {
    inner: Arc<Inner>,
    slots: QueueSlots,
}

/// Runs each job notified due on a queue of this process at once, when
/// this worker is the one chosen for it and the queue has a free slot: the
/// notification names the job, so one statement takes it and claims its
/// workflow, without apalis' fetch (its own transaction, and the dispatch
/// to a handler, a large part of a 1-client checkout). A queue without a
/// free slot asks apalis to fetch instead, and its handler waits for a
/// slot. Jobs nobody takes from their notification (the chosen worker has
/// just died) are fetched at the next poll.
pub(super) async fn job_notice_loop(inner: Arc<Inner>) {
    let stop = inner.drain.subscribe();
    let notices = inner.clone();
    queue::listen_for_jobs(inner.pool.clone(), stop, move |notice| {
        let inner = &notices;
        let Some(job) = notice else {
            // Notices may have been missed: every queue looks for work.
            for queue in inner.queues.values() {
                queue.fetch.wake();
            }
            return;
        };
        let Some(queue) = inner.queues.get(&job.job_type) else {
            return;
        };
        if *inner.drain.borrow() || !inner.takes_notified(&job.job_type, &job.id) {
            return;
        }
        let Ok(permit) = queue.slots.clone().try_acquire_owned() else {
            queue.fetch.wake();
            return;
        };
        let runtime = Runtime {
            inner: inner.clone(),
        };
        spawn_in_slot(permit, move |slot| async move {
            runtime.execute_job(&job.id, Some(slot)).await
        });
    })
    .await;
}

/// Runs the apalis worker of one queue, restarting it (under a new name, so
/// its registration never collides with the old one) if it dies, for
/// example when the database restarts.
pub(super) async fn run_queue(inner: Arc<Inner>, queue: QueueConfig) {
    let slots = inner.queues[&queue.name].clone();
    let mut drain = inner.drain.subscribe();
    let mut generation = 0u32;
    loop {
        if *drain.borrow() {
            return;
        }
        generation += 1;
        let name = format!("{}/{}/{}", inner.worker_id, queue.name, generation);
        if generation > 1 {
            // Jobs claimed by our earlier incarnation but never acked.
            let released = async {
                let mut conn = inner.pool.acquire().await?;
                queue::release_jobs(
                    &mut conn,
                    &[inner.worker_id.to_string()],
                    Some((&queue.name, &name)),
                )
                .await
            }
            .await;
            if let Err(e) = released {
                tracing::warn!(error = %e, queue = %queue.name, "cannot release earlier jobs yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        let config = apalis_postgres::Config::default()
            .queue(&queue.name)
            .batch_size(queue.concurrency.max(1))
            .heartbeat_interval(Duration::from_secs(5))
            .missed_heartbeats(6)
            // No separate 'Running' update per job: a fetched job stays
            // 'Queued' under our lock_by until acked, which the reaper and
            // apalis' orphan recovery both hand back; a fetch is one transaction.
            .lock_tasks(false);
        let backend = PostgresStorage::<WorkflowJob>::new(&inner.pool)
            .with_config(config)
            .poll_with_strategy(JobWakeups::new(
                slots.fetch.clone(),
                inner.config.poll_interval,
            ));
        let worker = WorkerBuilder::new(name.as_str())
            .backend(backend)
            .data(FetchedJobs {
                inner: inner.clone(),
                slots: slots.clone(),
            })
            .concurrency(queue.concurrency.max(1))
            .build(handle_job);
        let mut stop = drain.clone();
        let signal = async move {
            let _ = crate::until_true(&mut stop).await;
            Ok::<(), WorkerError>(())
        };
        // A panic anywhere in the apalis worker must not silently end this
        // queue's consumption while the process still looks alive: catch it
        // and start a new generation.
        let ran = AssertUnwindSafe(worker.run_until(signal))
            .catch_unwind()
            .await;
        match ran {
            Ok(Ok(())) if *drain.borrow() => return,
            Ok(Ok(())) => tracing::warn!(queue = %queue.name, "queue worker stopped; restarting"),
            Err(panic) => tracing::error!(
                queue = %queue.name,
                panic = %panic_message(&*panic),
                "queue worker panicked; restarting"
            ),
            Ok(Err(e)) => {
                tracing::warn!(queue = %queue.name, error = %e, "queue worker failed; restarting")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = crate::until_true(&mut drain) => return,
        }
    }
}

impl Inner {
    /// Whether this worker is the one to take the notified job `job_id` of
    /// `queue`: of the live workers consuming the queue, the one whose id
    /// hashed with the job's id scores highest (rendezvous hashing). Each
    /// job then costs one attempt instead of one per worker; when every
    /// worker tried, the losers' attempts cost more than they saved at 32
    /// clients. A worker that died since the last reap may still be
    /// chosen: its jobs then wait for a fetch (the poll interval), and so
    /// does a job a worker of another version was chosen for (its claim
    /// leaves the job of a workflow pinned to a version it does not run).
    fn takes_notified(&self, queue: &str, job_id: &str) -> bool {
        let score = |worker_id: &str| {
            let mut hasher = DefaultHasher::new();
            (worker_id, job_id).hash(&mut hasher);
            hasher.finish()
        };
        let mine = score(&self.worker_id);
        let peers = self.peers.lock().expect("peers");
        !peers
            .iter()
            .any(|(id, queues)| queues.iter().any(|q| q == queue) && score(id) > mine)
    }
}
