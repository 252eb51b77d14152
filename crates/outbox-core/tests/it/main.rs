//! Integration tests of enqueue and the stores against a real PostgreSQL.
mod enqueue;
mod inspect;
mod leases;
mod plans;
mod positions;
mod state_machine;
mod wake;
