//! AMQP URIs as RabbitMQ's shovel and federation plugins read them (`amqp_uri`).
//!
//! `amqp://user:pass@host:port/vhost?heartbeat=10&connection_timeout=5000` and `amqps://…` with
//! the TLS query parameters (`cacertfile`, `certfile`, `keyfile`, `verify`,
//! `server_name_indication`). A URI without a host (`amqp://`) means the local node.
//!
//! What differs from RabbitMQ on purpose: `amqps://` verifies the peer's certificate by default
//! (against the system trust store plus `cacertfile`); `verify=verify_none` turns that off.
//! RabbitMQ 3.10's Erlang default is not to verify.

use std::path::PathBuf;
use std::time::Duration;

/// The default port of each scheme.
const AMQP_PORT: u16 = 5672;
const AMQPS_PORT: u16 = 5671;

/// How an `amqps://` link checks the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    /// Extra trust anchors (PEM), on top of the system's.
    pub cacertfile: Option<PathBuf>,
    /// Client certificate chain and key (PEM) for mutual TLS.
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    /// `verify_peer` (default) or `verify_none`.
    pub verify: bool,
    /// The name sent in SNI and checked against the certificate; `None` sends the host,
    /// `Some("")` (`server_name_indication=disable`) sends none and checks the host.
    pub server_name: Option<String>,
}

impl Default for TlsOptions {
    fn default() -> Self {
        Self {
            cacertfile: None,
            certfile: None,
            keyfile: None,
            verify: true,
            server_name: None,
        }
    }
}

/// A parsed link URI. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkUri {
    /// The URI with its credentials removed, as RabbitMQ shows it (`amqp://host:5672/vhost`).
    pub redacted: String,
    /// `amqps://`.
    pub tls: bool,
    /// No host: the node this link runs on.
    pub local: bool,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// The vhost in the path; `None` when the URI has no path (the caller's default applies).
    pub vhost: Option<String>,
    /// Seconds; `None` leaves the links' default.
    pub heartbeat: Option<u16>,
    pub connection_timeout: Option<Duration>,
    pub channel_max: Option<u16>,
    pub frame_max: Option<u32>,
    /// `plain` (default), `amqplain` or `external`.
    pub auth_mechanism: Option<String>,
    pub tls_options: TlsOptions,
}

impl std::fmt::Debug for LinkUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

fn decode(s: &str) -> Result<String, String> {
    percent_decode(s).ok_or_else(|| format!("invalid percent-encoding in '{s}'"))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Two hex digits exactly: `from_str_radix` alone would also take a sign ("%+1").
            let hex = bytes.get(i + 1..i + 3)?;
            let digit = |b: u8| char::from(b).to_digit(16);
            out.push((digit(hex[0])? * 16 + digit(hex[1])?) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl LinkUri {
    /// Parses a URI; errors say what is wrong with it.
    pub fn parse(uri: &str) -> Result<Self, String> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| format!("\"{uri}\" is not an AMQP URI (amqp:// or amqps://)"))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "amqp" => false,
            "amqps" => true,
            other => return Err(format!("unsupported URI scheme '{other}' (amqp or amqps)")),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => ("guest".to_owned(), "guest".to_owned()),
            Some(ui) => match ui.split_once(':') {
                Some((u, p)) => (decode(u)?, decode(p)?),
                None => (decode(ui)?, "guest".to_owned()),
            },
        };
        let default_port = if tls { AMQPS_PORT } else { AMQP_PORT };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("unterminated IPv6 address in \"{hostport}\""))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p
                    .parse()
                    .map_err(|_| format!("invalid port \"{p}\" in {}", redact_str(uri)))?,
                None if after.is_empty() => default_port,
                None => return Err(format!("unexpected \"{after}\" after the IPv6 address")),
            };
            (h.to_owned(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (
                    decode(h)?,
                    p.parse()
                        .map_err(|_| format!("invalid port \"{p}\" in {}", redact_str(uri)))?,
                ),
                None => (decode(hostport)?, default_port),
            }
        };
        let vhost = match path {
            None => None,
            Some(p) => {
                if p.contains('/') {
                    return Err(format!(
                        "the vhost in {} must be one path segment (encode '/' as %2f)",
                        redact_str(uri)
                    ));
                }
                Some(decode(p)?)
            }
        };
        let mut parsed = LinkUri {
            redacted: redact_str(uri),
            tls,
            local: host.is_empty(),
            host,
            port,
            user,
            password,
            vhost,
            heartbeat: None,
            connection_timeout: None,
            channel_max: None,
            frame_max: None,
            auth_mechanism: None,
            tls_options: TlsOptions::default(),
        };
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v)?;
            let int = |what: &str| -> Result<u64, String> {
                v.parse::<u64>()
                    .map_err(|_| format!("URI parameter {what} should be an integer, got \"{v}\""))
            };
            match k {
                "heartbeat" => parsed.heartbeat = Some(int(k)?.min(u64::from(u16::MAX)) as u16),
                "connection_timeout" => {
                    parsed.connection_timeout = Some(Duration::from_millis(int(k)?));
                }
                "channel_max" => {
                    parsed.channel_max = Some(int(k)?.min(u64::from(u16::MAX)) as u16);
                }
                "frame_max" => parsed.frame_max = Some(int(k)?.min(u64::from(u32::MAX)) as u32),
                "auth_mechanism" => {
                    let m = v.to_ascii_lowercase();
                    if !matches!(m.as_str(), "plain" | "amqplain" | "external") {
                        return Err(format!(
                            "URI parameter auth_mechanism should be plain, amqplain or external, got \"{v}\""
                        ));
                    }
                    parsed.auth_mechanism = Some(m);
                }
                "cacertfile" => parsed.tls_options.cacertfile = Some(v.into()),
                "certfile" => parsed.tls_options.certfile = Some(v.into()),
                "keyfile" => parsed.tls_options.keyfile = Some(v.into()),
                "verify" => {
                    parsed.tls_options.verify = match v.as_str() {
                        "verify_peer" => true,
                        "verify_none" => false,
                        _ => {
                            return Err(format!(
                                "URI parameter verify should be verify_peer or verify_none, got \"{v}\""
                            ));
                        }
                    }
                }
                "server_name_indication" => {
                    parsed.tls_options.server_name =
                        Some(if v == "disable" { String::new() } else { v });
                }
                // Accepted by RabbitMQ's parser and meaningless here (Erlang TLS tuning).
                "fail_if_no_peer_cert" | "depth" | "password" | "versions" | "ciphers" => {}
                other => return Err(format!("unknown URI parameter '{other}'")),
            }
        }
        if parsed.tls_options.certfile.is_some() != parsed.tls_options.keyfile.is_some() {
            return Err("URI parameters certfile and keyfile go together".into());
        }
        Ok(parsed)
    }

    /// The vhost to open: the URI's, or `default` when it has no path.
    pub fn vhost_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.vhost.as_deref().unwrap_or(default)
    }

    /// The query keys that make the node read a file of its own (`cacertfile`, `certfile`,
    /// `keyfile`), as given.
    pub fn local_file_keys(&self) -> Vec<&'static str> {
        let o = &self.tls_options;
        [
            ("cacertfile", &o.cacertfile),
            ("certfile", &o.certfile),
            ("keyfile", &o.keyfile),
        ]
        .into_iter()
        .filter(|(_, path)| path.is_some())
        .map(|(key, _)| key)
        .collect()
    }
}

