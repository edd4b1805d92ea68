//! The Rust client library against a real broker.

mod common;

use common::{config, key_of, TestServer, BASIC};
use futures::StreamExt;
use herd::client::{Client, ClientError, ClientOptions, Source, Status};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method() {
    let server = TestServer::basic().await;
    let client = Client::connect(&server.url(), None).await.unwrap();
    assert_eq!(client.hello()["type"], "hello");
    assert!(client.ping().await.unwrap() > 0);

    let input = json!({"sleep_ms": 30, "m": 1});
    let key = key_of("default", &input);
    let first = client.submit("default", input.clone()).await.unwrap();
    assert_eq!(first.key, key);
    assert_eq!(first.source, Source::Eval);
    assert_eq!(first.shared, Some(1));
    assert!(first.eval_ms.unwrap() >= 30.0);
    let again = client.submit("default", input).await.unwrap();
    assert_eq!(again.source, Source::Cache);
    assert_eq!(again.output, first.output);

    // Many calls in flight on one connection, each answered by its own id.
    let calls: Vec<_> = (0..20)
        .map(|n| {
            let c = client.clone();
            tokio::spawn(async move { c.submit("echo", json!({"n": n})).await })
        })
        .collect();
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap().output, json!({"n": n}));
    }

    let slow = json!({"sleep_ms": 300, "m": 2});
    let accepted = client.submit_nowait("default", slow.clone()).await.unwrap();
    assert!(accepted.first);
    assert_eq!(accepted.key, key_of("default", &slow));
    match client.get(&accepted.key).await.unwrap() {
        Status::Pending { state, .. } => assert!(state == "queued" || state == "running"),
        other => panic!("expected pending, got {other:?}"),
    }
    let sub = client.subscribe(&accepted.key).await.unwrap();
    assert_eq!(sub.key, accepted.key);
    assert!(matches!(
        client.get(&accepted.key).await.unwrap(),
        Status::Done(_)
    ));
    assert_eq!(
        client.get(&key_of("default", &json!(0))).await.unwrap(),
        Status::Unknown
    );

    // cancel: a subscription that is cancelled is never answered.
    let never = key_of("default", &json!({"never": true}));
    let waiting = {
        let c = client.clone();
        let k = never.clone();
        tokio::spawn(async move { c.subscribe(&k).await })
    };
    server.wait_stats(|s| s["wait_table"] == 1).await;
    client.cancel(&never).await.unwrap();
    // The wait ends at once, on both sides.
    match waiting.await.unwrap() {
        Err(ClientError::Cancelled { key }) => assert_eq!(key, never),
        other => panic!("expected Cancelled, got {other:?}"),
    }
    server.wait_stats(|s| s["wait_table"] == 0).await;

    let stream = client.watch(100).await.unwrap();
    futures::pin_mut!(stream);
    let snapshot = stream.next().await.unwrap();
    assert_eq!(snapshot["type"], "snapshot");
    assert!(snapshot["stats"]["submits"].as_u64().unwrap() >= 23);
    client.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_typed() {
    let server = TestServer::start(config(&format!(
        "{BASIC}[[evaluator]]\nfn = \"tight\"\nkind = \"simulate\"\nthreads = 1\ntimeout_ms = 100\nqueue_capacity = 1\nmax_sleep_ms = 1000\nspare_threads = 0\n"
    )))
    .await;
    let client = Client::connect(&server.url(), None).await.unwrap();
    match client
        .submit("default", json!({"fail": "boom", "sleep_ms": 1}))
        .await
    {
        Err(ClientError::EvalFailed { message, .. }) => assert_eq!(message, "boom"),
        other => panic!("{other:?}"),
    }
    match client.submit("tight", json!({"sleep_ms": 400})).await {
        Err(ClientError::EvalTimeout { .. }) => {}
        other => panic!("{other:?}"),
    }
    match client.submit("nope", json!(1)).await {
        Err(ClientError::Rejected { code, .. }) => assert_eq!(code, "unknown_fn"),
        other => panic!("{other:?}"),
    }
    // The one thread is still busy with the timed-out job; fill the queue of one.
    client
        .submit_nowait("tight", json!({"sleep_ms": 300, "q": 1}))
        .await
        .unwrap();
    match client
        .submit_nowait("tight", json!({"sleep_ms": 1, "q": 2}))
        .await
    {
        Err(ClientError::Busy(_)) => {}
        other => panic!("{other:?}"),
    }
    match Client::connect("ws://127.0.0.1:1/ws", None).await {
        Err(ClientError::Connect { .. }) => {}
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("connected to nothing"),
    }
    server.stop().await;
    match client.ping().await {
        Err(ClientError::Closed { .. }) => {}
        other => panic!("expected Closed after the broker stopped, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_across_a_restart_loses_no_request() {
    let first = TestServer::basic().await;
    let addr = first.addr;
    let client = Client::connect_with(
        &first.url(),
        ClientOptions {
            token: None,
            reconnect: true,
        },
    )
    .await
    .unwrap();
    let later = json!({"sleep_ms": 20, "after": "restart"});
    let waiting = {
        let c = client.clone();
        let k = key_of("default", &later);
        tokio::spawn(async move { c.subscribe(&k).await })
    };
    first.wait_stats(|s| s["wait_table"] == 1).await;
    first.stop().await;

    // Requests made while no broker is there wait for the next one: one
    // poll hands the request to the client's connection task.
    let during = client.submit("echo", json!({"sent": "while down"}));
    let mut during = Box::pin(during);
    assert!(futures::poll!(&mut during).is_pending());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let second = TestServer::start_on(listener, config(BASIC)).await;
    let answered = tokio::time::timeout(Duration::from_secs(10), during)
        .await
        .expect("answered after the restart")
        .unwrap();
    assert_eq!(answered.output, json!({"sent": "while down"}));

    // The subscription made before the restart was renewed with the new broker.
    let other = Client::connect(&second.url(), None).await.unwrap();
    other.submit("default", later).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("subscription answered")
        .unwrap()
        .unwrap();
    assert_eq!(got.output["key"], got.key.as_str());
    client.close().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_submit_yields_progress_then_its_result_and_a_deadline_ends_a_wait() {
    use herd::client::{SubmitOptions, Update};
    let server = TestServer::basic().await;
    let client = Client::connect(&server.url(), None).await.unwrap();
    let input = json!({"sleep_ms": 300, "progress": 3, "stream": "rust"});
    let updates: Vec<Update> = client
        .submit_stream("default", input.clone(), SubmitOptions::default())
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(updates.len(), 4, "{updates:?}");
    for (n, update) in updates.iter().take(3).enumerate() {
        let n = n as u64 + 1;
        assert_eq!(
            update,
            &Update::Progress {
                seq: n,
                data: json!({"step": n, "of": 3})
            }
        );
    }
    let Update::Done(Ok(result)) = &updates[3] else {
        panic!("{updates:?}");
    };
    assert_eq!(
        (result.source, result.key.clone()),
        (Source::Eval, key_of("default", &input))
    );
    // A cached result comes alone.
    let cached: Vec<Update> = client
        .submit_stream("default", input, SubmitOptions::default())
        .await
        .unwrap()
        .collect()
        .await;
    assert!(
        matches!(&cached[..], [Update::Done(Ok(o))] if o.source == Source::Cache),
        "{cached:?}"
    );
    // A deadline shorter than the evaluation.
    let slow = json!({"sleep_ms": 2000, "stream": "deadline"});
    let options = SubmitOptions {
        priority: Some(9),
        deadline_ms: Some(50),
    };
    let late = client.submit_with("default", slow, options).await;
    assert!(
        matches!(late, Err(ClientError::DeadlineExceeded { .. })),
        "{late:?}"
    );
    server.stop().await;
}
