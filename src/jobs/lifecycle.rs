//! The lifecycle of a fine-tuning job, as one state machine: the statuses (with their
//! names, which are both the SQL values of `jobs.status` and the API's), and the
//! transitions between them: for each, the statuses it leaves from, the one it goes to,
//! who may make it, and the event it writes. [`super::queue::JobStore`] makes every
//! transition from this table, each one conditional `UPDATE` and its event in one
//! transaction, so of two racing transitions exactly one wins and a terminal status is
//! never left again.
//!
//! ```text
//!   validating_files --Validated--> queued --Claim--> running --Succeed--> succeeded
//!          |                          ^                 |  |
//!          |                          +-Expire/Release--+  +--Fail--> failed
//!          +-------- Cancel (from any active status) --------------> cancelled
//! ```

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    ValidatingFiles,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::ValidatingFiles,
        Status::Queued,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
    ];

    /// The statuses of a job that may still run.
    pub const ACTIVE: [Status; 3] = [Status::ValidatingFiles, Status::Queued, Status::Running];

    /// The status's name: its value in SQL and in the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::ValidatingFiles => "validating_files",
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_active(self) -> bool {
        Self::ACTIVE.contains(&self)
    }

    /// `statuses` as an SQL list of literals, `('queued', 'running')`: the names are
    /// this enum's constants, never input.
    pub fn sql_list(statuses: &[Status]) -> String {
        let names: Vec<String> = statuses
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        format!("({})", names.join(", "))
    }
}

/// How loud a job event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    pub const fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "warn" => Level::Warn,
            "error" => Level::Error,
            _ => Level::Info,
        }
    }
}

/// Who may make a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// The process that accepted the job (its files checked).
    Server,
    /// A worker with room for a job: it becomes the job's holder.
    Worker,
    /// Any process: it finds the holder's lease expired.
    AnyProcess,
    /// The worker holding the job's lease, and only while it holds it.
    Holder,
    /// The job's owner (or the admin), through the API.
    Owner,
}

/// A change of a job's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The job's files were checked: it waits for a worker.
    Validated,
    /// A worker takes the job, oldest first among the owners with the fewest running.
    Claim,
    /// The holder stopped renewing its lease: the job goes back to the queue.
    Expire,
    /// The holder gives the job back (it stops, or the object store is unreachable).
    Release,
    /// The holder installed the job's adapter.
    Succeed,
    /// The holder ends the job as failed, with its error.
    Fail,
    /// The owner cancels an active job.
    Cancel,
}

/// One row of the transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub from: &'static [Status],
    pub to: Status,
    pub by: Actor,
    /// The level of the event the transition writes.
    pub level: Level,
    /// The event's message; `{name}`s are filled with the transition's details.
    pub message: &'static str,
}

impl Transition {
    pub const ALL: [Transition; 7] = [
        Transition::Validated,
        Transition::Claim,
        Transition::Expire,
        Transition::Release,
        Transition::Succeed,
        Transition::Fail,
        Transition::Cancel,
    ];

    /// The transition table.
    pub const fn rule(self) -> Rule {
        use Status::*;
        let (from, to, by, level, message): (&'static [Status], _, _, _, _) = match self {
            Transition::Validated => (
                &[ValidatingFiles],
                Queued,
                Actor::Server,
                Level::Info,
                "Files validated, moving job to queued state",
            ),
            Transition::Claim => (
                &[Queued],
                Running,
                Actor::Worker,
                Level::Info,
                "Claimed by worker {worker}",
            ),
            Transition::Expire => (
                &[Running],
                Queued,
                Actor::AnyProcess,
                Level::Warn,
                "Worker {worker} stopped renewing its lease; the job is back in the queue \
                 and continues from its last saved state",
            ),
            Transition::Release => (
                &[Running],
                Queued,
                Actor::Holder,
                Level::Warn,
                "{reason}; the job is back in the queue and continues from its last saved state",
            ),
            Transition::Succeed => (
                &[Running],
                Succeeded,
                Actor::Holder,
                Level::Info,
                "The job has successfully completed: the model {model} is ready",
            ),
            Transition::Fail => (
                &[Running],
                Failed,
                Actor::Holder,
                Level::Error,
                "The job failed: {error}",
            ),
            Transition::Cancel => (
                &Status::ACTIVE,
                Cancelled,
                Actor::Owner,
                Level::Info,
                "Job cancelled",
            ),
        };
        Rule {
            from,
            to,
            by,
            level,
            message,
        }
    }

    /// The transition from `from` to `to`, if the table has one.
    pub fn between(from: Status, to: Status) -> Option<Transition> {
        Self::ALL
            .into_iter()
            .find(|t| t.rule().to == to && t.rule().from.contains(&from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_parse_back() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        let mut names: Vec<_> = Status::ALL.iter().map(|s| s.as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), Status::ALL.len());
        assert_eq!(Status::parse("RUNNING"), None);
        assert_eq!(
            Status::sql_list(&Status::ACTIVE),
            "('validating_files', 'queued', 'running')"
        );
    }

    #[test]
    fn terminal_statuses_are_never_left() {
        for t in Transition::ALL {
            let rule = t.rule();
            assert!(!rule.from.is_empty(), "{t:?}");
            for from in rule.from {
                assert!(from.is_active(), "{t:?} leaves the terminal {from:?}");
                assert_ne!(*from, rule.to, "{t:?} goes nowhere");
            }
        }
        for s in Status::ALL.into_iter().filter(|s| !s.is_active()) {
            for to in Status::ALL {
                assert_eq!(Transition::between(s, to), None, "{s:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn the_table_is_the_lifecycle() {
        use Status::*;
        // Every pair of statuses, against the diagram in the module's comment.
        let allowed = [
            (ValidatingFiles, Queued),
            (Queued, Running),
            (Running, Queued),
            (Running, Succeeded),
            (Running, Failed),
            (ValidatingFiles, Cancelled),
            (Queued, Cancelled),
            (Running, Cancelled),
        ];
        for from in Status::ALL {
            for to in Status::ALL {
                assert_eq!(
                    Transition::between(from, to).is_some(),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
        // Only the holder ends a running job, except the owner's cancel; a success is
        // never anyone else's.
        for t in Transition::ALL {
            let rule = t.rule();
            if matches!(rule.to, Succeeded | Failed) {
                assert_eq!(rule.by, Actor::Holder, "{t:?}");
            }
            if rule.to == Cancelled {
                assert_eq!(rule.by, Actor::Owner, "{t:?}");
            }
        }
        assert_eq!(Transition::Fail.rule().level, Level::Error);
        assert_eq!(Transition::Expire.rule().level, Level::Warn);
    }
}
