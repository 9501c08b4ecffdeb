//! Tolerance of latency, stopped and killed instances and clock drift: a matrix
//! of fault scenarios, each through the mutual-exclusion checker.
//!
//! Every cell is one [`Scenario`] (fresh 5-server cluster, the fault, 2 clients ×
//! 3 tasks each taking one of 6 keys at random, TTL 300 ms, per-instance timeout
//! 50 ms, half the tenures held to the end of their validity) run for a few
//! seconds. With as many keys as tasks most acquisitions are uncontended, so
//! the latency shows the fault more than the waiting, while tasks still meet on
//! keys often enough for the checker to see an early expiry:
//!
//! - injected latency (round trip, through the fault proxy) of 0, 1, 5, 20 and
//!   100 ms on k = 1 and on k = 3 of the 5 instances;
//! - one instance stopped (`SIGSTOP`), one killed;
//! - server clock rates 0.5, 0.99, 1.0, 1.01, 1.1 and 2.0 (through the clock shim)
//!   on 2 and on 3 of the 5 instances, with the drift defences on and off;
//! - rslock (0.10, its defaults) through the same scenarios for latency, stop
//!   and kill ([`Scenario::run_with`]), retrying as ours does (every 10 ms ± 50%,
//!   for up to twice the TTL).
//!
//! For each cell: success rate (acquisitions / `acquire` calls; calls give up
//! after twice the TTL), p50 and p99 acquire latency (waiting for a contended
//! key included), validity left at acquisition, violations (overlapping
//! tenures seen by the checker) and keys left behind. It prints a table with a
//! progress bar, and writes `target/tolerance/tolerance.csv`,
//! `target/tolerance/latency.svg` and `target/tolerance/clock.svg`.
//!
//! Run with `cargo bench --bench tolerance` (about 4 minutes: 3 s per cell);
//! `TOLERANCE_SECS=10 cargo bench --bench tolerance` runs each cell longer.
//! Without `--bench` (as under `cargo test --benches`) it smoke-tests two cells.

use std::fmt::Write as _;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use quorumlock::testing::{Failure, Fault, Report, Scenario, ScenarioClient};
use quorumlock::QuorumLocker;
use tokio::time::Instant;

/// Injected round-trip latencies, ms.
const LATENCIES: [u64; 5] = [0, 1, 5, 20, 100];

/// How many instances get the latency: one, and a majority.
const LATENCY_ON: [usize; 2] = [1, 3];

/// Server clock rates.
const RATES: [f64; 6] = [0.5, 0.99, 1.0, 1.01, 1.1, 2.0];

/// How many instances get the odd clock: a minority, and a majority.
const CLOCK_ON: [usize; 2] = [2, 3];

/// Seconds per cell unless `TOLERANCE_SECS` says otherwise.
const DEFAULT_SECS: f64 = 3.0;

/// Keys the tasks choose from: one per task.
const KEYS: usize = 6;

/// Which client a cell runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Client {
    Ours,
    Rslock,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Ours => "quorumlock",
            Client::Rslock => "rslock",
        }
    }
}

/// One cell of the matrix.
#[derive(Clone, Debug)]
struct Cell {
    client: Client,
    /// `latency`, `pause`, `kill` or `clock`.
    kind: &'static str,
    /// Instances with the fault.
    on: usize,
    /// Latency in ms, or clock rate; 0 for pause and kill.
    value: f64,
    defences: bool,
}

impl Cell {
    fn fault(&self) -> Fault {
        // The last `on` instances.
        let on: Vec<usize> = (5 - self.on..5).collect();
        match self.kind {
            "latency" => Fault::Latency {
                on,
                latency: Duration::from_millis(self.value as u64),
                jitter: Duration::ZERO,
            },
            "pause" => Fault::Pause(on),
            "kill" => Fault::Kill(on),
            "clock" => Fault::ClockRate {
                on,
                rate: self.value,
            },
            other => unreachable!("unknown cell kind {other}"),
        }
    }

