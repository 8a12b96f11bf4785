//! Health checks: whether a workload serves, by a TCP connect or an HTTP GET on the
//! node's loopback (`spec.healthCheck`), and the rule that turns checks into a
//! verdict ([`Streak`]: so many failures in a row to go down, so many passes to come
//! back), which `verge lb` applies to its backends too.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use verge_api::instance::HealthCheck;

/// Passes and failures in a row, and the verdict they make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Streak {
    /// The verdict: `None` until the first check (which decides at once).
    pub healthy: Option<bool>,
    /// Checks in a row that went against the verdict.
    against: u32,
}

impl Streak {
    /// Take a check's result; the new verdict when it changed. `fall` failures in a
    /// row take a healthy one down, `rise` passes bring it back.
    pub fn observe(&mut self, ok: bool, fall: u32, rise: u32) -> Option<bool> {
        match self.healthy {
            None => {
                (self.healthy, self.against) = (Some(ok), 0);
                Some(ok)
            }
            Some(h) if h == ok => {
                self.against = 0;
                None
            }
            Some(_) => {
                self.against += 1;
                if self.against >= if ok { rise.max(1) } else { fall.max(1) } {
                    (self.healthy, self.against) = (Some(ok), 0);
                    Some(ok)
                } else {
                    None
                }
            }
        }
    }

    /// Down now, whatever the streak (a backend that refused a connection); whether
    /// that changed the verdict.
    pub fn down_now(&mut self) -> bool {
        let was = self.healthy;
        (self.healthy, self.against) = (Some(false), 0);
        was != Some(false)
    }
}

/// The most of an HTTP answer read (its status line is all that counts).
const HTTP_HEAD: usize = 1024;

/// Run one check against 127.0.0.1; why it failed, if it did.
pub async fn probe(check: &HealthCheck) -> Result<(), String> {
    let timeout = Duration::from_secs(u64::from(check.timeout_seconds.max(1)));
    let port = check
        .tcp
        .or(check.http.as_ref().map(|h| h.port))
        .unwrap_or(0);
    let run = async {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("127.0.0.1:{port}: {e}"))?;
        let Some(http) = &check.http else {
            return Ok(());
        };
        let req = format!(
            "GET {} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: verge-health\r\n\r\n",
            http.path
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("GET {}: {e}", http.path))?;
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        while !head.contains(&b'\n') && head.len() < HTTP_HEAD {
            let n = s
                .read(&mut buf)
                .await
                .map_err(|e| format!("GET {}: {e}", http.path))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or_default();
        match line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
        {
            Some(code) if (200..400).contains(&code) => Ok(()),
            Some(code) => Err(format!("GET {} answered {code}", http.path)),
            None => Err(format!("GET {}: not an HTTP answer: {line:?}", http.path)),
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", timeout.as_secs())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::instance::HttpCheck;

    #[test]
    fn a_verdict_needs_a_streak_to_change_but_the_first_check_decides() {
        let mut s = Streak::default();
        assert_eq!(
            s.observe(false, 3, 2),
            Some(false),
            "the first check decides"
        );
        assert_eq!(s.observe(true, 3, 2), None);
        assert_eq!(s.observe(true, 3, 2), Some(true), "two passes in a row");
        assert_eq!(s.observe(false, 3, 2), None);
        assert_eq!(s.observe(false, 3, 2), None);
        assert_eq!(s.observe(true, 3, 2), None, "a pass breaks the streak");
        for _ in 0..2 {
            assert_eq!(s.observe(false, 3, 2), None);
        }
        assert_eq!(
            s.observe(false, 3, 2),
            Some(false),
            "three failures in a row"
        );
        assert!(!s.down_now(), "already down");
        s.observe(true, 3, 1);
        assert!(s.down_now());
    }

    fn check(tcp: Option<u16>, http: Option<(u16, &str)>) -> HealthCheck {
        HealthCheck {
            tcp,
            http: http.map(|(port, path)| HttpCheck {
                port,
                path: path.into(),
            }),
            period_seconds: 1,
            timeout_seconds: 1,
            failure_threshold: 1,
            success_threshold: 1,
        }
    }

    #[tokio::test]
    async fn tcp_and_http_checks_pass_and_fail_as_the_server_answers() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let status = if req.starts_with("GET /ok ") {
                    "200 OK"
                } else {
                    "503 Busy"
                };
                let _ = s
                    .write_all(format!("HTTP/1.0 {status}\r\n\r\n").as_bytes())
                    .await;
            }
        });
        assert_eq!(probe(&check(Some(port), None)).await, Ok(()));
        assert_eq!(probe(&check(None, Some((port, "/ok")))).await, Ok(()));
        let e = probe(&check(None, Some((port, "/no"))))
            .await
            .expect_err("503");
        assert!(e.contains("503"), "{e}");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let e = probe(&check(Some(closed), None))
            .await
            .expect_err("refused");
        assert!(e.contains(&format!("127.0.0.1:{closed}")), "{e}");
    }
}
