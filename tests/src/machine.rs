//! The whole machine's CPU time and context switches (/proc/stat), for benchmarks on machines
//! where the server, the load generator and the proxy share the cores.

use std::process::Command;

/// The whole machine's counters so far (/proc/stat): busy CPU time in clock ticks (all but idle
/// and iowait) and context switches.
pub fn counters() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu = stat.lines().next().expect("cpu line");
    let busy = cpu
        .split_whitespace()
        .skip(1)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v.parse::<u64>().unwrap_or(0))
        .sum();
    let ctxt = stat
        .lines()
        .find_map(|l| l.strip_prefix("ctxt "))
        .and_then(|v| v.trim().parse().ok())
        .expect("ctxt line in /proc/stat");
    (busy, ctxt)
}

/// Clock ticks per second (USER_HZ), asked of getconf once.
pub fn ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output().expect("getconf CLK_TCK");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("CLK_TCK")
    })
}

/// The whole machine's busy CPU time so far, in seconds.
pub fn busy_seconds() -> f64 {
    counters().0 as f64 / ticks_per_second()
}

/// A process's minor page faults so far (/proc/<pid>/stat, field 10, counted after the command
/// name, which ends with the last ')').
pub fn minor_faults(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process's /proc stat");
    let after_name = stat.rsplit_once(')').expect("stat line").1;
    after_name.split_whitespace().nth(7).and_then(|v| v.parse().ok()).expect("minflt")
}
