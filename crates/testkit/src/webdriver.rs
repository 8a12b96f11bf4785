//! A small W3C WebDriver client and Debian's `chromedriver` driving a headless
//! `chromium`: what the console's browser tests and `verge bench console` use. Only
//! the commands they need: navigate, find, type, click, read text, run a script,
//! take a screenshot.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A WebDriver failure.
#[derive(Debug, thiserror::Error)]
#[error("webdriver: {0}")]
pub struct WebDriverError(pub String);

type Result<T> = std::result::Result<T, WebDriverError>;

fn err(e: impl std::fmt::Display) -> WebDriverError {
    WebDriverError(e.to_string())
}

/// A `chromedriver` process on a loopback port, killed on drop.
pub struct ChromeDriver {
    child: Child,
    url: String,
    /// The browsers' profiles: here rather than Chromium's own temporary directories,
    /// which a killed driver leaves behind in /tmp.
    profiles: tempfile::TempDir,
}

impl ChromeDriver {
    /// Start `chromedriver` on a free port, its log in `log`, and wait until it serves.
    pub async fn start(log: &Path) -> Result<Self> {
        // reqwest is built without a default TLS provider (it speaks plain HTTP here).
        verge_tunnel::install_crypto_provider();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(err)?
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).map_err(err)?)
            .spawn()
            .map_err(|e| {
                err(format!(
                    "chromedriver (apt-get install chromium-driver): {e}"
                ))
            })?;
        let d = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            profiles: tempfile::tempdir().map_err(err)?,
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}/status", d.url)).send().await
                && r.status().is_success()
            {
                return Ok(d);
            }
            if Instant::now() > deadline {
                return Err(err("chromedriver did not start within 30s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Open a headless Chromium (`width` × `height`) that accepts the hub's
    /// self-signed certificate.
    pub async fn session(&self, width: u32, height: u32) -> Result<Session> {
        let client = reqwest::Client::new();
        static SESSIONS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let profile = self.profiles.path().join(format!("s{n}"));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                         "--ignore-certificate-errors", format!("--window-size={width},{height}"),
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let v = call(
            &client,
            reqwest::Method::POST,
            &format!("{}/session", self.url),
            Some(caps),
        )
        .await?;
        let id = v["sessionId"]
            .as_str()
            .ok_or_else(|| err(format!("no session id in {v}")))?;
        Ok(Session {
            client,
            base: format!("{}/session/{id}", self.url),
        })
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Result<Value> {
    let mut req = client.request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.map_err(err)?;
    let status = r.status();
    let v: Value = r.json().await.map_err(err)?;
    if !status.is_success() {
        return Err(err(format!(
            "{url}: {} {}",
            v["value"]["error"].as_str().unwrap_or("error"),
            v["value"]["message"].as_str().unwrap_or("")
        )));
    }
    Ok(v["value"].clone())
}

/// One browser session, closed on [`Session::close`].
pub struct Session {
    client: reqwest::Client,
    base: String,
}

/// An element of the page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Session {
    async fn post(&self, path: &str, body: Value) -> Result<Value> {
        call(
            &self.client,
            reqwest::Method::POST,
            &format!("{}{path}", self.base),
            Some(body),
        )
        .await
    }

    async fn get(&self, path: &str) -> Result<Value> {
        call(
            &self.client,
            reqwest::Method::GET,
            &format!("{}{path}", self.base),
            None,
        )
        .await
    }

    /// Go to `url`.
    pub async fn goto(&self, url: &str) -> Result<()> {
        self.post("/url", json!({ "url": url })).await.map(|_| ())
    }

    /// The first element matching a CSS selector.
    pub async fn find(&self, css: &str) -> Result<Element> {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await?;
        // An element reference is an object of one key (the web element identifier).
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .map(|id| Element(id.to_string()))
            .ok_or_else(|| err(format!("no element for {css}: {v}")))
    }

    /// Type `text` into an element.
    pub async fn type_into(&self, e: &Element, text: &str) -> Result<()> {
        self.post(&format!("/element/{}/value", e.0), json!({ "text": text }))
            .await
            .map(|_| ())
    }

    /// Click an element.
    pub async fn click(&self, e: &Element) -> Result<()> {
        self.post(&format!("/element/{}/click", e.0), json!({}))
            .await
            .map(|_| ())
    }

    /// An element's visible text.
    pub async fn text(&self, e: &Element) -> Result<String> {
        Ok(self
            .get(&format!("/element/{}/text", e.0))
            .await?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Run `script` (a function body; `arguments` holds `args`) and return its value.
    pub async fn eval(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.post("/execute/sync", json!({ "script": script, "args": args }))
            .await
    }

    /// Poll `script` until it returns something other than null/false, up to `within`.
    pub async fn wait_for(&self, what: &str, script: &str, within: Duration) -> Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let v = self.eval(script, Vec::new()).await?;
            if !(v.is_null() || v == Value::Bool(false)) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(err(format!(
                    "timed out after {within:?} waiting for {what}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Save a PNG screenshot of the page to `path`.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        use base64::Engine;
        let v = self.get("/screenshot").await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map_err(err)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        std::fs::write(path, png).map_err(err)
    }

    /// End the session (closes the browser).
    pub async fn close(self) -> Result<()> {
        call(&self.client, reqwest::Method::DELETE, &self.base, None)
            .await
            .map(|_| ())
    }
}
