//! Failures a program driving `esft-train` must tell apart: the data is refused, the data
//! is too small, the loss diverged. Anything else is `internal`. With `--json` a failed
//! command ends with one `error` line naming the failure's [`Failure::code`] (see
//! [`crate::progress`]); its message is [`public_message`], which names a data file by its
//! file name only, never by its full path.

use std::fmt;
use std::path::{Path, PathBuf};

/// A problem with a data file: the file, the 1-based line (none for the file as a whole)
/// and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataProblem {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl DataProblem {
    pub fn new(file: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line,
            message: message.into(),
        }
    }

    /// `FILE line N: what` or `FILE: what`, the file named by `file`.
    fn render(&self, file: &str) -> String {
        match self.line {
            Some(n) => format!("{file} line {n}: {}", self.message),
            None => format!("{file}: {}", self.message),
        }
    }

    /// The problem with the file named by its last component only.
    pub fn without_dirs(&self) -> String {
        let name = self
            .file
            .file_name()
            .map_or_else(|| "the data".into(), |n| n.to_string_lossy());
        self.render(&name)
    }
}

impl fmt::Display for DataProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(&self.file.display().to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    /// The loss (or the gradient, or the eval loss) stopped being a finite number.
    #[error(
        "the {quantity} became {value} at step {step}; training stopped and nothing was \
         written (a lower --lr may help)"
    )]
    NonFinite {
        quantity: &'static str,
        value: f64,
        step: u64,
    },
    /// The data holds too little to do the work at all.
    #[error("{0}")]
    DataTooSmall(DataProblem),
    /// A line of the data is refused (format, tokenization, length).
    #[error("{0}")]
    InvalidData(DataProblem),
}

impl Failure {
    pub fn code(&self) -> &'static str {
        match self {
            Failure::NonFinite { .. } => "nan_loss",
            Failure::DataTooSmall(_) => "data_too_small",
            Failure::InvalidData(_) => "invalid_data",
        }
    }

    /// The message without directory names.
    pub fn public_message(&self) -> String {
        match self {
            Failure::NonFinite { .. } => self.to_string(),
            Failure::DataTooSmall(p) | Failure::InvalidData(p) => p.without_dirs(),
        }
    }
}

/// The code of an error whatever context was added to it: a [`Failure`]'s, else
/// `internal`.
pub fn code(e: &anyhow::Error) -> &'static str {
    failure(e).map_or("internal", Failure::code)
}

/// The message a driving program may show: a [`Failure`]'s public message, else the whole
/// error chain.
pub fn public_message(e: &anyhow::Error) -> String {
    failure(e).map_or_else(|| format!("{e:#}"), Failure::public_message)
}

fn failure(e: &anyhow::Error) -> Option<&Failure> {
    e.chain().find_map(|c| c.downcast_ref::<Failure>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn codes_and_messages_survive_context() {
        let p = DataProblem::new(Path::new("/srv/jobs/7/train.jsonl"), Some(3), "not JSON");
        assert_eq!(p.to_string(), "/srv/jobs/7/train.jsonl line 3: not JSON");
        let e = Err::<(), _>(Failure::InvalidData(p))
            .context("loading")
            .context("training")
            .unwrap_err();
        assert_eq!(code(&e), "invalid_data");
        assert_eq!(public_message(&e), "train.jsonl line 3: not JSON");
        assert!(format!("{e:#}").contains("/srv/jobs/7/train.jsonl line 3"));

        let small = Failure::DataTooSmall(DataProblem::new(Path::new("/a/b.jsonl"), None, "empty"));
        let e = anyhow::Error::new(small).context("x");
        assert_eq!(
            (code(&e), public_message(&e).as_str()),
            ("data_too_small", "b.jsonl: empty")
        );

        let nan = anyhow::Error::new(Failure::NonFinite {
            quantity: "loss",
            value: f64::NAN,
            step: 4,
        });
        assert_eq!(code(&nan), "nan_loss");
        assert!(public_message(&nan).contains("loss became NaN at step 4"));

        let other = anyhow::anyhow!("disk full").context("/secret/dir");
        assert_eq!(code(&other), "internal");
        assert_eq!(public_message(&other), "/secret/dir: disk full");
    }
}