/// A URI without its user name and password (RabbitMQ's `amqp_uri:remove_credentials`).
pub fn redact_str(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{hostport}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rabbitmq_uris() {
        let u = LinkUri::parse("amqp://").unwrap();
        assert!(u.local && !u.tls);
        assert_eq!((u.user.as_str(), u.vhost.as_deref()), ("guest", None));
        let u = LinkUri::parse(
            "amqp://bob:s%40cret@10.0.0.2:5673/%2f?heartbeat=5&connection_timeout=2000",
        )
        .unwrap();
        assert!(!u.local);
        assert_eq!(u.host, "10.0.0.2");
        assert_eq!(u.port, 5673);
        assert_eq!((u.user.as_str(), u.password.as_str()), ("bob", "s@cret"));
        assert_eq!(u.vhost.as_deref(), Some("/"));
        assert_eq!(u.heartbeat, Some(5));
        assert_eq!(u.connection_timeout, Some(Duration::from_secs(2)));
        assert_eq!(
            u.redacted,
            "amqp://10.0.0.2:5673/%2f?heartbeat=5&connection_timeout=2000"
        );
        assert!(!format!("{u:?}").contains("cret"));
        let u = LinkUri::parse("amqp://h/").unwrap();
        assert_eq!(
            u.vhost.as_deref(),
            Some(""),
            "a bare slash is the empty vhost"
        );
        let u = LinkUri::parse(
            "amqps://h?cacertfile=/ca.pem&verify=verify_none&server_name_indication=x.example",
        )
        .unwrap();
        assert!(u.tls && !u.tls_options.verify);
        assert_eq!(u.port, 5671);
        assert_eq!(u.tls_options.server_name.as_deref(), Some("x.example"));
        let u = LinkUri::parse("amqp://[::1]:5000/v").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 5000));
        assert!(u.local_file_keys().is_empty());
        let u = LinkUri::parse("amqps://h?cacertfile=/a&certfile=/b&keyfile=/c").unwrap();
        assert_eq!(u.local_file_keys(), ["cacertfile", "certfile", "keyfile"]);
    }

    #[test]
    fn refuses_bad_uris_with_a_reason() {
        for (uri, why) in [
            ("http://h", "scheme"),
            ("h:5672", "not an AMQP URI"),
            ("amqp://h:x", "port"),
            ("amqp://h/a/b", "one path segment"),
            ("amqp://h?bogus=1", "bogus"),
            ("amqp://h?heartbeat=x", "heartbeat"),
            ("amqps://h?certfile=/c.pem", "keyfile"),
        ] {
            let e = LinkUri::parse(uri).unwrap_err();
            assert!(e.contains(why), "{uri}: {e}");
        }
    }

    /// `%+1` decoded as byte 1: `u8::from_str_radix` accepts a leading `+`.
    #[test]
    fn percent_encoding_is_two_hex_digits() {
        assert_eq!(percent_decode("a%2Fb%2f").as_deref(), Some("a/b/"));
        for bad in ["%+1", "%-1", "%1", "%", "%g0", "%\u{e9}0", "x%+f"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
        let e = LinkUri::parse("amqp://h/%+1").unwrap_err();
        assert!(e.contains("percent-encoding"), "{e}");
    }

    #[test]
    fn redaction_keeps_host_path_and_query() {
        assert_eq!(redact_str("amqp://u:p@h:1/v?x=1"), "amqp://h:1/v?x=1");
        assert_eq!(redact_str("amqp://h"), "amqp://h");
        assert_eq!(redact_str("amqp://"), "amqp://");
        assert_eq!(redact_str("amqps://u@h"), "amqps://h");
    }
}
