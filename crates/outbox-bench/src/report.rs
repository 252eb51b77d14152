//! The benchmark's files: CSV of every figure and series, and SVG charts
//! drawn from them (plain SVG, so no plotting dependency).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

/// One printed figure, optionally with the baseline it is compared with.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Which scenario produced it.
    pub scenario: &'static str,
    /// What was measured.
    pub name: String,
    /// The value.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// The baseline value and its label.
    pub ratio_to: Option<(f64, String)>,
}

impl Figure {
    /// The value over its baseline.
    pub fn ratio(&self) -> Option<f64> {
        self.ratio_to
            .as_ref()
            .filter(|(base, _)| *base > 0.0)
            .map(|(base, _)| self.value / base)
    }
}

/// A time series, e.g. queue depth per second.
#[derive(Debug, Clone)]
pub struct Series {
    /// Name of the chart it belongs to.
    pub chart: &'static str,
    /// Line label.
    pub label: String,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
}

/// Writes `results.csv`, `series.csv` and the charts into `dir`.
pub fn write(dir: &Path, figures: &[Figure], series: &[Series]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut csv = String::from("scenario,figure,value,unit,baseline,baseline_value,ratio\n");
    for f in figures {
        let (base, label) = f
            .ratio_to
            .as_ref()
            .map(|(v, l)| (format!("{v:.3}"), l.clone()))
            .unwrap_or_default();
        let ratio = f.ratio().map(|r| format!("{r:.3}")).unwrap_or_default();
        let _ = writeln!(
            csv,
            "{},{},{:.3},{},{},{},{}",
            f.scenario,
            quote(&f.name),
            f.value,
            f.unit,
            quote(&label),
            base,
            ratio
        );
    }
    write_file(dir, "results.csv", &csv)?;
    let mut csv = String::from("chart,series,x,y\n");
    for s in series {
        for (x, y) in &s.points {
            let _ = writeln!(csv, "{},{},{x:.3},{y:.3}", s.chart, quote(&s.label));
        }
    }
    write_file(dir, "series.csv", &csv)?;

    let throughput: Vec<(String, f64)> = figures
        .iter()
        .filter(|f| f.unit == "events/s" || f.unit == "rows/s")
        .map(|f| (f.name.clone(), f.value))
        .collect();
    write_file(
        dir,
        "throughput.svg",
        &bars("Throughput (events or rows per second)", &throughput, None),
    )?;
    let ratios: Vec<(String, f64)> = figures
        .iter()
        .filter_map(|f| {
            f.ratio().map(|r| {
                (
                    format!(
                        "{} / {}",
                        f.name,
                        f.ratio_to.as_ref().map_or("", |(_, l)| l.as_str())
                    ),
                    r,
                )
            })
        })
        .collect();
    write_file(
        dir,
        "ratios.svg",
        &bars("Ratio to the raw baseline of the same run", &ratios, None),
    )?;
    let latency: Vec<(String, f64)> = figures
        .iter()
        .filter(|f| f.scenario == "latency" && f.unit == "ms")
        .map(|f| (f.name.clone(), f.value))
        .collect();
    // A taker that fell behind waits seconds; drawn to scale, it would hide
    // every other bar.
    write_file(
        dir,
        "latency.svg",
        &bars(
            "Latency commit → handler start (ms; bars cut at 100)",
            &latency,
            Some(100.0),
        ),
    )?;
    let mut charts: Vec<&'static str> = series.iter().map(|s| s.chart).collect();
    charts.dedup();
    for chart in charts {
        let lines: Vec<&Series> = series.iter().filter(|s| s.chart == chart).collect();
        write_file(dir, &format!("{chart}.svg"), &line_chart(chart, &lines))?;
    }
    Ok(())
}

