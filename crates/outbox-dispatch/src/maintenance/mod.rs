//! Background services besides the dispatcher. Each has the same shape: a
//! documented config, a `run_once()` that returns what it did (tests step it
//! instead of sleeping), and a `run()` loop that only handles timing and
//! shutdown.

pub mod leader;
pub mod replayer;
pub mod scheduler;
pub mod sweeper;

pub use replayer::Replayer;
pub use scheduler::Scheduler;
pub use sweeper::Sweeper;
