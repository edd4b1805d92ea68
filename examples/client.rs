//! Using herd's Rust client: many identical requests, one evaluation.
//!
//! Start a broker (`cargo run --release -- serve`), then:
//!
//!     cargo run --example client
//!
//! Set HERD_URL / HERD_TOKEN to reach another broker.

use herd::client::{Client, ClientOptions, Source};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("HERD_URL").unwrap_or_else(|_| "ws://127.0.0.1:7878/ws".into());
    let client = Client::connect_with(
        &url,
        ClientOptions {
            token: std::env::var("HERD_TOKEN").ok(),
            // Survive a broker restart: waiting requests are sent again.
            reconnect: true,
        },
    )
    .await?;

    // Ten identical submits in flight at once share one evaluation.
    let input = json!({"question": "what is six times seven", "sleep_ms": 200});
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let client = client.clone();
            let input = input.clone();
            tokio::spawn(async move { client.submit("default", input).await })
        })
        .collect();
    for call in calls {
        let result = call.await??;
        match result.shared {
            Some(shared) => println!("{} evaluated, shared by {shared} waiters", result.key),
            None => println!("{} from the cache", result.key),
        }
    }

    // The next one is answered from the cache.
    let cached = client.submit("default", input).await?;
    assert_eq!(cached.source, Source::Cache);
    println!("cached: {}", cached.output);
    client.close().await;
    Ok(())
}
