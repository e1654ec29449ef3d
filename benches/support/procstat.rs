//! Memory and CPU of processes, read from `/proc` (Linux only): the processes listening
//! on a port, their resident memory sampled while a load runs, and their CPU time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the resident memory is sampled.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Returns the ids of the processes holding a listening TCP socket on `port` (IPv4 or
/// IPv6). Processes of other users are found only when this one may read their `fd`s.
pub fn pids_listening_on(port: u16) -> Vec<u32> {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return Vec::new();
    }
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = processes
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| holds_any_socket(*pid, &inodes))
        .collect();
    pids.sort_unstable();
    pids
}

/// Inodes of the listening sockets on `port`, from `/proc/net/tcp` and `tcp6`. A line
/// there is `sl local_address rem_address st ... inode`, with the port in hex and
/// state `0A` for LISTEN.
fn listening_inodes(port: u16) -> Vec<String> {
    let port_hex = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let listening = fields.get(3) == Some(&"0A");
                    let on_port = fields
                        .get(1)
                        .is_some_and(|local| local.ends_with(&port_hex));
                    (listening && on_port).then(|| fields.get(9).map(|inode| inode.to_string()))?
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn holds_any_socket(pid: u32, inodes: &[String]) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            inodes
                .iter()
                .any(|inode| target == format!("socket:[{inode}]"))
        })
    })
}

/// Reads a `kB` field such as `VmRSS` or `VmHWM` of `/proc/PID/status`, in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Returns the process name from `/proc/PID/comm`.
pub fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// User plus system CPU time of the process and all its threads so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name in brackets may contain spaces, so fields are counted after the last ')'.
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks_per_second())
}

/// `CLK_TCK` from `getconf`, the unit of the times in `/proc/PID/stat`; 100 when it
/// cannot be read, the value on every common Linux platform.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Samples `VmRSS` of some processes in a thread of its own and keeps the peak of each.
pub struct RssWatch {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<Vec<u64>>>,
    thread: Option<JoinHandle<()>>,
}

impl RssWatch {
    pub fn start(pids: &[u32]) -> RssWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new(Mutex::new(vec![0; pids.len()]));
        let thread = {
            let (pids, stop, peaks) = (pids.to_vec(), Arc::clone(&stop), Arc::clone(&peaks));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut peaks = peaks.lock().unwrap_or_else(|err| err.into_inner());
                    for (peak, pid) in peaks.iter_mut().zip(&pids) {
                        *peak = (*peak).max(status_kib(*pid, "VmRSS").unwrap_or(0));
                    }
                    drop(peaks);
                    std::thread::sleep(RSS_SAMPLE_INTERVAL);
                }
            })
        };
        RssWatch {
            stop,
            peaks,
            thread: Some(thread),
        }
    }

    /// Stops sampling and returns the peak of each process, in KiB, in the order given.
    pub fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let peaks = self.peaks.lock().unwrap_or_else(|err| err.into_inner());
        peaks.clone()
    }
}

/// CPU seconds of all processes whose name (`/proc/PID/comm`) is `name`, summed. Time of
/// processes that exited is not included.
pub fn cpu_seconds_of_name(name: &str) -> f64 {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    processes
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| process_name(*pid) == name)
        .filter_map(cpu_seconds)
        .sum()
}

/// Busy and total CPU seconds of the whole machine, summed over its cores, from the
/// first line of `/proc/stat`. Idle and I/O wait count as not busy.
pub fn machine_cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|field| field.parse().ok())
        .collect();
    let total: f64 = ticks.iter().sum();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    let per_second = clock_ticks_per_second();
    ((total - idle) / per_second, total / per_second)
}
