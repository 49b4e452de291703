//! Order statistics of a sample: what the benchmark reports for each system.

/// min / median / p90 / max of one measure (milliseconds or KiB, as the caller decides).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub max: f64,
}

impl Summary {
    /// None for an empty sample. The median of an even count is the mean of the two middle
    /// values; p90 is the nearest-rank percentile (the smallest value with at least 90% of the
    /// sample at or below it), so it is always a value that was measured.
    pub fn of(sample: &[f64]) -> Option<Summary> {
        if sample.is_empty() {
            return None;
        }
        let mut v = sample.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            n,
            min: v[0],
            median,
            p90: nearest_rank(&v, 0.9),
            max: v[n - 1],
        })
    }
}

/// The nearest-rank `q` quantile (0 < q <= 1) of a sample: the smallest value with at least
/// that share of the sample at or below it, so always a value that was measured.
pub fn percentile(sample: &[f64], q: f64) -> Option<f64> {
    if sample.is_empty() {
        return None;
    }
    let mut v = sample.to_vec();
    v.sort_by(f64::total_cmp);
    Some(nearest_rank(&v, q))
}

fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    let rank = (q * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// The index of the sample element closest to the median (the lower one on a tie): the run a
/// chart can show as "typical" with all its parts adding up.
pub fn median_index(sample: &[f64]) -> Option<usize> {
    let s = Summary::of(sample)?;
    let mut best = 0;
    for (i, x) in sample.iter().enumerate() {
        let d = (x - s.median).abs();
        let b = (sample[best] - s.median).abs();
        if d < b || (d == b && *x < sample[best]) {
            best = i;
        }
    }
    Some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_sample_has_no_summary() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(median_index(&[]), None);
    }

    #[test]
    fn odd_sample() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!(
            (s.n, s.min, s.median, s.p90, s.max),
            (3, 1.0, 3.0, 5.0, 5.0)
        );
    }

    #[test]
    fn even_sample_median_is_mean_of_middle_pair() {
        let s = Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
    }

    #[test]
    fn p90_is_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(Summary::of(&v).unwrap().p90, 18.0);
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(Summary::of(&v).unwrap().p90, 9.0);
        assert_eq!(Summary::of(&[7.0]).unwrap().p90, 7.0);
    }

    #[test]
    fn p75_is_nearest_rank_too() {
        let v: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 0.75), Some(8.0));
        assert_eq!(percentile(&[3.0, 1.0], 0.75), Some(3.0));
        assert_eq!(percentile(&[], 0.75), None);
    }

    #[test]
    fn median_index_picks_a_measured_run() {
        assert_eq!(median_index(&[10.0, 30.0, 20.0]), Some(2));
        // Median 2.5: 2.0 and 3.0 are equally close; the lower one wins.
        assert_eq!(median_index(&[4.0, 3.0, 1.0, 2.0]), Some(3));
    }
}