    fn label(&self) -> String {
        match self.kind {
            "latency" => format!("latency {} ms on {}/5", self.value, self.on),
            "pause" => format!("stopped {}/5", self.on),
            "kill" => format!("killed {}/5", self.on),
            _ => format!("clock ×{} on {}/5", self.value, self.on),
        }
    }
}

/// The whole matrix, in run order.
fn matrix() -> Vec<Cell> {
    let mut cells = Vec::new();
    for client in [Client::Ours, Client::Rslock] {
        for on in LATENCY_ON {
            for latency in LATENCIES {
                cells.push(Cell {
                    client,
                    kind: "latency",
                    on,
                    value: latency as f64,
                    defences: true,
                });
            }
        }
        for kind in ["pause", "kill"] {
            cells.push(Cell {
                client,
                kind,
                on: 1,
                value: 0.0,
                defences: true,
            });
        }
    }
    for on in CLOCK_ON {
        for defences in [true, false] {
            for rate in RATES {
                cells.push(Cell {
                    client: Client::Ours,
                    kind: "clock",
                    on,
                    value: rate,
                    defences,
                });
            }
        }
    }
    cells
}

/// rslock as a scenario client: one `lock` attempt at a time (its own retries
/// off), retried every 10 ms ± 50% until the wait is over, as the scenarios'
/// own locker does.
#[derive(Clone)]
struct Rslock(rslock::LockManager);

impl ScenarioClient for Rslock {
    type Held = rslock::Lock;

    async fn connect(_scenario: &Scenario, urls: &[String]) -> Option<Self> {
        let mut manager = rslock::LockManager::new(urls.to_vec());
        manager.set_retry(1, Duration::from_millis(1));
        Some(Self(manager))
    }

