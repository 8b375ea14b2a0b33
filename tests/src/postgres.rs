//! A private PostgreSQL cluster a test or the chaos runner owns: it may
//! stop and restart it, or listen on an address a network namespace
//! reaches, which the shared server does not.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

/// A cluster in a temporary directory, started, trusting local clients.
pub struct PrivatePostgres {
    /// PostgreSQL's binaries.
    pub bin: PathBuf,
    /// Its directory (data, socket, log).
    pub dir: PathBuf,
    /// Its port.
    pub port: u16,
    /// The addresses it listens on.
    listen: Vec<String>,
    /// Leave the stopped cluster on disk when dropped, for a post-mortem.
    pub keep: bool,
}

impl PrivatePostgres {
    /// A new cluster listening on 127.0.0.1.
    pub fn create() -> anyhow::Result<Self> {
        Self::listening_on(&[])
    }

    /// A new cluster listening on 127.0.0.1 and `addresses` too, trusting
    /// clients from those addresses' /24 networks.
    pub fn listening_on(addresses: &[&str]) -> anyhow::Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL binaries not found under /usr/lib/postgresql (apt-get install postgresql)")?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .context("no initdb found")?;
        let dir = std::env::temp_dir().join(format!("widget-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let mut listen = vec!["127.0.0.1".to_owned()];
        listen.extend(addresses.iter().map(|a| (*a).to_owned()));
        let pg = Self {
            bin,
            dir,
            port: free_port()?,
            listen,
            keep: false,
        };
        if is_root() {
            run(Command::new("chown").arg("postgres").arg(&pg.dir))?;
        }
        run(pg
            .command("initdb")
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "-D"])
            .arg(pg.data()))?;
        if !addresses.is_empty() {
            let hba = pg.data().join("pg_hba.conf");
            let mut text = std::fs::read_to_string(&hba)?;
            for address in addresses {
                let network = address.rsplit_once('.').map_or(*address, |(net, _)| net);
                text.push_str(&format!("host all all {network}.0/24 trust\n"));
            }
            std::fs::write(&hba, text)?;
        }
        pg.start()?;
        Ok(pg)
    }

    /// Its data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A command running PostgreSQL's `program` as the `postgres` user.
    pub fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// Starts it (again).
    pub fn start(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses={} -c max_connections=400",
            self.port,
            self.dir.display(),
            self.listen.join(","),
        );
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"]))
    }

    /// Stops it as a crash would (`-m immediate`).
    pub fn stop_immediate(&self) -> anyhow::Result<()> {
        run(self.command("pg_ctl").arg("-D").arg(self.data()).args([
            "-m",
            "immediate",
            "-w",
            "stop",
        ]))
    }

    /// The URL of `database` on 127.0.0.1.
    pub fn url(&self, database: &str) -> String {
        self.url_at("127.0.0.1", database)
    }

    /// The URL of `database` at `address`.
    pub fn url_at(&self, address: &str, database: &str) -> String {
        format!("postgres://postgres@{address}:{}/{database}", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.stop_immediate();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether this process runs as root (PostgreSQL then runs as `postgres`).
pub fn is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false)
}

/// Runs `command`, failing with its stderr.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A port nothing listens on now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
