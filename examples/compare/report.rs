//! The comparison's results: one row per cell (layout x client x concurrency), the median
//! over rounds, and the Markdown and JSON they are written as.

use super::measure::PerCall;

#[derive(Clone)]
pub struct Row {
    /// The round it ran in (1-based; 0 for a median over rounds).
    pub round: usize,
    /// Open loop at a share of the channel's capacity: the share, which names the cell
    /// across rounds (each round measures the capacity, so the rates differ).
    pub share: Option<f64>,
    pub layout: String,
    pub client: String,
    /// Closed loop: the callers, each starting a call when its last one returns (0 in open loop).
    pub concurrency: usize,
    /// Open loop: the calls started a second, on schedule whatever came back.
    pub offered: Option<f64>,
    pub calls_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub errors: u64,
    pub starved: usize,
    pub per: PerCall,
}

/// Shows a figure, or `-` where there is none.
fn show(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "-".into()
    }
}

/// The per-call figures, shown: client CPU, server CPU, segments (all, client's, server's),
/// client writes.
fn per_call(row: &Row) -> [String; 6] {
    let p = &row.per;
    [
        show(p.client_cpu_us, 1),
        show(p.server_cpu_us, 1),
        show(p.segments, 2),
        show(p.client_segments, 2),
        show(p.server_segments, 2),
        show(p.client_writes, 2),
    ]
}

/// The cell's load: `c=N` callers in closed loop, `rate=N` calls a second in open loop.
fn load(row: &Row) -> String {
    match row.offered {
        Some(rate) => format!("rate={rate:.0}"),
        None => format!("c={}", row.concurrency),
    }
}

