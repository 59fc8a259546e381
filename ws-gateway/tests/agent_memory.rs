//! Memory the gateway holds per connection while a malicious agent sends the largest messages
//! the protocol allows (64 KiB snapshot chunks) without end to a client that does not read, measured with a counting allocator around the in-process gateway
//! (this file's only test, so nothing else allocates meanwhile).
// The counting allocator is the one `unsafe` here: it forwards to the system allocator.
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use tether_gateway::index::Index;
use tether_protocol::frame::Start;
use tether_protocol::{ClientFrame, ClientId, MAX_SNAPSHOT, Mode, ServerFrame, Size};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MIB: usize = 1 << 20;

/// An agent that answers `OPEN` with `WELCOME start=2` and a `SNAPSHOT` chunk of the largest size
/// the protocol allows, then sends such snapshots (each a valid catch-up) as fast as it can.
async fn flooding_agent() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut snapshot = ServerFrame::Snapshot(tether_protocol::frame::SnapshotFrame {
        offset: 0,
        size: Size::default(),
        more: false,
        truncated: false,
        data: Default::default(),
    })
    .encode();
    snapshot.resize(14 + MAX_SNAPSHOT, b'x');
    // One WebSocket message, written raw from one shared buffer: the agent holds no copy per
    // connection, so what this process allocates per connection is the gateway's.
    let mut head = vec![0x82u8, 127];
    head.extend_from_slice(&(snapshot.len() as u64).to_be_bytes());
    let head = bytes::Bytes::from(head);
    let snapshot = bytes::Bytes::from(snapshot);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (snapshot, head) = (snapshot.clone(), head.clone());
            tokio::spawn(async move {
                let Some(mut ws) = accept_as_agent(stream).await else {
                    return;
                };
                let _open = ws.next().await;
                let welcome = ServerFrame::Welcome {
                    client_id: ClientId::random(),
                    mode: Mode::Attach,
                    window: 1 << 20,
                    offset: 0,
                    start: Start::Snapshot,
                }
                .encode();
                let _ = ws.send(Message::binary(welcome)).await;
                use tokio::io::AsyncWriteExt;
                let raw = ws.get_mut();
                while raw.write_all(&head).await.is_ok() && raw.write_all(&snapshot).await.is_ok() {
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_and_a_client_that_does_not_read_hold_bounded_memory() {
    let agent = flooding_agent().await;
    let idx = Index::shared();
    {
        let mut i = idx.write().unwrap();
        i.relist_begin();
        i.relist_apply(&ready_session(NS, SESSION, SESSION_UID, &agent.to_string()));
        i.relist_done();
    }
    let gw = TestGateway::start_with(Options {
        flags: vec!["--max-connections-per-user=64".into()],
        index: Some(idx),
        ..Default::default()
    })
    .await;
    const CONNECTIONS: usize = 4;
    // The agent's one shared snapshot is allocated already; from here on, what grows is the
    // gateway's (and a few KiB of test sockets).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = CURRENT.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let (mut ws, _) = gw
            .ws(&format!("/ws/{NS}/{SESSION}"), Some(ORIGIN), Some(ALICE))
            .await
            .expect("upgrade");
        send(
            &mut ws,
            ClientFrame::Open {
                size: Size::default(),
            }
            .encode(),
        )
        .await;
        // Never read again.
        clients.push(ws);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peak = PEAK.load(Ordering::Relaxed);
    let held = CURRENT.load(Ordering::Relaxed);
    let per_connection_peak = peak.saturating_sub(baseline) / CONNECTIONS;
    eprintln!(
        "baseline {:.1} MiB, peak {:.1} MiB, now {:.1} MiB, peak growth per connection {:.1} MiB",
        baseline as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        held as f64 / MIB as f64,
        per_connection_peak as f64 / MIB as f64
    );
    let per_connection_held = held.saturating_sub(baseline) / CONNECTIONS;
    // The bound by design: one message of the protocol's largest (a 64 KiB SNAPSHOT chunk) in
    // the client's write buffer, plus the agent socket's read buffer, which keeps the capacity
    // that message needed; everything else is small. The gateway reads the agent no faster than
    // the client takes messages, so nothing grows with how long the agent keeps sending.
    let bound = 2 * tether_protocol::MAX_SERVER_FRAME + MIB;
    assert!(
        per_connection_held < bound,
        "{per_connection_held} bytes held per connection"
    );
    assert!(
        per_connection_peak < bound,
        "{per_connection_peak} bytes at the peak per connection"
    );
    // Still connected: the bound is not had by dropping the connections.
    assert_eq!(gw.gw.conns.count("alice"), CONNECTIONS);
    drop(clients);
}
