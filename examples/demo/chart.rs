//! `--svg FILE`: the run as a picture. An SVG is text, so it is written here by hand rather
//! than with a plotting crate: calls/s (top) and failed calls/s (bottom) of both clients over
//! time, each fault's phase shaded and named.

use std::fmt::Write;

/// One phase of the run, in seconds since it started.
pub struct Phase {
    pub from: f64,
    pub to: f64,
    pub name: &'static str,
}

/// One client's calls and failed calls per second, one value per bucket.
pub struct Series {
    pub name: &'static str,
    pub colour: &'static str,
    pub calls: Vec<f64>,
    pub failed: Vec<f64>,
}

const WIDTH: f64 = 960.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 50.0;
const PANEL: f64 = 170.0;
const GAP: f64 = 50.0;
const HEIGHT: f64 = TOP + 2.0 * PANEL + GAP + 60.0;

/// The smallest 1, 2 or 5 times a power of ten at or above `value` (at least `floor`).
fn nice_max(value: f64, floor: f64) -> f64 {
    let value = value.max(floor);
    let power = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * power).find(|m| *m >= value).unwrap_or(10.0 * power)
}

/// Renders the chart: `bucket` seconds per value, `length` seconds in all.
pub fn render(bucket: f64, length: f64, phases: &[Phase], series: &[Series], title: &str) -> String {
    let plot = WIDTH - LEFT - RIGHT;
    let x = |t: f64| LEFT + plot * (t / length).clamp(0.0, 1.0);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    // The phases, shaded every other one, named above the top panel.
    for (i, phase) in phases.iter().enumerate() {
        let (from, to) = (x(phase.from), x(phase.to));
        if i % 2 == 1 {
            let height = 2.0 * PANEL + GAP;
            let _ = writeln!(
                svg,
                r##"<rect x="{from:.1}" y="{TOP}" width="{:.1}" height="{height}" fill="#f0f0f0"/>"##,
                to - from
            );
        }
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{}" text-anchor="middle" fill="#444">{}</text>"##,
            (from + to) / 2.0,
            TOP - 8.0,
            escape(phase.name)
        );
    }
    let panels = [
        ("calls/s", TOP, series.iter().map(|s| &s.calls).collect::<Vec<_>>(), 100.0),
        ("failed calls/s", TOP + PANEL + GAP, series.iter().map(|s| &s.failed).collect::<Vec<_>>(), 10.0),
    ];
    for (label, top, values, floor) in panels {
        let most = values.iter().flat_map(|v| v.iter()).copied().fold(0.0, f64::max);
        let max = nice_max(most, floor);
        let y = |v: f64| top + PANEL - PANEL * (v / max).clamp(0.0, 1.0);
        // Axes, with four ticks up the side.
        for tick in 0..=4 {
            let value = max * f64::from(tick) / 4.0;
            let at = y(value);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{at:.1}" x2="{:.1}" y2="{at:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                WIDTH - RIGHT,
                LEFT - 6.0,
                at + 4.0,
                value.round()
            );
        }
        let _ = writeln!(
            svg,
            r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{label}</text>"#,
            top + PANEL / 2.0
        );
        for (values, client) in values.iter().zip(series) {
            let points: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(i, v)| format!("{:.1},{:.1}", x((i as f64 + 0.5) * bucket), y(*v)))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.8" points="{}"/>"#,
                client.colour,
                points.join(" ")
            );
        }
    }
    // Time along the bottom, every 5 s.
    let bottom = TOP + 2.0 * PANEL + GAP;
    let mut t = 0.0;
    while t <= length + 1e-9 {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{t:.0} s</text>"#,
            x(t),
            bottom + 16.0
        );
        t += 5.0;
    }
    // The legend: each client's colour and its failed calls in all.
    for (i, client) in series.iter().enumerate() {
        let at = LEFT + 220.0 * i as f64;
        let failed: f64 = client.failed.iter().sum::<f64>() * bucket;
        let _ = writeln!(
            svg,
            r#"<rect x="{at}" y="{:.1}" width="14" height="4" fill="{}"/><text x="{}" y="{:.1}">{} ({} failed calls)</text>"#,
            bottom + 36.0,
            client.colour,
            at + 20.0,
            bottom + 41.0,
            escape(client.name),
            failed.round()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_end_on_round_numbers() {
        assert_eq!(nice_max(0.0, 10.0), 10.0);
        assert_eq!(nice_max(13.0, 10.0), 20.0);
        assert_eq!(nice_max(4100.0, 100.0), 5000.0);
        assert_eq!(nice_max(5000.0, 100.0), 5000.0);
    }

    #[test]
    fn a_chart_names_its_phases_and_clients() {
        let phases =
            [Phase { from: 0.0, to: 2.0, name: "baseline" }, Phase { from: 2.0, to: 4.0, name: "drop <1>" }];
        let series =
            [Series { name: "pool", colour: "#1b9e77", calls: vec![10.0; 16], failed: vec![0.0; 16] }];
        let svg = render(0.25, 4.0, &phases, &series, "demo");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("drop &lt;1&gt;") && svg.contains("pool (0 failed calls)"));
        assert_eq!(svg.matches("<polyline").count(), 2, "calls and failures");
    }
}
