//! `verge artifact`: put files (Wasm components, VM kernels, initrds, disk images)
//! where nodes can fetch them: the hub's artifact store, or an OCI registry.

use std::path::Path;

use anyhow::{Context, Result};
use verge_hub::artifacts::ArtifactInfo;

use crate::cli::{Output, table};
use crate::client::Client;

/// Upload `file` to the hub's artifact store; prints and returns its digest.
pub async fn push_to_hub(client: &Client, file: &Path) -> Result<String> {
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("{}: cannot open it", file.display()))?;
    let info: ArtifactInfo = client.put_file("/v1/artifacts", f).await?;
    println!("{}", info.digest);
    eprintln!(
        "stored {} ({} bytes) in the hub's artifact store; name it in a manifest as {}",
        file.display(),
        info.size,
        info.digest
    );
    Ok(info.digest)
}

/// Publish `file` as a single-file OCI artifact at `reference`.
pub async fn push_to_registry(file: &Path, reference: &str, plain_http: Vec<String>) -> Result<()> {
    let data =
        std::fs::read(file).with_context(|| format!("{}: cannot read it", file.display()))?;
    verge_tunnel::install_crypto_provider();
    let url = verge_artifacts::Registry::new(plain_http)
        .push_file(reference, data)
        .await?;
    println!("{reference}");
    eprintln!("pushed {} to {url}", file.display());
    Ok(())
}

/// What the hub's artifact store holds.
pub async fn list(client: &Client, output: Output) -> Result<()> {
    let v: serde_json::Value = client.get("/v1/artifacts").await?;
    let items: Vec<ArtifactInfo> =
        serde_json::from_value(v["items"].clone()).context("decoding the artifact list")?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&items)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(&items)?),
        Output::Table | Output::Wide => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|i| vec![i.digest.clone(), verge_api::Bytes(i.size).to_string()])
                .collect();
            print!("{}", table(&["DIGEST", "SIZE"], &rows));
        }
    }
    Ok(())
}
