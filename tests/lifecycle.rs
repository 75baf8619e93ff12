//! One socket's life and the node's: slow consumers, heartbeats, graceful shutdown, and churn
//! that must leave nothing behind.

mod support;

use futures_util::StreamExt;
use gateway_client::ClientConfig;
use serde_json::json;
use serde_json::value::RawValue;
use std::time::Duration;
use support::{Backend, Cluster, Gateway, RawSocket, fresh_channel, within};

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_as_slow_consumer_and_memory_stays_bounded() {
    let node = Gateway::start("slow", &["--queue-size", "8", "--write-timeout", "10s"]);
    node.wait_readyz(200).await;
    let channel = fresh_channel("slow");
    let mut stalled = RawSocket::connect(&node.ws_url()).await;
    stalled.subscribe(&channel).await;
    let rss_before = node.rss_bytes();

    // 200 MB offered to a socket that reads nothing: only the bounded queue may hold any of it.
    let publisher = node.client().await;
    let data = RawValue::from_string(format!("\"{}\"", "x".repeat(50_000))).expect("raw");
    for _ in 0..160 {
        if node.metric(r#"gateway_disconnects_total{reason="slow_consumer"}"#).await > 0.0 {
            break;
        }
        for _ in 0..25 {
            publisher.publish(&channel, &data).await.expect("publish accepted");
        }
    }
    node.wait_metric(r#"gateway_disconnects_total{reason="slow_consumer"}"#, 1.0).await;
    assert!(node.metric(r#"gateway_messages_dropped_total{reason="slow_consumer"}"#).await >= 1.0);
    let grown = node.rss_bytes().saturating_sub(rss_before);
    assert!(grown < 48 << 20, "RSS grew by {grown} bytes while a socket stalled");

    // Once it reads again it finds what the kernel buffered, then the close frame.
    assert_eq!(stalled.recv_close().await, Some((1008, "slow consumer".to_owned())));
    node.wait_metric("gateway_channels", 0.0).await; // the closed socket left the hub
    let observer = node.client().await;
    let mut sub = observer.subscribe(&channel).await.expect("subscribe");
    publisher.publish_json(&channel, &json!("still serving")).await.expect("publish");
    assert_eq!(within("delivery", sub.recv()).await.expect("message").data_json(), json!("still serving"));
}

#[tokio::test]
async fn a_silent_peer_is_dropped_by_the_heartbeat_and_a_live_one_is_not() {
    let node = Gateway::start("heartbeat", &["--ping-interval", "200ms", "--pong-timeout", "300ms"]);
    node.wait_readyz(200).await;
    let live = node.client().await; // its connection task answers pings
    let mut silent = RawSocket::connect(&node.ws_url()).await; // never polled: never answers
    node.wait_metric(r#"gateway_disconnects_total{reason="heartbeat_timeout"}"#, 1.0).await;
    assert_eq!(silent.recv_close().await, Some((1008, "heartbeat timeout".to_owned())));
    within("ping on the live client", live.ping()).await.expect("the live client is still connected");
    node.wait_metric("gateway_connections", 1.0).await;
}

#[tokio::test]
async fn sigterm_flushes_queued_messages_closes_with_1001_and_exits_zero() {
    let mut node = Gateway::start("shutdown", &["--shutdown-grace", "5s"]);
    node.wait_readyz(200).await;
    let channel = fresh_channel("shutdown");
    let mut subscriber = RawSocket::connect(&node.ws_url()).await;
    subscriber.subscribe(&channel).await;
    let publisher = node.client().await;
    for i in 0..100 {
        publisher.publish_json(&channel, &json!(i)).await.expect("publish");
    }
    node.terminate();
    // Every message published before the signal arrives, then the 1001 close.
    for i in 0..100 {
        assert_eq!(subscriber.recv_json().await["data"], json!(i));
    }
    assert_eq!(subscriber.recv_close().await.map(|c| c.0), Some(1001));
    assert_eq!(within("publisher close", publisher.closed()).await.code, Some(1001));
    let status = node.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    assert!(node.logs().iter().any(|l| l.contains("drained")));
}

#[tokio::test]
async fn readiness_turns_503_before_sockets_are_closed() {
    let mut node = Gateway::start("drain-order", &["--shutdown-grace", "5s"]);
    node.wait_readyz(200).await;
    let mut socket = RawSocket::connect(&node.ws_url()).await;
    node.terminate();
    assert_eq!(socket.recv_close().await.map(|c| c.0), Some(1001));
    // By the time a socket hears 1001, the node refuses new work: /readyz is 503 or the
    // listener is already closed.
    let probe = tokio::net::TcpStream::connect(node.addr()).await;
    if probe.is_ok() {
        let status = tokio::time::timeout(Duration::from_secs(2), node.readyz()).await;
        assert!(matches!(status, Ok(503) | Err(_)), "readyz after 1001: {status:?}");
    }
    assert_eq!(node.wait_exit(Duration::from_secs(10)).await.code(), Some(0));
}

/// Connect, subscribe, leave (politely or by dropping TCP), thousands of times: the hub must end
/// empty, the gauges at zero, and Redis holding no subscription of this node.
#[tokio::test]
async fn thousands_of_connect_subscribe_disconnect_cycles_leave_nothing_behind() {
    for backend in [Backend::Memory, Backend::Redis] {
        let cluster = Cluster::start(backend, &[]).await;
        let node = &cluster.nodes[0];
        let channels: Vec<String> = (0..20).map(|i| fresh_channel(&format!("churn{i}"))).collect();
        let url = node.ws_url();
        let workers = (0..20).map(|w| {
            let (url, channels) = (url.clone(), channels.clone());
            tokio::spawn(async move {
                for cycle in 0..100 {
                    let mut socket = RawSocket::connect(&url).await;
                    socket.subscribe(&channels[(w + cycle) % channels.len()]).await;
                    if cycle % 2 == 0 {
                        let _ = socket.inner().close(None).await;
                        while let Some(Ok(_)) = socket.inner().next().await {}
                    } // else: dropped without a close frame
                }
            })
        });
        for worker in workers.collect::<Vec<_>>() {
            within("churn worker", worker).await.expect("worker ran");
        }
        node.wait_metric("gateway_connections", 0.0).await;
        node.wait_metric("gateway_channels", 0.0).await;
        assert_eq!(node.metric("gateway_connects_total").await, 2000.0);
        if let Some(redis) = &cluster.redis {
            for channel in &channels {
                let redis_channel = format!("gateway:{channel}");
                support::eventually("Redis subscriptions released", || async {
                    redis.numsub(&redis_channel).await == 0
                })
                .await;
            }
        }
        let _ = ClientConfig::default();
    }
}
