//! `outbox-chaos`: runs real outboxd daemons (`outbox-chaos-worker`: the
//! daemon `outboxd run` starts, with fault-injection handlers) against a real PostgreSQL
//! and real nats-servers, injects faults (kill -9, crashes, SIGSTOP,
//! partitions through its own TCP proxy, slow and poisonous handlers, clock
//! skew), records the history and checks outboxd's promises on it:
//!
//! - no committed event is lost;
//! - each event is handled at most `max_attempts` times;
//! - an effect written under a unique key in the handler's transaction
//!   happens exactly once;
//! - an exhausted event is in `dead_letters` exactly once;
//! - a rolled-back enqueue is never seen.
//!
//! Run it through `scripts/chaos.sh`, which starts the PostgreSQL cluster
//! (durable, so a crash is a real crash) and builds the binaries.
//!
//! Layout: [`proxy`] (the TCP proxy), [`procs`] (the processes it runs and
//! hurts), [`history`] (producing, collecting and checking), [`scenarios`].

mod history;
mod procs;
mod proxy;
mod scenarios;

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Fault-injection suite for outboxd.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The chaos worker binary (`outbox-chaos-worker`: outboxd's daemon with
    /// the fault-injection handlers) to run as the outboxd processes.
    #[arg(long = "worker", env = "OUTBOX_CHAOS_WORKER")]
    outboxd: PathBuf,
    /// The nats-server binary.
    #[arg(long, env = "NATS_BIN")]
    nats_bin: PathBuf,
    /// outboxd's config directory.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config"))]
    config_dir: PathBuf,
    /// Scratch folder for logs, histories and nats stores.
    #[arg(long, default_value = "target/chaos")]
    work_dir: PathBuf,
    /// Comma-separated scenarios to run (default: all).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Also write the results table (Markdown) to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(err) => {
            eprintln!("outbox-chaos: {err:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    std::fs::create_dir_all(&cli.work_dir)
        .with_context(|| format!("creating {}", cli.work_dir.display()))?;
    let ctx = scenarios::Ctx {
        outboxd: cli.outboxd.canonicalize().with_context(|| {
            format!(
                "the chaos worker binary {} is missing",
                cli.outboxd.display()
            )
        })?,
        config_dir: cli.config_dir.canonicalize().context("config dir")?,
        nats_bin: cli.nats_bin.clone(),
        work_dir: cli.work_dir.canonicalize()?,
    };
    let names: Vec<String> = if cli.scenarios.is_empty() {
        scenarios::ALL.iter().map(|s| (*s).to_owned()).collect()
    } else {
        cli.scenarios.clone()
    };
    let mut outcomes = Vec::new();
    let mut errors = 0;
    for name in &names {
        eprintln!("chaos: {name} …");
        match scenarios::run(&ctx, name).await {
            Ok(outcome) => {
                eprintln!(
                    "chaos: {name}: {} in {:.1} s {:?} {}",
                    if outcome.passed() { "ok" } else { "FAILED" },
                    outcome.elapsed.as_secs_f64(),
                    outcome.verdict,
                    outcome.failure.as_deref().unwrap_or("")
                );
                outcomes.push(outcome);
            }
            Err(err) => {
                errors += 1;
                eprintln!("chaos: {name}: ERROR {err:#}");
            }
        }
    }
    let table = render(&outcomes);
    println!("{table}");
    if let Some(path) = &cli.report {
        std::fs::File::create(path)
            .and_then(|mut f| f.write_all(table.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let passed = outcomes.iter().filter(|o| o.passed()).count();
    let failed = names.len() - passed;
    // The same closing line as the test runners, for scripts/test.sh.
    println!("{passed} passed, {failed} failed");
    Ok(failed == 0 && errors == 0)
}

fn render(outcomes: &[scenarios::Outcome]) -> String {
    let mut out = String::from(
        "| Scenario | Faults | Committed | Ambiguous | Not committed | Lost | Unexpected | Double effects | Over max_attempts | Extra invocations | Stream copies | Stuck | Result | Notes |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let v = &o.verdict;
        let mut notes = o.notes.clone();
        if let Some(f) = &o.failure {
            notes.push(format!("FAILED: {f}"));
        }
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            o.name,
            o.faults,
            v.committed,
            v.ambiguous,
            v.not_committed,
            v.lost,
            v.unexpected,
            v.double_effects,
            v.over_attempts,
            v.extra_invocations,
            v.stream_copies,
            v.stuck,
            if o.passed() { "pass" } else { "FAIL" },
            notes.join("; ")
        ));
    }
    out
}
