//! The wire contract (docs/protocol.md), frame by frame, run once against a single node with the
//! in-process backplane and once against two nodes sharing a private Redis: one suite, two
//! backplanes. Clients of a Redis cluster are spread over both nodes.

mod support;

use futures_util::{SinkExt, StreamExt};
use gateway_client::{Client, ClientError, ErrorCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use support::{Backend, Cluster, RawSocket, fresh_channel, within};
use tokio_tungstenite::tungstenite::Message;

/// Generates one `#[tokio::test]` per backplane for each contract test.
macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Memory).await })*
        }
        mod redis {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Redis).await })*
        }
    };
}

contract_tests!(
    subscribe_publish_ping_replies_echo_the_id,
    commands_without_id_get_no_reply_but_still_work,
    publisher_receives_its_own_message_and_others_do_too,
    many_messages_arrive_in_publish_order_on_every_subscriber,
    a_subscribes_ok_comes_before_the_channels_first_message,
    websocket_pings_get_their_pongs_between_messages,
    channels_are_isolated,
    unsubscribe_stops_delivery_and_repeats_are_ok,
    every_bad_input_gets_its_error_and_the_socket_keeps_serving,
    an_oversized_frame_closes_with_1009_and_others_carry_on,
    http_publish_answers_ok_and_json_errors,
    metrics_move_with_traffic,
);

async fn subscribe_publish_ping_replies_echo_the_id(backend: Backend) {
    let cluster = Cluster::start(backend, &[]).await;
    let mut raw = RawSocket::connect(&cluster.any_node().ws_url()).await;
    let channel = fresh_channel("ids");
    raw.send_json(json!({"type": "subscribe", "channel": channel, "id": "sub-1"})).await;
    assert_eq!(raw.recv_json().await, json!({"type": "ok", "id": "sub-1"}));
    raw.send_json(json!({"type": "ping", "id": 4})).await;
    assert_eq!(raw.recv_json().await, json!({"type": "pong", "id": 4}));
    raw.send_json(json!({"type": "publish", "channel": channel, "data": {"text": "hi"}, "id": 3.5})).await;
    // The ok and our own message may come in either order.
    let (a, b) = (raw.recv_json().await, raw.recv_json().await);
    let mut got = [a, b];
    got.sort_by_key(|v| v["type"].as_str().map(str::to_owned));
    assert_eq!(got[0], json!({"type": "message", "channel": channel, "data": {"text": "hi"}}));
    assert_eq!(got[1], json!({"type": "ok", "id": 3.5}));
}

async fn commands_without_id_get_no_reply_but_still_work(backend: Backend) {
    let cluster = Cluster::start(backend, &[]).await;
    let mut raw = RawSocket::connect(&cluster.any_node().ws_url()).await;
    let channel = fresh_channel("noid");
    raw.send_json(json!({"type": "subscribe", "channel": channel})).await;
    raw.send_json(json!({"type": "ping"})).await;
    raw.send_json(json!({"type": "ping", "id": null})).await;
    // The next frame must be the pong for id 7: nothing was sent for the commands without id.
    raw.send_json(json!({"type": "ping", "id": 7})).await;
    assert_eq!(raw.recv_json().await, json!({"type": "pong", "id": 7}));
    let publisher = cluster.client().await;
    publisher.publish_json(&channel, &json!(1)).await.expect("publish");
    assert_eq!(raw.recv_json().await, json!({"type": "message", "channel": channel, "data": 1}));
}

async fn publisher_receives_its_own_message_and_others_do_too(backend: Backend) {
    let cluster = Cluster::start(backend, &[]).await;
    let channel = fresh_channel("own");
    let (alice, bob) = (cluster.client().await, cluster.client().await);
    let mut alice_sub = alice.subscribe(&channel).await.expect("subscribe");
    let mut bob_sub = bob.subscribe(&channel).await.expect("subscribe");
    alice.publish_json(&channel, &json!({"from": "alice"})).await.expect("publish");
    for sub in [&mut alice_sub, &mut bob_sub] {
        let message = within("delivery", sub.recv()).await.expect("a message");
        assert_eq!((message.channel.as_str(), message.data_json()), (channel.as_str(), json!({"from": "alice"})));
    }
}

