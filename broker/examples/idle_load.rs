//! A load for measuring a broker's memory (scripts/bench-memory.sh): holds many idle
//! connections, or declares many queues, then waits until its standard input closes.
//!
//!   idle_load connections <amqp-url> <n>   n connections (the handshake by hand, no
//!                                          heartbeats), one channel each, left idle
//!   idle_load queues <amqp-url> <n>        n transient (non-durable) queues, declared with
//!                                          nowait on one channel, then checked passively
//!
//! Prints `ready <n>` once all are open or declared (after a synchronous round trip, so the
//! broker has processed them), then holds them until stdin reaches EOF.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "common/amqp.rs"]
mod amqp;
use amqp::{Target, method, short_str};

/// Connections opened at once.
const CONCURRENT_OPENS: usize = 100;

fn usage() -> ! {
    eprintln!("usage: idle_load connections|queues <amqp-url> <n>");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [what, url, n] = args.as_slice() else {
        usage()
    };
    let Ok(n) = n.parse::<usize>() else { usage() };
    let started = Instant::now();
    let held = match what.as_str() {
        "connections" => connections(url, n).await.map(|c| (c, Vec::new())),
        "queues" => queues(url, n).await.map(|q| (Vec::new(), q)),
        _ => usage(),
    };
    let held = match held {
        Ok(h) => h,
        Err(e) => {
            eprintln!("idle_load: {e}");
            std::process::exit(1)
        }
    };
    println!("ready {n} in {:.1} s", started.elapsed().as_secs_f64());
    // Hold everything until the caller closes our stdin.
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await;
    drop(held);
}

/// Opens `n` connections with the least client: the AMQP handshake by hand (PLAIN, heartbeat
/// 0, a channel), each then an idle socket. (A full client per connection costs the load
/// generator more memory than the broker: lapin took 24 GB for 10,000.)
async fn connections(url: &str, n: usize) -> Result<Vec<TcpStream>, String> {
    let target = Target::parse(url)?;
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_OPENS));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (target, permits) = (target.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire().await.map_err(|e| e.to_string())?;
            handshake(&target)
                .await
                .map_err(|e| format!("connection {i}: {e}"))
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        out.push(r.map_err(|e| e.to_string())??);
    }
    Ok(out)
}

/// Reads frames until the method `class`.`method`; returns its arguments.
async fn expect(s: &mut TcpStream, class: u16, method: u16) -> Result<Vec<u8>, String> {
    loop {
        let mut header = [0u8; 7];
        s.read_exact(&mut header).await.map_err(|e| e.to_string())?;
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        if size > 1 << 20 {
            return Err(format!("a frame of {size} bytes"));
        }
        let mut payload = vec![0u8; size + 1];
        s.read_exact(&mut payload)
            .await
            .map_err(|e| e.to_string())?;
        if header[0] != 1 || size < 4 {
            continue;
        }
        let (c, m) = (
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        );
        if (c, m) == (class, method) {
            return Ok(payload[4..size].to_vec());
        }
        if (c, m) == (10, 50) {
            return Err(format!(
                "the broker closed the connection: {:?}",
                String::from_utf8_lossy(&payload)
            ));
        }
    }
}

async fn handshake(t: &Target) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(&t.addr)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"AMQP\x00\x00\x09\x01")
        .await
        .map_err(|e| e.to_string())?;
    expect(&mut s, 10, 10).await?;
    let mut start_ok = 0u32.to_be_bytes().to_vec(); // no client properties
    short_str(&mut start_ok, "PLAIN");
    let response = format!("\0{}\0{}", t.user, t.pass);
    start_ok.extend_from_slice(&(response.len() as u32).to_be_bytes());
    start_ok.extend_from_slice(response.as_bytes());
    short_str(&mut start_ok, "en_US");
    s.write_all(&method(0, 10, 11, &start_ok))
        .await
        .map_err(|e| e.to_string())?;
    let tune = expect(&mut s, 10, 30).await?;
    let channel_max = tune.get(0..2).ok_or("a short connection.tune")?;
    let mut tune_ok = channel_max.to_vec();
    tune_ok.extend_from_slice(&131_072u32.to_be_bytes());
    tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats: idle for good
    s.write_all(&method(0, 10, 31, &tune_ok))
        .await
        .map_err(|e| e.to_string())?;
    let mut open = Vec::new();
    short_str(&mut open, &t.vhost);
    short_str(&mut open, "");
    open.push(0);
    s.write_all(&method(0, 10, 40, &open))
        .await
        .map_err(|e| e.to_string())?;
    expect(&mut s, 10, 41).await?;
    s.write_all(&method(1, 20, 10, &[0]))
        .await
        .map_err(|e| e.to_string())?;
    expect(&mut s, 20, 11).await?;
    Ok(s)
}

async fn queues(url: &str, n: usize) -> Result<Vec<Connection>, String> {
    let c = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let ch = c.create_channel().await.map_err(|e| e.to_string())?;
    let nowait = QueueDeclareOptions {
        nowait: true,
        ..QueueDeclareOptions::default()
    };
    for i in 0..n {
        ch.queue_declare(
            format!("idle-{i}").as_str().into(),
            nowait,
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("declare idle-{i}: {e}"))?;
    }
    // A synchronous declare after the nowait ones: answered once the broker has them all.
    if n > 0 {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(
            format!("idle-{}", n - 1).as_str().into(),
            passive,
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("passive declare: {e}"))?;
    }
    Ok(vec![c])
}
