//! Results that stay true: `invalidate` by key and by fn, the admin role,
//! an evaluation under way when its result is dropped, `max_age_ms` and
//! `age_ms`, over real sockets.

mod common;

use common::{config, key_of, Client, TestServer, BASIC};
use serde_json::{json, Value};

/// Submits with `extra` members and returns the request's last answer.
async fn submit(c: &mut Client, id: &str, extra: Value) -> Value {
    let mut op = json!({"op": "submit", "id": id});
    for (k, v) in extra.as_object().unwrap() {
        op[k] = v.clone();
    }
    c.send(op).await;
    loop {
        let f = c.recv().await;
        if f["id"] == id && f["type"] != "accepted" {
            return f;
        }
    }
}

#[tokio::test]
async fn an_invalidated_key_is_evaluated_again_and_others_stay_cached() {
    let server = TestServer::start(config(BASIC)).await;
    let mut c = server.client().await;
    let (a, b) = (json!({"inv": "a"}), json!({"inv": "b"}));
    for (id, input) in [("1", &a), ("2", &b)] {
        let r = submit(&mut c, id, json!({"input": input})).await;
        assert_eq!(r["source"], "eval", "{r}");
        assert!(r.get("age_ms").is_none(), "a fresh result has no age: {r}");
    }
    let r = submit(&mut c, "3", json!({"input": a})).await;
    assert_eq!(r["source"], "cache", "{r}");
    assert!(r["age_ms"].is_u64(), "a cached result says its age: {r}");

    let key = key_of("default", &a);
    let r = c
        .request(json!({"op": "invalidate", "id": 4, "key": key}))
        .await;
    assert_eq!(r, json!({"type": "invalidated", "id": 4, "key": key}));
    let r = c.request(json!({"op": "get", "id": 5, "key": key})).await;
    assert_eq!(r["state"], "unknown", "{r}");
    let r = submit(&mut c, "6", json!({"input": a})).await;
    assert_eq!(r["source"], "eval", "{r}");
    let r = submit(&mut c, "7", json!({"input": b})).await;
    assert_eq!(r["source"], "cache", "the other key stays: {r}");
    assert_eq!(server.settled_stats().await["evaluations"], 3);
    server.stop().await;
}

#[tokio::test]
async fn invalidating_a_fn_drops_all_its_results_and_no_other_fn_s() {
    let server = TestServer::start(config(BASIC)).await;
    let mut c = server.client().await;
    for n in 0..3 {
        let r = submit(&mut c, &format!("d{n}"), json!({"input": {"n": n}})).await;
        assert_eq!(r["source"], "eval", "{r}");
    }
    let r = submit(&mut c, "e", json!({"fn": "echo", "input": "kept"})).await;
    assert_eq!(r["source"], "eval", "{r}");
    let r = c
        .request(json!({"op": "invalidate", "id": "f", "fn": "default"}))
        .await;
    assert_eq!(
        r,
        json!({"type": "invalidated", "id": "f", "fn": "default"})
    );
    for n in 0..3 {
        let r = submit(&mut c, &format!("again{n}"), json!({"input": {"n": n}})).await;
        assert_eq!(r["source"], "eval", "{r}");
    }
    let r = submit(&mut c, "e2", json!({"fn": "echo", "input": "kept"})).await;
    assert_eq!(r["source"], "cache", "{r}");
    let r = c
        .request(json!({"op": "invalidate", "id": "x", "fn": "nope"}))
        .await;
    assert_eq!(r["code"], "unknown_fn", "{r}");
    server.stop().await;
}