async fn many_messages_arrive_in_publish_order_on_every_subscriber(backend: Backend) {
    let cluster = Cluster::start(backend, &[]).await;
    let channel = fresh_channel("order");
    let mut subscriptions = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let client = cluster.client().await;
        subscriptions.push(client.subscribe(&channel).await.expect("subscribe"));
        clients.push(client);
    }
    let publisher = cluster.client().await;
    const N: u64 = 2000;
    let raw_publisher = RawSocket::connect(&cluster.any_node().ws_url()).await;
    drop(raw_publisher);
    // Pipelined without waiting for answers, in bursts below the 1024-frame outgoing queue: this
    // test is about order; a burst beyond the queue closes a subscriber that cannot write it out
    // as fast (slow consumer, see lifecycle.rs), which depends on the machine's speed.
    const BURST: u64 = 500;
    for start in (0..N).step_by(BURST as usize) {
        for i in start..start + BURST {
            let data = serde_json::value::RawValue::from_string(i.to_string()).expect("raw");
            publisher.publish_nowait(&channel, &data).await.expect("publish");
        }
        for sub in &mut subscriptions {
            for expected in start..start + BURST {
                let message = within("ordered delivery", sub.recv()).await.expect("a message");
                assert_eq!(message.data_json(), json!(expected));
            }
        }
    }
}

/// While a channel is flooded, a new subscriber (on a node that has no subscriber yet, for
/// Redis: the window between SUBSCRIBE and its confirmation) gets its `ok` before any message.
async fn a_subscribes_ok_comes_before_the_channels_first_message(backend: Backend) {
    // A queue deep enough that no reader of this test falls a queue behind (slow consumer).
    let unlimited = ["--publish-rate", "1000000", "--publish-burst", "1000000", "--queue-size", "1000000"];
    let cluster = Cluster::start(backend, &unlimited).await;
    for round in 0..20u64 {
        let channel = fresh_channel("ok-first");
        let publisher_node = cluster.any_node();
        let mut watcher = RawSocket::connect(&publisher_node.ws_url()).await;
        watcher.subscribe(&channel).await;
        let mut publisher = RawSocket::connect(&publisher_node.ws_url()).await;
        let stop = Arc::new(AtomicBool::new(false));
        let flood = tokio::spawn({
            let (stop, channel) = (stop.clone(), channel.clone());
            async move {
                for i in 0..500_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    publisher.send_json(json!({"type": "publish", "channel": channel, "data": i})).await;
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }
        });
        assert_eq!(watcher.recv_json().await["type"], "message", "the flood is on");
        drop(watcher);

        let mut subscriber = RawSocket::connect(&cluster.any_node().ws_url()).await;
        subscriber.send_json(json!({"type": "subscribe", "channel": channel, "id": round})).await;
        assert_eq!(subscriber.recv_json().await, json!({"type": "ok", "id": round}));
        let message = subscriber.recv_json().await;
        assert_eq!((&message["type"], &message["channel"]), (&json!("message"), &json!(channel)));
        stop.store(true, Ordering::Relaxed);
        within("the flood to stop", flood).await.expect("the publishing task");
    }
}

/// Pongs (written by the WebSocket layer) and messages (written from shared, pre-encoded bytes)
/// share one connection: every ping gets its pong, and every message arrives whole and in order.
async fn websocket_pings_get_their_pongs_between_messages(backend: Backend) {
    let cluster = Cluster::start(backend, &[]).await;
    let channel = fresh_channel("pings");
    let mut raw = RawSocket::connect(&cluster.any_node().ws_url()).await;
    raw.subscribe(&channel).await;
    let publisher = cluster.client().await;
    const ROUNDS: u64 = 20;
    const PER_ROUND: u64 = 50;
    for round in 0..ROUNDS {
        for i in 0..PER_ROUND {
            let data = serde_json::value::RawValue::from_string((round * PER_ROUND + i).to_string()).expect("raw");
            publisher.publish_nowait(&channel, &data).await.expect("publish");
        }
        raw.inner().send(Message::Ping(round.to_be_bytes().to_vec().into())).await.expect("send a ping");
    }
    let (mut next, mut pongs) = (0, Vec::new());
    while next < ROUNDS * PER_ROUND || pongs.len() < ROUNDS as usize {
        match within("messages and pongs", raw.inner().next()).await {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).expect("a whole JSON frame");
                assert_eq!((&frame["type"], &frame["data"]), (&json!("message"), &json!(next)), "{frame}");
                next += 1;
            }
            Some(Ok(Message::Pong(payload))) => {
                pongs.push(u64::from_be_bytes(payload[..].try_into().expect("the ping's 8 bytes")));
            }
            other => panic!("expected messages and pongs, got {other:?}"),
        }
    }
    assert_eq!(pongs, (0..ROUNDS).collect::<Vec<_>>());
}

