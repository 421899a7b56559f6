//! Free loopback ports for processes a test starts later, shared by the broker's tests
//! (`common/node.rs`) and the e2e crate (`e2e/src/lib.rs`, through `#[path]`).

/// A free TCP port on loopback. Not `bind(0)`: those ports are in the kernel's ephemeral
/// range, where the next `bind(0)` or any outgoing connection (such as a node dialling its
/// peers) may take the same port before our process listens on it. Ports come from
/// 20000..32768 instead, each bound once to check it is free and never handed out twice by
/// this process (the start point depends on the process id, so concurrent test binaries
/// start far apart).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_768;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(2_654_435_761)) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32768")
}
