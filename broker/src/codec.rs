//! AMQP 0-9-1 framing over byte buffers: no sockets, no connection state.
//!
//! `amq-protocol` knows how to parse and generate every method and the content header, but it
//! does not bound frame sizes. [`FrameDecoder`] reads the 7-byte frame header itself and
//! refuses a frame larger than the negotiated `frame_max` before waiting for (and buffering)
//! its payload; only complete, size-checked payloads reach `amq-protocol`'s parsers. The hot
//! outgoing frames (`basic.deliver` and content) are encoded by hand into the connection's
//! output buffer, without intermediate allocations.

use amq_protocol::frame::WriteContext;
use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::protocol::{AMQPClass, basic::AMQPProperties, basic::gen_properties, gen_class};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{AmqpError, Result};

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;
/// Bytes of framing around a payload: type, channel, size and the end octet.
pub const FRAME_OVERHEAD: usize = 8;
/// The smallest frame_max a peer may negotiate (AMQP 0-9-1 §4.2.1).
pub const FRAME_MIN_SIZE: u32 = 4096;
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// One frame, split off the input buffer; its payload still undecoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Bytes,
}

/// Splits frames off a byte buffer, enforcing the negotiated maximum frame size.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    /// Largest whole frame accepted, framing included (the negotiated `frame_max`).
    pub frame_max: u32,
}

impl FrameDecoder {
    pub fn new(frame_max: u32) -> Self {
        Self { frame_max }
    }

    /// Returns the next complete frame, `None` if more bytes are needed, or a FRAME_ERROR.
    /// An oversized frame is refused as soon as its header is seen.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<RawFrame>> {
        if buf.len() < 7 {
            return Ok(None);
        }
        let kind = buf[0];
        let channel = u16::from_be_bytes([buf[1], buf[2]]);
        let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
        if !matches!(
            kind,
            FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
        ) {
            return Err(AmqpError::frame_error(format!("unknown frame type {kind}")));
        }
        if size + FRAME_OVERHEAD > self.frame_max as usize {
            return Err(AmqpError::frame_error(format!(
                "frame of {} bytes exceeds the negotiated frame_max of {} bytes",
                size + FRAME_OVERHEAD,
                self.frame_max
            )));
        }
        if buf.len() < size + FRAME_OVERHEAD {
            buf.reserve(size + FRAME_OVERHEAD - buf.len());
            return Ok(None);
        }
        if buf[7 + size] != FRAME_END {
            return Err(AmqpError::frame_error(format!(
                "frame end octet was {:#04x}, expected 0xce",
                buf[7 + size]
            )));
        }
        buf.advance(7);
        let payload = buf.split_to(size).freeze();
        buf.advance(1);
        Ok(Some(RawFrame {
            kind,
            channel,
            payload,
        }))
    }
}

/// Is (class, method) a method of AMQP 0-9-1 at all?
fn known_method(class: u16, method: u16) -> bool {
    match class {
        10 => matches!(
            method,
            10 | 11 | 20 | 21 | 30 | 31 | 40 | 41 | 50 | 51 | 60 | 61
        ),
        20 => matches!(method, 10 | 11 | 20 | 21 | 40 | 41),
        30 => matches!(method, 10 | 11),
        40 => matches!(method, 10 | 11 | 20 | 21 | 30 | 31 | 40 | 51),
        50 => matches!(method, 10 | 11 | 20 | 21 | 30 | 31 | 40 | 41 | 50 | 51),
        60 => matches!(
            method,
            10 | 11
                | 20
                | 21
                | 30
                | 31
                | 40
                | 50
                | 60
                | 70
                | 71
                | 72
                | 80
                | 90
                | 100
                | 110
                | 111
                | 120
        ),
        85 => matches!(method, 10 | 11),
        90 => matches!(method, 10 | 11 | 20 | 21 | 30 | 31),
        _ => false,
    }
}

/// The class and method ids at the start of a method frame payload.
pub fn method_ids(payload: &[u8]) -> Option<(u16, u16)> {
    if payload.len() < 4 {
        return None;
    }
    Some((
        u16::from_be_bytes([payload[0], payload[1]]),
        u16::from_be_bytes([payload[2], payload[3]]),
    ))
}

