//! Consumer latency at a fixed publish rate, measured with the least client: two blocking
//! sockets speaking AMQP 0-9-1 by hand (no client library, no garbage collector, no thread
//! hand-off inside the client), so what is measured is the broker and the kernel's loopback.
//!
//!   latency <amqp-url> [rate msg/s = 10000] [seconds = 15] [size B = 1024]
//!           [transient|confirm|confirm-ack]
//!
//! One connection declares a queue and consumes it with autoack; a second publishes to it
//! through the default exchange at `rate` (paced against a schedule), each body starting with
//! its send time. `transient`: a server-named exclusive queue, transient messages, no
//! confirms. `confirm`: a durable (auto-delete) queue, persistent messages and publisher
//! confirms, whose latency (publish to `basic.ack`) is measured too. `confirm-ack`: the same
//! with a consumer that acknowledges (prefetch 1,000; after each read from its socket one
//! `basic.ack` with `multiple` for everything delivered so far), as PerfTest's persistent
//! runs do: a message is still in the queue when it is confirmed. Prints the rate received
//! and the latency percentiles (µs) of every message after the first second (a warm-up), as
//! `key=value` words on one line (`c50`, `c99`... for confirms), the format
//! scripts/bench-latency.sh reads.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

#[path = "common/amqp.rs"]
mod amqp;
use amqp::{Target, frame, method, short_str};

