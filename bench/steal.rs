//! Steal time: the share of the machine's CPU time that the hypervisor gave
//! to other guests while a measurement ran. On a VM it explains outliers
//! that nothing in socktap causes (a round with 10 % steal can show a p99
//! ten times the usual), so every measurement reports it beside its numbers.

/// The machine's CPU time counters, in clock ticks, from the `cpu` line of
/// `/proc/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// All time, every state.
    pub total: u64,
    /// Stolen by the hypervisor.
    pub steal: u64,
}

impl CpuTimes {
    /// Now, or None where `/proc/stat` cannot be read.
    pub fn now() -> Option<CpuTimes> {
        parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Percent of the CPU time from `self` to `later` that was stolen; None
    /// when no time passed.
    pub fn steal_percent_until(self, later: CpuTimes) -> Option<f64> {
        let total = later.total.checked_sub(self.total)?;
        let steal = later.steal.checked_sub(self.steal)?;
        (total > 0).then(|| 100.0 * steal as f64 / total as f64)
    }
}

/// Reads the first line of `/proc/stat`: `cpu  user nice system idle iowait
/// irq softirq steal guest guest_nice`. guest and guest_nice are already
/// counted in user and nice, so they are left out of the total.
fn parse(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().next()?;
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields.take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    if values.len() < 8 {
        return None;
    }
    Some(CpuTimes {
        total: values.iter().sum(),
        steal: values[7],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_the_share_of_all_cpu_time_between_two_readings() {
        let a = parse("cpu  100 0 50 800 10 0 20 20 7 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(a, CpuTimes { total: 1000, steal: 20 });
        let b = parse("cpu  200 0 100 1400 10 0 40 250 9 0\n").unwrap();
        let pct = a.steal_percent_until(b).unwrap();
        assert!((pct - 23.0).abs() < 1e-9, "{pct}");
        assert_eq!(a.steal_percent_until(a), None, "no time passed");
        assert_eq!(b.steal_percent_until(a), None, "counters went backwards");
    }

    #[test]
    fn lines_that_are_not_the_cpu_total_are_refused() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse("cpu 1 2 3"), None, "kernels before steal time");
        assert_eq!(parse("cpu 1 2 3 4 5 6 7 x"), None);
    }
}
