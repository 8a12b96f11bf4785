//! The hub's artifact store: uploads are hashed as they stream in and refused when they
//! do not match the digest asked for; downloads over HTTP and over an edge's data
//! stream return exactly what was stored; a missing digest says how to upload it.

use std::sync::Arc;

use axum::body::Body;
use verge_api::ErrorCode;
use verge_hub::HubConfig;
use verge_hub::artifacts::{UploadQuery, download, serve_stream, upload};
use verge_hub::objects::Objects;
use verge_hub::state::HubState;
use verge_store::{SqliteStore, Store};
use verge_tunnel::chunk::{Chunk, read_chunk};
use verge_tunnel::pki::CertAuthority;

fn hub(dir: &std::path::Path) -> Arc<HubState> {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.join("db")).expect("store"));
    let ca = CertAuthority::generate("t").expect("ca");
    HubState::new(
        Objects::new(store),
        ca,
        HubConfig::new("127.0.0.1:0".parse().expect("addr"), dir),
    )
}

fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", verge_artifacts::sha256_hex(data))
}

#[tokio::test]
async fn uploads_are_verified_and_served_back_over_http_and_data_streams() {
    let dir = tempfile::tempdir().expect("dir");
    let st = hub(dir.path());
    // Larger than one data chunk, so the stream carries several.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let want = digest_of(&data);

    // The wrong digest asked for: refused, nothing stored.
    let wrong = digest_of(b"something else");
    let err = upload(
        &st,
        UploadQuery {
            digest: Some(wrong.clone()),
        },
        Body::from(data.clone()),
    )
    .await
    .expect_err("mismatch");
    assert_eq!(err.code, ErrorCode::Invalid);
    assert!(
        err.message.contains(&wrong) && err.message.contains(&want),
        "{}",
        err.message
    );
    assert!(st.artifacts.list().is_empty());

    let (_, info) = upload(
        &st,
        UploadQuery {
            digest: Some(want.clone()),
        },
        Body::from(data.clone()),
    )
    .await
    .expect("upload");
    assert_eq!(
        (info.0.digest.as_str(), info.0.size),
        (want.as_str(), 200_000)
    );

    let resp = download(&st, &want, false).await.expect("download");
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    assert_eq!(&body[..], &data[..]);

    // What an edge gets on a data stream: data chunks, then eof.
    let (mut edge, hub_side) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn({
        let st = st.clone();
        let want = want.clone();
        async move { serve_stream(&st, "n1", hub_side, &want).await }
    });
    let mut got = Vec::new();
    loop {
        match read_chunk(&mut edge).await.expect("chunk") {
            Some(Chunk::Data(d)) => got.extend(d),
            Some(Chunk::Eof) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    server.await.expect("server");
    assert_eq!(got, data);

    // A digest the hub lacks: an error that says what to do.
    let missing = digest_of(b"never uploaded");
    let err = download(&st, &missing, false).await.expect_err("missing");
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(
        err.message.contains("verge artifact push"),
        "{}",
        err.message
    );
    let (mut edge, hub_side) = tokio::io::duplex(1 << 16);
    serve_stream(&st, "n1", hub_side, &missing).await;
    match read_chunk(&mut edge).await.expect("chunk") {
        Some(Chunk::Error(m)) => assert!(m.contains(&missing), "{m}"),
        other => panic!("unexpected {other:?}"),
    }
    // Not a digest at all.
    let err = download(&st, "sha256:../../etc/passwd", false)
        .await
        .expect_err("bad");
    assert_eq!(err.code, ErrorCode::Invalid);
}