pub fn line(row: &Row) -> String {
    let [client_cpu, server_cpu, segments, client_segments, server_segments, writes] = per_call(row);
    format!(
        "{:<8} {:<10} {:>9.0} calls/s  p50 {:>7.0} µs  p99 {:>7.0} µs  p99.9 {:>7.0} µs  errors {}  starved {}  \
         cpu/call client {client_cpu:>5} µs server {server_cpu:>5} µs  \
         segs/call {segments:>5} (client {client_segments:>5}, server {server_segments:>5})  writes/call {writes:>5}",
        row.client, load(row), row.calls_per_sec, row.p50_us, row.p99_us, row.p999_us, row.errors, row.starved,
    )
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// One row per cell: each figure the median of that cell's rounds (each figure on its own, so
/// a row's figures may come from different rounds).
pub fn medians(rows: &[Row]) -> Vec<Row> {
    let mut out: Vec<Row> = Vec::new();
    for row in rows {
        let same = |r: &&Row| {
            r.layout == row.layout
                && r.client == row.client
                && r.concurrency == row.concurrency
                && match (r.share, row.share) {
                    (Some(a), Some(b)) => a == b,
                    (None, None) => r.offered == row.offered,
                    _ => false,
                }
        };
        if out.iter().any(|r| same(&r)) {
            continue;
        }
        let cell: Vec<&Row> = rows.iter().filter(same).collect();
        let m = |f: &dyn Fn(&Row) -> f64| median(cell.iter().map(|r| f(r)).collect());
        out.push(Row {
            round: 0,
            share: row.share,
            layout: row.layout.clone(),
            client: row.client.clone(),
            concurrency: row.concurrency,
            offered: if row.share.is_some() {
                Some(m(&|r| r.offered.unwrap_or(f64::NAN)))
            } else {
                row.offered
            },
            calls_per_sec: m(&|r| r.calls_per_sec),
            p50_us: m(&|r| r.p50_us),
            p99_us: m(&|r| r.p99_us),
            p999_us: m(&|r| r.p999_us),
            errors: m(&|r| r.errors as f64) as u64,
            starved: m(&|r| r.starved as f64) as usize,
            per: PerCall {
                client_cpu_us: m(&|r| r.per.client_cpu_us),
                server_cpu_us: m(&|r| r.per.server_cpu_us),
                segments: m(&|r| r.per.segments),
                client_segments: m(&|r| r.per.client_segments),
                server_segments: m(&|r| r.per.server_segments),
                client_writes: m(&|r| r.per.client_writes),
                client_flushes: m(&|r| r.per.client_flushes),
            },
        });
    }
    out
}

fn ratio(rows: &[Row], row: &Row, client: &str) -> String {
    rows.iter()
        .find(|r| {
            r.layout == row.layout
                && r.concurrency == row.concurrency
                && r.offered == row.offered
                && r.client == client
        })
        .map(|base| format!("{:.2}", row.calls_per_sec / base.calls_per_sec))
        .unwrap_or_else(|| "-".into())
}

pub fn tables(rows: &[Row]) -> String {
    let mut out = String::new();
    let mut layouts: Vec<&str> = rows.iter().map(|r| r.layout.as_str()).collect();
    layouts.dedup();
    for layout in layouts {
        out.push_str(&format!(
            "### layout `{layout}`\n\n| client | concurrency | calls/s | p50 µs | p99 µs | p99.9 µs | errors | starved | client CPU µs/call | server CPU µs/call | segments/call | client segments/call | server segments/call | client writes/call | / channel | / h2load |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        ));
        for row in rows.iter().filter(|r| r.layout == layout && r.offered.is_none()) {
            out.push_str(&format!(
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                row.client,
                row.concurrency,
                row.calls_per_sec,
                show(row.p50_us, 0),
                show(row.p99_us, 0),
                show(row.p999_us, 0),
                row.errors,
                row.starved,
                per_call(row).join(" | "),
                ratio(rows, row, "channel"),
                ratio(rows, row, "h2load"),
            ));
        }
        out.push('\n');
        if rows.iter().any(|r| r.layout == layout && r.offered.is_some()) {
            out.push_str(&open_table(rows, layout));
        }
    }
    out.push_str(
        "(h2load reports no percentiles: its p50 column is its mean; its writes are the write \
         system calls of /proc/<pid>/io, its calls in the window its rate times the window. \
         segments/call: /proc/net/snmp OutSegs over the window, the whole machine, both \
         directions; client and server segments/call: the sockets between them only, from `ss -ti`.)\n",
    );
    out
}

/// The open-loop cells of a layout: latency from each call's intended start, so a client that
/// falls behind the rate shows it in its tail; p99 and p99.9 beside the `channel`'s at the
/// same rate.
fn open_table(rows: &[Row], layout: &str) -> String {
    let mut out = format!(
        "#### layout `{layout}`, open loop (latency from each call's intended start)\n\n| client | share of the channel's capacity | offered calls/s | calls/s | p50 µs | p99 µs | p99.9 µs | errors | client CPU µs/call | server CPU µs/call | p99 / channel | p99.9 / channel |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    let mut open: Vec<&Row> = rows.iter().filter(|r| r.layout == layout && r.offered.is_some()).collect();
    open.sort_by(|a, b| a.offered.partial_cmp(&b.offered).unwrap().then_with(|| a.client.cmp(&b.client)));
    for row in open {
        let channel = rows.iter().find(|r| {
            r.layout == layout && r.share == row.share && r.offered == row.offered && r.client == "channel"
        });
        let versus = |f: fn(&Row) -> f64| match channel {
            Some(c) if f(c).is_finite() && f(row).is_finite() => format!("{:.2}", f(row) / f(c)),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.client,
            row.share.map(|s| format!("{:.0}%", s * 100.0)).unwrap_or_else(|| "-".into()),
            row.offered.unwrap_or(f64::NAN),
            row.calls_per_sec,
            show(row.p50_us, 0),
            show(row.p99_us, 0),
            show(row.p999_us, 0),
            row.errors,
            show(row.per.client_cpu_us, 1),
            show(row.per.server_cpu_us, 1),
            versus(|r| r.p99_us),
            versus(|r| r.p999_us),
        ));
    }
    out.push('\n');
    out
}

pub fn json(rows: &[Row]) -> String {
    let num = |v: f64| if v.is_finite() { format!("{v:.3}") } else { "null".into() };
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"layout\":\"{}\",\"client\":\"{}\",\"concurrency\":{},\"offered\":{},\"calls_per_sec\":{},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{},\"starved\":{},\"client_cpu_us_per_call\":{},\"server_cpu_us_per_call\":{},\"segments_per_call\":{},\"client_segments_per_call\":{},\"server_segments_per_call\":{},\"client_writes_per_call\":{},\"client_flushes_per_call\":{}}}",
                r.layout,
                r.client,
                r.concurrency,
                num(r.offered.unwrap_or(f64::NAN)),
                num(r.calls_per_sec),
                num(r.p50_us),
                num(r.p99_us),
                num(r.p999_us),
                r.errors,
                r.starved,
                num(r.per.client_cpu_us),
                num(r.per.server_cpu_us),
                num(r.per.segments),
                num(r.per.client_segments),
                num(r.per.server_segments),
                num(r.per.client_writes),
                num(r.per.client_flushes),
            )
        })
        .collect();
    format!("[\n  {}\n]\n", items.join(",\n  "))
}