fn usage() -> ! {
    eprintln!(
        "usage: latency <amqp-url> [rate msg/s] [seconds] [size B] [transient|confirm|confirm-ack]"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(url) = args.first() else { usage() };
    let num = |i: usize, default: u64| -> u64 {
        args.get(i)
            .map(|s| s.parse().unwrap_or_else(|_| usage()))
            .unwrap_or(default)
    };
    let (rate, seconds, size) = (num(1, 10_000), num(2, 15), num(3, 1024).max(8));
    // (publisher confirms and persistent messages, consumer acknowledgements)
    let (confirm, manual_ack) = match args.get(4).map(String::as_str) {
        None | Some("transient") => (false, false),
        Some("confirm") => (true, false),
        Some("confirm-ack") => (true, true),
        Some(_) => usage(),
    };
    let mode = Mode {
        confirm,
        manual_ack,
    };
    if let Err(e) = run(url, rate.max(1), seconds.max(2), size as usize, mode) {
        eprintln!("latency: {e}");
        std::process::exit(1)
    }
}

#[derive(Clone, Copy)]
struct Mode {
    confirm: bool,
    manual_ack: bool,
}

/// The consumer's prefetch when it acknowledges.
const PREFETCH: u16 = 1000;

fn run(url: &str, rate: u64, seconds: u64, size: usize, mode: Mode) -> Result<(), String> {
    let confirm = mode.confirm;
    let target = Target::parse(url)?;
    let mut consumer = handshake(&target)?;
    // queue.declare ("" and exclusive, or a durable auto-delete one), then basic.consume (with
    // no-ack, or after basic.qos).
    let mut declare = vec![0, 0];
    if confirm {
        short_str(
            &mut declare,
            &format!("latency-probe-{}", std::process::id()),
        );
        declare.push(0b0000_1010);
    } else {
        short_str(&mut declare, "");
        declare.push(0b0000_0100);
    }
    declare.extend_from_slice(&0u32.to_be_bytes());
    send(&mut consumer, &method(1, 50, 10, &declare))?;
    let ok = expect(&mut consumer, 50, 11)?;
    let len = *ok.first().ok_or("a short queue.declare-ok")? as usize;
    let queue =
        String::from_utf8_lossy(ok.get(1..1 + len).ok_or("a short declare-ok")?).into_owned();
    if mode.manual_ack {
        let mut qos = 0u32.to_be_bytes().to_vec();
        qos.extend_from_slice(&PREFETCH.to_be_bytes());
        qos.push(0);
        send(&mut consumer, &method(1, 60, 10, &qos))?;
        expect(&mut consumer, 60, 11)?;
    }
    let mut consume = vec![0, 0];
    short_str(&mut consume, &queue);
    short_str(&mut consume, "");
    consume.push(if mode.manual_ack { 0 } else { 0b0000_0010 });
    consume.extend_from_slice(&0u32.to_be_bytes());
    send(&mut consumer, &method(1, 60, 20, &consume))?;
    expect(&mut consumer, 60, 21)?;

    let epoch = Instant::now();
    let warm_up = Duration::from_secs(1);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let reader = {
        let stop = stop.clone();
        let ack = mode.manual_ack;
        std::thread::spawn(move || consume_loop(consumer, epoch, warm_up, &stop, ack, tx))
    };

    let mut publisher = handshake(&target)?;
    // Send times of unconfirmed publishes, by sequence number (from 1).
    let unconfirmed: Arc<Mutex<VecDeque<(u64, Duration)>>> = Arc::default();
    let confirms = if confirm {
        send(&mut publisher, &method(1, 85, 10, &[0]))?;
        expect(&mut publisher, 85, 11)?;
        let s = publisher.try_clone().map_err(|e| e.to_string())?;
        let (stop, unconfirmed) = (stop.clone(), unconfirmed.clone());
        Some(std::thread::spawn(move || {
            confirm_loop(s, epoch, warm_up, &stop, &unconfirmed)
        }))
    } else {
        None
    };
    let mut publish = vec![0, 0];
    short_str(&mut publish, "");
    short_str(&mut publish, &queue);
    publish.push(0);
    let publish = method(1, 60, 40, &publish);
    let mut header = vec![0, 60, 0, 0];
    header.extend_from_slice(&(size as u64).to_be_bytes());
    if confirm {
        // delivery-mode 2 (persistent)
        header.extend_from_slice(&0x1000u16.to_be_bytes());
        header.push(2);
    } else {
        header.extend_from_slice(&0u16.to_be_bytes());
    }
    let header = frame(2, 1, &header);
    let mut body = vec![0u8; size];
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let total = rate * seconds;
    let mut out = Vec::with_capacity(publish.len() + header.len() + size + 8);
    let start = Instant::now();
    for k in 0..total {
        let due = start + period * k as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let sent = epoch.elapsed();
        body[..8].copy_from_slice(&(sent.as_nanos() as u64).to_be_bytes());
        if confirm {
            unconfirmed
                .lock()
                .map_err(|_| "poisoned")?
                .push_back((k + 1, sent));
        }
        out.clear();
        out.extend_from_slice(&publish);
        out.extend_from_slice(&header);
        out.extend_from_slice(&frame(3, 1, &body));
        send(&mut publisher, &out)?;
    }
    let published = start.elapsed();
    // Let the last ones arrive, then stop the reader.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Release);
    let _ = publisher.shutdown(std::net::Shutdown::Both);
    let (mut lat, received, measured_for) = rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the consumer did not finish")?;
    let _ = reader.join();
    let confirmed = match confirms.map(|c| c.join()) {
        Some(Ok(c)) => {
            let (mut c, nacked) = c?;
            if c.is_empty() {
                return Err("no publish confirmed".into());
            }
            c.sort_unstable();
            let pct = |p: f64| c[((c.len() as f64 * p) as usize).min(c.len() - 1)];
            format!(
                " confirmed={} nacked={nacked} c50={} c95={} c99={} c999={} cmax={}",
                c.len(),
                pct(0.50),
                pct(0.95),
                pct(0.99),
                pct(0.999),
                c[c.len() - 1]
            )
        }
        Some(Err(_)) => return Err("the confirm reader failed".into()),
        None => String::new(),
    };
    if lat.is_empty() {
        return Err("no message received".into());
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "sent={:.0} received={:.0} measured={} min={} p50={} p75={} p95={} p99={} p999={} max={}{confirmed}",
        total as f64 / published.as_secs_f64(),
        received as f64 / measured_for.as_secs_f64().max(1e-9),
        lat.len(),
        lat[0],
        pct(0.50),
        pct(0.75),
        pct(0.95),
        pct(0.99),
        pct(0.999),
        lat[lat.len() - 1],
    );
    Ok(())
}

/// Reads `basic.ack`s (and nacks) until `stop`: confirm latencies (µs) of the publishes sent
/// after the warm-up, and how many were nacked.
fn confirm_loop(
    mut s: TcpStream,
    epoch: Instant,
    warm_up: Duration,
    stop: &AtomicBool,
    unconfirmed: &Mutex<VecDeque<(u64, Duration)>>,
) -> Result<(Vec<u32>, u64), String> {
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut lat = Vec::with_capacity(1 << 20);
    let mut nacked = 0u64;
    while !stop.load(Ordering::Acquire) {
        let args = match read_method(&mut s) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            // The publisher's socket is shut down once stopped.
            Err(_) if stop.load(Ordering::Acquire) => break,
            Err(e) => return Err(e),
        };
        let ((60, 80) | (60, 120), rest) = (args.0, &args.1) else {
            continue;
        };
        let (Some(tag), Some(bits)) = (rest.get(0..8), rest.get(8)) else {
            return Err("a short basic.ack".into());
        };
        let tag = u64::from_be_bytes(tag.try_into().map_err(|_| "tag")?);
        let multiple = bits & 1 == 1;
        let now = epoch.elapsed();
        let nack = args.0 == (60, 120);
        let mut record = |sent: Duration| {
            if nack {
                nacked += 1;
            } else if sent >= warm_up {
                lat.push(now.saturating_sub(sent).as_micros() as u32);
            }
        };
        let mut q = unconfirmed.lock().map_err(|_| "poisoned")?;
        if multiple {
            while q.front().is_some_and(|&(seq, _)| seq <= tag) {
                if let Some((_, sent)) = q.pop_front() {
                    record(sent);
                }
            }
        } else if let Some(i) = q.iter().position(|&(seq, _)| seq == tag)
            && let Some((_, sent)) = q.remove(i)
        {
            record(sent);
        }
    }
    Ok((lat, nacked))
}

