//! `esft-train` as a child process: started at a lower priority with its own compute
//! threads, dying with this process (`PR_SET_PDEATHSIG`), killed at once when its work
//! must stop, its stdout read as the contract's JSON lines ([`Line`]) and its failure
//! turned into a job error a client may read.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::stop::{internal, Stop};
use crate::jobs::contract::Line;
use crate::jobs::queue::JobError;

/// What a child's work answers to: whether it must stop, and where the child's pid goes.
pub trait Watch {
    /// Why the work must stop, if it must (asked before and after each child).
    fn stopped(&self) -> Option<Stop>;
    /// The child `pid` started (`None`: it ended). True when it must be killed at once
    /// (the work was stopped while it started).
    fn child(&self, pid: Option<u32>) -> bool;
}

/// How children run.
#[derive(Debug, Clone)]
pub struct Trainer {
    /// The `esft-train` executable.
    pub path: PathBuf,
    /// Compute threads of each child.
    pub threads: usize,
    /// Niceness added to the children (serving keeps the upper hand).
    pub nice: i32,
}

impl Trainer {
    /// Runs `esft-train` with `args`, handing each line of its stdout to `each` (the
    /// error line excepted: it becomes the failure). `label` names the work in the log;
    /// `scrub` turns a trainer message into one a client may see.
    pub fn run(
        &self,
        label: &str,
        args: &[OsString],
        watch: &dyn Watch,
        scrub: &dyn Fn(&str) -> String,
        mut each: impl FnMut(Line),
    ) -> Result<(), Stop> {
        if let Some(stop) = watch.stopped() {
            return Err(stop);
        }
        let mut cmd = Command::new(&self.path);
        cmd.args(args)
            .env("RAYON_NUM_THREADS", self.threads.max(1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let nice = self.nice;
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (prctl, getppid, setpriority, _exit) run
        // between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // The server died before the line above: do not run on as an orphan.
                if libc::getppid() != parent as libc::pid_t {
                    libc::_exit(1);
                }
                if nice != 0 {
                    libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| internal(&format!("starting the trainer {}", self.path.display()), e))?;
        let pid = child.id();
        if watch.child(Some(pid)) {
            kill(pid);
        }
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = e.read_to_string(&mut text);
                text
            })
        });
        let mut error_line = None;
        if let Some(stdout) = child.stdout.take() {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match Line::parse(&line) {
                    Some(Line::Error(e)) => error_line = Some(e),
                    Some(l) => each(l),
                    None => {}
                }
            }
        }
        let status = child.wait();
        let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
        watch.child(None);
        if let Some(stop) = watch.stopped() {
            return Err(stop);
        }
        let status = status.map_err(|e| internal("waiting for the trainer", e))?;
        if status.success() {
            return Ok(());
        }
        let command = args
            .first()
            .and_then(|a| a.to_str())
            .unwrap_or("trainer")
            .to_string();
        tracing::warn!(work = label, %command, ?status, "esft-train failed: {}", stderr.trim());
        use std::os::unix::process::ExitStatusExt;
        Err(Stop::Failed(failure(
            &command,
            error_line.map(|e| (e.code, e.message)),
            status.signal(),
            &stderr,
            scrub,
        )))
    }
}

/// The job error of a failed child: its error line where it printed one, else what its
/// end says (killed, crashed, the last line of its stderr).
fn failure(
    command: &str,
    error_line: Option<(String, String)>,
    signal: Option<i32>,
    stderr: &str,
    scrub: &dyn Fn(&str) -> String,
) -> JobError {
    if let Some((code, message)) = error_line {
        return JobError::new(&code, scrub(&message));
    }
    match signal {
        Some(libc::SIGKILL) => JobError::new(
            "training_killed",
            format!("the trainer ({command}) was killed, possibly for lack of memory"),
        ),
        Some(sig) => JobError::new(
            "training_crashed",
            format!("the trainer ({command}) died of signal {sig}"),
        ),
        None => JobError::new(
            "training_failed",
            scrub(
                stderr
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("the trainer failed"),
            ),
        ),
    }
}

