//! How a job's run here ends short of success ([`Stop`]), and the retried writes its end
//! depends on ([`persist`]).

use std::time::{Duration, Instant};

use crate::jobs::queue::{JobError, JobsError};

/// Why a job stopped short of success.
#[derive(Debug)]
pub enum Stop {
    Cancelled,
    Failed(JobError),
    /// The lease is gone (another worker runs the job, or could): nothing more of the job
    /// is this runner's to change.
    Lost,
    /// This runner stops: the job goes back to the queue.
    Released,
    /// The object store could not be reached (what was being done): the job goes back to
    /// the queue, for a later claim, rather than failing.
    StoreUnavailable(String),
}

impl From<JobError> for Stop {
    fn from(e: JobError) -> Self {
        Stop::Failed(e)
    }
}

/// [`Stop::StoreUnavailable`] for `what`, the error logged.
pub fn unavailable(what: &str, e: impl std::fmt::Display) -> Stop {
    tracing::warn!("fine-tuning job: {what}: {e}");
    Stop::StoreUnavailable(what.to_string())
}

/// A failure of the server's own (`internal_error`), the details logged, not shown.
pub fn internal(what: &str, e: impl std::fmt::Display) -> Stop {
    tracing::error!("fine-tuning job: {what}: {e}");
    Stop::Failed(JobError::new(
        "internal_error",
        format!("{what} failed; the server log has the details"),
    ))
}

/// The job error of work refused for want of disk space.
pub fn no_room(what: &str, free: u64) -> JobError {
    JobError::new(
        "insufficient_storage",
        format!(
            "{what} would leave less free disk space than this server keeps \
             (limits.min_free_disk_bytes; {free} bytes are free)"
        ),
    )
}

/// Runs `op` on the records until it succeeds, for up to `within` (the database may be
/// restarting): the writes a job's end depends on.
pub fn persist<T, F, Fut>(
    rt: &tokio::runtime::Handle,
    within: Duration,
    what: &str,
    op: F,
) -> Result<T, JobsError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, JobsError>>,
{
    let deadline = Instant::now() + within;
    loop {
        match rt.block_on(op()) {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!("{what}: {e}; trying again");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_retried_within_its_time_and_no_longer() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let tries = std::sync::atomic::AtomicU32::new(0);
        let flaky = || {
            let n = tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(JobsError::Db(sqlx::Error::PoolTimedOut))
                } else {
                    Ok(n)
                }
            }
        };
        let handle = rt.handle().clone();
        assert_eq!(
            persist(&handle, Duration::from_secs(5), "w", flaky).unwrap(),
            2
        );
        let never = || async { Err::<(), _>(JobsError::Db(sqlx::Error::PoolTimedOut)) };
        let started = Instant::now();
        assert!(persist(&handle, Duration::from_millis(300), "w", never).is_err());
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn internal_failures_show_no_details() {
        let Stop::Failed(e) = internal("copying", "/srv/data/secret: disk full") else {
            panic!()
        };
        assert_eq!(e.code, "internal_error");
        assert!(!e.message.contains("/srv"), "{}", e.message);
    }
}
