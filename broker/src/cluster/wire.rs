//! The inter-node protocol's framing, over byte buffers (no I/O): every frame is
//!
//! ```text
//! length: u32 BE (of the payload) | crc32: u32 BE (of the payload) | payload (postcard)
//! ```
//!
//! A frame over [`MAX_FRAME`] is refused from its header, before anything is buffered, and a
//! frame whose checksum does not match is an error: a damaged link is closed and redialled,
//! never trusted. The payload is a [`Frame`], encoded with postcard (compact, serde-driven,
//! versioned with the protocol: both ends of a link run the same `PROTOCOL`).

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to [`Frame`] or the messages it carries; peers with a
/// different version are refused at the handshake with both versions named.
pub const PROTOCOL: u32 = 1;

/// Largest payload accepted (metadata snapshots travel in one frame).
pub const MAX_FRAME: usize = 64 << 20;

/// Length and checksum.
pub const HEADER: usize = 8;

/// Everything that crosses a link between two nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// First frame from each side: who it is and a fresh challenge for the other.
    Hello(Hello),
    /// The answer to the other side's challenge: HMAC-SHA256 over both hellos with the cluster
    /// secret (see [`super::handshake`]).
    Proof([u8; 32]),
    /// The link is refused, and why (wrong secret, wrong protocol version, …).
    Refused(String),
    /// The dialling side's proof checked out: the link is up.
    Accepted,
    Request {
        id: u64,
        #[serde(with = "as_bytes")]
        body: Vec<u8>,
    },
    Response {
        id: u64,
        #[serde(with = "as_bytes")]
        body: Vec<u8>,
    },
}

/// `#[serde(with = "as_bytes")]` for a `Vec<u8>`: serialized as bytes (postcard writes the
/// length and copies them) instead of as a sequence of `u8` (one call per byte). postcard
/// encodes both the same way, so either side reads the other.
pub mod as_bytes {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::ser::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Bytes)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    /// The node's name (`warren@host`).
    pub node: String,
    /// Where other nodes reach this node's inter-node listener (`host:port`).
    pub advertise: String,
    /// Drawn when the node's data directory is created: a node forgotten by the cluster is
    /// refused until its data is wiped (a new incarnation), as a reset RabbitMQ node rejoins.
    pub incarnation: u64,
    pub nonce: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("frame checksum mismatch (link damaged)")]
    Checksum,
    #[error("undecodable frame: {0}")]
    Decode(String),
    #[error("cannot encode frame: {0}")]
    Encode(String),
}

/// Appends one encoded frame to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<(), WireError> {
    let payload = postcard::to_stdvec(frame).map_err(|e| WireError::Encode(e.to_string()))?;
    if payload.len() > MAX_FRAME {
        return Err(WireError::TooLarge(payload.len()));
    }
    out.reserve(HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// The payload length a frame header announces, refused when over the limit.
pub fn payload_len(header: &[u8; HEADER]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a payload after checking it against the header's checksum.
pub fn decode(header: &[u8; HEADER], payload: &[u8]) -> Result<Frame, WireError> {
    let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if crc32fast::hash(payload) != crc {
        return Err(WireError::Checksum);
    }
    postcard::from_bytes(payload).map_err(|e| WireError::Decode(e.to_string()))
}

/// Encodes a message carried in a request or response body.
pub fn to_body<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    postcard::to_stdvec(value).map_err(|e| WireError::Encode(e.to_string()))
}

/// Decodes a request or response body.
pub fn from_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, WireError> {
    postcard::from_bytes(body).map_err(|e| WireError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(buf: &[u8]) -> ([u8; HEADER], &[u8]) {
        let mut h = [0; HEADER];
        h.copy_from_slice(&buf[..HEADER]);
        (h, &buf[HEADER..])
    }

    /// Bodies as bytes encode exactly as the per-byte sequence earlier versions wrote, so
    /// nodes of both versions read each other, and JSON (a sequence) still reads.
    #[test]
    fn bytes_encode_as_the_sequence_of_u8_did() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Seq(u64, Vec<u8>);
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Fast(u64, #[serde(with = "as_bytes")] Vec<u8>);
        let body: Vec<u8> = (0..=255).cycle().take(1000).collect();
        let seq = postcard::to_allocvec(&Seq(7, body.clone())).unwrap();
        let fast = postcard::to_allocvec(&Fast(7, body.clone())).unwrap();
        assert_eq!(seq, fast);
        let back: Fast = postcard::from_bytes(&seq).unwrap();
        assert_eq!(back, Fast(7, body.clone()));
        let json = serde_json::to_string(&Seq(7, body.clone())).unwrap();
        let back: Fast = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Fast(7, body));
    }

    #[test]
    fn frames_round_trip_back_to_back() {
        let frames = [
            Frame::Hello(Hello {
                protocol: PROTOCOL,
                node: "warren@a".into(),
                advertise: "10.0.0.1:25672".into(),
                incarnation: 1,
                nonce: [7; 32],
            }),
            Frame::Request {
                id: 42,
                body: vec![1, 2, 3],
            },
            Frame::Refused("wrong cluster secret".into()),
        ];
        let mut buf = Vec::new();
        for f in &frames {
            encode(f, &mut buf).expect("encode");
        }
        let mut rest = &buf[..];
        for f in &frames {
            let (h, after) = split(rest);
            let len = payload_len(&h).expect("len");
            assert_eq!(&decode(&h, &after[..len]).expect("decode"), f);
            rest = &after[len..];
        }
        assert!(rest.is_empty());
    }

    #[test]
    fn a_flipped_byte_is_a_checksum_error() {
        let mut buf = Vec::new();
        encode(&Frame::Proof([9; 32]), &mut buf).expect("encode");
        let last = buf.len() - 1;
        buf[last] ^= 1;
        let (h, p) = split(&buf);
        assert_eq!(decode(&h, p), Err(WireError::Checksum));
    }

    #[test]
    fn an_oversized_header_is_refused_before_buffering() {
        let mut h = [0; HEADER];
        h[..4].copy_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert_eq!(payload_len(&h), Err(WireError::TooLarge(MAX_FRAME + 1)));
    }

    #[test]
    fn garbage_with_a_good_checksum_is_a_decode_error() {
        let payload = [0xff; 5];
        let mut h = [0; HEADER];
        h[..4].copy_from_slice(&5u32.to_be_bytes());
        h[4..].copy_from_slice(&crc32fast::hash(&payload).to_be_bytes());
        assert!(matches!(decode(&h, &payload), Err(WireError::Decode(_))));
    }
}
