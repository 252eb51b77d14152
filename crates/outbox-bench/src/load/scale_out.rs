//! Several `outbox-bench worker` processes draining one backlog.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use outbox_core::store::stats;
use sqlx::PgPool;

use crate::support::prefill;

/// What each scale-out worker process does per event.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerLoad {
    /// Handler time, ms (0: a no-op handler).
    pub handler_ms: u64,
    /// The process's `dispatcher.concurrency` (0: the configured one).
    pub concurrency: u32,
}

/// Drains `rows` with `processes` separate `outbox-bench worker` processes;
/// returns events per second. The rows wait in a suspended app until every
/// worker is up, so start-up is not measured.
pub async fn scale_out(
    pool: &PgPool,
    rows: u32,
    processes: u32,
    load: WorkerLoad,
) -> anyhow::Result<f64> {
    let app = outbox_core::store::apps::ensure(pool, "bench-scale", "bench scale-out")
        .await?
        .id;
    outbox_core::store::apps::set_suspended(pool, "bench-scale", true).await?;
    prefill(pool, app, rows, "bench.noop").await?;
    let exe = std::env::current_exe().context("finding the benchmark binary")?;
    let mut workers = Vec::new();
    for _ in 0..processes {
        let mut command = tokio::process::Command::new(&exe);
        command
            .args(["worker", "--handler-ms", &load.handler_ms.to_string()])
            .stdin(std::process::Stdio::null());
        if load.concurrency > 0 {
            command.env(
                "OUTBOXD_DISPATCHER__CONCURRENCY",
                load.concurrency.to_string(),
            );
        }
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a bench worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with("bench-worker ready") {
                    return Ok(());
                }
            }
            Err(std::io::Error::other("the worker exited"))
        })
        .await
        .context("a bench worker did not start within 30 s")??;
        workers.push(child);
    }
    // The workers' LISTEN connections are up shortly after "ready".
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    outbox_core::store::apps::set_suspended(pool, "bench-scale", false).await?;
    stats::wake_dispatchers(pool).await?;
    while !stats::queue_empty(pool, app).await? {
        for w in &mut workers {
            ensure!(w.try_wait()?.is_none(), "a bench worker died");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = f64::from(rows) / started.elapsed().as_secs_f64();
    for mut w in workers {
        if let Some(pid) = w.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), w.wait()).await;
    }
    Ok(rate)
}