#[tokio::test]
async fn an_evaluation_under_way_is_delivered_but_not_kept() {
    let server = TestServer::start(config(BASIC)).await;
    let mut c = server.client().await;
    let input = json!({"sleep_ms": 400, "inv": "inflight"});
    let key = key_of("default", &input);
    c.send(json!({"op": "submit", "id": "w", "input": input}))
        .await;
    assert_eq!(c.recv_type("accepted").await["id"], "w");
    server.wait_inflight(&key, "running").await;
    let mut admin = server.client().await;
    let r = admin
        .request(json!({"op": "invalidate", "id": 1, "key": key}))
        .await;
    assert_eq!(r["type"], "invalidated", "{r}");
    let r = c.recv_type("result").await;
    assert_eq!(
        (r["id"].as_str(), r["source"].as_str()),
        (Some("w"), Some("eval"))
    );
    let r = submit(&mut c, "again", json!({"input": input})).await;
    assert_eq!(r["source"], "eval", "the dropped result was not kept: {r}");
    server.stop().await;
}

#[tokio::test]
async fn max_age_ms_refuses_an_older_result_and_joins_a_fresh_evaluation() {
    let server = TestServer::start(config(BASIC)).await;
    let mut c = server.client().await;
    let input = json!({"sleep_ms": 300, "inv": "max_age"});
    let key = key_of("default", &input);
    assert_eq!(
        submit(&mut c, "1", json!({"input": input})).await["source"],
        "eval"
    );
    let r = submit(&mut c, "2", json!({"input": input, "max_age_ms": 600_000})).await;
    assert_eq!(r["source"], "cache", "young enough: {r}");
    // No cached result is 0 ms old: two such submits share one evaluation.
    let mut other = server.client().await;
    c.send(json!({"op": "submit", "id": "3", "input": input, "max_age_ms": 0}))
        .await;
    let a = c.recv_type("accepted").await;
    assert_eq!(a["first"], true, "{a}");
    server.wait_inflight(&key, "running").await;
    other
        .send(json!({"op": "submit", "id": "4", "input": input, "max_age_ms": 0}))
        .await;
    let a = other.recv_type("accepted").await;
    assert_eq!(a["first"], false, "it joins the fresh evaluation: {a}");
    for (client, id) in [(&mut c, "3"), (&mut other, "4")] {
        let r = client.recv_type("result").await;
        assert_eq!(
            (r["id"].as_str(), r["source"].as_str()),
            (Some(id), Some("eval")),
            "{r}"
        );
        assert_eq!(r["shared"], 2, "{r}");
    }
    assert_eq!(server.settled_stats().await["evaluations"], 2);
    let r = c
        .request(json!({"op": "submit", "id": 5, "input": input, "max_age_ms": -1}))
        .await;
    assert_eq!(r["code"], "bad_request", "{r}");
    server.stop().await;
}

#[tokio::test]
async fn only_an_admin_may_invalidate() {
    let toml = format!(
        "{BASIC}[[token]]\nname = \"ops\"\nrole = \"admin\"\nsecret = \"admin-secret\"\n[[token]]\nname = \"a\"\nrole = \"agent\"\nsecret = \"agent-secret\"\n"
    );
    let server = TestServer::start(config(&toml)).await;
    let url = server.url();
    let key = "0".repeat(32);
    let mut agent = Client::connect(&format!("{url}?token=agent-secret")).await;
    let r = agent
        .request(json!({"op": "invalidate", "id": 1, "key": key}))
        .await;
    assert_eq!(r["code"], "forbidden", "{r}");
    let mut admin = Client::connect(&format!("{url}?token=admin-secret")).await;
    assert_eq!(admin.hello["role"], "admin");
    let r = admin
        .request(json!({"op": "submit", "id": 2, "fn": "echo", "input": 1}))
        .await;
    assert_eq!(r["type"], "accepted", "an admin is an agent too: {r}");
    admin.recv_type("result").await;
    let r = admin
        .request(json!({"op": "invalidate", "id": 3, "key": key}))
        .await;
    assert_eq!(r["type"], "invalidated", "{r}");
    for bad in [
        json!({"op": "invalidate", "id": 4}),
        json!({"op": "invalidate", "id": 5, "key": key, "fn": "echo"}),
        json!({"op": "invalidate", "id": 6, "key": "xyz"}),
    ] {
        assert_eq!(admin.request(bad).await["code"], "bad_request");
    }
    server.stop().await;
}
