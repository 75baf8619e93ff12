//! One socket's life and the node's: slow consumers, the write linger of a quiet socket, heartbeats, a client's close, graceful shutdown,
//! and churn that must leave nothing behind.

mod support;

use futures_util::StreamExt;
use gateway_client::{Client, ClientConfig};
use serde_json::json;
use serde_json::value::RawValue;
use std::io::Cursor;
use std::ops::Range;
use std::time::Duration;
use support::{Backend, Cluster, Gateway, RawSocket, fresh_channel, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};

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

/// The write linger holds back a busy socket's writes, not a quiet one's: two messages in a
/// row after a quiet spell go out at once, however long the linger (here longer than the test's
/// deadline), and the subscribe's `ok` before them does not count as a write of the stream.
#[tokio::test]
async fn a_quiet_sockets_first_two_messages_are_not_held_back_by_the_linger() {
    let node = Gateway::start("quiet", &["--write-linger", "1h"]);
    node.wait_readyz(200).await;
    let mut subscriber = RawSocket::connect(&node.ws_url()).await;
    let channel = fresh_channel("quiet");
    subscriber.subscribe(&channel).await;
    // One at a time: two messages that reach the socket together would share one write anyway.
    for n in 0..2 {
        assert_eq!(node.publish_http(&channel, &n.to_string(), None).await.status, 200);
        assert_eq!(subscriber.recv_json().await["data"], json!(n));
    }
}

/// The node's busy sockets share `--write-rate` writes a second: two busy subscribers on a budget
/// of 5 writes a second linger ten times longer than the 20 ms linger alone (the ceiling), so
/// each write carries several times as many messages as on a node without the budget fed the
/// same stream, and every message still arrives, in order. Once the stream stops, a linger with
/// nothing to write makes them quiet, and they leave the busy count.
#[tokio::test]
async fn busy_sockets_beyond_the_write_budget_write_less_often_with_more_in_each_write() {
    let budgeted = Gateway::start("budget", &["--write-linger", "20ms", "--write-rate", "5"]);
    let unbudgeted = Gateway::start("no-budget", &["--write-linger", "20ms", "--write-rate", "0"]);
    const MESSAGES: usize = 200;
    let channel = fresh_channel("budget");
    let mut readers = Vec::new();
    let mut publishers = Vec::new();
    for node in [&budgeted, &unbudgeted] {
        node.wait_readyz(200).await;
        for _ in 0..2 {
            let client = node.client().await;
            let mut subscription = client.subscribe(&channel).await.expect("subscribe");
            readers.push(tokio::spawn(async move {
                for n in 0..MESSAGES {
                    let message = within("every message", subscription.recv()).await.expect("message");
                    assert_eq!(message.data_json(), json!(n), "in order");
                }
                client
            }));
        }
        publishers.push(node.client().await);
    }
    // 200 messages a second for a second: ten times one per period, so the subscribers stay busy
    // even if the loop runs late.
    let busy_while_publishing = stream_paced(&publishers, &channel, 0..MESSAGES, Some(&budgeted)).await;
    assert_eq!(busy_while_publishing, 2.0, "both subscribers are busy while the stream runs");
    let mut subscribers = Vec::new();
    for reader in readers {
        subscribers.push(reader.await.expect("every message arrived in order"));
    }
    let (with_budget, without) = (frames_per_write(&budgeted).await, frames_per_write(&unbudgeted).await);
    assert!(with_budget >= 2.5 * without, "frames per write: {with_budget:.1} on a budget, {without:.1} without");
    // Silence makes them quiet; they are still connected.
    budgeted.wait_metric("gateway_busy_sockets", 0.0).await;
    unbudgeted.wait_metric("gateway_busy_sockets", 0.0).await;
    assert_eq!(budgeted.metric("gateway_connections").await, 3.0);
    drop(subscribers);
}

/// A socket that unsubscribes from a busy stream leaves the busy count, though the linger it was
/// in when the answer was queued ends with a reply to write and no message.
#[tokio::test]
async fn a_socket_that_unsubscribes_from_a_busy_stream_leaves_the_busy_count() {
    let node = Gateway::start("unsubscribe-busy", &["--write-linger", "20ms"]);
    node.wait_readyz(200).await;
    let channel = fresh_channel("unsubscribe-busy");
    let subscriber = node.client().await;
    let mut subscription = subscriber.subscribe(&channel).await.expect("subscribe");
    let publishers = [node.client().await];
    let busy = stream_paced(&publishers, &channel, 0..100, Some(&node)).await;
    assert_eq!(busy, 1.0, "the subscriber is busy while the stream runs");
    // Unsubscribed in the middle of the stream.
    let unsubscribing = tokio::spawn({
        let channel = channel.clone();
        async move {
            subscriber.unsubscribe(&channel).await.expect("unsubscribed");
            subscriber
        }
    });
    stream_paced(&publishers, &channel, 100..200, None).await;
    let subscriber = within("the unsubscribe's answer", unsubscribing).await.expect("task ran");
    node.wait_metric("gateway_busy_sockets", 0.0).await;
    assert_eq!(within("the first message", subscription.recv()).await.expect("message").data_json(), json!(0));
    drop(subscriber);
}

