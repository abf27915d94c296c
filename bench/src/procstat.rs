//! CPU time and memory of a process tree, read from /proc.

use std::collections::HashMap;
use std::fs;

/// Clock ticks per second of `utime`/`stime` in /proc/PID/stat.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// Parsed fields of /proc/PID/stat that the harness uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub ppid: u32,
    /// utime + stime in clock ticks, all threads of the process.
    pub cpu_ticks: u64,
}

/// Parses one /proc/PID/stat line. The command name in parentheses may
/// contain spaces, so fields are counted from the last `)`.
pub fn parse_stat(line: &str) -> Option<Stat> {
    let after = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15), 1-based in proc(5).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Stat {
        ppid,
        cpu_ticks: utime + stime,
    })
}

pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `root` and all its descendants alive now.
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(stat) = stat(pid) {
                children.entry(stat.ppid).or_default().push(pid);
            }
        }
    }
    let mut tree = vec![root];
    let mut index = 0;
    while index < tree.len() {
        if let Some(kids) = children.get(&tree[index]) {
            tree.extend(kids);
        }
        index += 1;
    }
    tree
}

/// CPU seconds (user + system) used so far by `root` and its live
/// descendants. Tick-based: the resolution is one tick (usually 10 ms).
pub fn tree_cpu_seconds(root: u32) -> f64 {
    let ticks: u64 = process_tree(root)
        .iter()
        .filter_map(|pid| stat(*pid))
        .map(|s| s.cpu_ticks)
        .sum();
    ticks as f64 / clock_ticks_per_second() as f64
}

/// CPU seconds used so far by `pid` alone (all its threads).
pub fn process_cpu_seconds(pid: u32) -> f64 {
    stat(pid).map_or(0.0, |s| {
        s.cpu_ticks as f64 / clock_ticks_per_second() as f64
    })
}

/// A `Vm*` field of /proc/PID/status in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kib(&text, field)
}

pub fn parse_status_kib(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Sum of `field` (`VmRSS`, `VmHWM`) over the tree, in KiB. Shared pages
/// count once per process, so a multi-process server is overstated.
pub fn tree_kib(root: u32, field: &str) -> u64 {
    process_tree(root)
        .iter()
        .filter_map(|pid| status_kib(*pid, field))
        .sum()
}

/// Resets the peak RSS (VmHWM) of every process in the tree to its
/// current RSS. Needs write access to /proc/PID/clear_refs; failures are
/// ignored and leave the peak since process start.
pub fn reset_peak_rss(root: u32) {
    for pid in process_tree(root) {
        let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

/// Whole-machine CPU counters from the first line of /proc/stat, in ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineTicks {
    pub busy: u64,
    pub total: u64,
}

pub fn machine_ticks() -> MachineTicks {
    fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|text| parse_machine_ticks(&text))
        .unwrap_or_default()
}

pub fn parse_machine_ticks(text: &str) -> Option<MachineTicks> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    if values.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal
    let total: u64 = values.iter().sum();
    let idle = values[3] + values[4];
    Some(MachineTicks {
        busy: total - idle,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_name() {
        let line = "1234 (my (odd) name) S 77 1234 1234 0 -1 4194560 500 0 0 0 250 31 0 0 20 0 3 0 100 0 0";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.ppid, 77);
        assert_eq!(stat.cpu_ticks, 281);
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(stat(me).is_some());
        assert!(process_tree(me).contains(&me));
        assert!(status_kib(me, "VmRSS").unwrap() > 0);
        assert!(status_kib(me, "VmHWM").unwrap() >= status_kib(me, "VmRSS").unwrap() / 2);
    }

    #[test]
    fn parses_status_and_machine_lines() {
        let status = "Name:\tx\nVmHWM:\t   2048 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(2048));
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(1024));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
        let machine = "cpu  100 5 50 800 20 1 4 0 0 0\ncpu0 1 2 3 4\n";
        let ticks = parse_machine_ticks(machine).unwrap();
        assert_eq!(ticks.total, 980);
        assert_eq!(ticks.busy, 160);
    }
}
