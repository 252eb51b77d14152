//! Helpers shared by the tests: running the binary, talking HTTP to it,
//! scratch folders.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

pub(crate) type TestResult = Result<(), Box<dyn std::error::Error>>;

pub(crate) fn outboxd(db_url: Option<&str>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "OUTBOXD_CONFIG_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../config"),
        )
        .env("OUTBOXD_ENV", "test")
        .env("OUTBOXD_LOG__FILTER", "warn")
        .env("OUTBOXD_HTTP__LISTEN", "127.0.0.1:0");
    if let Some(url) = db_url {
        cmd.env("DATABASE_URL", url);
    }
    cmd
}

pub(crate) fn run(cmd: &mut Command) -> Result<Output, std::io::Error> {
    cmd.stdin(Stdio::null()).output()
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A minimal HTTP/1.1 GET, enough for the health and metrics endpoints.
pub(crate) async fn http_get(
    addr: &str,
    path: &str,
) -> Result<(u16, String), Box<dyn std::error::Error>> {
    http_send(addr, "GET", path, None, "").await
}

/// Starts `outboxd <args>` and returns the child and the HTTP address it printed.
pub(crate) async fn spawn_server(
    db_url: &str,
    args: &[&str],
) -> Result<(tokio::process::Child, String), Box<dyn std::error::Error>> {
    spawn_server_with(db_url, args, &[]).await
}

/// As [`spawn_server`], with these environment variables set as well.
pub(crate) async fn spawn_server_with(
    db_url: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Result<(tokio::process::Child, String), Box<dyn std::error::Error>> {
    let mut cmd = tokio::process::Command::from(outboxd(Some(db_url)));
    cmd.args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.strip_prefix("outboxd listening on http://") {
                return Ok::<String, std::io::Error>(url.trim().to_owned());
            }
        }
        Err(std::io::Error::other("outboxd exited before listening"))
    })
    .await??;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr))
}

pub(crate) async fn stop(
    child: &mut tokio::process::Child,
) -> Result<std::process::ExitStatus, Box<dyn std::error::Error>> {
    let pid = child.id().ok_or("already exited")?;
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    assert!(status.success());
    Ok(tokio::time::timeout(Duration::from_secs(30), child.wait()).await??)
}

/// An HTTP/1.1 request with a JSON body; returns status and body.
pub(crate) async fn http_send(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Result<(u16, String), Box<dyn std::error::Error>> {
    http_send_with(addr, method, path, token, &[], body).await
}

/// As [`http_send`], with these request headers as well.
pub(crate) async fn http_send_with(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String), Box<dyn std::error::Error>> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    for (name, value) in headers {
        auth.push_str(&format!("{name}: {value}\r\n"));
    }
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A folder of one test's own, removed with everything in it (a JetStream
/// store preallocates tens of megabytes) when the test ends.
pub(crate) struct ScratchDir(pub(crate) std::path::PathBuf);

impl std::ops::Deref for ScratchDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for ScratchDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for ScratchDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
