//! What one arm of a rollout did lately: a sliding window of per-second buckets (requests,
//! failures, plugin traps, a log-scale latency histogram, drift against the stable and the
//! experiment's output metric) plus the same counts since the rollout began. Memory is fixed
//! by the window length (at most 300 buckets), whatever the traffic.

use std::time::{Duration, Instant};

/// Latency histogram buckets: bucket `i` holds latencies under `10 µs × 2^((i+1)/4)`, so 96
/// buckets cover 10 µs to about 167 s with a 19 % step.
pub const LATENCY_BUCKETS: usize = 96;

fn latency_bucket(latency: Duration) -> usize {
    let micros = latency.as_secs_f64() * 1e6;
    if micros <= 10.0 {
        return 0;
    }
    let index = ((micros / 10.0).log2() * 4.0).floor() as usize;
    index.min(LATENCY_BUCKETS - 1)
}

/// The upper bound of a latency bucket, in milliseconds.
pub fn bucket_upper_ms(index: usize) -> f64 {
    0.01 * 2f64.powf((index as f64 + 1.0) / 4.0)
}

/// Counts over some span of time.
#[derive(Clone, Debug, PartialEq)]
pub struct Counts {
    pub requests: u64,
    pub failures: u64,
    pub traps: u64,
    pub latency: [u32; LATENCY_BUCKETS],
    /// Mirrored requests compared with the stable's answer, and the sum of their drift.
    pub compared: u64,
    pub drift_sum: f64,
    /// Answers the experiment's metric was read from, and the sum of the values.
    pub measured: u64,
    pub metric_sum: f64,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            requests: 0,
            failures: 0,
            traps: 0,
            latency: [0; LATENCY_BUCKETS],
            compared: 0,
            drift_sum: 0.0,
            measured: 0,
            metric_sum: 0.0,
        }
    }
}

