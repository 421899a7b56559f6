//! `warren-broker check ready` and `warren-broker drain`: one-shot clients of the local node's
//! management API, for a container that has no curl (Kubernetes readiness probe, preStop hook).
//!
//! The HTTP client is deliberately tiny: HTTP/1.1 over a `TcpStream` (or TLS over it, for an
//! `https://` URL), basic auth, `Connection: close`, the whole command bounded by a timeout. It
//! reads `Content-Length` and chunked bodies, at most [`MAX_BODY`] bytes.
//!
//! HTTPS (a node whose management API is served only on `management-tls-listen`): a loopback
//! host (`127.0.0.0/8`, `::1`, `localhost`) is the node talking to itself, and its certificate
//! is not verified (it names the node's service, not `127.0.0.1`, and nothing on the path can
//! intercept). Any other host is verified: against `tls-ca-file` when the node has one,
//! otherwise against the system's trust anchors.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response read (a drain report lists every queue).
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// Where the management API is and who to be.
#[derive(Debug, Clone)]
pub struct Client {
    /// `host:port` as written in the URL (a name, an IPv4 address or a bracketed IPv6 one).
    host: String,
    port: u16,
    /// Path prefix from the URL, without a trailing `/` (usually empty).
    base: String,
    /// The URL as given, for messages.
    url: String,
    authorization: String,
    /// For an `https://` URL.
    tls: Option<Tls>,
}

#[derive(Debug, Clone)]
struct Tls {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

/// The management URL for a node whose API listens on `addr`: a wildcard address becomes
/// loopback.
pub fn local_url(addr: SocketAddr) -> String {
    format!("http://{}", loopback(addr))
}

/// [`local_url`] for `management-tls-listen`.
pub fn local_https_url(addr: SocketAddr) -> String {
    format!("https://{}", loopback(addr))
}

fn loopback(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// The TLS client settings for `host` (see the module documentation).
fn tls_for(host: &str, ca: Option<&Path>) -> Result<Tls, String> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| format!("'{host}' cannot be a TLS server name: {e}"))?;
    let is_loopback = match &name {
        ServerName::IpAddress(ip) => IpAddr::from(*ip).is_loopback(),
        _ => host.eq_ignore_ascii_case("localhost"),
    };
    let provider = crate::links::connect::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = if is_loopback {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::links::connect::NoVerification(
                provider,
            )))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("cannot read TLS CA file {}: {e}", ca.display()))?;
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| format!("TLS CA file {}: {e}", ca.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("TLS CA file {}: {e}", ca.display()))?;
                }
            }
            None => {
                roots.add_parsable_certificates(
                    crate::links::connect::system_roots().iter().cloned(),
                );
            }
        }
        if roots.is_empty() {
            return Err(format!(
                "no trust anchors to verify {host}'s certificate with (set tls-ca-file)"
            ));
        }
        builder.with_root_certificates(roots)
    };
    Ok(Tls {
        config: Arc::new(builder.with_no_client_auth()),
        name,
    })
}

impl Client {
    /// `url` is `http[s]://host[:port][/prefix]`; an `https://` URL to a host other than
    /// loopback is verified against the system's trust anchors.
    pub fn new(url: &str, user: &str, password: &str) -> Result<Client, String> {
        Self::with_ca(url, user, password, None)
    }

