//! A count of matching rows: exact up to a bound, else an estimate or a
//! lower bound, and set right by the first page read beside it.

use serde::Serialize;

use super::RowPage;

/// How many rows match, counted up to a bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RowCount {
    /// The exact count when `exact`, else the planner's estimate, or one
    /// more than the bound when counting got past it and the planner
    /// expected fewer (then `at_least`).
    pub rows: i64,
    /// False when `rows` is not the exact count.
    pub exact: bool,
    /// True when `rows` is a lower bound: the count stopped at the bound
    /// and the planner's estimate was lower (its statistics do not know
    /// the rows yet), so more rows than `rows` may match.
    pub at_least: bool,
}

impl RowCount {
    /// This count set right by the first page of the same filter, read
    /// beside it: a first page that holds every match makes the count
    /// exact, and one with more after it is a lower bound that an estimate
    /// may fall under (the planner guesses a fixed share of the rows for a
    /// payload filter or a topic it has no statistics for).
    pub fn with_first_page(self, page: &RowPage) -> RowCount {
        if self.exact {
            return self;
        }
        let seen = page.rows.len() as i64;
        if page.after.is_none() {
            RowCount {
                rows: seen,
                exact: true,
                at_least: false,
            }
        } else if self.rows <= seen {
            RowCount {
                rows: seen + 1,
                exact: false,
                at_least: true,
            }
        } else {
            self
        }
    }
}
