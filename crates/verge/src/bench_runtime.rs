//! `verge bench runtime`: how fast the node's drivers start workloads, with the real
//! drivers and the real tools (runc, a local OCI registry, QEMU, wasmtime), each
//! against a baseline in the same run where one exists.
// A build without any driver feature measures nothing but still compiles this.
#![cfg_attr(
    not(any(feature = "vm", feature = "container", feature = "function")),
    allow(unused_imports, dead_code)
)]

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;
use verge_api::{Bytes, Cpu, Form, Instance, InstanceSpec, VmSpec};
use verge_runtime::{Runtime, Workload};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn p(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    ms(sorted[((sorted.len() - 1) as f64 * q).round() as usize])
}

fn workload(dir: &Path, name: &str, spec: InstanceSpec) -> Workload {
    Workload {
        instance: Instance::new(name, spec),
        dir: dir.join(name),
        cgroup: None,
        run_id: None,
    }
}

fn have(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// Run the runtime benchmarks. `component`: the Wasm component for the function
/// measurements (`guests/hello-fn`, built for wasm32-wasip2).
pub async fn run(starts: usize, component: &Path, output: &str) -> Result<()> {
    let dir = crate::bench::tempdir()?;
    let skipped = |e: anyhow::Error| json!({ "skipped": format!("{e:#}") });
    eprintln!("bench runtime: containers ({starts} starts)");
    let container = container(&dir.join("c"), starts)
        .await
        .unwrap_or_else(skipped);
    eprintln!("bench runtime: VMs ({} boots)", starts.min(5));
    let vm = vm(&dir.join("v"), starts.min(5))
        .await
        .unwrap_or_else(skipped);
    eprintln!("bench runtime: functions");
    let function = function(component).await.unwrap_or_else(skipped);
    let _ = std::fs::remove_dir_all(&dir);
    let report = json!({
        "bench": "runtime",
        "container": container,
        "vm": vm,
        "function": function,
    });
    crate::bench::print_report(&report, output)
}

/// Container start to running (runc has started the process) and stop, against
/// `runc run --detach` + `runc delete --force` of the same image root by hand.
#[cfg(feature = "container")]
async fn container(dir: &Path, starts: usize) -> Result<serde_json::Value> {
    use anyhow::Context;
    use verge_api::ContainerSpec;
    use verge_container::image::{ImageStore, layer_tar_gz};
    if !have("runc") || !have("docker-registry") {
        bail!("needs runc and docker-registry (apt-get install runc docker-registry)");
    }
    std::fs::create_dir_all(dir)?;
    let port = crate::bench::free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        verge_artifacts::registry_config(&dir.join("registry"), &addr),
    )?;
    let _registry = tokio::process::Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting docker-registry")?;
    let t = Instant::now();
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("docker-registry did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let busybox = std::fs::read("/bin/busybox").context("/bin/busybox (busybox-static)")?;
    let layer = layer_tar_gz(
        &[("bin/busybox", 0o755, &busybox)],
        &[("bin/sh", "busybox"), ("bin/sleep", "busybox")],
    );
    let image = format!("{addr}/bench/busybox:1");
    ImageStore::new(dir.join("push"), vec![addr.clone()])
        .push(&image, layer, json!({"Cmd": ["/bin/sh"]}))
        .await?;

    let node = dir.join("node");
    let driver =
        verge_container::ContainerRuntime::new(&node, vec![addr.clone()], std::env::current_exe()?);
    let spec = InstanceSpec {
        form: Form::Container,
        container: Some(ContainerSpec {
            image: image.clone(),
            command: vec!["/bin/sleep".into(), "600".into()],
            ..Default::default()
        }),
        resources: verge_api::instance::Resources {
            cpu: Cpu(250),
            memory: Bytes(32 << 20),
            ..Default::default()
        },
        ..Default::default()
    };
    let instances = node.join("instances");
    // The first start pulls, verifies and unpacks the image.
    let w = workload(&instances, "cold", spec.clone());
    let t = Instant::now();
    let r = driver.start(&w).await?;
    let cold = t.elapsed();
    driver.stop(&r.record, Duration::ZERO).await?;

    let (mut up, mut down) = (Vec::new(), Vec::new());
    for i in 0..starts {
        let w = workload(&instances, &format!("warm-{i}"), spec.clone());
        let t = Instant::now();
        let r = driver.start(&w).await?;
        up.push(t.elapsed());
        let t = Instant::now();
        driver.stop(&r.record, Duration::ZERO).await?;
        down.push(t.elapsed());
    }
    up.sort();
    down.sort();

    // Baseline: runc alone on a bundle over the same unpacked image.
    let rootfs = std::fs::read_dir(node.join("artifacts").join("images"))?
        .flatten()
        .map(|e| e.path().join("rootfs"))
        .find(|p| p.is_dir())
        .context("the unpacked image")?;
    let bundle = dir.join("raw-bundle");
    std::fs::create_dir_all(&bundle)?;
    let mut cfg = verge_container::runtime_config(
        &spec,
        spec.container.as_ref().context("container")?,
        &verge_container::image::Image::default(),
        "raw",
        None,
        &[],
    );
    cfg["root"] = json!({"path": rootfs, "readonly": true});
    cfg["linux"]["cgroupsPath"] = json!("/verge-bench-raw");
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&cfg)?)?;
    let state = dir.join("raw-state");
    let runc = |args: Vec<String>| {
        let state = state.clone();
        async move {
            let ok = tokio::process::Command::new("runc")
                .arg("--root")
                .arg(&state)
                .args(&args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .await?
                .success();
            if !ok {
                bail!("runc {args:?} failed");
            }
            Ok::<_, anyhow::Error>(())
        }
    };
    let (mut raw_up, mut raw) = (Vec::new(), Vec::new());
    for i in 0..starts {
        let id = format!("raw-{i}");
        let t = Instant::now();
        runc(vec![
            "run".into(),
            "--detach".into(),
            "--bundle".into(),
            bundle.display().to_string(),
            id.clone(),
        ])
        .await?;
        raw_up.push(t.elapsed());
        runc(vec!["delete".into(), "--force".into(), id]).await?;
        raw.push(t.elapsed());
    }
    raw_up.sort();
    raw.sort();
    let ours: Vec<Duration> = up
        .iter()
        .zip(&down)
        .map(|(a, b)| *a + *b)
        .collect::<Vec<_>>();
    let mut ours = ours;
    ours.sort();
    Ok(json!({
        "coldStartWithPullMs": ms(cold),
        "startToRunningP50Ms": p(&up, 0.5),
        "startToRunningP99Ms": p(&up, 0.99),
        "stopP50Ms": p(&down, 0.5),
        "startPlusStopP50Ms": p(&ours, 0.5),
        "rawRuncRunP50Ms": p(&raw_up, 0.5),
        "startToRunningVsRawRunc": p(&up, 0.5) / p(&raw_up, 0.5).max(f64::MIN_POSITIVE),
        "rawRuncRunDeleteP50Ms": p(&raw, 0.5),
        "startPlusStopVsRawRunc": p(&ours, 0.5) / p(&raw, 0.5).max(f64::MIN_POSITIVE),
        "runcAnchorMs": 100,
    }))
}

