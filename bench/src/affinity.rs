//! CPU pinning with sched_setaffinity(2), for the pinned benchmark layout.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Pins the calling thread to `core`. Threads it starts afterwards inherit
/// the mask, so call it before building a runtime.
pub fn pin_current_thread(core: usize) -> io::Result<()> {
    set_affinity(0, Some(core))
}

/// Sets `pid`'s (0: the calling thread) affinity to `core`, or to all
/// online CPUs with `None`.
pub fn set_affinity(pid: libc::pid_t, core: Option<usize>) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it and
    // sched_setaffinity reads it with its correct size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        match core {
            Some(core) => libc::CPU_SET(core, &mut set),
            None => {
                let online = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as usize;
                for cpu in 0..online {
                    libc::CPU_SET(cpu, &mut set);
                }
            }
        }
        if libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes `command`'s process start pinned to `core`, or on all CPUs with
/// `None` (so it does not inherit a pinned parent's mask).
pub fn pin_command(command: &mut Command, core: Option<usize>) {
    // SAFETY: the closure runs between fork and exec and only calls
    // sched_setaffinity, which is async-signal-safe.
    unsafe {
        command.pre_exec(move || set_affinity(0, core));
    }
}

/// Number of online CPUs.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    online.max(1) as usize
}