/// Publishes the numbers in `messages` to `channel` from each of `publishers`, one every 5 ms,
/// without ids (no replies to count among the writes). Every 20th message it reads `watched`'s
/// `gateway_busy_sockets`; returns the highest reading (0 with nothing watched).
async fn stream_paced(publishers: &[Client], channel: &str, messages: Range<usize>, watched: Option<&Gateway>) -> f64 {
    let mut pace = tokio::time::interval(Duration::from_millis(5));
    let mut busiest: f64 = 0.0;
    for n in messages {
        pace.tick().await;
        let data = RawValue::from_string(n.to_string()).expect("raw");
        for publisher in publishers {
            publisher.publish_nowait(channel, &data).await.expect("sent");
        }
        if let Some(node) = watched.filter(|_| n % 20 == 19) {
            busiest = busiest.max(node.metric("gateway_busy_sockets").await);
        }
    }
    busiest
}

/// The frames a node's writes carried on average, from its `gateway_write_batch_frames` histogram.
async fn frames_per_write(node: &Gateway) -> f64 {
    let writes = node.metric("gateway_write_batch_frames_count").await;
    assert!(writes > 0.0, "the node wrote");
    node.metric("gateway_write_batch_frames_sum").await / writes
}

/// At the default level (`info`), a socket's whole life (subscribe, a message, the client's close
/// and its answer) writes no log line about it: neither ours nor the WebSocket library's debug
/// lines. The node is then shut down, so that every line it wrote has been read.
#[tokio::test]
async fn a_sockets_life_logs_nothing_at_the_default_level() {
    let mut node = Gateway::start("quiet-logs", &[]);
    node.wait_readyz(200).await;
    let mut socket = RawSocket::connect(&node.ws_url()).await;
    let channel = fresh_channel("quiet-logs");
    socket.subscribe(&channel).await;
    assert_eq!(node.publish_http(&channel, "1", None).await.status, 200);
    assert_eq!(socket.recv_json().await["data"], json!(1));
    socket.inner().close(None).await.expect("close");
    socket.recv_close().await;
    node.wait_metric("gateway_connections", 0.0).await;
    node.terminate();
    assert!(node.wait_exit(Duration::from_secs(10)).await.success());
    let per_socket: Vec<String> = node
        .logs_through_drain()
        .await
        .into_iter()
        .filter(|line| line.contains("DEBUG") || line.contains("TRACE") || line.contains(&channel))
        .collect();
    assert!(per_socket.is_empty(), "lines about one socket at the info level: {per_socket:?}");
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
    node.logs_through_drain().await;
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

/// An idle socket costs the node under 6 KiB of RSS (about 4.8 measured, debug and release
/// builds alike), so that a node holds tens of thousands: whatever a socket keeps from its
/// upgrade (hyper's read buffer, say: 9 KiB in all) shows here.
#[tokio::test]
async fn an_idle_subscribed_socket_costs_the_node_a_few_kib() {
    let node = Gateway::start("idle-memory", &[]);
    node.wait_readyz(200).await;
    let channels: Vec<String> = (0..10).map(|_| fresh_channel("idle-memory")).collect();
    let mut sockets = Vec::new();
    // The first sockets also grow what the node allocates once (worker stacks, pools): not measured.
    for channel in &channels {
        let mut socket = RawSocket::connect(&node.ws_url()).await;
        socket.subscribe(channel).await;
        sockets.push(socket);
    }
    let before = node.rss_bytes();
    const IDLE: usize = 1000;
    for index in 0..IDLE {
        let mut socket = RawSocket::connect(&node.ws_url()).await;
        socket.subscribe(&channels[index % channels.len()]).await;
        sockets.push(socket);
    }
    let per_socket = node.rss_bytes().saturating_sub(before) / IDLE as u64;
    assert!(per_socket < 6 * 1024, "{per_socket} bytes of RSS per idle socket");
}

/// A client may send its first frames in the same write as its upgrade request: the node reads
/// them after the handshake (they arrive with the request, before the socket is handed over).
#[tokio::test]
async fn frames_sent_with_the_upgrade_request_are_read_after_the_handshake() {
    let node = Gateway::start("read-ahead", &[]);
    node.wait_readyz(200).await;
    let mut stream = TcpStream::connect(node.addr()).await.expect("connect");
    let mut request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        node.addr()
    )
    .into_bytes();
    let ping = json!({"type": "ping", "id": 7}).to_string();
    request.extend_from_slice(&client_frame(0x1, ping.as_bytes()));
    stream.write_all(&request).await.expect("request and frame in one write");

    let mut wire = Vec::new();
    within("the upgrade", read_until(&mut stream, &mut wire, &|w| w.windows(4).any(|x| x == b"\r\n\r\n"))).await;
    let head_end = wire.windows(4).position(|x| x == b"\r\n\r\n").expect("head") + 4;
    assert!(wire.starts_with(b"HTTP/1.1 101"), "upgraded: {}", String::from_utf8_lossy(&wire[..head_end]));
    wire.drain(..head_end);
    within("the pong", read_until(&mut stream, &mut wire, &|w| !server_opcodes(w).is_empty())).await;
    assert_eq!(server_opcodes(&wire)[0], OpCode::Data(Data::Text));
    // A text frame of under 126 bytes from the server: two header bytes, no mask.
    let reply: serde_json::Value = serde_json::from_slice(&wire[2..2 + usize::from(wire[1])]).expect("json reply");
    assert_eq!(reply, json!({"type": "pong", "id": 7}));
}

