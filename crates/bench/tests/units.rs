//! Tests that need neither Redis nor a gateway: the bisection search, the payload record and
//! frames, the loopback guard, and the raw WebSocket framing against tungstenite's.

use gateway_bench::bisect::{Bisection, Verdict};
use gateway_bench::payload::{self, Found, PublishFrame, Record, Reply};
use gateway_bench::target::{Target, TargetError, is_loopback_host};
use gateway_bench::ws::{FrameReader, FrameWriter, Opcode, check_upgrade_response};
use gateway_protocol::ErrorCode;

/// Runs a search against a server whose limit is `limit` (passes iff rate <= limit).
fn search(low: f64, high: f64, res: f64, limit: f64, budget: usize) -> (Bisection, Vec<f64>) {
    let mut b = Bisection::new(low, high, res, budget);
    let mut asked = Vec::new();
    while let Some(rate) = b.next_rate() {
        asked.push(rate);
        b.record(rate <= limit);
        assert!(asked.len() <= budget, "probe budget exceeded");
    }
    (b, asked)
}

#[test]
fn bisection_converges_to_the_limit_within_the_resolution() {
    for limit in [100.0, 101.0, 777.0, 1234.5, 4999.0] {
        let (b, asked) = search(100.0, 5000.0, 25.0, limit, 32);
        let o = b.outcome();
        assert_eq!(o.verdict, Some(Verdict::Converged), "limit {limit}");
        let best = o.best.expect("low passes");
        let failed = o.lowest_failed.expect("high fails");
        assert!(best <= limit && failed > limit, "limit {limit}: {best}..{failed}");
        assert!(failed - best <= 25.0, "limit {limit}: interval {best}..{failed}");
        // low, high, then log2(4900 / 25) ≈ 7.6 midpoints: bisection, not steps.
        assert!(asked.len() <= 2 + 8, "limit {limit}: {} probes {asked:?}", asked.len());
        assert_eq!(&asked[..2], &[100.0, 5000.0]);
        assert_eq!(asked[2], 2550.0);
    }
}

#[test]
fn bisection_edges_and_budget() {
    let (b, asked) = search(100.0, 5000.0, 25.0, 50.0, 32);
    assert_eq!(b.outcome().verdict, Some(Verdict::LowFailed));
    assert_eq!(b.outcome().best, None);
    assert_eq!(asked, vec![100.0]);

    let (b, asked) = search(100.0, 5000.0, 25.0, 1e9, 32);
    assert_eq!(b.outcome().verdict, Some(Verdict::HighPassed));
    assert_eq!(b.outcome().best, Some(5000.0));
    assert_eq!(asked.len(), 2);

    let (b, asked) = search(100.0, 5000.0, 1.0, 1000.0, 4);
    assert_eq!(b.outcome().verdict, Some(Verdict::Budget));
    assert_eq!(asked.len(), 4);
    assert_eq!(b.outcome().probes, 4);

    // Asking twice without recording repeats the same probe.
    let mut b = Bisection::new(10.0, 20.0, 1.0, 8);
    assert_eq!(b.next_rate(), Some(10.0));
    assert_eq!(b.next_rate(), Some(10.0));
}

#[test]
fn records_round_trip_through_a_publish_and_a_message_frame() {
    let mut pf = PublishFrame::new("bench", 100, true);
    let r = Record { publisher: 42, seq: 123_456_789, ts_ns: 9_876_543_210_123 };
    let text = pf.stamp(r).to_vec();
    let v: serde_json::Value = serde_json::from_slice(&text).expect("publish frame is JSON");
    assert_eq!(v["type"], "publish");
    assert_eq!(v["channel"], "bench");
    assert_eq!(v["id"], 123_456_789);
    let data = v["data"].as_str().expect("data is a string");
    assert_eq!(data.len(), 100);

    // What the gateway sends subscribers: the same data, inside a message frame.
    let raw = serde_json::value::RawValue::from_string(serde_json::to_string(data).expect("json")).expect("raw");
    let message = gateway_protocol::encode_message("bench", &raw);
    assert_eq!(payload::find_record(message.as_bytes()), Found::Record(r));

    // Without ids, and reusing the builder: no stale id tail.
    let mut pf = PublishFrame::new("c", payload::HEADER_LEN, false);
    for seq in [1u64, 10_000, 2] {
        let text = pf.stamp(Record { publisher: 1, seq, ts_ns: 5 }).to_vec();
        let v: serde_json::Value = serde_json::from_slice(&text).expect("JSON");
        assert!(v.get("id").is_none());
    }
    let mut pf = PublishFrame::new("c", 60, true);
    pf.stamp(Record { publisher: 1, seq: 123_456, ts_ns: 5 });
    let text = pf.stamp(Record { publisher: 1, seq: 7, ts_ns: 5 }).to_vec();
    let v: serde_json::Value = serde_json::from_slice(&text).expect("JSON");
    assert_eq!(v["id"], 7);
}

