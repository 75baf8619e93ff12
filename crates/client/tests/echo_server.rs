//! The client against a tiny in-test WebSocket server that follows the contract:
//! `subscribe` / `unsubscribe` / `refresh` answer `ok`, `publish` becomes a `message` frame to the
//! same socket followed by `ok`, `ping` answers `pong`, channel `forbidden` answers `error`.
//! Special channels drive the ending: subscribing to `slow` makes the server close with 1008
//! `slow consumer`, to `drop` makes it drop the TCP connection.

use futures_util::{SinkExt, StreamExt};
use gateway_client::{Client, ClientConfig, ClientError, CloseInfo, ErrorCode};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::future::Future;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

const WAIT: Duration = Duration::from_secs(5);

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Starts the server; with `require_auth`, upgrades without an `Authorization` header get 401.
async fn server(require_auth: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(connection(tcp, require_auth));
        }
    });
    format!("ws://{addr}/ws")
}

// The callback's signature is tungstenite's.
#[allow(clippy::result_large_err)]
async fn connection(tcp: TcpStream, require_auth: bool) {
    let check = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if require_auth && !req.headers().contains_key("authorization") {
            let mut refusal = ErrorResponse::new(Some(r#"{"error":"unauthorized"}"#.to_owned()));
            *refusal.status_mut() = StatusCode::UNAUTHORIZED;
            return Err(refusal);
        }
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        let replies = match msg {
            WsMessage::Text(text) => answer(text.as_str()),
            WsMessage::Binary(_) => vec![error(None, "bad_request")],
            _ => continue,
        };
        for reply in replies {
            match reply {
                Reply::Frame(text) => {
                    if ws.send(WsMessage::text(text)).await.is_err() {
                        return;
                    }
                }
                Reply::CloseSlow => {
                    let frame = CloseFrame { code: CloseCode::Policy, reason: "slow consumer".into() };
                    let _ = ws.close(Some(frame)).await;
                }
                Reply::Drop => return,
            }
        }
    }
}

enum Reply {
    Frame(String),
    CloseSlow,
    Drop,
}

fn error(id: Option<&Value>, code: &str) -> Reply {
    let mut frame = json!({"type": "error", "code": code, "message": format!("test server: {code}")});
    if let Some(id) = id {
        frame["id"] = id.clone();
    }
    Reply::Frame(frame.to_string())
}

fn answer(text: &str) -> Vec<Reply> {
    let Ok(cmd) = serde_json::from_str::<Value>(text) else {
        return vec![error(None, "bad_request")];
    };
    let id = cmd.get("id").filter(|id| !id.is_null());
    let reply = |kind: &str| match id {
        Some(id) => vec![Reply::Frame(json!({"type": kind, "id": id}).to_string())],
        None => vec![],
    };
    let channel = cmd.get("channel").and_then(Value::as_str).unwrap_or_default();
    match cmd.get("type").and_then(Value::as_str).unwrap_or_default() {
        "subscribe" | "publish" if channel == "forbidden" => vec![error(id, "forbidden")],
        "subscribe" if channel == "slow" => vec![Reply::CloseSlow],
        "subscribe" if channel == "drop" => vec![Reply::Drop],
        "subscribe" | "unsubscribe" | "refresh" => reply("ok"),
        "publish" => {
            let data = cmd.get("data").cloned().unwrap_or(Value::Null);
            let message = json!({"type": "message", "channel": channel, "data": data}).to_string();
            let mut out = vec![Reply::Frame(message)];
            out.extend(reply("ok"));
            out
        }
        "ping" => reply("pong"),
        _ => vec![error(id, "bad_request")],
    }
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).expect("valid JSON")
}