async fn channels_are_isolated(backend: Backend) {
    let cluster = Cluster::start(backend, &[]).await;
    let (a, b) = (fresh_channel("iso-a"), fresh_channel("iso-b"));
    let client = cluster.client().await;
    let mut sub_a = client.subscribe(&a).await.expect("subscribe a");
    let publisher = cluster.client().await;
    publisher.publish_json(&b, &json!("for b")).await.expect("publish b");
    publisher.publish_json(&a, &json!("for a")).await.expect("publish a");
    let first = within("delivery on a", sub_a.recv()).await.expect("a message");
    assert_eq!(first.data_json(), json!("for a"), "a message published on another channel arrived");
}

async fn unsubscribe_stops_delivery_and_repeats_are_ok(backend: Backend) {
    let cluster = Cluster::start(backend, &[]).await;
    let mut raw = RawSocket::connect(&cluster.any_node().ws_url()).await;
    let channel = fresh_channel("unsub");
    let sub = json!({"type": "subscribe", "channel": channel});
    let unsub = json!({"type": "unsubscribe", "channel": channel});
    assert_eq!(raw.command(sub.clone(), 1).await["type"], "ok");
    assert_eq!(raw.command(sub, 2).await["type"], "ok", "subscribing twice is ok");
    assert_eq!(raw.command(unsub.clone(), 3).await["type"], "ok");
    assert_eq!(raw.command(unsub, 4).await["type"], "ok", "unsubscribing from a channel not held is ok");
    let publisher = cluster.client().await;
    publisher.publish_json(&channel, &json!("after unsubscribe")).await.expect("publish");
    // Round trip on the same socket: had the message been routed here, it would come first.
    assert_eq!(raw.command(json!({"type": "ping"}), 5).await, json!({"type": "pong", "id": 5}));
}

