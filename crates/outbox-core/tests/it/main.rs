//! Integration tests of the stores against a real PostgreSQL.
mod state_machine;
mod wake;
