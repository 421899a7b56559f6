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
/// The frame size accepted until the client's `tune-ok` (RabbitMQ's `initial_frame_max`):
/// before login a peer may not make the node buffer more than this per frame.
pub const PRE_TUNE_FRAME_MAX: u32 = 4096;
/// Deepest nesting of field tables and arrays accepted, the outermost table counting as 1
/// (deep enough for any real use; `x-death` headers nest 3).
pub const MAX_TABLE_DEPTH: usize = 100;

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
    /// False until `tune-ok` (for the error text).
    tuned: bool,
}

impl FrameDecoder {
    pub fn new(frame_max: u32) -> Self {
        Self {
            frame_max,
            tuned: true,
        }
    }

    /// The decoder of a connection before its `tune-ok`: frames of [`PRE_TUNE_FRAME_MAX`].
    pub fn pre_tune() -> Self {
        Self {
            frame_max: PRE_TUNE_FRAME_MAX,
            tuned: false,
        }
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
            let limit = if self.tuned {
                "the negotiated frame_max"
            } else {
                "the limit before connection.tune-ok"
            };
            return Err(AmqpError::frame_error(format!(
                "frame of {} bytes exceeds {limit} of {} bytes",
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
    check_method_tables(class, method, payload).map_err(|e| e.on_method(class, method))?;
    match amq_protocol::protocol::parse_class(payload) {
        Ok((_, m)) => Ok(m),
        Err(_) => Err(AmqpError::syntax(format!(
            "malformed arguments for method {class}.{method}"
        ))
        .on_method(class, method)),
    }
}

/// One argument of a method, as far as finding its field tables needs.
#[derive(Clone, Copy)]
enum Arg {
    /// An octet (also a group of up to 8 bits).
    Octet,
    Short,
    ShortStr,
    /// A field table; its name for error texts.
    Table(&'static str),
}

/// The arguments up to the last field table of each method that carries one.
fn table_args(class: u16, method: u16) -> &'static [Arg] {
    use Arg::*;
    match (class, method) {
        (10, 10) => &[Octet, Octet, Table("server_properties")],
        (10, 11) => &[Table("client_properties")],
        (40, 10) => &[Short, ShortStr, ShortStr, Octet, Table("arguments")],
        (40, 30) | (40, 40) | (50, 20) => &[
            Short,
            ShortStr,
            ShortStr,
            ShortStr,
            Octet,
            Table("arguments"),
        ],
        (50, 10) => &[Short, ShortStr, Octet, Table("arguments")],
        (50, 50) => &[Short, ShortStr, ShortStr, ShortStr, Table("arguments")],
        (60, 20) => &[Short, ShortStr, ShortStr, Octet, Table("arguments")],
        _ => &[],
    }
}

fn malformed(what: &str) -> AmqpError {
    AmqpError::syntax(format!("malformed field table in {what}"))
}

/// Walks the field tables of a method payload (ids included) before `amq-protocol` parses it.
fn check_method_tables(class: u16, method: u16, payload: &[u8]) -> Result<()> {
    let mut at = 4;
    for arg in table_args(class, method) {
        let len = |n: usize| -> Option<usize> { payload.get(at..at + n).map(|_| n) };
        let step = match *arg {
            Arg::Octet => len(1),
            Arg::Short => len(2),
            Arg::ShortStr => payload.get(at).and_then(|&n| len(1 + n as usize)),
            Arg::Table(name) => Some(check_table(payload.get(at..).unwrap_or_default(), name)?),
        };
        // Arguments cut short: amq-protocol refuses the method without recursing.
        let Some(step) = step else { return Ok(()) };
        at += step;
    }
    Ok(())
}

/// Walks the `headers` property of a content header payload, if present.
fn check_header_table(payload: &[u8]) -> Result<()> {
    // class, weight, body size, then the property flags.
    let Some(flags) = payload.get(12..14) else {
        return Ok(());
    };
    let flags = u16::from_be_bytes([flags[0], flags[1]]);
    if flags & (1 << 13) == 0 {
        return Ok(());
    }
    let mut at = 14;
    // content_type and content_encoding, short strings, come before the headers.
    for bit in [15, 14] {
        if flags & (1 << bit) != 0 {
            let Some(&n) = payload.get(at) else {
                return Ok(());
            };
            at += 1 + n as usize;
        }
    }
    match payload.get(at..) {
        Some(rest) => check_table(rest, "message headers").map(|_| ()),
        None => Ok(()),
    }
}

/// Walks the length-prefixed field table at the start of `buf` without recursion and returns
/// the bytes it takes. Refuses (502) a table nested deeper than [`MAX_TABLE_DEPTH`] or one
/// that is malformed (what `amq-protocol` would refuse too). `what` names it in the error.
pub fn check_table(buf: &[u8], what: &str) -> Result<usize> {
    let u32_at = |at: usize| -> Option<usize> {
        let b = buf.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let end = u32_at(0)
        .and_then(|n| n.checked_add(4))
        .filter(|&end| end <= buf.len())
        .ok_or_else(|| malformed(what))?;
    // The open tables and arrays: where each ends, and whether its entries have keys.
    let mut open: Vec<(usize, bool)> = Vec::with_capacity(8);
    open.push((end, true));
    let mut at = 4;
    while let Some(&(container_end, keyed)) = open.last() {
        if at == container_end {
            open.pop();
            continue;
        }
        if keyed {
            let key = *buf.get(at).ok_or_else(|| malformed(what))? as usize;
            at += 1 + key;
        }
        if at >= container_end {
            return Err(malformed(what));
        }
        let kind = buf[at];
        at += 1;
        let size = match kind {
            b'V' => 0,
            b't' | b'b' | b'B' => 1,
            b's' | b'U' | b'u' => 2,
            b'I' | b'i' | b'f' => 4,
            b'D' => 5,
            b'L' | b'l' | b'd' | b'T' => 8,
            b'S' | b'x' => 4 + u32_at(at).ok_or_else(|| malformed(what))?,
            b'A' | b'F' => {
                if open.len() >= MAX_TABLE_DEPTH {
                    return Err(AmqpError::syntax(format!(
                        "{what}: field tables and arrays nest deeper than {MAX_TABLE_DEPTH} levels"
                    )));
                }
                let inner_end = u32_at(at)
                    .and_then(|n| (at + 4).checked_add(n))
                    .filter(|&e| e <= container_end)
                    .ok_or_else(|| malformed(what))?;
                open.push((inner_end, kind == b'F'));
                at += 4;
                continue;
            }
            _ => return Err(malformed(what)),
        };
        at = at
            .checked_add(size)
            .filter(|&a| a <= container_end)
            .ok_or_else(|| malformed(what))?;
    }
    Ok(end)
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
    check_header_table(payload)?;
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

    /// A field value of `depth` nested arrays (tables when `tables`), innermost empty.
    fn nested(depth: usize, tables: bool) -> Vec<u8> {
        let per = if tables { 6 } else { 5 };
        let mut v = Vec::new();
        for level in 0..depth {
            v.push(if tables { b'F' } else { b'A' });
            // What the levels below take (a table's also holds the empty key's octet).
            let inner = per * (depth - 1 - level);
            v.extend_from_slice(&(inner as u32).to_be_bytes());
            if tables && level + 1 < depth {
                v.push(0);
            }
        }
        v
    }

    /// A length-prefixed table with one entry "k" = `value`.
    fn table_of(value: &[u8]) -> Vec<u8> {
        let mut t = ((2 + value.len()) as u32).to_be_bytes().to_vec();
        t.extend_from_slice(&[1, b'k']);
        t.extend_from_slice(value);
        t
    }

    #[test]
    fn table_nesting_is_capped_without_recursion() {
        for tables in [false, true] {
            // The outer table counts as one level.
            let ok = table_of(&nested(MAX_TABLE_DEPTH - 1, tables));
            assert_eq!(check_table(&ok, "t").unwrap(), ok.len(), "tables={tables}");
            let (_, parsed) = amq_protocol::types::parsing::parse_field_table(&ok[..]).unwrap();
            assert_eq!(parsed.inner().len(), 1);
            let deep = table_of(&nested(MAX_TABLE_DEPTH, tables));
            let e = check_table(&deep, "client_properties").unwrap_err();
            assert_eq!(e.code, 502);
            assert!(
                e.text.contains("client_properties") && e.text.contains("deeper than 100"),
                "{}",
                e.text
            );
            // Far deeper than any stack: refused just the same, in a test thread's stack.
            let huge = table_of(&nested(1_000_000, tables));
            assert_eq!(check_table(&huge, "t").unwrap_err().code, 502);
        }
    }

    #[test]
    fn every_field_type_is_walked_like_amq_protocol_parses_it() {
        use amq_protocol::types::{AMQPValue, DecimalValue, FieldArray, FieldTable};
        let mut inner = FieldTable::default();
        inner.insert("s".into(), AMQPValue::LongString("text".into()));
        let mut t = FieldTable::default();
        let values = [
            AMQPValue::Boolean(true),
            AMQPValue::ShortShortInt(-1),
            AMQPValue::ShortShortUInt(1),
            AMQPValue::ShortInt(-2),
            AMQPValue::ShortUInt(2),
            AMQPValue::LongInt(-3),
            AMQPValue::LongUInt(3),
            AMQPValue::LongLongInt(-4),
            AMQPValue::Float(1.5),
            AMQPValue::Double(2.5),
            AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 5 }),
            AMQPValue::LongString("long".into()),
            AMQPValue::ByteArray(vec![1u8, 2, 3].into()),
            AMQPValue::Timestamp(7),
            AMQPValue::Void,
            AMQPValue::FieldTable(inner.clone()),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::FieldTable(inner),
                AMQPValue::LongInt(1),
            ])),
        ];
        for (i, v) in values.into_iter().enumerate() {
            t.insert(format!("k{i}").into(), v);
        }
        let encoded =
            amq_protocol::types::generation::gen_field_table(&t)(WriteContext::from(Vec::new()))
                .unwrap()
                .into_inner()
                .0;
        let mut with_tail = encoded.clone();
        with_tail.extend_from_slice(b"tail");
        assert_eq!(check_table(&with_tail, "t").unwrap(), encoded.len());
        // Every truncation is refused, never a panic.
        for cut in 0..encoded.len() {
            assert!(check_table(&encoded[..cut], "t").is_err(), "cut at {cut}");
        }
        // A length that lies, an unknown type.
        let mut bad = table_of(b"Ax\0\0\0");
        bad[9] = 200;
        assert_eq!(check_table(&bad, "t").unwrap_err().code, 502);
        assert!(
            check_table(&table_of(b"?"), "t")
                .unwrap_err()
                .text
                .contains("malformed")
        );
    }

