//! (h) Several dispatcher processes on one database. No-op handlers: one
//! process already drives PostgreSQL to its limit on this machine.
//! I/O-bound handlers with a per-process concurrency: the processes, not the
//! database, are the limit, which is when adding one helps.

use crate::bench::Bench;
use crate::load::{self, WorkerLoad};
use crate::support::truncate;

/// For each handler kind, each of `--processes` in turn, compared with one
/// process.
pub async fn scale_out(b: &mut Bench) -> anyhow::Result<()> {
    let io_bound = WorkerLoad {
        handler_ms: b.args.scale_handler_ms,
        concurrency: b.args.scale_concurrency,
    };
    let processes = b.args.processes.clone();
    for (label, load) in [
        ("no-op handler".to_owned(), WorkerLoad::default()),
        (
            format!(
                "{} ms handler, {} at once per process",
                io_bound.handler_ms, io_bound.concurrency
            ),
            io_bound,
        ),
    ] {
        let mut one = None;
        for &n in &processes {
            let rate = load::scale_out(&b.pool, b.args.scale_rows, n, load).await?;
            truncate(&b.pool).await?;
            let base = *one.get_or_insert(rate);
            b.figure(
                "scale-out",
                format!("{n} process(es), {label}"),
                rate,
                "events/s",
                Some((base, "1 process")),
            );
        }
    }
    Ok(())
}
