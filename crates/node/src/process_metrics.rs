//! The standard `process_*` metrics every Prometheus-instrumented server exports (CPU time,
//! resident and virtual memory, open and maximum file descriptors, start time), read from
//! `/proc/self` as the Prometheus Go client does. Off Linux the sample is empty.

/// Clock ticks per second of `/proc/<pid>/stat` times. Fixed at 100 on Linux (`USER_HZ`);
/// the Prometheus Go client assumes the same.
const USER_HZ: f64 = 100.0;

/// One reading of the process's resource use.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessSample {
    /// User and system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Resident set size, in bytes.
    pub resident_memory_bytes: u64,
    /// Virtual memory size, in bytes.
    pub virtual_memory_bytes: u64,
    /// File descriptors open now.
    pub open_fds: u64,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<u64>,
    /// Start time, in seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
}

impl ProcessSample {
    /// Reads the current process's figures; `None` where `/proc` is not available.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name may hold spaces and parentheses: the fields start after the last ')'.
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
        // Field numbers below are those of proc(5), minus 3 (pid, comm and the offset).
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        let cpu_ticks = field(14)? + field(15)?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|k| k * 1024)
        };
        let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| {
                let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
                line.split_whitespace().nth(3)?.parse().ok()
            });
        let start_time_seconds = field(22).and_then(|ticks| {
            let stat = std::fs::read_to_string("/proc/stat").ok()?;
            let boot: f64 = stat
                .lines()
                .find_map(|l| l.strip_prefix("btime "))?
                .trim()
                .parse()
                .ok()?;
            Some(boot + ticks as f64 / USER_HZ)
        });
        Some(Self {
            cpu_seconds: cpu_ticks as f64 / USER_HZ,
            resident_memory_bytes: kib("VmRSS:").unwrap_or(0),
            virtual_memory_bytes: kib("VmSize:").unwrap_or(0),
            open_fds,
            max_fds,
            start_time_seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let sample = ProcessSample::read().expect("/proc is readable on Linux");
        assert!(sample.resident_memory_bytes > 1024 * 1024, "{sample:?}");
        assert!(sample.virtual_memory_bytes >= sample.resident_memory_bytes);
        assert!(sample.open_fds >= 3, "{sample:?}");
        assert!(sample.max_fds.is_some_and(|m| m >= sample.open_fds));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = sample.start_time_seconds.expect("start time");
        assert!(
            started <= now + 1.0 && started > now - 3600.0,
            "{started} vs {now}"
        );
        // Burn a little CPU and see the counter move.
        let before = sample.cpu_seconds;
        let mut x = 0u64;
        let until = std::time::Instant::now() + std::time::Duration::from_millis(80);
        while std::time::Instant::now() < until {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let after = ProcessSample::read().unwrap().cpu_seconds;
        assert!(after > before, "cpu {before} -> {after}");
    }
}