    /// [`Client::new`], verifying an `https://` URL's certificate (when the host is not
    /// loopback) against the CA certificates in `ca`.
    pub fn with_ca(
        url: &str,
        user: &str,
        password: &str,
        ca: Option<&Path>,
    ) -> Result<Client, String> {
        let bad = |why: &str| format!("invalid management URL '{url}': {why}");
        let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else {
            let rest = url
                .strip_prefix("http://")
                .ok_or_else(|| bad("it must start with http:// or https://"))?;
            (false, rest)
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(bad("put credentials in --user/--password, not in the URL"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(bad("unexpected text after ']'")),
            };
            (format!("[{h}]"), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (authority.to_owned(), None),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
            None if https => 443,
            None => 80,
        };
        let tls = if https {
            let name = host.trim_start_matches('[').trim_end_matches(']');
            Some(tls_for(name, ca).map_err(|e| bad(&e))?)
        } else {
            None
        };
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Ok(Client {
            host,
            port,
            base: path.to_owned(),
            url: url.trim_end_matches('/').to_owned(),
            authorization: format!("Basic {credentials}"),
            tls,
        })
    }

    /// One request; the status and the body. Errors say what could not be done, with the URL.
    pub async fn request(&self, method: &str, path: &str) -> Result<(u16, Vec<u8>), String> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let stream = TcpStream::connect((host, self.port))
            .await
            .map_err(|e| format!("cannot reach the management API at {}: {e}", self.url))?;
        let request = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}:{}\r\nAuthorization: {}\r\n\
             Accept: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\
             User-Agent: warren-broker/{}\r\n\r\n",
            self.base,
            self.host,
            self.port,
            self.authorization,
            env!("CARGO_PKG_VERSION"),
        );
        let response = match &self.tls {
            None => self.exchange(stream, &request, method, path).await?,
            Some(tls) => {
                let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
                    .connect(tls.name.clone(), stream)
                    .await
                    .map_err(|e| {
                        format!("TLS handshake with the management API at {}: {e}", self.url)
                    })?;
                self.exchange(stream, &request, method, path).await?
            }
        };
        parse_response(&response).map_err(|e| format!("{method} {}{path}: {e}", self.url))
    }

    /// Writes the request and reads the whole response, up to the end of the stream.
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        request: &str,
        method: &str,
        path: &str,
    ) -> Result<Vec<u8>, String> {
        let io = |e: std::io::Error| format!("{method} {}{path}: {e}", self.url);
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut response = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = match stream.read(&mut chunk).await {
                Ok(n) => n,
                // A TLS server that closes without close_notify: the response is checked
                // against its Content-Length (or chunked end) anyway.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {
                    0
                }
                Err(e) => return Err(io(e)),
            };
            if n == 0 {
                break;
            }
            if response.len() + n > MAX_BODY {
                return Err(format!(
                    "{method} {}{path}: the response is larger than {MAX_BODY} bytes",
                    self.url
                ));
            }
            response.extend_from_slice(&chunk[..n]);
        }
        Ok(response)
    }

    /// A request whose answer must be JSON.
    async fn json(&self, method: &str, path: &str) -> Result<(u16, Value), String> {
        let (status, body) = self.request(method, path).await?;
        let v = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).map_err(|e| {
                format!(
                    "{method} {}{path} answered {status} with a body that is not JSON: {e}",
                    self.url
                )
            })?
        };
        Ok((status, v))
    }
}

/// Status code and body of a complete HTTP/1.1 response.
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the response ended before its headers did")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "the response headers are not text")?;
    let body = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| format!("not an HTTP response: '{status_line}'"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length '{value}'"))?,
            );
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body.get(..n)
            .ok_or("the response ended before its Content-Length")?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

/// Decodes a chunked body.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunked body ended inside a chunk header")?;
        let size_text = std::str::from_utf8(&rest[..eol]).map_err(|_| "bad chunk header")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size '{size_text}'"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let data = rest
            .get(..size)
            .ok_or("a chunked body ended inside a chunk")?;
        out.extend_from_slice(data);
        rest = rest
            .get(size + 2..)
            .ok_or("a chunked body ended after a chunk")?;
    }
}

/// The `reason` of a RabbitMQ-style error body, or the body itself.
fn reason(v: &Value) -> String {
    match v.get("reason").and_then(Value::as_str) {
        Some(r) => r.to_owned(),
        None => v.to_string(),
    }
}

/// An answer other than the one expected, as one line.
fn unexpected(client: &Client, what: &str, status: u16, body: &Value, user: &str) -> String {
    match status {
        401 => format!(
            "the management API at {} refused user '{user}': {}",
            client.url,
            reason(body)
        ),
        _ => format!("{what} answered {status}: {}", reason(body)),
    }
}

/// Runs `f` within `timeout`, with a clear error when it does not finish.
pub async fn within<T>(
    timeout: Duration,
    client: &Client,
    f: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(timeout, f).await.unwrap_or_else(|_| {
        Err(format!(
            "no answer from the management API at {} within {} s",
            client.url,
            timeout.as_secs_f64()
        ))
    })
}

/// Ready: `GET /api/health/checks/virtual-hosts` is 200 and the node is not being drained.
/// Resource alarms do not make a node unready (they block publishers, and are reported by
/// `/api/health/checks/alarms`). `Ok` carries the node's name.
pub async fn check_ready(client: &Client, user: &str) -> Result<String, String> {
    let (status, body) = client
        .json("GET", "/api/health/checks/virtual-hosts")
        .await?;
    if status != 200 {
        return Err(unexpected(
            client,
            "the virtual hosts health check",
            status,
            &body,
            user,
        ));
    }
    let (status, nodes) = client.json("GET", "/api/nodes").await?;
    if status != 200 {
        return Err(unexpected(client, "GET /api/nodes", status, &nodes, user));
    }
    let node = nodes
        .get(0)
        .ok_or_else(|| format!("GET /api/nodes listed no node: {nodes}"))?;
    let name = node
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("the node");
    if node.get("being_drained").and_then(Value::as_bool) == Some(true) {
        return Err(format!("node {name} is being drained"));
    }
    Ok(name.to_owned())
}

/// `POST /api/warren/drain` (or `DELETE` with `end`); the report.
pub async fn drain(client: &Client, user: &str, end: bool) -> Result<Value, String> {
    let method = if end { "DELETE" } else { "POST" };
    let (status, body) = client.json(method, "/api/warren/drain").await?;
    if status != 200 {
        return Err(unexpected(
            client,
            &format!("{method} /api/warren/drain"),
            status,
            &body,
            user,
        ));
    }
    Ok(body)
}

