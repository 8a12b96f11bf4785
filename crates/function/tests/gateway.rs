//! The function driver with a real component: the test suite's `guests/hello-fn`,
//! built for wasm32-wasip2 by `scripts/test.sh` (or named by `$VERGE_TEST_FUNCTION`).

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use verge_api::{Bytes, Form, FunctionSpec, Instance, InstanceSpec};
use verge_function::FunctionRuntime;
use verge_runtime::{Runtime, Workload};

fn component() -> PathBuf {
    std::env::var_os("VERGE_TEST_FUNCTION")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../guests/hello-fn/target/wasm32-wasip2/release/hello_fn.wasm")
        })
}

fn workload(dir: &std::path::Path, name: &str, memory: u64, timeout_ms: u64) -> Workload {
    let path = component();
    assert!(
        path.exists(),
        "{} is missing: run ./scripts/test.sh (it builds guests/hello-fn for wasm32-wasip2)",
        path.display()
    );
    let mut spec = InstanceSpec {
        form: Form::Function,
        function: Some(FunctionSpec {
            component: path.display().to_string(),
            timeout_ms: Some(timeout_ms),
        }),
        ..Default::default()
    };
    spec.resources.memory = Bytes(memory);
    Workload {
        instance: Instance::new(name, spec),
        dir: dir.join(name),
        cgroup: None,
        run_id: None,
    }
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: fn\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_answer_http_within_their_limits() {
    let rt = FunctionRuntime::new(100).expect("engine");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(rt.clone().serve(l));

    let tmp = tempfile::tempdir().expect("tmp");
    let hello = rt
        .start(&workload(tmp.path(), "hello", 32 << 20, 300))
        .await
        .expect("deploy");
    let (status, body) = get(addr, "/hello/greet?who=edge").await;
    assert_eq!((status, body.as_str()), (200, "hello from /greet?who=edge"));
    let log = std::fs::read_to_string(tmp.path().join("hello/output.log")).expect("log");
    assert!(
        log.contains("request for /greet?who=edge"),
        "stdout is the log: {log}"
    );
    // Every request is a fresh instance; many in a row work.
    for i in 0..20 {
        assert_eq!(get(addr, &format!("/hello/{i}")).await.0, 200);
    }
    // CPU: a request that never returns is stopped at its deadline.
    let (status, body) = get(addr, "/hello/spin").await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("300 ms"), "{body}");
    // Memory: 64 MiB does not fit in 32 MiB.
    let (status, body) = get(addr, "/hello/hog").await;
    assert_eq!(status, 500, "{body}");
    // More memory, and the same request succeeds.
    rt.start(&workload(tmp.path(), "roomy", 128 << 20, 1000))
        .await
        .expect("deploy");
    assert_eq!(
        get(addr, "/roomy/hog").await,
        (200, format!("held {} bytes", 64 << 20))
    );

    assert_eq!(get(addr, "/nobody/x").await.0, 404);
    rt.stop(&hello.record, Duration::ZERO).await.expect("stop");
    assert_eq!(get(addr, "/hello/x").await.0, 404, "gone after stop");
}
