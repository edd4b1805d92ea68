//! Heap allocations the broker makes per cache hit and per fan-out
//! delivery, and the heap an idle session holds, counted by a counting
//! global allocator over a real socket.
//!
//! The broker runs on a single-threaded runtime of its own, driven only
//! while a phase of the test runs, and allocations are counted per thread
//! (`allocation_counter`): the count of a measured phase is the broker's
//! alone, not the test client's. Budgets are counts, which do not depend on
//! the machine's speed.

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::mpsc;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

/// Allocations a cache hit may cost the broker: its reply's text.
const PER_HIT: u64 = 1;
/// Allocations one more subscriber of a finished key may cost: its copy of
/// the result (and its queue's share of the hub's bookkeeping).
const PER_DELIVERY: u64 = 2;
/// Allocations a measured phase may make beside those: the runtime's own,
/// and one evaluation's.
const SLACK: u64 = 64;
/// Heap bytes an idle session may hold in the broker: its task, socket,
/// queue and state, and no read or write buffer beyond its small frame
/// buffer (`limits.ws_frame_buffer`).
const PER_IDLE_SESSION: i64 = 3328;

const CONFIG: &str = r#"
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 2
"#;

/// What a counted phase made: allocations, and the heap bytes still held
/// at its end (allocated minus freed).
type Counted = (u64, i64);

/// What the broker's thread does next: run until the signal, and with a
/// sender, count the allocations made meanwhile and send the count.
type Phase = (oneshot::Receiver<()>, Option<mpsc::Sender<Counted>>);

/// A broker on a thread of its own, whose runtime runs only while a phase
/// runs; its allocations are counted in the phases that ask for it. The
/// broker stops once the phases' sender is dropped.
fn start_broker() -> (String, mpsc::Sender<Phase>, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let config = herd::Config::from_toml(CONFIG).unwrap();
    let (phases, next_phase) = mpsc::channel::<Phase>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            herd::server::run(listener, config, async move {
                let _ = stopped.await;
            })
            .await
        });
        while let Ok((until, count)) = next_phase.recv() {
            match count {
                None => {
                    let _ = runtime.block_on(until);
                }
                Some(count) => {
                    let info = allocation_counter::measure(|| {
                        let _ = runtime.block_on(until);
                    });
                    count.send((info.count_total, info.bytes_current)).unwrap();
                }
            }
        }
        let _ = stop.send(());
        runtime.block_on(server).unwrap().unwrap();
    });
    (url, phases, thread)
}

/// Starts a phase; the returned sender ends it.
fn phase(
    phases: &mpsc::Sender<Phase>,
    count: Option<mpsc::Sender<Counted>>,
) -> oneshot::Sender<()> {
    let (end, until) = oneshot::channel();
    phases.send((until, count)).unwrap();
    end
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(next(&mut ws).await["type"], "hello");
    ws
}