/// Reads from `stream` into `wire` until `done(wire)`.
async fn read_until(stream: &mut TcpStream, wire: &mut Vec<u8>, done: &dyn Fn(&[u8]) -> bool) {
    let mut chunk = vec![0u8; 64 * 1024];
    while !done(wire) {
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "the server closed early");
        wire.extend_from_slice(&chunk[..n]);
    }
}

/// A client frame (final, masked with a zero key: the payload is sent as is).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126, "short frames only");
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    frame
}

/// The opcodes of the complete server frames at the start of `wire`.
fn server_opcodes(wire: &[u8]) -> Vec<OpCode> {
    let mut cursor = Cursor::new(wire);
    let mut opcodes = Vec::new();
    while let Ok(Some((header, length))) = FrameHeader::parse(&mut cursor) {
        let end = cursor.position() + length;
        if end > wire.len() as u64 {
            break;
        }
        opcodes.push(header.opcode);
        cursor.set_position(end);
    }
    opcodes
}

/// A client that closes while messages stream to it gets the close answered, and no message
/// after that answer (RFC 6455 5.5.1), even though more were queued for it.
#[tokio::test]
async fn a_client_close_is_answered_and_no_message_follows_the_answer() {
    let node = Gateway::start(
        "peer-close",
        &["--write-linger", "0ms", "--queue-size", "100000", "--publish-rate", "1000000", "--publish-burst", "1000000"],
    );
    node.wait_readyz(200).await;
    let publisher = node.client().await;
    let data = RawValue::from_string(format!("\"{}\"", "x".repeat(40))).expect("raw");
    for round in 0..20 {
        let channel = fresh_channel("peer-close");
        let mut stream = TcpStream::connect(node.addr()).await.expect("connect");
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            node.addr()
        );
        stream.write_all(request.as_bytes()).await.expect("upgrade request");
        let mut wire = Vec::new();
        within("the upgrade", read_until(&mut stream, &mut wire, &|w| w.windows(4).any(|x| x == b"\r\n\r\n"))).await;
        let head_end = wire.windows(4).position(|x| x == b"\r\n\r\n").expect("head") + 4;
        wire.drain(..head_end);
        let subscribe = json!({"type": "subscribe", "channel": channel, "id": 1}).to_string();
        stream.write_all(&client_frame(0x1, subscribe.as_bytes())).await.expect("subscribe");
        within("the subscribe ok", read_until(&mut stream, &mut wire, &|w| !server_opcodes(w).is_empty())).await;

        let flood = {
            let (publisher, channel, data) = (publisher.clone(), channel.clone(), data.clone());
            tokio::spawn(async move {
                for _ in 0..5_000 {
                    publisher.publish_nowait(&channel, &data).await.expect("publish");
                }
            })
        };
        within("messages", read_until(&mut stream, &mut wire, &|w| server_opcodes(w).len() > 200)).await;
        stream.write_all(&client_frame(0x8, &1000u16.to_be_bytes())).await.expect("send a close");
        let mut chunk = vec![0u8; 64 * 1024];
        within("the server to end the connection", async {
            while let Ok(n) = stream.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                wire.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        within("the publisher", flood).await.expect("publisher task");

        let opcodes = server_opcodes(&wire);
        let close = opcodes.iter().position(|o| *o == OpCode::Control(Control::Close));
        let close = close.unwrap_or_else(|| panic!("round {round}: the close was not answered"));
        let after = opcodes[close + 1..].iter().filter(|o| **o == OpCode::Data(Data::Text)).count();
        assert_eq!(after, 0, "round {round}: {after} messages after the close answer");
    }
}