#[cfg(not(feature = "container"))]
async fn container(_dir: &Path, _starts: usize) -> Result<serde_json::Value> {
    bail!("this build has no container driver (feature `container`)")
}

/// VM start to the marker its init prints on the serial console.
#[cfg(feature = "vm")]
async fn vm(dir: &Path, boots: usize) -> Result<serde_json::Value> {
    use verge_vm::images;
    if !have("qemu-system-x86_64") {
        bail!("needs qemu-system-x86_64 (apt-get install qemu-system-x86)");
    }
    std::fs::create_dir_all(dir)?;
    let kernel = images::test_kernel().map_err(anyhow::Error::msg)?;
    let initrd = dir.join("initrd.cpio");
    images::busybox_initrd(&initrd, &images::marker_init("VERGE-BENCH-UP"))
        .map_err(anyhow::Error::msg)?;
    let driver = verge_vm::VmRuntime::detect();
    let spec = InstanceSpec {
        form: Form::Vm,
        vm: Some(VmSpec {
            kernel: Some(kernel.display().to_string()),
            initrd: Some(initrd.display().to_string()),
            cmdline: Some("console=ttyS0 quiet panic=-1".into()),
            disk: None,
        }),
        resources: verge_api::instance::Resources {
            cpu: Cpu(1000),
            memory: Bytes(128 << 20),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut times = Vec::new();
    for i in 0..boots {
        let w = workload(dir, &format!("vm-{i}"), spec.clone());
        let t = Instant::now();
        let r = driver.start(&w).await?;
        loop {
            let log = std::fs::read_to_string(w.log_path()).unwrap_or_default();
            if log.contains("VERGE-BENCH-UP") {
                break;
            }
            if t.elapsed() > Duration::from_secs(120) {
                let _ = driver.stop(&r.record, Duration::ZERO).await;
                bail!("no marker after 120 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        times.push(t.elapsed());
        driver.stop(&r.record, Duration::ZERO).await?;
    }
    times.sort();
    Ok(json!({
        "accelerator": if driver.kvm { "kvm" } else { "tcg" },
        "boots": boots,
        "startToSerialMarkerP50Ms": p(&times, 0.5),
        "startToSerialMarkerMaxMs": p(&times, 1.0),
    }))
}

/// One HTTP/1.0 request on a new connection; the time until the whole answer is in.
#[cfg(feature = "function")]
async fn timed_get(addr: std::net::SocketAddr, path: &str) -> Result<(Duration, u16)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: b\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let status = String::from_utf8_lossy(&raw)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((t.elapsed(), status))
}

/// Function cold starts (every request is a fresh instance): instantiation alone, and
/// an HTTP request through the gateway against a native HTTP answer on the same
/// loopback. (The agent's memory per idle deployed function is measured end to end,
/// on a real agent, by `verge bench idle --functions 1000`.)
#[cfg(feature = "function")]
async fn function(component: &Path) -> Result<serde_json::Value> {
    use verge_api::FunctionSpec;
    crate::bench::component_exists(component)?;
    let rt = verge_function::FunctionRuntime::new(16)?;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gateway = l.local_addr()?;
    tokio::spawn(rt.clone().serve(l));
    let spec = InstanceSpec {
        form: Form::Function,
        function: Some(FunctionSpec {
            component: component.display().to_string(),
            timeout_ms: Some(2000),
        }),
        resources: verge_api::instance::Resources {
            cpu: Cpu(100),
            memory: Bytes(32 << 20),
            ..Default::default()
        },
        ..Default::default()
    };
    let dir = crate::bench::tempdir()?;
    let t = Instant::now();
    rt.start(&workload(&dir, "f-0", spec.clone())).await?;
    let first_deploy = t.elapsed();
    let mut inst = rt
        .instantiation_times("f-0", 2000)
        .await
        .map_err(anyhow::Error::msg)?;
    inst.sort();
    let native = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let native_addr = native.local_addr()?;
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = native.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 14\r\n\r\nhello from /x\n")
                    .await;
            });
        }
    });
    let (mut via_fn, mut via_native) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        timed_get(gateway, "/f-0/x").await?;
    }
    for _ in 0..1000 {
        let (d, status) = timed_get(gateway, "/f-0/x").await?;
        if status != 200 {
            bail!("the function answered {status}");
        }
        via_fn.push(d);
        via_native.push(timed_get(native_addr, "/x").await?.0);
    }
    via_fn.sort();
    via_native.sort();
    let _ = std::fs::remove_dir_all(&dir);
    let us = |d: &[Duration], q: f64| p(d, q) * 1000.0;
    Ok(json!({
        "component": component.display().to_string(),
        "firstDeployMs": ms(first_deploy),
        "instantiationP50Us": us(&inst, 0.5),
        "instantiationP99Us": us(&inst, 0.99),
        "wasmtimePoolingAnchorUs": 5,
        "requestP50Ms": p(&via_fn, 0.5),
        "requestP99Ms": p(&via_fn, 0.99),
        "nativeRequestP50Ms": p(&via_native, 0.5),
        "nativeRequestP99Ms": p(&via_native, 0.99),
        "cloudflareWorkersColdStartAnchorMs": 5,
    }))
}

#[cfg(not(feature = "function"))]
async fn function(_component: &Path) -> Result<serde_json::Value> {
    bail!("this build has no function driver (feature `function`)")
}

#[cfg(not(feature = "vm"))]
async fn vm(_dir: &Path, _boots: usize) -> Result<serde_json::Value> {
    bail!("this build has no VM driver (feature `vm`)")
}
