//! herd's WebSocket transport as an echo server, for conformance runs.
//!
//! The HTTP upgrade, the tokio-tungstenite configuration and the session
//! writer (bounded outbound queue, batched writes, close handshake) are
//! herd's own; only the broker behind them is replaced by an echo.
//!
//!     cargo run --release --example echo_server -- 127.0.0.1:9001 [MAX_FRAME_BYTES]
//!     kosoku 127.0.0.1:9001 -x '12.*' -x '13.*'
//!
//! Every limit is the broker's default except `max_frame_bytes`, which the
//! conformance cases need larger (they send messages of up to 16 MiB).

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use herd::config::Limits;
use herd::server::Handshake;
use std::sync::Arc;
use tokio_util::task::TaskTracker;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9001".into());
    let mut limits = Limits::default();
    if let Some(max) = args.next() {
        limits.max_frame_bytes = max.parse()?;
        limits.ws_max_write_buffer = limits.ws_write_buffer + 2 * limits.max_frame_bytes + 1024;
    }
    let limits = Arc::new(limits);
    let tasks = TaskTracker::new();
    let app = Router::new().fallback(any(move |mut request: Request| {
        let limits = Arc::clone(&limits);
        let tasks = tasks.clone();
        async move {
            match Handshake::check(&request) {
                Err(error) => error.into_response(),
                Ok(handshake) => {
                    let settings = Arc::clone(&limits);
                    let response: Response = handshake.accept(
                        &mut request,
                        &tasks,
                        &settings,
                        move |ws| async move { herd::server::session::echo(ws, &limits).await },
                        |error| eprintln!("upgrade failed: {error}"),
                    );
                    response
                }
            }
        }
    }));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("echo server on ws://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
