//! A Jepsen-style check of replicated queues: publishers with confirms and consumers with
//! manual acks on every node of a cluster, while a nemesis kills (-9), pauses (SIGSTOP),
//! restarts and partitions nodes (halves, the isolated leader, a majority ring, a bridge);
//! then everything is healed, the queue drained, and a checker compares what publishers
//! were confirmed with what consumers received: **lost** (confirmed, never received) must be
//! 0, **unexpected** (received, never published) must be 0, **returned** (published
//! mandatory and returned unroutable: a node that did not know the queue) must be 0;
//! duplicates are counted and
//! reported, and the time until every node's publisher is confirmed again after the heal is
//! measured.
//!
//! Short form (in the test suite): 3 nodes, 45 s. Long form:
//! `WARREN_JEPSEN_NODES=5 WARREN_JEPSEN_SECS=600 cargo test -p warren-broker --test cluster
//! jepsen -- --nocapture`; `WARREN_JEPSEN_SEED=<seed>` replays a schedule (printed at the
//! start of every run).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::harness::{Net, PASS, SERIAL, USER};

const QUEUE: &str = "jepsen";

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[derive(Default)]
struct History {
    attempted: HashSet<String>,
    confirmed: HashSet<String>,
    nacked: HashSet<String>,
    /// Published mandatory, confirmed, and returned unroutable: a node that did not know the
    /// queue (which exists throughout).
    returned: HashSet<String>,
    /// Published, then the connection failed or no confirm came in time.
    unknown: HashSet<String>,
    received: Vec<String>,
}

type Shared = Arc<Mutex<History>>;

/// A connection to node `ip` and a channel on it (within 3 s), or None.
async fn connect(ip: &str) -> Option<(Connection, Channel)> {
    let url = format!("amqp://{USER}:{PASS}@{ip}:5672/%2f");
    let conn = tokio::time::timeout(
        Duration::from_secs(3),
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    .ok()?
    .ok()?;
    let ch = tokio::time::timeout(Duration::from_secs(3), conn.create_channel())
        .await
        .ok()?
        .ok()?;
    Some((conn, ch))
}

/// `op` within 10 s (a paused or cut-off node answers nothing; the client's heartbeat would
/// take minutes to notice), or None, saying so with what it was.
async fn bounded<T, E: std::fmt::Debug>(
    node: usize,
    what: &str,
    op: impl std::future::Future<Output = Result<T, E>>,
) -> Option<T> {
    match tokio::time::timeout(Duration::from_secs(10), op).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(_)) => None,
        Err(_) => {
            eprintln!("jepsen: {what} through node {node} had no answer within 10 s");
            None
        }
    }
}

/// Publishes `n<node>-<seq>` one at a time with confirms through node `ip`, reconnecting
/// whenever the connection fails, until `stop`.
async fn publisher(node: usize, ip: String, h: Shared, stop: Arc<AtomicBool>) {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some((conn, ch)) = connect(&ip).await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let select = ch.confirm_select(ConfirmSelectOptions::default());
        if bounded(node, "confirm.select", select).await.is_none() {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), conn.close(200, "bye".into())).await;
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let id = format!("n{node}-{seq}");
            h.lock().attempted.insert(id.clone());
            let confirm = async {
                ch.basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    id.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?
                .await
            };
            match tokio::time::timeout(Duration::from_secs(10), confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => {
                    h.lock().confirmed.insert(id);
                }
                Ok(Ok(Confirmation::Ack(Some(_)))) => {
                    h.lock().returned.insert(id);
                }
                Ok(Ok(_)) => {
                    h.lock().nacked.insert(id);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => {
                    h.lock().unknown.insert(id);
                    break;
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(200, "bye".into())).await;
    }
}

/// Consumes with manual acks (prefetch 20) through node `ip`, recording every delivery,
/// reconnecting whenever the connection fails, until `stop`.
async fn consumer(node: usize, ip: String, h: Shared, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Some((conn, ch)) = connect(&ip).await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let qos = ch.basic_qos(20, BasicQosOptions::default());
        let consume = async {
            bounded(node, "basic.qos", qos).await?;
            let consume = ch.basic_consume(
                QUEUE.into(),
                format!("c{node}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            );
            bounded(node, "basic.consume", consume).await
        };
        let Some(mut deliveries) = consume.await else {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), conn.close(200, "bye".into())).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(500), deliveries.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(d))) => {
                    h.lock()
                        .received
                        .push(String::from_utf8_lossy(&d.data).into_owned());
                    if bounded(node, "basic.ack", d.ack(BasicAckOptions::default()))
                        .await
                        .is_none()
                    {
                        break;
                    }
                }
                Ok(_) => break,
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(200, "bye".into())).await;
    }
}