/// `DELETE /api/nodes/{node}`: removes a stopped node from the cluster; the answer names
/// the queues deleted with it.
pub async fn forget(client: &Client, user: &str, node: &str) -> Result<Value, String> {
    let path = format!(
        "/api/nodes/{}",
        node.replace('%', "%25")
            .replace('/', "%2F")
            .replace(' ', "%20")
    );
    let (status, body) = client.json("DELETE", &path).await?;
    if status != 204 && status != 200 {
        return Err(unexpected(
            client,
            &format!("DELETE {path}"),
            status,
            &body,
            user,
        ));
    }
    Ok(body)
}

/// The drain report for people: what was closed, and the queues left on the node.
pub fn describe_drain(report: &Value) -> String {
    let node = report["node"].as_str().unwrap_or("the node");
    let mut out = if report["being_drained"] == Value::Bool(true) {
        format!(
            "node {node} is being drained: {} client connection(s) closed, {} still open\n",
            report["connections_closed"].as_u64().unwrap_or(0),
            report["connections_open"].as_u64().unwrap_or(0),
        )
    } else {
        format!("node {node} is not being drained: it accepts client connections\n")
    };
    for l in report["leadership"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let what = match l["queue"].as_str() {
            Some(q) => format!(
                "queue '{q}' in vhost '{}'",
                l["vhost"].as_str().unwrap_or_default()
            ),
            None => "the cluster's metadata".to_owned(),
        };
        match (l["moved_to"].as_str(), l["kept"].as_str()) {
            (Some(to), _) => out.push_str(&format!("leadership of {what} moved to {to}\n")),
            (_, Some(why)) => out.push_str(&format!("leadership of {what} NOT moved: {why}\n")),
            _ => {}
        }
    }
    let queues = report["queues"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if queues.is_empty() {
        out.push_str("no queues on the node\n");
        return out;
    }
    let messages: u64 = queues.iter().filter_map(|q| q["messages"].as_u64()).sum();
    out.push_str(&format!(
        "{} queue(s) on the node, {messages} message(s):\n",
        queues.len()
    ));
    out.push_str("vhost\tname\tdurable\tmessages\tconsumers\n");
    for q in queues {
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\n",
            q["vhost"].as_str().unwrap_or_default(),
            q["name"].as_str().unwrap_or_default(),
            q["durable"].as_bool().unwrap_or(false),
            q["messages"].as_u64().unwrap_or(0),
            q["consumers"].as_u64().unwrap_or(0),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = Client::new("http://127.0.0.1:15672", "u", "p").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.base.as_str()),
            ("127.0.0.1", 15672, "")
        );
        let c = Client::new("http://[::1]:8080/mgmt/", "u", "p").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.base.as_str()),
            ("[::1]", 8080, "/mgmt")
        );
        let c = Client::new("http://warren-0.warren", "u", "p").unwrap();
        assert_eq!(c.port, 80);
        let c = Client::new("https://127.0.0.1:15671", "u", "p").unwrap();
        assert_eq!((c.port, c.tls.is_some()), (15671, true));
        let c = Client::new("https://[::1]", "u", "p").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("[::1]", 443));
        assert!(c.tls.is_some());
        // Another host is verified, against the CA file given.
        let e = Client::with_ca("https://warren", "u", "p", Some(Path::new("/nonexistent")))
            .unwrap_err();
        assert!(e.contains("/nonexistent"), "{e}");
        assert_eq!(
            local_https_url("0.0.0.0:15671".parse().unwrap()),
            "https://127.0.0.1:15671"
        );
        for bad in [
            "ftp://x:1",
            "127.0.0.1:15672",
            "http://:1",
            "http://x:port",
            "http://u:p@x:1",
            "http://[::1",
        ] {
            assert!(Client::new(bad, "u", "p").is_err(), "{bad}");
        }
        assert_eq!(
            local_url("0.0.0.0:15672".parse().unwrap()),
            "http://127.0.0.1:15672"
        );
        assert_eq!(
            local_url("[::]:15672".parse().unwrap()),
            "http://[::1]:15672"
        );
        assert_eq!(
            local_url("10.1.2.3:15672".parse().unwrap()),
            "http://10.1.2.3:15672"
        );
    }

    #[test]
    fn responses() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"{}"[..]));
        let (s, b) = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((s, b.as_slice()), (503, &b"{\"a\":1}"[..]));
        let (_, b) = parse_response(b"HTTP/1.0 204 No Content\r\n\r\n").unwrap();
        assert!(b.is_empty());
        for bad in [
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10\r\nab",
        ] {
            assert!(parse_response(bad).is_err());
        }
    }
}
