//! An app's overview, the live part of its topics page: small charts of the
//! last hour (completed per second, failure rate, oldest due age) and each
//! topic's rows by state with its pause and its unresolved dead letters.
//! The page fetches it again every 2 s while the tab is visible.

use outbox_core::store::activity::{self, MinuteActivity};
use outbox_core::store::processes::Process;
use uuid::Uuid;

use crate::AdminState;
use crate::api::{TopicSummary, topic_summaries};
use crate::error::ApiError;

use super::render::{esc, when};

/// Minutes the charts cover, the current one included.
const CHART_MINUTES: i32 = 60;

/// What the overview shows, read in one go.
pub(super) struct Overview {
    topics: Vec<TopicSummary>,
    minutes: Vec<MinuteActivity>,
}

impl Overview {
    /// Reads `app`'s overview.
    pub(super) async fn read(state: &AdminState, app: Uuid) -> Result<Self, ApiError> {
        let (topics, minutes) = tokio::try_join!(topic_summaries(state, app), async {
            Ok(activity::per_minute(&state.pool, app, None, CHART_MINUTES).await?)
        },)?;
        Ok(Self { topics, minutes })
    }

    /// The charts and the table, as HTML.
    pub(super) fn html(&self, slug: &str) -> String {
        let mut html = self.charts();
        html.push_str(&self.table(slug));
        html
    }

    fn charts(&self) -> String {
        // The current minute has only begun: its rate is over its seconds so far.
        let now = chrono::Utc::now();
        let per_sec: Vec<f64> = self
            .minutes
            .iter()
            .map(|m| {
                let seconds = (now - m.minute).num_seconds().clamp(1, 60);
                m.completed as f64 / seconds as f64
            })
            .collect();
        let failure: Vec<f64> = self
            .minutes
            .iter()
            .map(|m| {
                let attempts = m.completed + m.failed;
                if attempts == 0 {
                    0.0
                } else {
                    m.failed as f64 * 100.0 / attempts as f64
                }
            })
            .collect();
        let age: Vec<f64> = self
            .minutes
            .iter()
            .map(|m| m.oldest_due_secs.unwrap_or(0.0))
            .collect();
        format!(
            r#"<div class=charts id=charts>{}{}{}</div>"#,
            chart("completed-per-sec", "Completed per second", &per_sec, "/s"),
            chart("failure-rate", "Failed attempts", &failure, " %"),
            chart("oldest-due", "Oldest due row", &age, " s"),
        )
    }

    fn table(&self, slug: &str) -> String {
        if self.topics.is_empty() {
            return r#"<p class=muted data-states=none>No rows counted: either the app has no rows, or no dispatcher has counted them yet (the elected one counts every <code>metrics_sample_secs</code>, 15 s by default). Enqueue one with <code>SELECT outbox_enqueue('app', 'topic', '{}')</code>.</p>"#.to_owned();
        }
        let sampled = self
            .topics
            .iter()
            .filter_map(|t| t.sampled_at)
            .max()
            .map_or_else(|| "not yet".to_owned(), when);
        let mut html = format!(
            r#"<p class=muted>Rows counted {sampled}.</p><div class=scroll><table id=topic-table><tr><th>Topic</th><th>Due</th><th>Scheduled</th><th>Retrying</th><th>Running</th><th>Unserved</th><th>Paused</th><th>Dead letters</th></tr>"#
        );
        for t in &self.topics {
            // A topic the sampler has not counted yet (listed for its dead
            // letters, or new): a 0 would read as counted.
            let counted = |n: i64| {
                if t.sampled_at.is_some() {
                    n.to_string()
                } else {
                    r#"<span class=muted title="not counted yet">–</span>"#.to_owned()
                }
            };
            let unserved = match t.oldest_unserved_at.filter(|_| t.unserved > 0) {
                Some(since) => format!(
                    r#"<strong class=err>{} waiting since {}</strong>: no running process serves this topic"#,
                    t.unserved,
                    when(since)
                ),
                None => counted(0),
            };
            let dead = if t.dead_letters > 0 {
                format!(
                    r#"<a href="/apps/{slug}/dead-letters?unresolved=true&amp;topic={link}">{n}</a>"#,
                    link = esc(&url_part(&t.topic)),
                    n = t.dead_letters,
                )
            } else {
                "0".to_owned()
            };
            html.push_str(&format!(
                r#"<tr data-topic-states="{topic}"><td><a href="/apps/{slug}/outbox?topic={link}">{topic}</a></td><td>{due}</td><td>{scheduled}</td><td>{retrying}</td><td>{running}</td><td class=wrap>{unserved}</td><td>{paused}</td><td>{dead}</td></tr>"#,
                topic = esc(&t.topic),
                link = esc(&url_part(&t.topic)),
                due = counted(t.due),
                scheduled = counted(t.scheduled - t.retrying),
                retrying = counted(t.retrying),
                running = counted(t.running),
                paused = if t.paused { "<strong>paused</strong>" } else { "" },
            ));
        }
        html.push_str("</table></div>");
        html
    }
}

/// Text for a query-string value.
fn url_part(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A small line chart of `values` (oldest first, one per minute) as inline
/// SVG, with the last value and the peak in words.
fn chart(id: &str, title: &str, values: &[f64], unit: &str) -> String {
    const W: f64 = 240.0;
    const H: f64 = 48.0;
    let peak = values.iter().copied().fold(0.0_f64, f64::max);
    let last = values.last().copied().unwrap_or(0.0);
    let step = if values.len() > 1 {
        W / (values.len() - 1) as f64
    } else {
        W
    };
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let y = if peak > 0.0 {
                H - 2.0 - v / peak * (H - 4.0)
            } else {
                H - 2.0
            };
            format!("{:.1},{:.1}", i as f64 * step, y)
        })
        .collect();
    let number = |v: f64| {
        if v >= 100.0 || v.fract() == 0.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    };
    format!(
        r#"<figure class=chart id={id} data-last="{last_raw}"><figcaption>{title}: <strong>{last}{unit}</strong> <span class=muted>peak {peak}{unit}, last hour</span></figcaption><svg viewBox="0 0 {W} {H}" preserveAspectRatio="none" role=img aria-label="{title} over the last hour"><polyline fill=none stroke=currentColor stroke-width=1.5 points="{points}"/></svg></figure>"#,
        last_raw = last,
        last = number(last),
        peak = number(peak),
        points = points.join(" "),
    )
}

/// The live dispatcher processes and what each serves, or what to do
/// without one.
pub(super) fn processes_table(live: &[Process]) -> String {
    if live.is_empty() {
        return r#"<p class=muted data-processes=none>No dispatcher is running: rows wait until one serving their topic starts (<code>outboxd run</code>).</p>"#.to_owned();
    }
    let mut html = String::from(
        "<div class=scroll><table id=processes><tr><th>Worker</th><th>Host</th><th>Version</th><th>Serves</th><th>Since</th><th>Last seen</th></tr>",
    );
    for p in live {
        html.push_str(&format!(
            r#"<tr data-process="{id}"><td>{worker}</td><td>{pid}@{host}</td><td>{version}</td><td>{serves}</td><td>{since}</td><td>{seen}</td></tr>"#,
            id = p.id,
            worker = esc(&p.worker),
            pid = p.pid,
            host = esc(&p.host),
            version = esc(&p.version),
            serves = esc(&p.serves()),
            since = when(p.started_at),
            seen = when(p.last_seen),
        ));
    }
    html.push_str("</table></div>");
    html
}
