//! A throwaway PostgreSQL server for the tests that run the records database on it: its
//! cluster made by `initdb` in a temporary directory, started by `pg_ctl` on a Unix socket
//! in that directory only (no TCP port, so tests in parallel never collide), restarted on
//! request ([`Postgres::restart`]), stopped (`pg_ctl stop -m immediate`) and removed on
//! drop.
//!
//! The server binaries are found through `ESFT_PG_BIN` (a directory), then `PATH`, then
//! Debian's `/usr/lib/postgresql/<version>/bin` (the newest). `initdb` refuses to run as
//! root: as root the server runs as the user `ESFT_PG_USER` names, else `postgres`, else
//! `nobody`, through `runuser`. Where no server can be had the test skips that backend,
//! and fails where `ESFT_E2E_REQUIRED=1` (CI sets it; see `tools.rs`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

#[path = "tools.rs"]
mod tools;

/// The cluster's superuser (trust authentication: no password).
const SUPERUSER: &str = "esft";
/// The port named in the socket's file name (`.s.PGSQL.<port>`); no TCP is opened.
const PORT: u16 = 5432;

pub struct Postgres {
    bin: PathBuf,
    /// The cluster's data directory.
    data: PathBuf,
    /// The socket's directory.
    socket: PathBuf,
    /// The user the server runs as when this process is root.
    run_as: Option<String>,
    databases: AtomicUsize,
    _dir: tempfile::TempDir,
}

/// The directory of the server binaries, if any.
pub fn bin_dir() -> Option<PathBuf> {
    let has_initdb = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(d) = std::env::var_os("ESFT_PG_BIN").map(PathBuf::from) {
        return has_initdb(&d).then_some(d);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    if let Some(d) = on_path.into_iter().find(|d| has_initdb(d)) {
        // Where `initdb` on PATH is a link, its real directory holds the other binaries.
        return std::fs::canonicalize(d.join("initdb"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .filter(|real| has_initdb(real))
            .or(Some(d));
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, d)| has_initdb(d))
        .collect();
    debian.sort();
    debian.pop().map(|(_, d)| d)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The unprivileged user to run the server as (this process being root).
fn unprivileged_user() -> Option<String> {
    let candidates = [
        std::env::var("ESFT_PG_USER").ok(),
        Some("postgres".to_string()),
        Some("nobody".to_string()),
    ];
    candidates.into_iter().flatten().find(|u| {
        Command::new("id")
            .arg("-u")
            .arg(u)
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn check(what: &str, out: std::io::Result<Output>) -> Result<Output, String> {
    let out = out.map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{what}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Postgres {
    /// A running server, or `None` (the test skips PostgreSQL) where none can be had; a
    /// failure where `ESFT_E2E_REQUIRED=1`.
    pub fn start() -> Option<Self> {
        let bin = tools::tool(
            "PostgreSQL's server (initdb, pg_ctl)",
            bin_dir(),
            "apt-get install postgresql, or set ESFT_PG_BIN",
        )?;
        match Self::start_in(bin) {
            Ok(pg) => Some(pg),
            Err(e) => {
                assert!(
                    !tools::required(),
                    "PostgreSQL is required (ESFT_E2E_REQUIRED=1) but did not start: {e}"
                );
                eprintln!("SKIPPED PostgreSQL: it did not start: {e}");
                None
            }
        }
    }

    fn start_in(bin: PathBuf) -> Result<Self, String> {
        let run_as = if is_root() {
            Some(unprivileged_user().ok_or("running as root and no unprivileged user")?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("esft-pg-")
            .tempdir()
            .map_err(|e| format!("a temporary directory: {e}"))?;
        if let Some(user) = &run_as {
            check(
                "chown",
                Command::new("chown").arg(user).arg(dir.path()).output(),
            )?;
        }
        let pg = Self {
            bin,
            data: dir.path().join("data"),
            socket: dir.path().to_path_buf(),
            run_as,
            databases: AtomicUsize::new(0),
            _dir: dir,
        };
        check(
            "initdb",
            pg.command("initdb")
                .arg("-D")
                .arg(&pg.data)
                .args(["-U", SUPERUSER, "--auth=trust", "--no-sync", "-E", "UTF8"])
                .output(),
        )?;
        pg.run_server()?;
        Ok(pg)
    }

    /// Starts the server on the cluster (its socket in the same directory each time).
    fn run_server(&self) -> Result<(), String> {
        let options = format!(
            "-p {PORT} -k {} -c listen_addresses='' -c fsync=off -c max_connections=200",
            self.socket.display()
        );
        check(
            "pg_ctl start",
            self.command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-o", &options, "-l"])
                .arg(self.socket.join("server.log"))
                .args(["-w", "-t", "60", "start"])
                .output(),
        )?;
        Ok(())
    }

    /// Stops the server (`pg_ctl stop -m fast`: every session is disconnected), leaves it
    /// down for `down`, and starts it again on the same data directory and socket: what
    /// clients see of a database restart. Returns once it accepts connections again.
    pub fn restart(&self, down: std::time::Duration) {
        let stopped = check(
            "pg_ctl stop",
            self.command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "fast", "-w", "stop"])
                .output(),
        );
        if let Err(e) = stopped {
            panic!("{e}");
        }
        std::thread::sleep(down);
        if let Err(e) = self.run_server() {
            panic!("{e}");
        }
    }

    /// The server binary `name`, run as the unprivileged user where this process is root.
    fn command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut c = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        // A directory the server's user may enter.
        c.current_dir(&self.socket);
        c
    }

    /// A new, empty database: its `postgres://` URL (over the socket).
    pub fn database(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::SeqCst);
        let name = format!("esft_test_{n}");
        let created = check(
            "createdb",
            self.command("createdb")
                .args(["-h"])
                .arg(&self.socket)
                .args(["-p", &PORT.to_string(), "-U", SUPERUSER, &name])
                .output(),
        );
        if let Err(e) = created {
            panic!("{e}");
        }
        format!(
            "postgres://{SUPERUSER}@localhost:{PORT}/{name}?host={}",
            self.socket.display()
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A records database for a test body to run on.
pub struct TestDatabase {
    /// `sqlite` or `postgres`, for assertion messages.
    pub name: &'static str,
    /// The `fine_tuning.database` value: `""` (SQLite in the data directory) or a URL.
    pub url: String,
    _server: Option<Postgres>,
}

/// SQLite, then a new database on a throwaway PostgreSQL where one can be had (see
/// [`Postgres::start`]): a test body runs once on each.
pub fn databases() -> Vec<TestDatabase> {
    let mut out = vec![TestDatabase {
        name: "sqlite",
        url: String::new(),
        _server: None,
    }];
    if let Some(pg) = Postgres::start() {
        out.push(TestDatabase {
            name: "postgres",
            url: pg.database(),
            _server: Some(pg),
        });
    }
    out
}
