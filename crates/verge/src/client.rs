//! The CLI's HTTP client for the hub's REST API.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use serde::de::DeserializeOwned;
use verge_api::ApiError;
use verge_hub::ClientConfig;

/// Where the CLI looks for its config: `--config`, then `$VERGE_CONFIG`, then `~/.verge/config`.
pub fn config_path(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p);
    }
    if let Some(p) = std::env::var_os("VERGE_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let home =
        std::env::var_os("HOME").ok_or_else(|| anyhow!("$HOME is not set; pass --config FILE"))?;
    Ok(PathBuf::from(home).join(".verge").join("config"))
}

/// The error an unsuccessful response carries (the hub's message when it sent one).
async fn error_of(resp: reqwest::Response) -> anyhow::Error {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<ApiError>(&text) {
        Ok(e) => anyhow!("{}", e.message),
        Err(_) => anyhow!("hub answered {status}: {text}"),
    }
}

/// How long a request refused with `Retry-After` is tried again before its error is
/// returned.
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// How long a 503 asks the client to wait (`Retry-After` in seconds, at most 10).
fn retry_after(resp: &reqwest::Response) -> Option<std::time::Duration> {
    if resp.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE {
        return None;
    }
    let secs: u64 = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(std::time::Duration::from_secs(secs.clamp(1, 10)))
}

/// A connection to one hub.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    /// Build from the config file.
    pub fn from_flag(flag: Option<PathBuf>) -> Result<Self> {
        let path = config_path(flag)?;
        let cfg = ClientConfig::load(&path).with_context(|| {
            format!(
                "no usable hub config at {} (start a hub with `verge dev`, or point --config / $VERGE_CONFIG at a hub's admin.conf)",
                path.display()
            )
        })?;
        Self::new(&cfg)
    }

    /// Build from a config.
    pub fn new(cfg: &ClientConfig) -> Result<Self> {
        verge_tunnel::install_crypto_provider();
        let tls = verge_tunnel::tls::client_config(&cfg.ca_cert, None, &[b"http/1.1"])?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls).clone())
            // The hub closes a keep-alive connection idle for
            // `verge_hub::REQUEST_HEAD_DEADLINE` (10 s); a client that kept it longer
            // (reqwest's default is 90 s) could send a request on it as the hub closes
            // it, and fail ("peer closed connection"): a 100,000-edge simulation lost
            // its final check so, its one request after 10 s of waiting.
            .pool_idle_timeout(verge_hub::REQUEST_HEAD_DEADLINE / 2)
            .build()
            .context("building HTTP client")?;
        Ok(Self {
            http,
            base: cfg.server.trim_end_matches('/').to_string(),
            token: cfg.token.clone(),
        })
    }

    /// Send `req`; a write refused with 503 and `Retry-After` (a hub behind on its
    /// work refuses writes so) is tried again after the time it asks, for up to
    /// [`RETRY_FOR`] in all. Reads are not: a 503 there (too many watches) is for the
    /// user to act on.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let began = std::time::Instant::now();
        let mut req = req.bearer_auth(&self.token);
        let write = req
            .try_clone()
            .and_then(|r| r.build().ok())
            .is_some_and(|r| r.method() != reqwest::Method::GET);
        loop {
            // A streamed body (a file) cannot be sent twice: it is not retried.
            let again = req.try_clone().filter(|_| write);
            let resp = req.send().await.with_context(|| {
                format!("cannot reach the hub at {}; is it running?", self.base)
            })?;
            if resp.status().is_success() {
                return Ok(resp);
            }
            match (again, retry_after(&resp)) {
                (Some(next), Some(wait)) if began.elapsed() + wait <= RETRY_FOR => {
                    tokio::time::sleep(wait).await;
                    req = next;
                }
                _ => return Err(error_of(resp).await),
            }
        }
    }

    /// Open a data stream (exec, port-forward): an HTTP/1.1 upgrade of `GET path?query`
    /// to `verge-stream/1`, after which the connection carries chunks.
    pub async fn upgrade(&self, path: &str, query: &[(&str, &str)]) -> Result<reqwest::Upgraded> {
        let mut url = reqwest::Url::parse(&self.url(path)).context("building the URL")?;
        for (k, v) in query {
            url.query_pairs_mut().append_pair(k, v);
        }
        let proto = String::from_utf8_lossy(verge_api::channel::ALPN_STREAM).into_owned();
        let resp = self
            .http
            .get(url)
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, proto)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the hub at {}; is it running?", self.base))?;
        if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            return Err(error_of(resp).await);
        }
        resp.upgrade().await.context("switching to a data stream")
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET a JSON document.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let r = self.send(self.http.get(self.url(path))).await?;
        r.json().await.context("decoding hub response")
    }

    /// GET text.
    pub async fn get_text(&self, path: &str) -> Result<String> {
        let r = self.send(self.http.get(self.url(path))).await?;
        r.text().await.context("reading hub response")
    }

    /// PUT JSON, returning the status code and body.
    pub async fn put(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value)> {
        let r = self.send(self.http.put(self.url(path)).json(body)).await?;
        let code = r.status().as_u16();
        Ok((code, r.json().await.context("decoding hub response")?))
    }

    /// PUT a file's bytes (streamed), returning the JSON answer.
    pub async fn put_file<T: DeserializeOwned>(
        &self,
        path: &str,
        file: tokio::fs::File,
    ) -> Result<T> {
        let r = self
            .send(
                self.http
                    .put(self.url(path))
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(file),
            )
            .await?;
        r.json().await.context("decoding hub response")
    }

    /// POST JSON.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T> {
        let r = self.send(self.http.post(self.url(path)).json(body)).await?;
        r.json().await.context("decoding hub response")
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> Result<()> {
        self.send(self.http.delete(self.url(path))).await?;
        Ok(())
    }

    /// GET a streaming response (watch).
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response> {
        self.send(self.http.get(self.url(path))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, retry_after: Option<&str>) -> reqwest::Response {
        let mut r = http::Response::new(Vec::new());
        *r.status_mut() = http::StatusCode::from_u16(status).expect("status");
        if let Some(v) = retry_after {
            r.headers_mut().insert(
                reqwest::header::RETRY_AFTER,
                reqwest::header::HeaderValue::from_str(v).expect("header value"),
            );
        }
        reqwest::Response::from(r)
    }

    /// Only a 503 that says when is tried again, after what it says (1 to 10 s).
    #[test]
    fn a_refusal_is_tried_again_only_when_it_says_when() {
        let secs = |s| Some(std::time::Duration::from_secs(s));
        assert_eq!(retry_after(&response(503, Some("1"))), secs(1));
        assert_eq!(retry_after(&response(503, Some(" 3 "))), secs(3));
        assert_eq!(retry_after(&response(503, Some("0"))), secs(1));
        assert_eq!(retry_after(&response(503, Some("3600"))), secs(10));
        assert_eq!(retry_after(&response(503, None)), None);
        assert_eq!(retry_after(&response(503, Some("soon"))), None);
        assert_eq!(retry_after(&response(429, Some("1"))), None);
        assert_eq!(retry_after(&response(409, Some("1"))), None);
    }
}
