//! The real processes a scenario runs and hurts: `outboxd`, `nats-server`,
//! and the PostgreSQL server (through the commands the chaos script gives).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// How to start one chaos worker (`outbox-chaos-worker run`).
#[derive(Debug, Clone)]
pub struct OutboxdSpec {
    /// The binary.
    pub bin: PathBuf,
    /// The config directory (`config/` of the repository).
    pub config_dir: PathBuf,
    /// Where the process writes its log and its invocation history.
    pub dir: PathBuf,
    /// A name for logs, e.g. "a".
    pub name: String,
    /// `DATABASE_URL` (maybe through a proxy).
    pub database_url: String,
    /// `NATS_URL`, when relaying.
    pub nats_url: Option<String>,
    /// `OUTBOXD_*` settings on top of the chaos defaults.
    pub env: Vec<(String, String)>,
    /// A libfaketime offset such as `+2d`: the process's wall clock is skewed.
    pub clock_offset: Option<String>,
}

impl OutboxdSpec {
    /// The history file of this process (one per start, so restarts append).
    pub fn history(&self) -> PathBuf {
        self.dir.join(format!("{}.history", self.name))
    }
}

/// A supervised `outboxd` process.
pub struct Outboxd {
    spec: OutboxdSpec,
    child: Option<Child>,
    addr: String,
    /// Times it was started after the first start.
    pub restarts: u32,
}

