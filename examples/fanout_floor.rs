//! The kernel's floor under S4 (`herd bench fanout`): one small frame sent
//! to each of many loopback TCP connections, one `send` per connection,
//! with nothing but a blocking write loop behind it and a reader draining
//! every connection on another thread. What herd's fan-out costs beyond
//! this is herd's own; the rest is the loopback send path, which also runs
//! the receiver's side of TCP on the sender's core.
//!
//!     cargo build --release --example fanout_floor
//!     taskset -c 0,1 ./target/release/examples/fanout_floor 10000 160
//!
//! Arguments: connections (10000) and frame bytes (160, about a `result`
//! frame of the fan-out benchmark). Prints the sender's loop time and the
//! last arrival, both from the first send.

use std::io::Write;
use std::net::TcpListener;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let connections: usize = args
        .next()
        .map_or(10_000, |a| a.parse().expect("connections"));
    let frame_bytes: usize = args.next().map_or(160, |a| a.parse().expect("frame bytes"));
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (start_tx, start_rx) = std::sync::mpsc::channel::<Instant>();
    let reader = std::thread::spawn(move || -> std::io::Result<Duration> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let mut streams = Vec::with_capacity(connections);
            for _ in 0..connections {
                streams.push(tokio::net::TcpStream::connect(addr).await?);
            }
            ready_tx.send(()).expect("sender waits");
            let readers: Vec<_> = streams
                .into_iter()
                .map(|mut stream| {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; frame_bytes];
                        stream.read_exact(&mut buf).await.map(|_| Instant::now())
                    })
                })
                .collect();
            let mut last = None;
            for reader in readers {
                let at = reader.await.expect("reader task")?;
                last = last.max(Some(at));
            }
            let start = start_rx.recv().expect("start time");
            Ok(last.expect("one connection at least") - start)
        })
    });
    let mut accepted = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        accepted.push(stream);
    }
    ready_rx.recv().expect("reader connects");
    let frame = vec![b'x'; frame_bytes];
    let start = Instant::now();
    for stream in &mut accepted {
        stream.write_all(&frame)?;
    }
    let sent = start.elapsed();
    start_tx.send(start).expect("reader waits");
    let last = reader.join().expect("reader thread")?;
    println!("connections  {connections}");
    println!("frame_bytes  {frame_bytes}");
    println!("send_loop_ms {:.1}", sent.as_secs_f64() * 1000.0);
    println!("last_ms      {:.1}", last.as_secs_f64() * 1000.0);
    Ok(())
}
