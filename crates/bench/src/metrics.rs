//! Reading a node's `/metrics` (Prometheus text) over a plain HTTP/1.1 GET.

use crate::target::Resolved;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest `/metrics` response read.
const MAX_RESPONSE: usize = 8 << 20;

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// Socket error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// No answer in time.
    #[error("timeout")]
    Timeout,
    /// Not a 200 response, or unreadable.
    #[error("bad response: {0}")]
    Bad(String),
    /// The metric is not in the exposition.
    #[error("metric `{0}` not found")]
    Missing(String),
}

/// Fetches `http://HOST:PORT/metrics` of the node behind `target` (same host and port as its
/// WebSocket URL) and returns the body.
pub async fn fetch(target: &Resolved, timeout: Duration) -> Result<String, ScrapeError> {
    let fut = async {
        let mut s = TcpStream::connect(target.addr).await?;
        let req = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
            target.target.authority
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::with_capacity(64 << 10);
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_RESPONSE {
                return Err(ScrapeError::Bad("response too large".to_owned()));
            }
        }
        Ok(buf)
    };
    let raw = tokio::time::timeout(timeout, fut).await.map_err(|_| ScrapeError::Timeout)??;
    parse_http_response(&raw)
}

/// Splits an HTTP/1.1 response into its body (de-chunked when `Transfer-Encoding: chunked`);
/// anything but status 200 is an error.
pub fn parse_http_response(raw: &[u8]) -> Result<String, ScrapeError> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| ScrapeError::Bad("no end of headers".to_owned()))?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        return Err(ScrapeError::Bad(format!("HTTP {status}")));
    }
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(n, v)| {
            n.trim().eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
        })
    });
    if !chunked {
        return Ok(body.to_owned());
    }
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    loop {
        let (size_line, after) =
            rest.split_once("\r\n").ok_or_else(|| ScrapeError::Bad("truncated chunk".to_owned()))?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| ScrapeError::Bad("bad chunk size".to_owned()))?;
        if size == 0 {
            break;
        }
        let chunk = after.get(..size).ok_or_else(|| ScrapeError::Bad("truncated chunk".to_owned()))?;
        out.push_str(chunk);
        rest = after.get(size..).unwrap_or_default().trim_start_matches("\r\n");
    }
    Ok(out)
}

/// The value of an unlabelled sample `name` in a Prometheus text exposition.
pub fn sample(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        // Exactly this metric: the name is followed by a space or by labels.
        let rest = match rest.as_bytes().first()? {
            b' ' => rest,
            b'{' => &rest[rest.find('}')? + 1..],
            _ => return None,
        };
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Reads `process_resident_memory_bytes` from the node's `/metrics`.
pub async fn resident_memory(target: &Resolved, timeout: Duration) -> Result<u64, ScrapeError> {
    const NAME: &str = "process_resident_memory_bytes";
    let body = fetch(target, timeout).await?;
    sample(&body, NAME).map(|v| v as u64).ok_or_else(|| ScrapeError::Missing(NAME.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_and_chunks() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            19\r\n# TYPE x gauge\nprocess_re\r\n\
            1a\r\nsident_memory_bytes 1.5e7\n\r\n0\r\n\r\n";
        let body = parse_http_response(raw).expect("200");
        assert_eq!(sample(&body, "process_resident_memory_bytes"), Some(1.5e7));
        assert_eq!(sample("a_b{x=\"1\"} 3\na 4\n", "a"), Some(4.0));
        assert_eq!(sample("a_b{x=\"1\"} 3\n", "a_b"), Some(3.0));
    }
}