    #[test]
    fn deep_tables_in_methods_and_headers_are_syntax_errors() {
        // queue.declare: ticket, queue "q", flags, then the arguments.
        let mut p = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
        p.extend_from_slice(&table_of(&nested(5_000, false)));
        let e = decode_method(&p).unwrap_err();
        assert_eq!((e.code, e.class_id, e.method_id), (502, 50, 10));
        assert!(e.text.contains("arguments"), "{}", e.text);
        // basic.consume and connection.start-ok likewise.
        let mut p = vec![0, 60, 0, 20, 0, 0, 1, b'q', 0, 0];
        p.extend_from_slice(&table_of(&nested(5_000, true)));
        assert_eq!(decode_method(&p).unwrap_err().code, 502);
        let mut p = vec![0, 10, 0, 11];
        p.extend_from_slice(&table_of(&nested(5_000, true)));
        p.extend_from_slice(&[5, b'P', b'L', b'A', b'I', b'N', 0, 0, 0, 0, 0]);
        let e = decode_method(&p).unwrap_err();
        assert!(e.text.contains("client_properties"), "{}", e.text);
        // Content header with content_type and headers.
        let mut h = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        h.extend_from_slice(&((1u16 << 15) | (1 << 13)).to_be_bytes());
        h.extend_from_slice(&[1, b'x']);
        h.extend_from_slice(&table_of(&nested(5_000, false)));
        let e = decode_header(&h).unwrap_err();
        assert!(e.text.contains("message headers"), "{}", e.text);
        // Within the limit both still decode.
        let mut h = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        h.extend_from_slice(&((1u16 << 15) | (1 << 13)).to_be_bytes());
        h.extend_from_slice(&[1, b'x']);
        h.extend_from_slice(&table_of(&nested(50, false)));
        assert!(decode_header(&h).unwrap().properties.headers().is_some());
    }

    #[test]
    fn pre_tune_limit_is_named_in_the_error() {
        let mut buf = frame(FRAME_METHOD, 0, &[0u8; 5000]);
        let e = FrameDecoder::pre_tune().decode(&mut buf).unwrap_err();
        assert_eq!(e.code, 501);
        assert!(e.text.contains("before connection.tune-ok"), "{}", e.text);
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
