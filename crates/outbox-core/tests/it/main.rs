//! Integration tests of the stores against a real PostgreSQL.
mod plans;
mod state_machine;
mod wake;
