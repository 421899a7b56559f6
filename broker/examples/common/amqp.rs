//! What the hand-written AMQP clients of the examples share: the target URL and frames.

#[derive(Clone)]
pub struct Target {
    pub addr: String,
    pub user: String,
    pub pass: String,
    pub vhost: String,
}

impl Target {
    /// `amqp://user:pass@host:port/vhost` (vhost percent-encoded `%2f` for `/`).
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url.strip_prefix("amqp://").ok_or("only amqp:// URLs")?;
        let (auth, rest) = rest.split_once('@').ok_or("the URL needs user:pass@")?;
        let (user, pass) = auth.split_once(':').ok_or("the URL needs user:pass@")?;
        let (addr, vhost) = rest.split_once('/').unwrap_or((rest, ""));
        let vhost = if vhost.is_empty() || vhost.eq_ignore_ascii_case("%2f") {
            "/".to_owned()
        } else {
            vhost.to_owned()
        };
        Ok(Target {
            addr: addr.to_owned(),
            user: user.to_owned(),
            pass: pass.to_owned(),
            vhost,
        })
    }
}

pub fn short_str(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

pub fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 8);
    f.push(kind);
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xCE);
    f
}

/// A method frame on `channel`: class, method, arguments.
pub fn method(channel: u16, class: u16, method: u16, args: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(args.len() + 4);
    payload.extend_from_slice(&class.to_be_bytes());
    payload.extend_from_slice(&method.to_be_bytes());
    payload.extend_from_slice(args);
    frame(1, channel, &payload)
}