/// A method's (class, method) and its arguments.
type Method = ((u16, u16), Vec<u8>);

/// One method frame's (class, method) and arguments; None on a read timeout or another
/// frame type.
fn read_method(s: &mut TcpStream) -> Result<Option<Method>, String> {
    let mut header = [0u8; 7];
    match s.read_exact(&mut header) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e.to_string()),
    }
    let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
    if size > 1 << 20 {
        return Err(format!("a frame of {size} bytes"));
    }
    let mut payload = vec![0u8; size + 1];
    s.read_exact(&mut payload).map_err(|e| e.to_string())?;
    if header[0] != 1 || size < 4 {
        return Ok(None);
    }
    let id = (
        u16::from_be_bytes([payload[0], payload[1]]),
        u16::from_be_bytes([payload[2], payload[3]]),
    );
    Ok(Some((id, payload[4..size].to_vec())))
}

/// Latencies (µs) after the warm-up, how many arrived in that time, and its length.
type Measured = (Vec<u32>, u64, Duration);

/// Reads deliveries until `stop`, timing each body against its send time; with `ack`,
/// acknowledges everything delivered after each read (one `basic.ack`, `multiple`).
fn consume_loop(
    mut s: TcpStream,
    epoch: Instant,
    warm_up: Duration,
    stop: &AtomicBool,
    ack: bool,
    done: mpsc::Sender<Measured>,
) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut lat = Vec::with_capacity(1 << 20);
    let mut received = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let (mut start, mut end) = (0usize, 0usize);
    // The highest delivery tag seen, and the highest acknowledged.
    let (mut delivered, mut acked) = (0u64, 0u64);
    while !stop.load(Ordering::Acquire) {
        // Parse every whole frame buffered.
        loop {
            let avail = &buf[start..end];
            if avail.len() < 7 {
                break;
            }
            let size = u32::from_be_bytes([avail[3], avail[4], avail[5], avail[6]]) as usize;
            if avail.len() < size + 8 {
                break;
            }
            if avail[0] == 3 && size >= 8 {
                let now = Instant::now();
                let mut ts = [0u8; 8];
                ts.copy_from_slice(&avail[7..15]);
                let sent = Duration::from_nanos(u64::from_be_bytes(ts));
                if sent >= warm_up {
                    let at = now.duration_since(epoch);
                    lat.push(at.saturating_sub(sent).as_micros() as u32);
                    first.get_or_insert(now);
                    last = now;
                    received += 1;
                }
            } else if ack
                && avail[0] == 1
                && size >= 5
                && avail[7..11] == [0, 60, 0, 60]
                && let Some(tag) = delivery_tag(&avail[11..7 + size])
            {
                delivered = delivered.max(tag);
            }
            start += size + 8;
        }
        if delivered > acked {
            let mut args = delivered.to_be_bytes().to_vec();
            args.push(1); // multiple
            if send(&mut s, &method(1, 60, 80, &args)).is_err() {
                break;
            }
            acked = delivered;
        }
        if start == end {
            (start, end) = (0, 0);
        } else if end == buf.len() {
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }
        match s.read(&mut buf[end..]) {
            Ok(0) => break,
            Ok(n) => end += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let span = first.map(|f| last.duration_since(f)).unwrap_or_default();
    let _ = done.send((lat, received, span));
}

/// The delivery tag of a `basic.deliver`'s arguments (after the consumer tag).
fn delivery_tag(args: &[u8]) -> Option<u64> {
    let len = *args.first()? as usize;
    let tag = args.get(1 + len..9 + len)?;
    Some(u64::from_be_bytes(tag.try_into().ok()?))
}

fn send(s: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    s.write_all(bytes).map_err(|e| format!("write: {e}"))
}

/// Reads frames until the method `class`.`method`; returns its arguments.
fn expect(s: &mut TcpStream, class: u16, method: u16) -> Result<Vec<u8>, String> {
    loop {
        let Some((id, args)) = read_method(s)? else {
            continue;
        };
        if id == (class, method) {
            return Ok(args);
        }
        if id == (10, 50) || id == (20, 40) {
            return Err(format!(
                "the broker closed the {}: {:?}",
                if id.0 == 10 { "connection" } else { "channel" },
                String::from_utf8_lossy(&args)
            ));
        }
    }
}

/// Opens a connection (PLAIN, no heartbeats) and channel 1.
fn handshake(t: &Target) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(&t.addr).map_err(|e| format!("{}: {e}", t.addr))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    send(&mut s, b"AMQP\x00\x00\x09\x01")?;
    expect(&mut s, 10, 10)?;
    let mut start_ok = 0u32.to_be_bytes().to_vec(); // no client properties
    short_str(&mut start_ok, "PLAIN");
    let response = format!("\0{}\0{}", t.user, t.pass);
    start_ok.extend_from_slice(&(response.len() as u32).to_be_bytes());
    start_ok.extend_from_slice(response.as_bytes());
    short_str(&mut start_ok, "en_US");
    send(&mut s, &method(0, 10, 11, &start_ok))?;
    let tune = expect(&mut s, 10, 30)?;
    let channel_max = tune.get(0..2).ok_or("a short connection.tune")?;
    let mut tune_ok = channel_max.to_vec();
    tune_ok.extend_from_slice(&131_072u32.to_be_bytes());
    tune_ok.extend_from_slice(&0u16.to_be_bytes());
    send(&mut s, &method(0, 10, 31, &tune_ok))?;
    let mut open = Vec::new();
    short_str(&mut open, &t.vhost);
    short_str(&mut open, "");
    open.push(0);
    send(&mut s, &method(0, 10, 40, &open))?;
    expect(&mut s, 10, 41)?;
    send(&mut s, &method(1, 20, 10, &[0]))?;
    expect(&mut s, 20, 11)?;
    Ok(s)
}
