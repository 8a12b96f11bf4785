//! `verge bench platform`: what the built-in platform services cost a site.
//!
//! - `lb`: a real `verge lb` process (this binary) in front of two local backends:
//!   its memory idle and after the load, its CPU per thousand connections, and the
//!   time of a connection (connect, one answer, close) through it against the same
//!   backends reached directly, in the same run.
//! - `local-disk`: a real volume (ext4 in a file, loop-mounted; needs root): the time
//!   to make and mount one, and writing with fsync into it against a plain directory
//!   of the same disk, in the same run. (Its memory is the kernel's: a loop device and
//!   its page cache; nothing of Verge's runs for it.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bench::print_report;
use crate::sim::cpu_seconds;

/// A backend that answers each connection with one line and closes it.
async fn backend() -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"pong\n").await;
            });
        }
    });
    Ok(addr)
}

/// `n` connections to `addr` one after another (each: connect, read the answer,
/// close); each one's time.
async fn connections(addr: SocketAddr, n: usize) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    let mut buf = [0u8; 16];
    for _ in 0..n {
        let t = Instant::now();
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let got = s.read(&mut buf).await?;
        anyhow::ensure!(got > 0, "{addr} closed without answering");
        times.push(t.elapsed());
    }
    Ok(times)
}

fn p(times: &mut [Duration], q: f64) -> f64 {
    times.sort();
    let i = ((times.len() as f64 - 1.0) * q).round() as usize;
    times.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

async fn lb(connections_n: usize, report: &mut serde_json::Value) -> Result<()> {
    let backends = [backend().await?, backend().await?];
    let listen = SocketAddr::from(([127, 0, 0, 1], crate::bench::free_port()?));
    let list = backends.map(|b| b.to_string()).join(",");
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["lb", "--listen", &listen.to_string(), "--backend", &list])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting verge lb")?;
    let pid = child.id().context("lb pid")?;
    // Up, and both backends checked in.
    let t = Instant::now();
    while connections(listen, 1).await.is_err() {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(10),
            "verge lb did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_kib(pid);
    // Direct first and through the lb after, then once more each way: the machine
    // is shared, so each is compared with the other of its round.
    let (mut direct, mut through, mut cpu) = (Vec::new(), Vec::new(), 0.0);
    for b in backends {
        direct.extend(connections(b, connections_n).await?);
        let cpu0 = cpu_seconds(pid);
        through.extend(connections(listen, connections_n).await?);
        cpu += cpu_seconds(pid) - cpu0;
    }
    let loaded = rss_kib(pid);
    let _ = child.kill().await;
    let (d50, t50) = (p(&mut direct, 0.5), p(&mut through, 0.5));
    report["lbConnections"] = (2 * connections_n).into();
    report["lbIdleRssMiB"] = (idle as f64 / 1024.0).into();
    report["lbRssAfterLoadMiB"] = (loaded as f64 / 1024.0).into();
    report["lbCpuMsPer1000Connections"] =
        (cpu * 1000.0 * 1000.0 / (2 * connections_n) as f64).into();
    report["connectionDirectP50Us"] = d50.into();
    report["connectionThroughLbP50Us"] = t50.into();
    report["connectionThroughLbP99Us"] = p(&mut through, 0.99).into();
    report["connectionDirectP99Us"] = p(&mut direct, 0.99).into();
    report["lbLatencyRatioP50"] = (t50 / d50.max(0.001)).into();
    Ok(())
}

/// Write `mib` MiB into `path` and fsync; the MiB/s.
fn write_rate(path: &std::path::Path, mib: usize) -> Result<f64> {
    use std::io::Write;
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(path)?;
    for _ in 0..mib {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(path)?;
    Ok(mib as f64 / secs.max(1e-9))
}

fn local_disk(mib: usize, report: &mut serde_json::Value) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        report["localDisk"] = "skipped: mounting a volume needs root".into();
        return Ok(());
    }
    // On the disk of the working directory (where a node's data would be), removed
    // at the end.
    let root =
        std::env::current_dir()?.join(format!(".verge-bench-platform-{}", std::process::id()));
    let dir = root.join("instance");
    let mut spec = verge_api::InstanceSpec {
        form: verge_api::Form::Process,
        ..Default::default()
    };
    spec.volumes = vec![verge_api::instance::VolumeSpec {
        name: "data".into(),
        size: verge_api::Bytes(((mib as u64) * 2 + 16) << 20),
        path: None,
    }];
    let w = verge_runtime::Workload {
        instance: verge_api::Instance::new("bench", spec),
        dir: dir.clone(),
        cgroup: None,
        run_id: None,
    };
    let t = Instant::now();
    let made = verge_runtime::volumes::prepare(&w, None);
    let make_ms = t.elapsed().as_secs_f64() * 1000.0;
    let result = made.map_err(anyhow::Error::from).and_then(|()| {
        let mp = verge_runtime::volumes::mount_point(&dir, "data");
        let plain = root.join("plain");
        std::fs::create_dir_all(&plain)?;
        let mut rounds = Vec::new();
        for _ in 0..2 {
            rounds.push((
                write_rate(&plain.join("f"), mib)?,
                write_rate(&mp.join("f"), mib)?,
            ));
        }
        Ok(rounds)
    });
    verge_runtime::volumes::release(&dir);
    let _ = std::fs::remove_dir_all(&root);
    let rounds = result?;
    let plain = rounds.iter().map(|r| r.0).sum::<f64>() / rounds.len() as f64;
    let volume = rounds.iter().map(|r| r.1).sum::<f64>() / rounds.len() as f64;
    report["volumeMakeAndMountMs"] = make_ms.into();
    report["writeMiB"] = mib.into();
    report["writePlainDirMiBps"] = plain.into();
    report["writeVolumeMiBps"] = volume.into();
    report["volumeWriteRatio"] = (volume / plain.max(1e-9)).into();
    Ok(())
}

/// Run the platform benchmark.
pub async fn run(connections_n: usize, mib: usize, output: &str) -> Result<()> {
    let mut report = serde_json::json!({"bench": "platform"});
    lb(connections_n, &mut report).await?;
    local_disk(mib, &mut report)?;
    print_report(&report, output)
}
