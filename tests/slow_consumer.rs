//! A client that never reads: closed with 4001 (its write deadline), the
//! broker's memory bounded meanwhile.
//! In a file of its own so that no other test shares the process whose
//! memory it measures.

mod common;

use common::{config, TestServer, BASIC};
use futures::SinkExt;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_with_4001_in_bounded_memory() {
    let server = TestServer::start(config(&format!(
        "[limits]\noutbound_queue = 64\nwrite_timeout_ms = 1000\n{BASIC}"
    )))
    .await;
    let mut c = server.client().await;
    let input = json!({"sleep_ms": 0, "output_bytes": 65536});
    c.send(json!({"op": "submit", "input": input})).await;
    c.recv_type("result").await;
    let rss_before = rss_kib();
    // Each request is a cache hit answered with ~64 KiB: 2,000 of them would be
    // 128 MiB if the broker buffered everything for a client that never reads.
    let request = json!({"op": "submit", "input": input}).to_string();
    for _ in 0..2000 {
        if c.ws
            .feed(tokio_tungstenite::tungstenite::Message::text(
                request.clone(),
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = c.ws.flush().await;
    // Its replies wait for room (its requests are no longer read), and the
    // write the broker cannot finish ends the session.
    server
        .wait_metric("herd_closes_total{code=\"4001\"}", |v| v == 1.0)
        .await;
    let grown_mib = (rss_kib().saturating_sub(rss_before)) / 1024;
    assert!(grown_mib < 64, "memory grew by {grown_mib} MiB");
    // Mid-frame, no close frame can follow: the stream just ends.
    if let Some(frame) = c.recv_close().await {
        assert_eq!(u16::from(frame.code), 4001);
    }
    drop(c);
    server.wait_metric("herd_connections", |v| v == 0.0).await;
    let mut other = server.client().await;
    assert_eq!(other.request(json!({"op": "ping"})).await["type"], "pong");
    server.stop().await;
}

fn rss_kib() -> u64 {
    herd::client::bench::rss_kib(std::process::id()).expect("VmRSS of this process")
}