/// Decodes a method frame payload. Unknown methods are 540 NOT_IMPLEMENTED, malformed
/// arguments 502 SYNTAX_ERROR (both connection errors).
pub fn decode_method(payload: &[u8]) -> Result<AMQPClass> {
    let Some((class, method)) = method_ids(payload) else {
        return Err(AmqpError::frame_error("method frame shorter than its ids"));
    };
    if !known_method(class, method) {
        return Err(AmqpError::not_implemented(format!(
            "unknown method: class {class}, method {method}"
        ))
        .on_method(class, method));
    }
    match amq_protocol::protocol::parse_class(payload) {
        Ok((_, m)) => Ok(m),
        Err(_) => Err(AmqpError::syntax(format!(
            "malformed arguments for method {class}.{method}"
        ))
        .on_method(class, method)),
    }
}

/// A decoded content header frame.
#[derive(Debug, Clone)]
pub struct ContentHeader {
    /// The frame payload as received, reusable when no property changes.
    pub raw: Bytes,
    pub class_id: u16,
    pub body_size: u64,
    pub properties: AMQPProperties,
}

pub fn decode_header(payload: &[u8]) -> Result<ContentHeader> {
    match parse_content_header(payload) {
        Ok((_, h)) => Ok(ContentHeader {
            // A copy, so a queued message does not pin the whole socket read buffer.
            raw: Bytes::copy_from_slice(payload),
            class_id: h.class_id,
            body_size: h.body_size,
            properties: h.properties,
        }),
        Err(_) => Err(AmqpError::syntax("malformed content header frame")),
    }
}

fn begin_frame(out: &mut BytesMut, kind: u8, channel: u16) -> usize {
    out.put_u8(kind);
    out.put_u16(channel);
    let at = out.len();
    out.put_u32(0);
    at
}

fn end_frame(out: &mut BytesMut, size_at: usize) {
    let size = (out.len() - size_at - 4) as u32;
    out[size_at..size_at + 4].copy_from_slice(&size.to_be_bytes());
    out.put_u8(FRAME_END);
}

/// Appends a method frame generated by `amq-protocol`.
pub fn encode_method(out: &mut BytesMut, channel: u16, method: &AMQPClass) {
    let at = begin_frame(out, FRAME_METHOD, channel);
    // Generating into a Vec cannot fail: it grows as needed.
    match gen_class(method)(WriteContext::from(Vec::with_capacity(64))) {
        Ok(ctx) => out.extend_from_slice(&ctx.into_inner().0),
        Err(e) => tracing::error!(?method, "failed to encode method: {e:?}"),
    }
    end_frame(out, at);
}

fn put_short_str(out: &mut BytesMut, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(255);
    out.put_u8(n as u8);
    out.extend_from_slice(&b[..n]);
}

/// Appends `basic.deliver`, hand-encoded: it is sent once per delivered message.
pub fn encode_deliver(
    out: &mut BytesMut,
    channel: u16,
    consumer_tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
) {
    let at = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(60);
    out.put_u16(60);
    put_short_str(out, consumer_tag);
    out.put_u64(delivery_tag);
    out.put_u8(redelivered as u8);
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    end_frame(out, at);
}

/// Appends `basic.get-ok`.
pub fn encode_get_ok(
    out: &mut BytesMut,
    channel: u16,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
    message_count: u32,
) {
    let at = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(60);
    out.put_u16(71);
    out.put_u64(delivery_tag);
    out.put_u8(redelivered as u8);
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    out.put_u32(message_count);
    end_frame(out, at);
}

/// Appends `basic.return`.
pub fn encode_return(
    out: &mut BytesMut,
    channel: u16,
    reply_code: u16,
    reply_text: &str,
    exchange: &str,
    routing_key: &str,
) {
    let at = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(60);
    out.put_u16(50);
    out.put_u16(reply_code);
    put_short_str(out, reply_text);
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    end_frame(out, at);
}

/// Appends `basic.ack` or `basic.nack` for publisher confirms.
pub fn encode_confirm(out: &mut BytesMut, channel: u16, tag: u64, multiple: bool, ack: bool) {
    let at = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(60);
    if ack {
        out.put_u16(80);
        out.put_u64(tag);
        out.put_u8(multiple as u8);
    } else {
        out.put_u16(120);
        out.put_u64(tag);
        out.put_u8(multiple as u8);
    }
    end_frame(out, at);
}

/// Encodes a content header payload (class 60, body size, properties) once per message, so
/// that every delivery of the message copies bytes instead of re-encoding properties.
pub fn encode_header_payload(body_size: u64, properties: &AMQPProperties) -> Bytes {
    let mut v: Vec<u8> = Vec::with_capacity(64);
    v.extend_from_slice(&60u16.to_be_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&body_size.to_be_bytes());
    match gen_properties(properties)(WriteContext::from(v)) {
        Ok(ctx) => Bytes::from(ctx.into_inner().0),
        Err(e) => {
            tracing::error!("failed to encode message properties: {e:?}");
            Bytes::new()
        }
    }
}

