//! Real servers for Weft's tests, started on loopback by the test itself and removed on drop.
//!
//! The shared store is tested against the real thing (no mocks): [`Postgres`] runs a throwaway
//! PostgreSQL cluster (initdb into a temporary directory, a free port, trust authentication on
//! 127.0.0.1 only, fsync off) and hands out fresh databases. A missing PostgreSQL installation
//! fails the test loudly with how to install it; it never skips.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The directory holding PostgreSQL's server programs (`initdb`, `pg_ctl`, `postgres`):
/// `WEFT_PG_BIN`, else the newest `/usr/lib/postgresql/<version>/bin`.
pub fn postgres_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("WEFT_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server programs not found: the shared-store tests need a real \
             PostgreSQL. Install it with `apt-get install -y postgresql` (or run `cargo xtask \
             setup`), or point WEFT_PG_BIN at the directory holding initdb and pg_ctl."
        ),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL program; as root, as the `postgres` user (the server refuses root).
fn pg_command(bin: &Path, program: &str, as_postgres: bool) -> Command {
    if as_postgres {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(bin.join(program));
        command
    } else {
        Command::new(bin.join(program))
    }
}

fn run(mut command: Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

/// A throwaway PostgreSQL cluster on 127.0.0.1; stopped and deleted on drop.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    port: u16,
    databases: AtomicU32,
}

impl Postgres {
    /// Creates and starts a cluster (about a second).
    pub fn start() -> Postgres {
        let bin = postgres_bin();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("weft-pg-")
            .tempdir()
            .expect("a temporary directory");
        if as_postgres {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                .expect("chmod the cluster directory");
        }
        let mut initdb = pg_command(&bin, "initdb", as_postgres);
        initdb.arg("-D").arg(dir.path().join("data")).args([
            "-A",
            "trust",
            "-U",
            "weft",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(initdb, "initdb");
        let postgres = Postgres {
            dir,
            bin,
            as_postgres,
            port: free_port(),
            databases: AtomicU32::new(0),
        };
        postgres.start_server();
        postgres
    }

    fn start_server(&self) {
        let mut pg_ctl = pg_command(&self.bin, "pg_ctl", self.as_postgres);
        pg_ctl
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                self.port,
                self.dir.path().display()
            ))
            .args(["-w", "-t", "30", "start"]);
        run(pg_ctl, "pg_ctl start");
    }

    /// Stops the server at once (as a crash would), keeping its data.
    pub fn stop(&self) {
        let mut pg_ctl = pg_command(&self.bin, "pg_ctl", self.as_postgres);
        pg_ctl
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"]);
        run(pg_ctl, "pg_ctl stop");
    }

    /// Starts it again after [`Postgres::stop`], on the same port.
    pub fn restart(&self) {
        self.start_server();
    }

    /// A URL for the database `name` (which [`Postgres::create_database`] made).
    pub fn url(&self, name: &str) -> String {
        format!("postgres://weft@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a fresh, empty database and returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "weft_test_{}",
            self.databases.fetch_add(1, Ordering::Relaxed)
        );
        let mut createdb = Command::new(self.bin.join("createdb"));
        createdb
            .args(["-h", "127.0.0.1", "-U", "weft", "-p"])
            .arg(self.port.to_string())
            .arg(&name);
        run(createdb, "createdb");
        self.url(&name)
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut pg_ctl = pg_command(&self.bin, "pg_ctl", self.as_postgres);
        pg_ctl
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"]);
        let _ = pg_ctl.output();
    }
}
