//! The container shim: one small process per container that outlives the agent and
//! learns the container's exit status, which on Linux only a parent can.
//!
//! `runc run --detach` leaves the container's init without its parent, and the kernel
//! hands it to the nearest ancestor that is a *child subreaper*. The shim is that
//! ancestor: it marks itself a subreaper, runs `runc run --detach`, reports the
//! container's pid (or runc's failure) on its standard output, and waits. When the
//! container ends, the shim writes its status to the exit file (`code N` or
//! `signal N`, replaced atomically) and exits. The agent reads the file whenever it
//! learns the container is gone, so a container that ends while the agent is down or
//! restarting still has its exit code.
//!
//! The shim is the `verge` binary itself (`verge container-shim`), started in the
//! instance's cgroup (its memory counts as the driver's overhead) and in a process
//! group of its own (a Ctrl-C meant for the agent does not reach it). It uses no async
//! runtime and only a few hundred kilobytes.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;

use nix::sys::wait::{WaitStatus, waitpid};
use verge_runtime::Exit;

/// What the shim prints when runc has started the container.
pub const STARTED: &str = "started ";
/// What it prints when runc failed (followed by runc's status).
pub const FAILED: &str = "failed ";

/// Write the exit status of the container to `exit_file`.
fn record(exit_file: &Path, status: &str) {
    let tmp = exit_file.with_extension("tmp");
    if std::fs::write(&tmp, status).is_ok() {
        let _ = std::fs::rename(&tmp, exit_file);
    }
}

/// Read an exit file the shim wrote.
pub fn read_exit(exit_file: &Path) -> Option<Exit> {
    let text = std::fs::read_to_string(exit_file).ok()?;
    let (kind, n) = text.trim().split_once(' ')?;
    let n: i32 = n.parse().ok()?;
    match kind {
        "code" => Some(Exit::Code(n)),
        "signal" => Some(Exit::Signal(n)),
        _ => None,
    }
}

/// `verge container-shim --exit-file FILE --pid-file FILE -- RUNC...` (the arguments
/// after `container-shim`); returns the process's exit code.
pub fn main(args: Vec<String>) -> i32 {
    let mut it = args.into_iter();
    let (mut exit_file, mut pid_file) = (None, None);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--exit-file" => exit_file = it.next(),
            "--pid-file" => pid_file = it.next(),
            "--" => break,
            other => {
                println!("{FAILED}unknown argument {other:?}");
                return 2;
            }
        }
    }
    let runc: Vec<String> = it.collect();
    match (exit_file, pid_file) {
        (Some(e), Some(p)) => run(Path::new(&e), Path::new(&p), &runc),
        _ => {
            println!(
                "{FAILED}usage: verge container-shim --exit-file FILE --pid-file FILE -- RUNC..."
            );
            2
        }
    }
}

/// Run the shim: `runc` is the full `runc ... run --detach --pid-file PID_FILE ...`
/// command line. Returns the shim's exit code.
pub fn run(exit_file: &Path, pid_file: &Path, runc: &[String]) -> i32 {
    let mut out = std::io::stdout();
    let mut say = |line: String| {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        say(format!("{FAILED}cannot become a child subreaper: {e}"));
        return 1;
    }
    let Some((program, args)) = runc.split_first() else {
        say(format!("{FAILED}no runc command given"));
        return 2;
    };
    // runc's own output goes where the shim's standard error goes: the instance's log.
    let log = || {
        std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map(std::process::Stdio::from)
            .unwrap_or_else(|_| std::process::Stdio::null())
    };
    let status = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log())
        .stderr(log())
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            say(format!("{FAILED}{s}"));
            return 1;
        }
        Err(e) => {
            say(format!("{FAILED}{program}: {e}"));
            return 1;
        }
    }
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        say(format!("{FAILED}runc wrote no pid file"));
        return 1;
    };
    say(format!("{STARTED}{pid}"));
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, code)) if p.as_raw() == pid => {
                record(exit_file, &format!("code {code}"));
                return 0;
            }
            Ok(WaitStatus::Signaled(p, sig, _)) if p.as_raw() == pid => {
                record(exit_file, &format!("signal {}", sig as i32));
                return 0;
            }
            // Some other orphan (a runc helper): reaped, and on we wait.
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            // No children left: the container was never handed to us.
            Err(_) => return 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shim_reports_the_exit_code_of_an_orphaned_grandchild() {
        let dir = tempfile::tempdir().unwrap();
        let (exit, pid) = (dir.path().join("exit"), dir.path().join("pid"));
        // Stands in for `runc run --detach`: starts a process that outlives it (an
        // orphan the shim inherits), writes its pid and returns.
        let fake_runc = format!("(sleep 0.3; exit 7) & echo $! > {}; exit 0", pid.display());
        let child = std::thread::spawn({
            let (exit, pid) = (exit.clone(), pid.clone());
            move || run(&exit, &pid, &["/bin/sh".into(), "-c".into(), fake_runc])
        });
        assert_eq!(child.join().unwrap(), 0);
        assert_eq!(read_exit(&exit), Some(Exit::Code(7)));
    }
}