impl Outboxd {
    /// Starts the process and waits until it serves HTTP.
    pub async fn start(spec: OutboxdSpec) -> anyhow::Result<Self> {
        let mut this = Self {
            spec,
            child: None,
            addr: String::new(),
            restarts: 0,
        };
        this.spawn().await?;
        Ok(this)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let spec = &self.spec;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.dir.join(format!("{}.log", spec.name)))?;
        let mut cmd = Command::new(&spec.bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("OUTBOXD_CONFIG_DIR", &spec.config_dir)
            .env("OUTBOXD_HTTP__LISTEN", "127.0.0.1:0")
            .env("OUTBOXD_LOG__FILTER", "warn")
            .env("CHAOS_HISTORY", spec.history())
            .env("DATABASE_URL", &spec.database_url)
            .env("OUTBOXD_TRIGGER_RETRY_BASE_MS", "50")
            .env("OUTBOXD_TRIGGER_RETRY_MAX_MS", "500")
            .env("OUTBOXD_TRIGGER_RETRY_MAX_ATTEMPTS", "3")
            .env("OUTBOXD_DISPATCHER__POLL_INTERVAL_MS", "100")
            .env("OUTBOXD_DISPATCHER__LEASE_MS", "2000")
            .env("OUTBOXD_DISPATCHER__HANDLER_TIMEOUT_MS", "1500")
            .env("OUTBOXD_DISPATCHER__HEARTBEAT_INTERVAL_MS", "500")
            .env("OUTBOXD_DISPATCHER__DRAIN_GRACE_MS", "1000")
            .env("OUTBOXD_DATABASE__ACQUIRE_TIMEOUT_MS", "2000");
        if let Some(url) = &spec.nats_url {
            cmd.env("NATS_URL", url);
        }
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        if let Some(offset) = &spec.clock_offset {
            cmd.env("LD_PRELOAD", libfaketime()?)
                .env("FAKETIME", offset)
                // Timers and timeouts keep real time; only the wall clock is skewed.
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        cmd.arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", spec.bin.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix("outboxd listening on http://") {
                    return Ok(addr.trim().to_owned());
                }
            }
            Err(std::io::Error::other("exited before listening"))
        })
        .await
        .with_context(|| format!("outboxd {} did not start within 30 s", spec.name))?
        .with_context(|| {
            format!(
                "outboxd {} failed to start; see {}",
                spec.name,
                spec.dir.join(format!("{}.log", spec.name)).display()
            )
        })?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        self.addr = addr;
        Ok(())
    }

    /// SIGKILL, then start again.
    pub async fn kill9_and_restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        self.restarts += 1;
        self.spawn().await
    }

    /// Starts the process again if it died by itself (e.g. a handler aborted
    /// it); returns whether it did.
    pub async fn restart_if_exited(&mut self) -> anyhow::Result<bool> {
        let exited = match self.child.as_mut() {
            Some(child) => child.try_wait()?.is_some(),
            None => true,
        };
        if exited {
            self.restarts += 1;
            self.spawn().await?;
        }
        Ok(exited)
    }

    /// SIGTERM, and waits for the exit; returns whether it exited cleanly.
    pub async fn terminate(&mut self, within: Duration) -> anyhow::Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(false);
        };
        if let Some(pid) = child.id() {
            signal(pid, "TERM").await?;
        }
        match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => Ok(status?.success()),
            Err(_) => {
                child.kill().await?;
                bail!(
                    "outboxd {} did not exit within {within:?} of SIGTERM",
                    self.spec.name
                )
            }
        }
    }

    /// Starts a terminated process again.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.restarts += 1;
        self.spawn().await
    }

    /// A counter or gauge from `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let body = http_get(&self.addr, "/metrics").await?;
        Ok(body
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

fn libfaketime() -> anyhow::Result<PathBuf> {
    let candidates = [
        std::env::var("CHAOS_LIBFAKETIME").unwrap_or_default(),
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1".into(),
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1".into(),
        "/usr/lib/faketime/libfaketimeMT.so.1".into(),
    ];
    candidates
        .iter()
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context(
            "libfaketime not found: install the Debian package faketime (scripts/chaos.sh does)",
        )
}

/// Sends a signal by name through `kill(1)`.
pub async fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .await?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// A JetStream nats-server of one scenario, on a fixed port and store, so a
/// restart comes back at the same address with the same data.
pub struct NatsServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts it and waits until it accepts connections.
    pub async fn start(bin: &Path, dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let port = free_port()?;
        let mut this = Self {
            bin: bin.to_owned(),
            dir,
            port,
            child: None,
        };
        this.spawn().await?;
        Ok(this)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats.log"))?;
        let child = Command::new(&self.bin)
            .args(["-js", "-sd"])
            .arg(self.dir.join("js"))
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        let url = self.url();
        for _ in 0..300 {
            if async_nats::connect(&url).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("nats-server did not accept connections on {url}")
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The socket address, for a proxy in front of it.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGKILL; [`NatsServer::restart`] brings it back.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts it again on the same port and store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn().await
    }

    /// SIGSTOP or SIGCONT.
    pub async fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .context("nats-server is not running")?;
        signal(pid, name).await
    }
}

/// Crashes and restarts the scenario's PostgreSQL server with the commands
/// the chaos script exports (it knows the cluster's directory, port and user).
pub struct PgControl {
    crash: String,
    start: String,
}

impl PgControl {
    /// From `CHAOS_PG_CRASH` and `CHAOS_PG_START`.
    pub fn from_env() -> anyhow::Result<Self> {
        let get = |k: &str| {
            std::env::var(k).with_context(|| {
                format!("{k} is not set: run the chaos suite through scripts/chaos.sh")
            })
        };
        Ok(Self {
            crash: get("CHAOS_PG_CRASH")?,
            start: get("CHAOS_PG_START")?,
        })
    }

    /// `pg_ctl stop -m immediate`: no checkpoint, crash recovery on start.
    pub async fn crash(&self) -> anyhow::Result<()> {
        sh(&self.crash).await
    }

    /// Starts the server again (crash recovery) and waits for it.
    pub async fn start(&self) -> anyhow::Result<()> {
        sh(&self.start).await
    }
}

async fn sh(script: &str) -> anyhow::Result<()> {
    let out = Command::new("bash")
        .args(["-c", script])
        .stdin(Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "`{script}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A port nobody listens on right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