    async fn acquire(
        &self,
        key: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<(Self::Held, Instant), Failure> {
        let key = format!("{}{key}", Scenario::KEY_PREFIX);
        let deadline = Instant::now() + wait;
        loop {
            match self.0.lock(key.as_str(), ttl).await {
                Ok(lock) => {
                    // Its validity is counted up to the moment it returns.
                    let until = Instant::now() + Duration::from_millis(lock.validity_time as u64);
                    return Ok((lock, until));
                }
                Err(rslock::LockError::Unavailable | rslock::LockError::TtlExceeded) => {}
                Err(_) => return Err(Failure::Other),
            }
            let jitter = RandomState::new().hash_one(Instant::now()) % 10_001;
            let delay = Duration::from_micros(5_000 + jitter);
            if Instant::now() + delay >= deadline {
                return Err(Failure::NotAcquired);
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn release(&self, held: Self::Held) {
        self.0.unlock(&held).await;
    }
}

/// A cell's outcome.
struct Row {
    cell: Cell,
    report: Report,
}

impl Row {
    fn success(&self) -> f64 {
        if self.report.calls == 0 {
            0.0
        } else {
            self.report.acquisitions as f64 / self.report.calls as f64
        }
    }

    fn table_line(&self) -> String {
        let r = &self.report;
        format!(
            "{:<10} {:<22} {:<4} {:>7.1}% {:>6} {:>9} {:>9} {:>9} {:>5} {:>4}",
            self.cell.client.name(),
            self.cell.label(),
            if self.cell.defences { "on" } else { "off" },
            self.success() * 100.0,
            r.acquisitions,
            ms(r.acquire_latency.p50),
            ms(r.acquire_latency.p99),
            ms(r.validity.p50),
            r.violations.len(),
            r.keys_left
        )
    }

    fn csv_line(&self) -> String {
        let r = &self.report;
        format!(
            "{},{},{},{},{},{},{},{:.4},{},{},{:.3},{:.3},{:.3},{:.3},{},{},{:.3}",
            self.cell.client.name(),
            self.cell.kind,
            self.cell.on,
            self.cell.value,
            self.cell.defences,
            r.calls,
            r.acquisitions,
            self.success(),
            r.not_acquired,
            r.errors,
            millis(r.acquire_latency.p50),
            millis(r.acquire_latency.p99),
            millis(r.validity.p50),
            millis(r.validity.min),
            r.violations.len(),
            r.keys_left,
            millis(r.longest_call)
        )
    }
}

const TABLE_HEADER: &str =
    "client     cell                   def.  success  acqs.  acq. p50  acq. p99  valid p50 viol. left";

const CSV_HEADER: &str = "client,fault,on,value,defences,calls,acquisitions,success_rate,not_acquired,errors,acquire_p50_ms,acquire_p99_ms,validity_p50_ms,validity_min_ms,violations,keys_left,longest_call_ms";

fn main() {
    let smoke = std::env::var_os("TOLERANCE_SECS").is_none()
        && !std::env::args().any(|arg| arg == "--bench");
    let secs: f64 = match std::env::var("TOLERANCE_SECS") {
        Ok(value) => value
            .trim()
            .parse()
            .ok()
            .filter(|secs: &f64| *secs > 0.0)
            .expect("TOLERANCE_SECS must be a positive number of seconds"),
        Err(_) if smoke => 0.5,
        Err(_) => DEFAULT_SECS,
    };
    let cells: Vec<Cell> = if smoke {
        println!("smoke test only; run `cargo bench --bench tolerance` for the matrix");
        matrix()
            .into_iter()
            .filter(|cell| cell.kind == "latency" && cell.value == 5.0 && cell.on == 1)
            .collect()
    } else {
        matrix()
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the tokio runtime");

    println!(
        "tolerance: {} cells, {secs} s each; 5 instances, 2 clients × 3 tasks on {KEYS} keys, TTL 300 ms, \
         instance timeout 50 ms (rslock: 500 ms, its default)\n",
        cells.len()
    );
    let bar = ProgressBar::new(cells.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} cells, {elapsed} elapsed, ~{eta} left: {msg}",
        )
        .expect("a valid progress template"),
    );
    bar.suspend(|| println!("{TABLE_HEADER}"));
    let mut rows = Vec::with_capacity(cells.len());
    for cell in cells {
        bar.set_message(format!("{} {}", cell.client.name(), cell.label()));
        let mut scenario = Scenario::new(cell.label(), cell.fault());
        scenario.duration = Duration::from_secs_f64(secs);
        scenario.acquisitions = usize::MAX;
        scenario.keys = KEYS;
        scenario.defences = cell.defences;
        let report = runtime
            .block_on(async {
                match cell.client {
                    Client::Ours => scenario.run_with::<QuorumLocker>().await,
                    Client::Rslock => scenario.run_with::<Rslock>().await,
                }
            })
            .expect("start the scenario (is redis-server installed, and a C compiler for the clock shim?)");
        let row = Row { cell, report };
        bar.suspend(|| println!("{}", row.table_line()));
        rows.push(row);
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("(ms; success = acquisitions / calls; violations from the checker; left = keys left after cleanup)");

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tolerance");
    std::fs::create_dir_all(&dir).expect("create target/tolerance");
    let mut csv = String::from(CSV_HEADER);
    csv.push('\n');
    for row in &rows {
        let _ = writeln!(csv, "{}", row.csv_line());
    }
    let csv_path = dir.join("tolerance.csv");
    std::fs::write(&csv_path, csv).expect("write the CSV");
    println!("\nwrote {}", csv_path.display());
    for (name, plot) in [
        (
            "latency.svg",
            plot_latency as fn(&Path, &[Row]) -> PlotResult,
        ),
        ("clock.svg", plot_clock),
    ] {
        let path = dir.join(name);
        match plot(&path, &rows) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(err) => eprintln!("could not plot {}: {err}", path.display()),
        }
    }
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// A panel's title, y axis and value per row.
type Metric = (&'static str, &'static str, fn(&Row) -> f64);

/// One line of a panel: its name and a y value per x position.
struct Line {
    name: String,
    points: Vec<(i32, f64)>,
}

/// One panel: a title, a y axis, lines over categorical x positions.
struct Panel {
    title: &'static str,
    y_desc: &'static str,
    lines: Vec<Line>,
}

/// Injected latency (x) against success rate, acquire p50 and validity p50, for
/// each client and k.
fn plot_latency(path: &Path, rows: &[Row]) -> PlotResult {
    let metrics: [Metric; 3] = [
        ("success rate", "acquisitions / calls", Row::success),
        ("acquire latency p50", "ms", |row| {
            millis(row.report.acquire_latency.p50)
        }),
        ("validity left at acquisition, p50", "ms", |row| {
            millis(row.report.validity.p50)
        }),
    ];
    let mut panels = Vec::new();
    for (title, y_desc, metric) in metrics {
        let mut lines = Vec::new();
        for client in [Client::Ours, Client::Rslock] {
            for on in LATENCY_ON {
                let points: Vec<(i32, f64)> = LATENCIES
                    .iter()
                    .enumerate()
                    .filter_map(|(x, &latency)| {
                        rows.iter()
                            .find(|row| {
                                row.cell.client == client
                                    && row.cell.kind == "latency"
                                    && row.cell.on == on
                                    && row.cell.value == latency as f64
                            })
                            .map(|row| (x as i32, metric(row)))
                    })
                    .collect();
                if !points.is_empty() {
                    lines.push(Line {
                        name: format!("{} on {on}/5", client.name()),
                        points,
                    });
                }
            }
        }
        panels.push(Panel {
            title,
            y_desc,
            lines,
        });
    }
    let labels: Vec<String> = LATENCIES.iter().map(|l| l.to_string()).collect();
    draw(path, "injected round-trip latency (ms)", &labels, &panels)
}

/// Server clock rate (x) against violations, success rate and validity p50,
/// for minority and majority, defences on and off.
fn plot_clock(path: &Path, rows: &[Row]) -> PlotResult {
    let metrics: [Metric; 3] = [
        ("violations (overlapping tenures)", "count", |row| {
            row.report.violations.len() as f64
        }),
        ("success rate", "acquisitions / calls", Row::success),
        ("validity left at acquisition, p50", "ms", |row| {
            millis(row.report.validity.p50)
        }),
    ];
    let mut panels = Vec::new();
    for (title, y_desc, metric) in metrics {
        let mut lines = Vec::new();
        for on in CLOCK_ON {
            for defences in [true, false] {
                let points: Vec<(i32, f64)> = RATES
                    .iter()
                    .enumerate()
                    .filter_map(|(x, &rate)| {
                        rows.iter()
                            .find(|row| {
                                row.cell.kind == "clock"
                                    && row.cell.on == on
                                    && row.cell.defences == defences
                                    && row.cell.value == rate
                            })
                            .map(|row| (x as i32, metric(row)))
                    })
                    .collect();
                if !points.is_empty() {
                    let state = if defences { "on" } else { "off" };
                    lines.push(Line {
                        name: format!("{on}/5 fast/slow, defences {state}"),
                        points,
                    });
                }
            }
        }
        panels.push(Panel {
            title,
            y_desc,
            lines,
        });
    }
    let labels: Vec<String> = RATES.iter().map(|r| format!("×{r}")).collect();
    draw(path, "server clock rate", &labels, &panels)
}

/// Draws `panels` side by side, x at categorical positions named by `labels`.
fn draw(path: &Path, x_desc: &str, labels: &[String], panels: &[Panel]) -> PlotResult {
    let root = SVGBackend::new(path, (420 * panels.len() as u32, 380)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, panel) in areas.iter().zip(panels) {
        let top = panel
            .lines
            .iter()
            .flat_map(|line| line.points.iter().map(|p| p.1))
            .fold(0.0_f64, f64::max);
        let top = if top > 0.0 { top * 1.1 } else { 1.0 };
        let last = labels.len() as i32 - 1;
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0..last, 0.0..top)?;
        chart
            .configure_mesh()
            .x_labels(labels.len())
            .x_label_formatter(&|x| labels.get(*x as usize).cloned().unwrap_or_default())
            .x_desc(x_desc)
            .y_desc(panel.y_desc)
            .draw()?;
        for (i, line) in panel.lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    line.points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(line.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            chart.draw_series(
                line.points
                    .iter()
                    .map(|&point| Circle::new(point, 3, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn ms(duration: Duration) -> String {
    format!("{:.1}", millis(duration))
}