#[test]
fn frames_without_a_record_are_classified() {
    assert_eq!(payload::find_record(br#"{"type":"ok","id":1}"#), Found::None);
    assert_eq!(payload::find_record(br#"{"type":"message","channel":"a","data":"gb|p12|x"}"#), Found::Malformed);
    assert_eq!(payload::classify(br#"{"type":"ok","id":17}"#), Reply::Ok(Some(17)));
    assert_eq!(payload::classify(br#"{"id":17,"type":"ok"}"#), Reply::Ok(Some(17)));
    assert_eq!(
        payload::classify(br#"{"type":"error","id":3,"code":"rate_limited","message":"slow down"}"#),
        Reply::Error(Some(3), ErrorCode::RateLimited)
    );
    assert_eq!(payload::classify(br#"{"type":"pong"}"#), Reply::Pong);
    assert_eq!(payload::classify(br#"{"type":"message","channel":"a","data":1}"#), Reply::Message);
    assert_eq!(payload::classify(b"not json"), Reply::Unknown);
    let sub: serde_json::Value = serde_json::from_str(&payload::subscribe_frame("chat:x", 1)).expect("JSON");
    assert_eq!(sub, serde_json::json!({"type": "subscribe", "channel": "chat:x", "id": 1}));
}

#[test]
fn only_loopback_targets_without_allow_remote() {
    for ok in ["ws://127.0.0.1:8080/ws", "ws://localhost:1/ws", "ws://[::1]:9/ws", "ws://127.9.9.9/ws?token=x"] {
        let t = Target::parse(ok, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert!(t.loopback);
    }
    for bad in ["ws://10.0.0.1:8080/ws", "ws://example.com/ws", "ws://0.0.0.0:80/ws", "ws://[2001:db8::1]/ws"] {
        assert!(matches!(Target::parse(bad, false), Err(TargetError::NotLoopback(_))), "{bad}");
        assert!(Target::parse(bad, true).is_ok(), "{bad} with --allow-remote");
    }
    assert!(matches!(Target::parse("wss://127.0.0.1/ws", false), Err(TargetError::Scheme(_))));
    assert!(matches!(Target::parse("http://127.0.0.1/ws", false), Err(TargetError::Scheme(_))));
    assert!(matches!(Target::parse("not a url", false), Err(TargetError::Invalid(..))));
    assert!(is_loopback_host("LocalHost"));
    assert!(!is_loopback_host("localhost.evil.com"));

    let t = Target::parse("ws://127.0.0.1:8080/ws?token=abc", false).expect("valid");
    assert_eq!(t.metrics_url(), "http://127.0.0.1:8080/metrics");
    assert_eq!(t.path_and_query, "/ws?token=abc");
    assert_eq!(t.authority, "127.0.0.1:8080");
    let t = Target::parse("ws://[::1]:81/ws", false).expect("valid");
    assert_eq!(t.metrics_url(), "http://[::1]:81/metrics");
}

#[test]
fn raw_frames_match_tungstenite() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

    // Server frames encoded by tungstenite parse with our reader.
    let mut wire = Vec::new();
    for (text, len) in [("a", 1usize), ("b", 200), ("c", 70_000)] {
        let payload = text.repeat(len);
        let frame = Frame::message(payload.into_bytes(), OpCode::Data(Data::Text), true);
        frame.format(&mut wire).expect("format");
    }
    let mut reader = FrameReader::new(256);
    let mut got = Vec::new();
    for chunk in wire.chunks(1000) {
        reader.push(chunk);
        while let Some(f) = reader.next_frame().expect("valid") {
            assert_eq!(f.opcode, Opcode::Text);
            got.push(f.payload.len());
        }
    }
    assert_eq!(got, vec![1, 200, 70_000]);

    // Our masked client frames parse with tungstenite.
    let mut w = FrameWriter::new(64, 7);
    w.push(Opcode::Text, b"{\"type\":\"ping\"}");
    let mut bytes = Vec::new();
    // Take the writer's buffer through a flush into a Vec.
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(w.flush(&mut bytes)).expect("flush");
    let mut cursor = std::io::Cursor::new(bytes.as_slice());
    let (header, len) = FrameHeader::parse(&mut cursor).expect("parse").expect("complete");
    assert!(header.mask.is_some());
    let start = cursor.position() as usize;
    let mut body = bytes[start..start + len as usize].to_vec();
    if let Some(m) = header.mask {
        for (i, b) in body.iter_mut().enumerate() {
            *b ^= m[i & 3];
        }
    }
    assert_eq!(body, b"{\"type\":\"ping\"}");
}

#[test]
fn upgrade_response_is_checked() {
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let good = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    assert!(check_upgrade_response(good.as_bytes(), key).is_ok());
    let wrong = good.replace("s3pP", "AAAA");
    assert!(check_upgrade_response(wrong.as_bytes(), key).is_err());
    let refused = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
    assert!(matches!(check_upgrade_response(refused.as_bytes(), key), Err(gateway_bench::ws::WsError::Http(503))));
}