#[tokio::test]
async fn subscribe_publish_round_trip() {
    let client = within("connect", Client::connect(&server(false).await)).await.expect("connect");

    let mut a = within("subscribe", client.subscribe("chat:lobby")).await.expect("subscribe");
    let mut b = within("subscribe", client.subscribe("chat:lobby")).await.expect("subscribe again");
    assert_eq!(a.channel(), "chat:lobby");

    within("publish", client.publish_json("chat:lobby", &json!({"text": "hi"}))).await.expect("publish");
    for sub in [&mut a, &mut b] {
        let msg = within("message", sub.next()).await.expect("a message");
        assert_eq!(msg.channel, "chat:lobby");
        assert_eq!(msg.data_json(), json!({"text": "hi"}));
    }

    // Raw data is delivered byte for byte; a dropped subscription no longer receives anything.
    drop(b);
    within("publish", client.publish("chat:lobby", &raw(r#"[1, "two"]"#))).await.expect("publish raw");
    let msg = within("message", a.recv()).await.expect("a message");
    assert_eq!(msg.data.get(), r#"[1,"two"]"#);

    // Fire and forget: the message still comes back.
    within("publish_nowait", client.publish_nowait("chat:lobby", &raw("3"))).await.expect("send");
    assert_eq!(within("message", a.recv()).await.expect("a message").data.get(), "3");

    let rtt = within("ping", client.ping()).await.expect("pong");
    assert!(rtt < WAIT);
    within("refresh", client.refresh("new-token")).await.expect("refresh");

    // After `unsubscribe`, the subscription ends.
    within("unsubscribe", client.unsubscribe("chat:lobby")).await.expect("unsubscribe");
    assert!(within("end of stream", a.next()).await.is_none());
    assert_eq!(client.dropped(), 0);
    assert!(client.take_errors().is_empty());
    assert!(client.take_unexpected().is_empty());

    let info = within("close", client.close()).await;
    assert_eq!(info.code, Some(1000));
    assert!(matches!(client.ping().await, Err(ClientError::Closed(i)) if i == info));
}

#[tokio::test]
async fn errors_are_mapped_and_uncorrelated_frames_kept() {
    let client = within("connect", Client::connect(&server(false).await)).await.expect("connect");

    match within("subscribe", client.subscribe("forbidden")).await {
        Err(ClientError::Server { code: ErrorCode::Forbidden, message }) => assert!(!message.is_empty()),
        other => panic!("expected forbidden, got {other:?}"),
    }
    let err = within("publish", client.publish("forbidden", &raw("1"))).await.expect_err("forbidden");
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));

    // Errors without id are kept in order.
    within("send", client.send_raw_text("not json".to_owned())).await.expect("send");
    within("send", client.send_raw_binary(vec![1, 2, 3])).await.expect("send");
    within("send", client.publish_nowait("forbidden", &raw("1"))).await.expect("send");
    for code in [ErrorCode::BadRequest, ErrorCode::BadRequest, ErrorCode::Forbidden] {
        let frame = within("error frame", client.next_error()).await.expect("an error frame");
        assert_eq!((frame.id, frame.code), (None, code));
    }

    // A reply with an id this client never assigned is kept as unexpected.
    within("send", client.send_raw_text(r#"{"type":"ping","id":999999}"#.to_owned())).await.expect("send");
    within("send", client.send_raw_text(r#"{"type":"nope","id":"x"}"#.to_owned())).await.expect("send");
    within("ping", client.ping()).await.expect("pong");
    let unexpected: Vec<Value> =
        client.take_unexpected().iter().map(|t| serde_json::from_str(t).expect("JSON")).collect();
    assert_eq!(unexpected, vec![json!({"type": "pong", "id": 999999})]);
    let errors = client.take_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!((errors[0].id.as_deref(), errors[0].code), (Some(r#""x""#), ErrorCode::BadRequest));
    assert!(!client.is_closed());
}

#[tokio::test]
async fn server_close_is_reported_and_fails_pending_calls() {
    let client = within("connect", Client::connect(&server(false).await)).await.expect("connect");
    let mut sub = within("subscribe", client.subscribe("news")).await.expect("subscribe");

    // The server answers this subscribe by closing with 1008 `slow consumer`.
    let expected = CloseInfo { code: Some(1008), reason: "slow consumer".to_owned() };
    match within("pending subscribe", client.subscribe("slow")).await {
        Err(ClientError::Closed(info)) => assert_eq!(info, expected),
        other => panic!("expected Closed, got {other:?}"),
    }
    assert_eq!(within("closed", client.closed()).await, expected);
    assert_eq!(client.close_info(), Some(expected.clone()));
    assert!(within("end of stream", sub.next()).await.is_none());
    assert!(matches!(client.ping().await, Err(ClientError::Closed(i)) if i == expected));
    assert!(within("next_error", client.next_error()).await.is_none());
    assert_eq!(within("close", client.close()).await, expected);
}

#[tokio::test]
async fn dropped_tcp_connection_has_no_close_code() {
    let client = within("connect", Client::connect(&server(false).await)).await.expect("connect");
    let err = within("pending subscribe", client.subscribe("drop")).await.expect_err("dropped");
    let info = err.close_info().expect("Closed").clone();
    assert_eq!(info.code, None);
    assert_eq!(within("closed", client.closed()).await, info);
}

#[tokio::test]
async fn full_subscription_queue_drops_and_counts() {
    let config = ClientConfig { queue: 2, ..ClientConfig::default() };
    let url = server(false).await;
    let client = within("connect", Client::connect_with_config(url.as_str(), config)).await.expect("connect");
    let mut sub = within("subscribe", client.subscribe("c")).await.expect("subscribe");
    for i in 0..5 {
        // Each `message` frame precedes its `ok`, so it was routed when `publish` returns.
        within("publish", client.publish("c", &raw(&i.to_string()))).await.expect("publish");
    }
    assert_eq!((client.dropped(), sub.dropped()), (3, 3));
    assert_eq!(sub.try_recv().map(|m| m.data.get().to_owned()).as_deref(), Some("0"));
    assert_eq!(sub.try_recv().map(|m| m.data.get().to_owned()).as_deref(), Some("1"));
    assert!(sub.try_recv().is_none());
    // The socket reader was never blocked.
    within("ping", client.ping()).await.expect("pong");
}

#[tokio::test]
async fn http_refusal_is_rejected_and_headers_are_sent() {
    let url = server(true).await;
    match within("connect", Client::connect(&url)).await {
        Err(ClientError::Rejected { status: 401, body }) => {
            assert!(body.contains("unauthorized"), "{body}")
        }
        other => panic!("expected 401, got {other:?}"),
    }

    let mut request = Client::request(&url).expect("request");
    request.headers_mut().insert("authorization", "Bearer t".parse().expect("header value"));
    request.headers_mut().insert("origin", "http://localhost".parse().expect("header value"));
    let client = within("connect", Client::connect_with(request)).await.expect("connect with header");
    within("ping", client.ping()).await.expect("pong");

    match within("connect", Client::connect("ws://127.0.0.1:1/ws")).await {
        Err(ClientError::Connect(e)) => assert!(matches!(*e, tungstenite::Error::Io(_)), "{e}"),
        other => panic!("expected a connect error, got {other:?}"),
    }
}