pub fn kill(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: plain syscall on a pid this process spawned and has not reaped.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Stops once `stop_after` lines were seen; records the pids it was told of.
    #[derive(Default)]
    struct Watcher {
        stop: Mutex<bool>,
        pids: Mutex<Vec<Option<u32>>>,
    }

    impl Watch for Watcher {
        fn stopped(&self) -> Option<Stop> {
            (*self.stop.lock().unwrap()).then_some(Stop::Cancelled)
        }
        fn child(&self, pid: Option<u32>) -> bool {
            self.pids.lock().unwrap().push(pid);
            *self.stop.lock().unwrap()
        }
    }

    fn sh(script: &str) -> (Trainer, Vec<OsString>) {
        let trainer = Trainer {
            path: "/bin/sh".into(),
            threads: 1,
            nice: 0,
        };
        (trainer, vec!["-c".into(), script.into()])
    }

    #[test]
    fn lines_go_to_the_caller_and_the_error_line_becomes_the_failure() {
        let (t, args) = sh(
            r#"echo '{"task":"score","event":"done","tokens":5}'; echo noise;
            echo '{"task":"score","event":"error","code":"invalid_data","message":"bad /srv/x line 2"}';
            echo 'detail' >&2; exit 1"#,
        );
        let w = Watcher::default();
        let mut seen = Vec::new();
        let scrub = |m: &str| m.replace("/srv/x", "file-1");
        let err = t
            .run("test", &args, &w, &scrub, |l| seen.push(l))
            .unwrap_err();
        assert_eq!(
            seen,
            [Line::ScoreDone(crate::jobs::contract::ScoreDone {
                tokens: 5
            })]
        );
        let Stop::Failed(e) = err else { panic!() };
        assert_eq!(e, JobError::new("invalid_data", "bad file-1 line 2"));
        let pids = w.pids.lock().unwrap().clone();
        assert_eq!(pids.len(), 2);
        assert!(pids[0].is_some() && pids[1].is_none());
    }

    #[test]
    fn a_child_without_an_error_line_fails_by_how_it_ended() {
        let w = Watcher::default();
        let none = |m: &str| m.to_string();
        let (t, args) = sh("echo 'last words' >&2; exit 3");
        let Err(Stop::Failed(e)) = t.run("test", &args, &w, &none, |_| {}) else {
            panic!()
        };
        assert_eq!(e, JobError::new("training_failed", "last words"));
        let (t, args) = sh("kill -9 $$");
        let Err(Stop::Failed(e)) = t.run("test", &args, &w, &none, |_| {}) else {
            panic!()
        };
        assert_eq!(e.code, "training_killed");
        let (t, args) = sh("exit 0");
        assert!(t.run("test", &args, &w, &none, |_| {}).is_ok());
    }

    #[test]
    fn stopped_work_starts_no_child_and_a_stop_kills_the_running_one() {
        let w = Watcher::default();
        let none = |m: &str| m.to_string();
        *w.stop.lock().unwrap() = true;
        let (t, args) = sh("exit 0");
        assert!(matches!(
            t.run("test", &args, &w, &none, |_| {}),
            Err(Stop::Cancelled)
        ));
        assert!(w.pids.lock().unwrap().is_empty());
        // Stopped as it starts: killed at once (a sleep of a minute ends now).
        let watch = Watcher::default();
        let started = std::time::Instant::now();
        let (t, args) = sh("echo '{}'; exec sleep 60");
        let stop_on_start = StopOnStart(&watch);
        assert!(matches!(
            t.run("test", &args, &stop_on_start, &none, |_| {}),
            Err(Stop::Cancelled)
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }

    /// Stops the work the moment its child starts.
    struct StopOnStart<'a>(&'a Watcher);

    impl Watch for StopOnStart<'_> {
        fn stopped(&self) -> Option<Stop> {
            self.0.stopped()
        }
        fn child(&self, pid: Option<u32>) -> bool {
            *self.0.stop.lock().unwrap() = true;
            self.0.child(pid)
        }
    }
}
