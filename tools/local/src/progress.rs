//! Progress on long steps: shared counters, and a reporter that prints them to stderr (one
//! line rewritten in place on a terminal, a line every few seconds otherwise, e.g. in CI logs).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A named count, with an optional expected total.
#[derive(Debug, Default)]
pub struct Counter {
    pub name: String,
    done: AtomicU64,
    total: AtomicU64,
}

impl Counter {
    pub fn new(name: impl Into<String>, total: u64) -> Arc<Self> {
        Arc::new(Counter {
            name: name.into(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
        })
    }

    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// `12,345` style grouping.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One progress line: `label  name 1,234/5,000 (250/s) · name …`.
pub fn render(label: &str, counters: &[Arc<Counter>], elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let parts: Vec<String> = counters
        .iter()
        .map(|c| {
            let done = c.done();
            let total = c.total();
            let rate = (done as f64 / secs).round() as u64;
            if total > 0 {
                format!(
                    "{} {}/{} ({}/s)",
                    c.name,
                    thousands(done),
                    thousands(total),
                    thousands(rate)
                )
            } else {
                format!("{} {} ({}/s)", c.name, thousands(done), thousands(rate))
            }
        })
        .collect();
    format!("{label} [{:>4.0}s] {}", secs, parts.join(" · "))
}

/// Prints progress until dropped (then prints the final line).
pub struct Reporter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reporter {
    /// Starts reporting `counters` under `label`.
    pub fn start(label: impl Into<String>, counters: Vec<Arc<Counter>>) -> Reporter {
        let label = label.into();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                let tty = std::io::stderr().is_terminal();
                let every = if tty {
                    Duration::from_millis(500)
                } else {
                    Duration::from_secs(10)
                };
                let started = Instant::now();
                let mut last = Instant::now();
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    if last.elapsed() >= every {
                        last = Instant::now();
                        let line = render(&label, &counters, started.elapsed());
                        let mut err = std::io::stderr().lock();
                        let _ = if tty {
                            write!(err, "\r\x1b[2K{line}")
                        } else {
                            writeln!(err, "{line}")
                        };
                        let _ = err.flush();
                    }
                }
                let line = render(&label, &counters, started.elapsed());
                let mut err = std::io::stderr().lock();
                let _ = if tty {
                    writeln!(err, "\r\x1b[2K{line}")
                } else {
                    writeln!(err, "{line}")
                };
            })
            .ok();
        Reporter { stop, thread }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_counts_totals_and_rates() {
        let a = Counter::new("impressions", 2_000);
        a.add(1_500);
        let b = Counter::new("clicks", 0);
        b.add(30);
        let line = render("send", &[a, b], Duration::from_secs(3));
        assert_eq!(
            line,
            "send [   3s] impressions 1,500/2,000 (500/s) · clicks 30 (10/s)"
        );
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
    }
}