async fn next(ws: &mut Ws) -> Value {
    loop {
        match ws.next().await.expect("open").expect("frame") {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn submit(id: u64) -> Message {
    let input = json!({"prompt": "x".repeat(500), "n": 7});
    Message::text(json!({"op": "submit", "id": id, "input": input}).to_string())
}

/// Sends `batches` batches of `depth` submits of one cached input, each in
/// one write, and reads every reply.
async fn hits(ws: &mut Ws, batches: u64, depth: u64) {
    for b in 0..batches {
        for i in 0..depth {
            ws.feed(submit(b * depth + i)).await.unwrap();
        }
        ws.flush().await.unwrap();
        for _ in 0..depth {
            let reply = next(ws).await;
            assert_eq!(reply["type"], "result", "{reply}");
            assert_eq!(reply["source"], "cache", "{reply}");
        }
    }
}

/// Runs `test` on a client runtime of its own against a broker started for
/// it (its URL, and the sender of its phases, which `test` drops when it
/// ends), then waits for the broker to stop.
fn with_broker<F, Fut>(test: F)
where
    F: FnOnce(String, mpsc::Sender<Phase>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (url, phases, broker) = start_broker();
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    client.block_on(test(url, phases));
    broker.join().unwrap();
}

#[test]
fn a_cache_hit_and_a_fan_out_delivery_allocate_within_budget() {
    with_broker(|url, phases| async move {
        let warm = phase(&phases, None);
        let mut ws = connect(&url).await;
        // The first submit evaluates; the hits after it warm the key memo,
        // the socket's buffers and the cache.
        ws.send(submit(0)).await.unwrap();
        while next(&mut ws).await["type"] != "result" {}
        hits(&mut ws, 20, 16).await;

        let (count, counted) = mpsc::channel();
        let measured = phase(&phases, Some(count));
        warm.send(()).unwrap();
        let (batches, depth) = (200, 16);
        hits(&mut ws, batches, depth).await;
        let setup = phase(&phases, None);
        measured.send(()).unwrap();
        let n = batches * depth;
        let (allocations, _) = counted.recv().unwrap();
        println!("{allocations} allocations for {n} hits");
        assert!(
            allocations <= PER_HIT * n + SLACK,
            "{allocations} allocations for {n} hits: more than {PER_HIT} per hit"
        );

        // Fan-out: subscribers of a key nobody has submitted yet, then one
        // submit; counted from the submit to the last subscriber's result.
        let subscribers = 200u64;
        let input = json!({"fan": "out"});
        let key =
            herd::Key::derive("default", herd::key::canonical_json(&input).as_bytes()).to_hex();
        let mut sessions = Vec::new();
        for i in 0..subscribers {
            let mut s = connect(&url).await;
            s.send(Message::text(
                json!({"op": "subscribe", "id": i, "key": key}).to_string(),
            ))
            .await
            .unwrap();
            assert_eq!(next(&mut s).await["type"], "subscribed");
            sessions.push(s);
        }
        let (count, counted) = mpsc::channel();
        let measured = phase(&phases, Some(count));
        setup.send(()).unwrap();
        ws.send(Message::text(
            json!({"op": "submit", "id": "fan", "input": input}).to_string(),
        ))
        .await
        .unwrap();
        while next(&mut ws).await["type"] != "result" {}
        for s in &mut sessions {
            let result = next(s).await;
            assert_eq!(result["type"], "result", "{result}");
        }
        let close = phase(&phases, None);
        measured.send(()).unwrap();
        let (allocations, _) = counted.recv().unwrap();
        println!(
            "{allocations} allocations for one evaluation delivered to {subscribers} subscribers"
        );
        assert!(
            allocations <= PER_DELIVERY * subscribers + SLACK,
            "{allocations} allocations for {subscribers} deliveries: more than {PER_DELIVERY} each"
        );
        for s in &mut sessions {
            let _ = s.close(None).await;
        }
        let _ = ws.close(None).await;
        close.send(()).unwrap();
    });
}

#[test]
fn an_idle_session_holds_no_read_or_write_buffer() {
    with_broker(|url, phases| async move {
        // A first session, so that the broker's tables and its thread's
        // lent read buffer exist before the count starts.
        let warm = phase(&phases, None);
        let mut first = connect(&url).await;
        let (count, counted) = mpsc::channel();
        let measured = phase(&phases, Some(count));
        warm.send(()).unwrap();
        let n = 200;
        let mut sessions = Vec::new();
        for _ in 0..n {
            sessions.push(connect(&url).await);
        }
        // Every session has written its hello and waits for its client.
        let close = phase(&phases, None);
        measured.send(()).unwrap();
        let (_, held) = counted.recv().unwrap();
        let per_session = held / n;
        println!("{held} heap bytes held by {n} idle sessions: {per_session} each");
        assert!(
            per_session <= PER_IDLE_SESSION,
            "an idle session holds {per_session} heap bytes, more than {PER_IDLE_SESSION}"
        );
        for s in &mut sessions {
            let _ = s.close(None).await;
        }
        let _ = first.close(None).await;
        close.send(()).unwrap();
    });
}