/// Appends the content header frame and body frames of a message, splitting the body so no
/// frame exceeds `frame_max`.
pub fn encode_content(
    out: &mut BytesMut,
    channel: u16,
    header_payload: &[u8],
    body: &[u8],
    frame_max: u32,
) {
    out.reserve(header_payload.len() + body.len() + 2 * FRAME_OVERHEAD);
    out.put_u8(FRAME_HEADER);
    out.put_u16(channel);
    out.put_u32(header_payload.len() as u32);
    out.extend_from_slice(header_payload);
    out.put_u8(FRAME_END);
    let chunk = (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1);
    for part in body.chunks(chunk) {
        out.put_u8(FRAME_BODY);
        out.put_u16(channel);
        out.put_u32(part.len() as u32);
        out.extend_from_slice(part);
        out.put_u8(FRAME_END);
    }
}

pub fn encode_heartbeat(out: &mut BytesMut) {
    out.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::{basic, queue};

    fn frame(kind: u8, ch: u16, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u8(kind);
        b.put_u16(ch);
        b.put_u32(payload.len() as u32);
        b.extend_from_slice(payload);
        b.put_u8(FRAME_END);
        b
    }

    #[test]
    fn splits_frames_and_waits_for_more() {
        let mut buf = frame(FRAME_BODY, 3, b"hello");
        buf.extend_from_slice(&frame(FRAME_HEARTBEAT, 0, b"")[..4]);
        let d = FrameDecoder::new(4096);
        let f = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(
            (f.kind, f.channel, &f.payload[..]),
            (FRAME_BODY, 3, &b"hello"[..])
        );
        assert_eq!(d.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn refuses_oversized_frame_from_its_header_alone() {
        let mut buf = BytesMut::new();
        buf.put_u8(FRAME_BODY);
        buf.put_u16(1);
        buf.put_u32(1 << 30);
        let err = FrameDecoder::new(131072).decode(&mut buf).unwrap_err();
        assert_eq!(err.code, 501);
        assert!(
            buf.capacity() < 1 << 20,
            "must not reserve for the oversized payload"
        );
    }

    #[test]
    fn refuses_bad_end_octet_and_unknown_type() {
        let mut buf = frame(FRAME_BODY, 1, b"x");
        let n = buf.len();
        buf[n - 1] = 0;
        assert_eq!(
            FrameDecoder::new(4096).decode(&mut buf).unwrap_err().code,
            501
        );
        let mut buf = frame(7, 1, b"x");
        assert_eq!(
            FrameDecoder::new(4096).decode(&mut buf).unwrap_err().code,
            501
        );
    }

    #[test]
    fn method_round_trip_and_unknown_methods() {
        let m = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "q".into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: Default::default(),
        }));
        let mut out = BytesMut::new();
        encode_method(&mut out, 1, &m);
        let f = FrameDecoder::new(4096).decode(&mut out).unwrap().unwrap();
        assert_eq!(decode_method(&f.payload).unwrap(), m);
        assert_eq!(decode_method(&[0, 60, 3, 231]).unwrap_err().code, 540);
        assert_eq!(decode_method(&[0, 50, 0, 10, 0]).unwrap_err().code, 502);
    }

    #[test]
    fn deliver_encoding_matches_amq_protocol() {
        let mut ours = BytesMut::new();
        encode_deliver(&mut ours, 2, "ctag", 7, true, "ex", "rk");
        let mut theirs = BytesMut::new();
        let m = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: "ctag".into(),
            delivery_tag: 7,
            redelivered: true,
            exchange: "ex".into(),
            routing_key: "rk".into(),
        }));
        encode_method(&mut theirs, 2, &m);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn content_is_split_by_frame_max() {
        let props = AMQPProperties::default().with_delivery_mode(2);
        let hp = encode_header_payload(10, &props);
        let mut out = BytesMut::new();
        encode_content(&mut out, 1, &hp, b"0123456789", 12);
        let d = FrameDecoder::new(12 + 64);
        let h = d.decode(&mut out).unwrap().unwrap();
        let parsed = decode_header(&h.payload).unwrap();
        assert_eq!(parsed.body_size, 10);
        assert_eq!(*parsed.properties.delivery_mode(), Some(2));
        let mut body = Vec::new();
        while let Some(f) = d.decode(&mut out).unwrap() {
            assert!(f.payload.len() <= 4);
            body.extend_from_slice(&f.payload);
        }
        assert_eq!(body, b"0123456789");
    }
}