fn write_file(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const COLORS: [&str; 6] = [
    "#3b6ea5", "#d9822b", "#3c9a5f", "#b03a48", "#7a5ea8", "#6b6b6b",
];

/// Horizontal bars, one per item, with the value printed.
pub fn bars(title: &str, items: &[(String, f64)], cap: Option<f64>) -> String {
    let row = 26.0;
    let (left, width) = (420.0, 360.0);
    let height = 50.0 + row * items.len() as f64;
    let max = items
        .iter()
        .map(|(_, v)| *v)
        .fold(0.0_f64, f64::max)
        .min(cap.unwrap_or(f64::INFINITY))
        .max(1e-9);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="900" height="{height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15">{}</text>"#,
        escape(title)
    );
    for (i, (label, value)) in items.iter().enumerate() {
        let y = 40.0 + row * i as f64;
        let w = width * value.min(max) / max;
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{left}" y="{}" width="{w:.1}" height="{}" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            left - 8.0,
            y + 15.0,
            escape(label),
            y + 3.0,
            row - 8.0,
            COLORS[i % COLORS.len()],
            left + w + 6.0,
            y + 15.0,
            short(*value)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Lines over a shared x axis.
pub fn line_chart(title: &str, lines: &[&Series]) -> String {
    let (left, top, width, height) = (70.0, 40.0, 760.0, 300.0);
    let xs = lines.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = lines.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let x_max = xs.fold(0.0_f64, f64::max).max(1e-9);
    let y_max = ys.fold(0.0_f64, f64::max).max(1.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="900" height="400" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15">{}</text><line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/><text x="{}" y="{}">{}</text><text x="{}" y="{}" text-anchor="end">{}</text><text x="{}" y="{}" text-anchor="end">0</text>"#,
        escape(title),
        top + height,
        left + width,
        top + height,
        top + height,
        left + width - 20.0,
        top + height + 18.0,
        short(x_max),
        left - 6.0,
        top + 10.0,
        short(y_max),
        left - 6.0,
        top + height,
    );
    for (i, line) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = line
            .points
            .iter()
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    left + width * x / x_max,
                    top + height - height * y / y_max
                )
            })
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/><rect x="{}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            points.join(" "),
            left + 10.0,
            top + 8.0 + 18.0 * i as f64,
            left + 28.0,
            top + 18.0 + 18.0 * i as f64,
            escape(&line.label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn short(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_every_label() {
        let svg = bars("t", &[("a <b>".into(), 2.0), ("c".into(), 1.0)], None);
        assert!(svg.starts_with("<svg") && svg.contains("a &lt;b&gt;") && svg.contains(">c<"));
        let series = Series {
            chart: "depth",
            label: "outboxd".into(),
            points: vec![(0.0, 1.0), (1.0, 3.0)],
        };
        let svg = line_chart("depth", &[&series]);
        assert!(svg.contains("polyline") && svg.contains("outboxd"));
    }

    #[test]
    fn a_capped_bar_stops_at_the_full_width_and_keeps_its_value() {
        let svg = bars(
            "t",
            &[("slow".into(), 9000.0), ("fast".into(), 5.0)],
            Some(100.0),
        );
        assert!(svg.contains(r#"width="360.0""#), "{svg}");
        assert!(svg.contains(r#"width="18.0""#), "{svg}");
        assert!(svg.contains(">9000<"), "{svg}");
    }

    #[test]
    fn files_are_written() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("outboxd-report-{}", std::process::id()));
        let figures = vec![Figure {
            scenario: "drain",
            name: "x, \"quoted\"".into(),
            value: 10.0,
            unit: "events/s",
            ratio_to: Some((20.0, "raw".into())),
        }];
        write(&dir, &figures, &[])?;
        let csv = std::fs::read_to_string(dir.join("results.csv"))?;
        assert!(
            csv.contains("\"x, \"\"quoted\"\"\",10.000,events/s,\"raw\",20.000,0.500"),
            "{csv}"
        );
        assert!(dir.join("ratios.svg").exists());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
