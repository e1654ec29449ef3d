//! The result of a load run, printed as Markdown tables.

use std::time::Duration;

use super::driver::LoadOutcome;
use super::lag::LagOutcome;
use super::procstat;

/// Limits of the components, in items per second; see `ceilings`.
pub struct Ceilings {
    /// Requests per second of the empty handler with workload A's and B's bodies.
    pub http_a: f64,
    pub http_b: f64,
    /// Events per second of the bare producer with A's and B's batches.
    pub producer_a: f64,
    pub producer_b: f64,
    /// Rows per second of binary COPY and of logpipe's INSERT statement.
    pub copy: f64,
    pub insert: f64,
    /// Decisions per second with A's and B's concurrency; `None` when Redis did not respond.
    pub redis_a: Option<f64>,
    pub redis_b: Option<f64>,
    /// Parallel COPY and INSERT streams, and rows per batch.
    pub streams: usize,
    pub batch_size: usize,
}

/// CPU and memory of the measured processes over one workload.
pub struct ProcessUse {
    /// Time from the start of the workload until its rows arrived.
    pub wall: Duration,
    /// CPU seconds of each measured process.
    pub cpu_seconds: Vec<f64>,
    /// CPU seconds of this process, the load generator.
    pub generator_cpu_seconds: f64,
    /// CPU seconds of the services, by process name.
    pub services: Vec<(&'static str, f64)>,
    /// Busy and total CPU seconds of the machine, summed over its cores.
    pub machine_busy_seconds: f64,
    pub machine_total_seconds: f64,
    /// Peak `VmRSS` of each measured process, in KiB.
    pub peak_rss_kib: Vec<u64>,
}

/// Workload B: the load, the rows counted and the lag.
pub struct WorkloadB {
    pub load: LoadOutcome,
    /// Rows counted right after the last response.
    pub rows_at_end: i64,
    /// Rows counted after waiting for the rest.
    pub rows: i64,
    /// How long the rest took to arrive.
    pub drain: Duration,
    pub lag: LagOutcome,
}

/// Everything a load run measured.
pub struct Report {
    pub url: String,
    pub pids: Vec<u32>,
    pub a_concurrency: usize,
    pub b_concurrency: usize,
    pub b_events_per_request: usize,
    pub a: LoadOutcome,
    /// Rows of workload A found in PostgreSQL after the wait.
    pub a_rows: i64,
    pub a_use: ProcessUse,
    pub b: WorkloadB,
    pub b_use: ProcessUse,
    /// `VmHWM` of each measured process at the end, in KiB.
    pub hwm_kib: Vec<u64>,
    pub ceilings: Ceilings,
}

/// Formats a rate with thousands separators and no decimals.
fn rate(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

fn millis(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

pub fn print(report: &Report) {
    println!();
    println!("## Load run against {}", report.url);
    print_a(report);
    print_b(report);
    print_processes(report);
    print_cpu(report);
    print_ceilings(report);
    print_ratios(report);
}

fn print_a(report: &Report) {
    let a = &report.a;
    println!();
    println!(
        "### Workload A: 1 event per request, {} connections",
        report.a_concurrency
    );
    println!();
    println!("| requests | time | accepted requests/s | P50 | P95 | P99 | max | errors by status | rows in PostgreSQL |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {:.1} s | {} | {} | {} | {} | {} | {} | {} of {} |",
        rate(a.sent() as f64),
        a.elapsed.as_secs_f64(),
        rate(a.accepted_per_sec()),
        millis(a.percentile(0.50)),
        millis(a.percentile(0.95)),
        millis(a.percentile(0.99)),
        millis(a.percentile(1.0)),
        a.errors(),
        rate(report.a_rows as f64),
        rate(a.accepted() as f64),
    );
}

fn print_b(report: &Report) {
    let b = &report.b;
    let seconds = b.load.elapsed.as_secs_f64();
    let events = b.load.accepted() as f64 * report.b_events_per_request as f64;
    println!();
    println!(
        "### Workload B: {} events per request, {} connections",
        report.b_events_per_request, report.b_concurrency
    );
    println!();
    println!("| requests | time | events/s accepted | events/s into PostgreSQL during the load | rows at the end of the load | rows after the wait | wait | lag P50 | lag P99 | lag max | probes (not found) | request P99 | errors by status |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {:.1} s | {} | {} | {} | {} of {} | {:.1} s | {} | {} | {} | {} ({}) | {} | {} |",
        rate(b.load.sent() as f64),
        seconds,
        rate(events / seconds),
        rate(b.rows_at_end as f64 / seconds),
        rate(b.rows_at_end as f64),
        rate(b.rows as f64),
        rate(events),
        b.drain.as_secs_f64(),
        millis(b.lag.percentile(0.50)),
        millis(b.lag.percentile(0.99)),
        millis(b.lag.percentile(1.0)),
        b.lag.lags.len(),
        b.lag.not_found,
        millis(b.load.percentile(0.99)),
        b.load.errors(),
    );
}

fn print_processes(report: &Report) {
    let a_events = report.a.accepted() as f64;
    let b_events = report.b.load.accepted() as f64 * report.b_events_per_request as f64;
    let per_thousand = |cpu: f64, events: f64| {
        if events > 0.0 {
            format!("{:.3}", cpu * 1000.0 / events)
        } else {
            "-".into()
        }
    };
    println!();
    println!("### Processes (CPU and memory from the start of a workload until its rows arrived)");
    println!();
    println!("| process | peak RSS in A | peak RSS in B | VmHWM at the end | CPU s in A | CPU s per 1,000 events in A | CPU s in B | CPU s per 1,000 events in B |");
    println!("|---|---|---|---|---|---|---|---|");
    for (index, pid) in report.pids.iter().enumerate() {
        let (cpu_a, cpu_b) = (
            report.a_use.cpu_seconds[index],
            report.b_use.cpu_seconds[index],
        );
        println!(
            "| {} (pid {pid}) | {} | {} | {} | {:.1} | {} | {:.1} | {} |",
            procstat::process_name(*pid),
            mib(report.a_use.peak_rss_kib[index]),
            mib(report.b_use.peak_rss_kib[index]),
            mib(report.hwm_kib[index]),
            cpu_a,
            per_thousand(cpu_a, a_events),
            cpu_b,
            per_thousand(cpu_b, b_events),
        );
    }
    let (gen_a, gen_b) = (
        report.a_use.generator_cpu_seconds,
        report.b_use.generator_cpu_seconds,
    );
    println!(
        "| load generator (this process) | - | - | - | {gen_a:.1} | {} | {gen_b:.1} | {} |",
        per_thousand(gen_a, a_events),
        per_thousand(gen_b, b_events),
    );
}

fn print_cpu(report: &Report) {
    let uses = [("A", &report.a_use), ("B", &report.b_use)];
    let names: Vec<&str> = report
        .a_use
        .services
        .iter()
        .map(|(name, _)| *name)
        .collect();
    println!();
    println!("### CPU seconds by process, from the start of a workload until its rows arrived");
    println!();
    println!(
        "| workload | time | machine busy | logpipe | load generator | {} | other |",
        names.join(" | ")
    );
    println!("|---|---|---|---|---|{}---|", "---|".repeat(names.len()));
    for (name, usage) in uses {
        let logpipe: f64 = usage.cpu_seconds.iter().sum();
        let services: f64 = usage.services.iter().map(|(_, cpu)| cpu).sum();
        let other = usage.machine_busy_seconds - logpipe - usage.generator_cpu_seconds - services;
        let columns: Vec<String> = usage
            .services
            .iter()
            .map(|(_, cpu)| format!("{cpu:.1}"))
            .collect();
        println!(
            "| {name} | {:.1} s | {:.1} of {:.1} ({:.0} %) | {:.1} | {:.1} | {} | {:.1} |",
            usage.wall.as_secs_f64(),
            usage.machine_busy_seconds,
            usage.machine_total_seconds,
            100.0 * usage.machine_busy_seconds / usage.machine_total_seconds,
            logpipe,
            usage.generator_cpu_seconds,
            columns.join(" | "),
            other,
        );
    }
}

/// One stage's limit with workload A's and B's shapes, in events per second.
struct Stage {
    name: String,
    a: Option<f64>,
    b: Option<f64>,
    /// Whether the stage counts as a ceiling; logpipe's INSERT is shown for reference.
    ceiling: bool,
}

fn stages(report: &Report) -> Vec<Stage> {
    let c = &report.ceilings;
    let per_request = report.b_events_per_request as f64;
    vec![
        Stage {
            name: "empty actix-web handler (requests/s x events per request)".into(),
            a: Some(c.http_a),
            b: Some(c.http_b * per_request),
            ceiling: true,
        },
        Stage {
            name: "bare rdkafka producer, logpipe's settings".into(),
            a: Some(c.producer_a),
            b: Some(c.producer_b),
            ceiling: true,
        },
        Stage {
            name: "Redis decisions through RateLimiter (x events per request)".into(),
            a: c.redis_a,
            b: c.redis_b.map(|decisions| decisions * per_request),
            ceiling: true,
        },
        Stage {
            name: format!(
                "binary COPY into an UNLOGGED table, {} streams of {} rows",
                c.streams, c.batch_size
            ),
            a: Some(c.copy),
            b: Some(c.copy),
            ceiling: true,
        },
        Stage {
            name: format!(
                "logpipe's INSERT into logs, {} streams of {} rows (reference, not a ceiling)",
                c.streams, c.batch_size
            ),
            a: Some(c.insert),
            b: Some(c.insert),
            ceiling: false,
        },
    ]
}

fn print_ceilings(report: &Report) {
    let show = |value: Option<f64>| value.map_or("Redis did not respond".into(), rate);
    println!();
    println!("### Ceilings in events/s, measured in the same run while logpipe was idle");
    println!();
    println!(
        "| stage | A shape (1 event, {} in flight) | B shape ({} events, {} in flight) |",
        report.a_concurrency, report.b_events_per_request, report.b_concurrency
    );
    println!("|---|---|---|");
    for stage in stages(report) {
        println!("| {} | {} | {} |", stage.name, show(stage.a), show(stage.b));
    }
}

/// Returns the lowest ceiling of a shape and its stage's name.
fn lowest(stages: &[Stage], pick: impl Fn(&Stage) -> Option<f64>) -> (f64, String) {
    stages
        .iter()
        .filter(|stage| stage.ceiling)
        .filter_map(|stage| pick(stage).map(|value| (value, stage.name.clone())))
        .min_by(|left, right| left.0.total_cmp(&right.0))
        .unwrap_or((f64::NAN, "none".into()))
}

fn print_ratios(report: &Report) {
    let stages = stages(report);
    let (low_a, stage_a) = lowest(&stages, |stage| stage.a);
    let (low_b, stage_b) = lowest(&stages, |stage| stage.b);
    let b = &report.b;
    let seconds = b.load.elapsed.as_secs_f64();
    let b_events = b.load.accepted() as f64 * report.b_events_per_request as f64;
    let rows = [
        (
            "A: events/s accepted",
            report.a.accepted_per_sec(),
            low_a,
            &stage_a,
        ),
        ("B: events/s accepted", b_events / seconds, low_b, &stage_b),
        (
            "B: events/s into PostgreSQL during the load",
            b.rows_at_end as f64 / seconds,
            low_b,
            &stage_b,
        ),
    ];

    println!();
    println!("### logpipe as a fraction of the lowest ceiling");
    println!();
    println!("| figure | logpipe | lowest ceiling | stage | ratio |");
    println!("|---|---|---|---|---|");
    for (name, value, ceiling, stage) in rows {
        println!(
            "| {name} | {} | {} | {stage} | {:.2} |",
            rate(value),
            rate(ceiling),
            value / ceiling
        );
    }
}