/// The node leading the queue, as any reachable node reports it.
async fn leader(net: &Net) -> Option<usize> {
    for i in 0..net.nodes.len() {
        if !net.is_up(i) {
            continue;
        }
        let Ok(Ok(q)) = tokio::time::timeout(
            Duration::from_secs(2),
            net.get(i, &format!("/api/queues/%2f/{QUEUE}")),
        )
        .await
        else {
            continue;
        };
        if let Some(name) = q["leader"].as_str() {
            return net.nodes.iter().position(|n| n.name == name);
        }
    }
    None
}

#[derive(Debug, Clone)]
enum Fault {
    Kill(usize),
    Pause(usize),
    /// Cut off from each other (both directions).
    Cut(Vec<(usize, usize)>, #[allow(dead_code)] &'static str),
}

/// Every pair between `a` and `b`.
fn between(a: &[usize], b: &[usize]) -> Vec<(usize, usize)> {
    a.iter()
        .flat_map(|&i| b.iter().map(move |&j| (i, j)))
        .collect()
}

async fn pick(rng: &mut StdRng, net: &Net) -> Fault {
    let n = net.nodes.len();
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    match rng.random_range(0..6) {
        0 => Fault::Kill(order[0]),
        1 => Fault::Pause(order[0]),
        2 => {
            let (a, b) = order.split_at(n / 2);
            Fault::Cut(between(a, b), "halves")
        }
        3 => {
            let l = leader(net).await.unwrap_or(order[0]);
            let rest: Vec<usize> = (0..n).filter(|&i| i != l).collect();
            Fault::Cut(between(&[l], &rest), "isolated leader")
        }
        4 => {
            // A ring in a random order: each node sees only its two neighbours (a majority of
            // 3 or 5 counting itself), never the others.
            let mut cut = Vec::new();
            if n == 3 {
                // Three nodes: a line, the middle one seeing both ends.
                cut.push((order[0], order[2]));
            }
            for x in 0..n {
                for y in x + 1..n {
                    let d = y - x;
                    if n > 3 && d != 1 && d != n - 1 {
                        cut.push((order[x], order[y]));
                    }
                }
            }
            Fault::Cut(cut, "majority ring")
        }
        _ => {
            // Two sides joined by one bridge node (order[0]) that sees both.
            let rest = &order[1..];
            let (a, b) = rest.split_at(rest.len() / 2);
            Fault::Cut(between(a, b), "bridge")
        }
    }
}

#[tokio::test]
async fn replicated_queue_loses_no_confirmed_message_under_kills_pauses_and_partitions() {
    let _serial = SERIAL.lock().await;
    let nodes = env::<usize>("WARREN_JEPSEN_NODES").unwrap_or(3);
    let secs = env::<u64>("WARREN_JEPSEN_SECS").unwrap_or(45);
    let seed = env::<u64>("WARREN_JEPSEN_SEED").unwrap_or_else(rand::random);
    eprintln!(
        "jepsen: {nodes} nodes, {secs} s of faults, seed {seed} (replay: WARREN_JEPSEN_SEED={seed})"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let mut net = Net::new(nodes);
    net.start_all().await;
    for i in 0..nodes {
        net.wait_ready(i, Duration::from_secs(30)).await;
    }
    {
        let (conn, ch) = connect(&net.nodes[0].ip).await.expect("connect");
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        ch.queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .expect("declare the replicated queue");
        let _ = conn.close(200, "bye".into()).await;
    }
    for i in 0..nodes {
        net.wait_status(
            i,
            &format!("/api/queues/%2f/{QUEUE}"),
            200,
            Duration::from_secs(10),
        )
        .await;
    }

    let h: Shared = Arc::default();
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let stop_consuming = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..nodes {
        let ip = net.nodes[i].ip.clone();
        workers.push(tokio::spawn(publisher(
            i,
            ip.clone(),
            h.clone(),
            stop_publishing.clone(),
        )));
        workers.push(tokio::spawn(consumer(
            i,
            ip,
            h.clone(),
            stop_consuming.clone(),
        )));
    }

    // The nemesis: a fault for 2–6 s, then 2–4 s of calm, until the time is up.
    let started = Instant::now();
    let mut schedule = Vec::new();
    tokio::time::sleep(Duration::from_secs(2)).await;
    while started.elapsed() < Duration::from_secs(secs) {
        let fault = pick(&mut rng, &net).await;
        let hold = Duration::from_millis(rng.random_range(2000..6000));
        let calm = Duration::from_millis(rng.random_range(2000..4000));
        let at = started.elapsed().as_secs_f64();
        eprintln!("jepsen: t={at:.1}s {fault:?} for {hold:?}");
        schedule.push((at, fault.clone()));
        match &fault {
            Fault::Kill(i) => net.kill(*i),
            Fault::Pause(i) => net.pause(*i),
            Fault::Cut(pairs, _) => net.cut(pairs),
        }
        tokio::time::sleep(hold).await;
        match &fault {
            Fault::Kill(i) => net.start(*i).await,
            Fault::Pause(i) => net.resume(*i),
            Fault::Cut(..) => net.heal(),
        }
        tokio::time::sleep(calm).await;
    }
    net.heal();

    // Availability after the heal: until a publish through every node is confirmed.
    let healed = Instant::now();
    let mut recovered = Vec::new();
    for i in 0..nodes {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = async {
                let (conn, ch) = connect(&net.nodes[i].ip).await?;
                ch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .ok()?;
                let id = format!("probe-{i}");
                h.lock().attempted.insert(id.clone());
                let c = ch
                    .basic_publish(
                        "".into(),
                        QUEUE.into(),
                        BasicPublishOptions::default(),
                        id.as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .ok()?;
                let confirmed = matches!(
                    tokio::time::timeout(Duration::from_secs(5), c).await,
                    Ok(Ok(Confirmation::Ack(_)))
                );
                if confirmed {
                    h.lock().confirmed.insert(id);
                }
                let _ = conn.close(200, "bye".into()).await;
                confirmed.then_some(())
            };
            if ok.await.is_some() {
                recovered.push(healed.elapsed());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} did not confirm a publish within 60 s of the heal (seed {seed})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let available_after = recovered.iter().max().copied().unwrap_or_default();
    stop_publishing.store(true, Ordering::Relaxed);

    // Drain: the consumers run until nothing more arrives for 5 s and the queue is empty.
    let mut last = (usize::MAX, Instant::now());
    let drain_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let n = h.lock().received.len();
        if n != last.0 {
            last = (n, Instant::now());
        }
        let empty = match net.get(0, &format!("/api/queues/%2f/{QUEUE}")).await {
            Ok(q) => q["messages"] == 0,
            Err(_) => false,
        };
        if empty && last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
        if Instant::now() >= drain_deadline {
            let mut seen = Vec::new();
            for i in 0..nodes {
                seen.push(net.get(i, &format!("/api/queues/%2f/{QUEUE}")).await);
            }
            panic!(
                "the queue did not drain within 120 s of the heal (seed {seed}); {} received; \
                 as each node sees it: {seen:?}",
                h.lock().received.len()
            );
        }
    }
    stop_consuming.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }

    // The checker.
    let h = h.lock();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &h.received {
        *counts.entry(r.as_str()).or_default() += 1;
    }
    let lost: Vec<&String> = h
        .confirmed
        .iter()
        .filter(|c| !counts.contains_key(c.as_str()))
        .collect();
    let unexpected: Vec<&&str> = counts
        .keys()
        .filter(|r| !h.attempted.contains(**r))
        .collect();
    let duplicates = h.received.len() - counts.len();
    let unconfirmed_received = counts
        .keys()
        .filter(|r| h.nacked.contains(**r) || h.unknown.contains(**r))
        .count();
    eprintln!(
        "jepsen: seed {seed}; {} faults; attempted {}, confirmed {}, nacked {}, unknown {}, \
         returned unroutable {}; \
         received {} ({} distinct, {duplicates} duplicates, {unconfirmed_received} of them \
         unconfirmed publishes); lost {}, unexpected {}; every node confirmed again {:.1} s \
         after the heal",
        schedule.len(),
        h.attempted.len(),
        h.confirmed.len(),
        h.nacked.len(),
        h.unknown.len(),
        h.returned.len(),
        h.received.len(),
        counts.len(),
        lost.len(),
        unexpected.len(),
        available_after.as_secs_f64()
    );
    assert!(
        h.confirmed.len() > 50,
        "too few confirmed publishes to judge ({}), seed {seed}",
        h.confirmed.len()
    );
    assert!(
        lost.is_empty(),
        "{} confirmed messages lost (seed {seed}), e.g. {:?}",
        lost.len(),
        lost.iter().take(10).collect::<Vec<_>>()
    );
    assert!(
        h.returned.is_empty(),
        "{} publishes returned unroutable though the queue exists (seed {seed}), e.g. {:?}",
        h.returned.len(),
        h.returned.iter().take(10).collect::<Vec<_>>()
    );
    assert!(
        unexpected.is_empty(),
        "{} unexpected messages (seed {seed}), e.g. {:?}",
        unexpected.len(),
        unexpected.iter().take(10).collect::<Vec<_>>()
    );
}