impl Counts {
    /// Adds another span's counts to these.
    pub fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.failures += other.failures;
        self.traps += other.traps;
        for (mine, theirs) in self.latency.iter_mut().zip(other.latency.iter()) {
            *mine = mine.saturating_add(*theirs);
        }
        self.compared += other.compared;
        self.drift_sum += other.drift_sum;
        self.measured += other.measured;
        self.metric_sum += other.metric_sum;
    }

    fn record(&mut self, outcome: &Outcome) {
        self.requests += 1;
        if outcome.failed {
            self.failures += 1;
        }
        if outcome.trapped {
            self.traps += 1;
        }
        let bucket = latency_bucket(outcome.latency);
        self.latency[bucket] = self.latency[bucket].saturating_add(1);
        if let Some(metric) = outcome.metric
            && metric.is_finite()
        {
            self.measured += 1;
            self.metric_sum += metric;
        }
    }

    /// A quantile of the latency, in milliseconds (the upper bound of its bucket); `None`
    /// without requests.
    pub fn quantile_ms(&self, quantile: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().map(|&count| u64::from(count)).sum();
        if total == 0 {
            return None;
        }
        let rank = ((quantile * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (index, &count) in self.latency.iter().enumerate() {
            seen += u64::from(count);
            if seen >= rank {
                return Some(bucket_upper_ms(index));
            }
        }
        Some(bucket_upper_ms(LATENCY_BUCKETS - 1))
    }

    pub fn failure_rate(&self) -> f64 {
        ratio(self.failures, self.requests)
    }

    pub fn trap_rate(&self) -> f64 {
        ratio(self.traps, self.requests)
    }

    /// The mean drift of the compared requests; `None` when none was compared.
    pub fn drift(&self) -> Option<f64> {
        (self.compared > 0).then(|| self.drift_sum / self.compared as f64)
    }

    /// The mean of the experiment's metric; `None` when no answer was measured.
    pub fn metric_mean(&self) -> Option<f64> {
        (self.measured > 0).then(|| self.metric_sum / self.measured as f64)
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// How one call of an arm went.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub latency: Duration,
    /// A server-side failure (internal, unavailable, deadline, unsupported); a client's bad
    /// request is not the arm's fault and is not counted at all.
    pub failed: bool,
    pub trapped: bool,
    pub metric: Option<f64>,
}

/// A sliding window of one-second buckets, plus totals since it began.
#[derive(Debug)]
pub struct Window {
    origin: Instant,
    /// `(second since origin, counts)`; slot `second % len`.
    buckets: Vec<(u64, Counts)>,
    total: Counts,
}

impl Window {
    pub fn new(seconds: u64, origin: Instant) -> Self {
        let len = seconds.clamp(1, super::spec::MAX_WINDOW_SECONDS) as usize;
        Window {
            origin,
            buckets: vec![(u64::MAX, Counts::default()); len],
            total: Counts::default(),
        }
    }

    fn slot(&mut self, now: Instant) -> &mut Counts {
        let second = now.saturating_duration_since(self.origin).as_secs();
        let len = self.buckets.len();
        let (held, counts) = &mut self.buckets[(second % len as u64) as usize];
        if *held != second {
            *held = second;
            *counts = Counts::default();
        }
        counts
    }

    pub fn record(&mut self, now: Instant, outcome: &Outcome) {
        self.slot(now).record(outcome);
        self.total.record(outcome);
    }

    pub fn record_drift(&mut self, now: Instant, drift: f64) {
        let slot = self.slot(now);
        slot.compared += 1;
        slot.drift_sum += drift;
        self.total.compared += 1;
        self.total.drift_sum += drift;
    }

    /// The counts of the last `len` seconds, the current one included.
    pub fn recent(&self, now: Instant) -> Counts {
        let second = now.saturating_duration_since(self.origin).as_secs();
        let len = self.buckets.len() as u64;
        let mut sum = Counts::default();
        for (held, counts) in &self.buckets {
            if *held != u64::MAX && *held <= second && second - *held < len {
                sum.add(counts);
            }
        }
        sum
    }

    /// Everything since the window began.
    pub fn total(&self) -> &Counts {
        &self.total
    }

    /// Forgets the recent buckets (not the totals): after a step changes, the next verdict
    /// is about the new step only.
    pub fn clear_recent(&mut self) {
        for bucket in &mut self.buckets {
            *bucket = (u64::MAX, Counts::default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(millis: u64) -> Outcome {
        Outcome {
            latency: Duration::from_millis(millis),
            failed: false,
            trapped: false,
            metric: None,
        }
    }

    #[test]
    fn old_seconds_slide_out_of_the_window_but_stay_in_the_totals() {
        let origin = Instant::now();
        let mut window = Window::new(3, origin);
        window.record(origin, &ok(1));
        window.record(
            origin + Duration::from_millis(1500),
            &Outcome {
                failed: true,
                ..ok(1)
            },
        );
        assert_eq!(window.recent(origin + Duration::from_secs(2)).requests, 2);
        let later = window.recent(origin + Duration::from_secs(3));
        assert_eq!((later.requests, later.failures), (1, 1));
        assert_eq!(window.recent(origin + Duration::from_secs(10)).requests, 0);
        window.record(origin + Duration::from_secs(10), &ok(1));
        assert_eq!(window.recent(origin + Duration::from_secs(10)).requests, 1);
        assert_eq!(window.total().requests, 3);
        assert_eq!(window.total().failure_rate(), 1.0 / 3.0);
    }

    #[test]
    fn quantiles_come_from_the_log_histogram_within_one_bucket() {
        let origin = Instant::now();
        let mut window = Window::new(10, origin);
        for millis in 1..=100 {
            window.record(origin, &ok(millis));
        }
        let counts = window.recent(origin);
        let p50 = counts.quantile_ms(0.5).unwrap();
        let p99 = counts.quantile_ms(0.99).unwrap();
        assert!((50.0..50.0 * 1.2).contains(&p50), "{p50}");
        assert!((99.0..99.0 * 1.2).contains(&p99), "{p99}");
        assert_eq!(Counts::default().quantile_ms(0.5), None);
        assert_eq!(
            latency_bucket(Duration::from_secs(100_000)),
            LATENCY_BUCKETS - 1
        );
        assert_eq!(latency_bucket(Duration::ZERO), 0);
    }

    #[test]
    fn drift_and_metric_are_means_over_what_was_measured() {
        let origin = Instant::now();
        let mut window = Window::new(5, origin);
        window.record_drift(origin, 0.5);
        window.record_drift(origin, 1.5);
        window.record(
            origin,
            &Outcome {
                metric: Some(2.0),
                ..ok(1)
            },
        );
        window.record(
            origin,
            &Outcome {
                metric: Some(f64::NAN),
                ..ok(1)
            },
        );
        let counts = window.recent(origin);
        assert_eq!(counts.drift(), Some(1.0));
        assert_eq!(counts.metric_mean(), Some(2.0));
        window.clear_recent();
        assert_eq!(window.recent(origin).compared, 0);
        assert_eq!(window.total().compared, 2);
    }
}