async fn every_bad_input_gets_its_error_and_the_socket_keeps_serving(backend: Backend) {
    let cluster = Cluster::start(backend, &[]).await;
    let mut raw = RawSocket::connect(&cluster.any_node().ws_url()).await;
    let cases: Vec<(&str, Value)> = vec![
        ("{not json", json!({"code": "bad_request"})),
        ("[1,2]", json!({"code": "bad_request"})),
        (r#"{"type":"dance","id":1}"#, json!({"code": "bad_request", "id": 1})),
        (r#"{"channel":"a","id":2}"#, json!({"code": "bad_request", "id": 2})),
        (r#"{"type":"subscribe","id":3}"#, json!({"code": "bad_request", "id": 3})),
        (r#"{"type":"publish","channel":"a","id":"p"}"#, json!({"code": "bad_request", "id": "p"})),
        (r#"{"type":"subscribe","channel":"no spaces","id":5}"#, json!({"code": "bad_channel", "id": 5})),
        (r#"{"type":"subscribe","channel":"","id":6}"#, json!({"code": "bad_channel", "id": 6})),
        (r#"{"type":"publish","channel":"x*","data":1,"id":7}"#, json!({"code": "bad_channel", "id": 7})),
        (r#"{"type":"ping","id":{"nested":true}}"#, json!({"code": "bad_request"})),
    ];
    for (input, expected) in cases {
        raw.send(input).await;
        let reply = raw.recv_json().await;
        assert_eq!(reply["type"], "error", "{input} -> {reply}");
        assert_eq!(reply["code"], expected["code"], "{input} -> {reply}");
        assert_eq!(reply.get("id"), expected.get("id"), "{input} -> {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()), "{input} -> {reply}");
    }
    let long = "a".repeat(256);
    raw.send_json(json!({"type": "subscribe", "channel": long, "id": 8})).await;
    assert_eq!(raw.recv_json().await["code"], "bad_channel");
    raw.send_binary(vec![1, 2, 3]).await;
    let reply = raw.recv_json().await;
    assert_eq!((reply["type"].as_str(), reply["code"].as_str()), (Some("error"), Some("bad_request")));
    assert_eq!(raw.command(json!({"type": "ping"}), 9).await, json!({"type": "pong", "id": 9}), "still serving");
}

async fn an_oversized_frame_closes_with_1009_and_others_carry_on(backend: Backend) {
    let cluster = Cluster::start(backend, &["--max-message-size", "1024"]).await;
    let channel = fresh_channel("big");
    let bystander = cluster.client().await;
    let mut sub = bystander.subscribe(&channel).await.expect("subscribe");
    let mut raw = RawSocket::connect(&cluster.any_node().ws_url()).await;
    let big = json!({"type": "publish", "channel": channel, "data": "x".repeat(2000)});
    raw.send_json(big).await;
    let closed = raw.recv_close().await;
    assert_eq!(closed.map(|c| c.0), Some(1009));
    bystander.publish_json(&channel, &json!("small")).await.expect("the node still serves");
    assert_eq!(within("delivery", sub.recv()).await.expect("message").data_json(), json!("small"));
}

async fn http_publish_answers_ok_and_json_errors(backend: Backend) {
    let cluster = Cluster::start(backend, &["--api-key", "s3cret-key", "--max-message-size", "2048"]).await;
    let channel = fresh_channel("http");
    let client = cluster.client().await;
    let mut sub = client.subscribe(&channel).await.expect("subscribe");
    let node = cluster.any_node();

    let ok = node.publish_http(&channel, r#"{"n":1}"#, Some("s3cret-key")).await;
    assert_eq!((ok.status, ok.json()), (200, json!({"ok": true})));
    assert_eq!(within("delivery", sub.recv()).await.expect("message").data_json(), json!({"n": 1}));

    let cases = [
        (node.publish_http(&channel, "1", None).await, 401, "unauthorized"),
        (node.publish_http(&channel, "1", Some("wrong")).await, 401, "unauthorized"),
        (node.publish_http("bad channel", "1", Some("s3cret-key")).await, 400, "bad_channel"),
        (
            node.http("POST", "/api/publish", &[("authorization", "Bearer s3cret-key")], "{oops").await,
            400,
            "bad_request",
        ),
        (
            node.http("POST", "/api/publish", &[("authorization", "Bearer s3cret-key")], r#"{"channel":"a"}"#).await,
            400,
            "bad_request",
        ),
        (node.publish_http(&channel, &format!("\"{}\"", "x".repeat(4000)), Some("s3cret-key")).await, 413, "too_large"),
    ];
    for (response, status, code) in cases {
        assert_eq!(response.status, status, "{}", response.body);
        let body = response.json();
        assert_eq!((body["ok"].clone(), body["code"].clone()), (json!(false), json!(code)), "{body}");
    }
    // Messages published by one HTTP client, request after request, arrive in order.
    for i in 0..50 {
        assert_eq!(node.publish_http(&channel, &i.to_string(), Some("s3cret-key")).await.status, 200);
    }
    for i in 0..50 {
        assert_eq!(within("delivery", sub.recv()).await.expect("message").data_json(), json!(i));
    }
}

async fn metrics_move_with_traffic(backend: Backend) {
    let cluster = Cluster::start(backend, &[]).await;
    let node = &cluster.nodes[0];
    let channel = fresh_channel("metrics");
    let client = node.client().await;
    node.wait_metric("gateway_connections", 1.0).await;
    let mut sub = client.subscribe(&channel).await.expect("subscribe");
    assert_eq!(node.metric("gateway_channels").await, 1.0);
    let published = node.metric(r#"gateway_messages_published_total{source="ws"}"#).await;
    let delivered = node.metric("gateway_messages_delivered_total").await;
    client.publish_json(&channel, &json!(1)).await.expect("publish");
    within("delivery", sub.recv()).await.expect("message");
    assert_eq!(node.metric(r#"gateway_messages_published_total{source="ws"}"#).await, published + 1.0);
    assert!(node.metric("gateway_messages_delivered_total").await > delivered);
    assert!(node.metric("gateway_publish_latency_seconds_count").await >= 1.0);
    assert!(node.metric("process_resident_memory_bytes").await > 0.0);
    assert_eq!(node.metric("gateway_backplane_up").await, 1.0);
    client.close().await;
    node.wait_metric("gateway_connections", 0.0).await;
    node.wait_metric("gateway_channels", 0.0).await;
    assert!(node.metric(r#"gateway_disconnects_total{reason="client_closed"}"#).await >= 1.0);
    let rejected = Client::connect(&format!("ws://{}/nope", node.addr())).await;
    assert!(matches!(rejected, Err(ClientError::Rejected { status: 404, .. })), "{rejected:?}");
    let _ = ErrorCode::BadRequest;
}
