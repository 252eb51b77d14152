//! Rebuilds the example when a migration changes (embedded by `sqlx::migrate!`).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
