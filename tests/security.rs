//! Hostile input, one test per row of the threat table in docs/security.md: forged, confused,
//! unsigned, expired and expiring tokens, channel permissions, the API key, every limit, slow
//! and oversized input and cross-site upgrades. Each test attacks a real `gateway` process and
//! checks the exact answer (HTTP status and JSON code, error frame or close code), the metric
//! that counts it, and that a well-behaved client on the same node was not affected.

mod support;

use futures_util::{FutureExt, SinkExt, StreamExt};
use gateway_client::{Client, Subscription};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::http::HttpResponse;
use support::{Gateway, RawSocket, fresh_channel, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The HS256 secret of the nodes under test.
const SECRET: &str = "security-test-secret-0123456789";
/// The API key of the nodes that have one.
const API_KEY: &str = "api-key-0123456789abcdef";

fn key_file(name: &str) -> String {
    format!("{}/../../tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn key_bytes(name: &str) -> Vec<u8> {
    std::fs::read(key_file(name)).unwrap_or_else(|e| panic!("test key {name}: {e}"))
}

/// Seconds since the Unix epoch, as JWTs count them.
fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

/// Seconds since the Unix epoch, with the fraction.
fn now_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs_f64()
}

/// `{"sub": sub, "exp": now + ttl}`.
fn claims(sub: &str, ttl: i64) -> Value {
    json!({"sub": sub, "exp": now().saturating_add_signed(ttl)})
}

fn sign(alg: Algorithm, claims: &Value, key: &EncodingKey) -> String {
    encode(&Header::new(alg), claims, key).expect("a token")
}

/// A token for the nodes' HS256 secret.
fn hs256(claims: &Value) -> String {
    sign(Algorithm::HS256, claims, &EncodingKey::from_secret(SECRET.as_bytes()))
}

/// Base64url without padding (JWT segments), for hand-made tokens.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// A gateway with JWT auth on (HS256), plus `extra` flags.
fn auth_node(name: &str, extra: &[&str]) -> Gateway {
    let mut args = vec!["--jwt-secret", SECRET];
    args.extend_from_slice(extra);
    Gateway::start(name, &args)
}

/// A well-behaved client that subscribed before the attack and must not notice it.
struct Bystander {
    client: Client,
    sub: Subscription,
    channel: String,
    addr: SocketAddr,
    api_key: Option<&'static str>,
    sent: u64,
}

impl Bystander {
    /// Connects (with a valid token when the node needs one) and subscribes to a fresh channel.
    async fn join(node: &Gateway, token: Option<&str>, api_key: Option<&'static str>) -> Self {
        let url = match token {
            Some(token) => format!("{}?token={token}", node.ws_url()),
            None => node.ws_url(),
        };
        let client = within("bystander connect", Client::connect(&url)).await.expect("the bystander connects");
        let channel = fresh_channel("bystander");
        let sub = within("bystander subscribe", client.subscribe(&channel)).await.expect("the bystander subscribes");
        Self { client, sub, channel, addr: node.addr(), api_key, sent: 0 }
    }

    /// Still connected, still answered, and still receives a message published (over HTTP, then
    /// on its own socket) after the attack.
    async fn assert_unaffected(&mut self) {
        assert!(self.client.close_info().is_none(), "the bystander was disconnected: {:?}", self.client.close_info());
        within("bystander ping", self.client.ping()).await.expect("the bystander gets its pong");
        self.sent += 1;
        let auth = self.api_key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(auth) = auth.as_deref() {
            headers.push(("authorization", auth));
        }
        let body = json!({"channel": self.channel, "data": {"http": self.sent}}).to_string();
        let published = support::http::request(self.addr, "POST", "/api/publish", &headers, &body).await;
        assert_eq!(published.status, 200, "{}", published.body);
        let message = within("bystander delivery", self.sub.recv()).await.expect("a message");
        assert_eq!(message.data_json(), json!({"http": self.sent}));
        self.sent += 1;
        self.client.publish_json(&self.channel, &json!({"ws": self.sent})).await.expect("the bystander publishes");
        let message = within("bystander delivery", self.sub.recv()).await.expect("a message");
        assert_eq!(message.data_json(), json!({"ws": self.sent}));
    }
}

/// A TCP connection to `addr` from the local address `from` (any 127.0.0.0/8 address works on
/// Linux loopback), to act as another client IP.
async fn connect_from(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.bind(SocketAddr::new(from, 0)).unwrap_or_else(|e| panic!("bind {from}: {e}"));
    within("TCP connect", socket.connect(addr)).await.expect("TCP connect")
}

/// Reads an HTTP response head (and its `content-length` body) from `stream`, leaving the
/// stream open: after a `101` it carries the WebSocket.
async fn read_response(stream: &mut TcpStream) -> HttpResponse {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        let n = within("an HTTP response head", stream.read(&mut byte)).await.expect("HTTP read");
        assert!(n == 1, "the connection closed before a full response head: {:?}", String::from_utf8_lossy(&raw));
        raw.push(byte[0]);
    }
    let (status, headers) = support::http::parse_head(&String::from_utf8_lossy(&raw));
    let length = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; length];
    within("an HTTP body", stream.read_exact(&mut body)).await.expect("HTTP body");
    HttpResponse { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
}

/// A WebSocket upgrade request on its own TCP connection from `from`, with `headers` added (a
/// `host` among them replaces the default). Returns the answer and the open stream.
async fn upgrade_from(
    from: IpAddr,
    node: &Gateway,
    target: &str,
    headers: &[(&str, &str)],
) -> (HttpResponse, TcpStream) {
    let mut stream = connect_from(from, node.addr()).await;
    let mut head = format!(
        "GET {target} HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {}\r\n", node.addr()));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write the upgrade request");
    let response = read_response(&mut stream).await;
    (response, stream)
}

/// A WebSocket upgrade request from 127.0.0.1.
async fn upgrade(node: &Gateway, target: &str, headers: &[(&str, &str)]) -> (HttpResponse, TcpStream) {
    upgrade_from(LOCALHOST, node, target, headers).await
}

const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Asserts an HTTP refusal: `status` and a JSON body `{"ok":false,"code":code,"message":..}`.
fn assert_refused(response: &HttpResponse, status: u16, code: &str) {
    assert_eq!(response.status, status, "{response:?}");
    let body = response.json();
    assert_eq!((&body["ok"], &body["code"]), (&json!(false), &json!(code)), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

/// A raw WebSocket to `/ws?token=TOKEN`.
async fn raw_with_token(node: &Gateway, token: &str) -> RawSocket {
    RawSocket::connect(&format!("{}?token={token}", node.ws_url())).await
}

/// Asserts the socket still answers a ping with the matching pong.
async fn assert_serving(raw: &mut RawSocket, id: u64) {
    assert_eq!(raw.command(json!({"type": "ping"}), id).await, json!({"type": "pong", "id": id}));
}

fn auth_failures(reason: &str) -> String {
    format!(r#"gateway_auth_failures_total{{reason="{reason}"}}"#)
}

fn limit_hits(limit: &str) -> String {
    format!(r#"gateway_limit_hits_total{{limit="{limit}"}}"#)
}

fn disconnects(reason: &str) -> String {
    format!(r#"gateway_disconnects_total{{reason="{reason}"}}"#)
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_forged_signature_is_refused_with_401() {
    let node = auth_node("forged", &[]);
    let mut bystander = Bystander::join(&node, Some(&hs256(&claims("alice", 60))), None).await;

    let other_secret =
        sign(Algorithm::HS256, &claims("mallory", 60), &EncodingKey::from_secret(b"not-the-secret-0123456789"));
    // A valid token whose claims were edited after signing (signature of the original kept).
    let genuine = hs256(&claims("mallory", 60));
    let mut parts: Vec<&str> = genuine.split('.').collect();
    let edited = b64url(json!({"sub": "admin", "exp": now() + 60}).to_string().as_bytes());
    parts[1] = &edited;
    let tampered = parts.join(".");
    for token in [other_secret.as_str(), tampered.as_str(), "not.a.jwt", "garbage"] {
        let (response, _) = upgrade(&node, &format!("/ws?token={token}"), &[]).await;
        assert_refused(&response, 401, "unauthorized");
    }
    assert_eq!(node.metric(&auth_failures("invalid")).await, 4.0);
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn a_missing_token_is_refused_with_401() {
    let node = auth_node("missing", &[]);
    let mut bystander = Bystander::join(&node, Some(&hs256(&claims("alice", 60))), None).await;
    let (response, _) = upgrade(&node, "/ws", &[]).await;
    assert_refused(&response, 401, "unauthorized");
    let (response, _) = upgrade(&node, "/ws", &[("authorization", "Basic YWxpY2U6cHc=")]).await;
    assert_refused(&response, 401, "unauthorized");
    assert_eq!(node.metric(&auth_failures("missing")).await, 2.0);
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn another_hmac_algorithm_is_refused() {
    let node = auth_node("hs384", &[]);
    let mut bystander = Bystander::join(&node, Some(&hs256(&claims("alice", 60))), None).await;
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let token = sign(alg, &claims("mallory", 60), &key);
        let (response, _) = upgrade(&node, &format!("/ws?token={token}"), &[]).await;
        assert_refused(&response, 401, "unauthorized");
    }
    assert_eq!(node.metric(&auth_failures("algorithm")).await, 2.0);
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn rs256_key_accepts_rs256_only_and_resists_algorithm_confusion() {
    let public = key_file("rsa_public.pem");
    let node = Gateway::start("rs256", &["--jwt-public-key", &public]);
    let rsa = EncodingKey::from_rsa_pem(&key_bytes("rsa_private.pem")).expect("RSA private key");
    let mut bystander = Bystander::join(&node, Some(&sign(Algorithm::RS256, &claims("alice", 60), &rsa)), None).await;

    // Algorithm confusion: an HS256 token whose HMAC key is the server's *public* key.
    let confused =
        sign(Algorithm::HS256, &claims("mallory", 60), &EncodingKey::from_secret(&key_bytes("rsa_public.pem")));
    // Same key family, other hash: still not the configured algorithm.
    let rs512 = sign(Algorithm::RS512, &claims("mallory", 60), &rsa);
    let es256 = sign(
        Algorithm::ES256,
        &claims("mallory", 60),
        &EncodingKey::from_ec_pem(&key_bytes("ec_private.pem")).expect("EC key"),
    );
    for token in [&confused, &rs512, &es256] {
        let (response, _) = upgrade(&node, &format!("/ws?token={token}"), &[]).await;
        assert_refused(&response, 401, "unauthorized");
    }
    assert_eq!(node.metric(&auth_failures("algorithm")).await, 3.0);
    // An RS256 token signed by another RSA key: bad signature.
    let forged = {
        let token = sign(Algorithm::RS256, &claims("mallory", 60), &rsa);
        let (head, _) = token.rsplit_once('.').expect("three parts");
        format!("{head}.{}", b64url(&[7u8; 256]))
    };
    let (response, _) = upgrade(&node, &format!("/ws?token={forged}"), &[]).await;
    assert_refused(&response, 401, "unauthorized");
    assert_eq!(node.metric(&auth_failures("invalid")).await, 1.0);
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn es256_key_accepts_es256_only_and_resists_algorithm_confusion() {
    let public = key_file("ec_public.pem");
    let node = Gateway::start("es256", &["--jwt-public-key", &public]);
    let ec = EncodingKey::from_ec_pem(&key_bytes("ec_private.pem")).expect("EC private key");
    let mut bystander = Bystander::join(&node, Some(&sign(Algorithm::ES256, &claims("alice", 60), &ec)), None).await;
    let confused =
        sign(Algorithm::HS256, &claims("mallory", 60), &EncodingKey::from_secret(&key_bytes("ec_public.pem")));
    let rs256 = sign(
        Algorithm::RS256,
        &claims("mallory", 60),
        &EncodingKey::from_rsa_pem(&key_bytes("rsa_private.pem")).expect("RSA key"),
    );
    for token in [&confused, &rs256] {
        let (response, _) = upgrade(&node, &format!("/ws?token={token}"), &[]).await;
        assert_refused(&response, 401, "unauthorized");
    }
    assert_eq!(node.metric(&auth_failures("algorithm")).await, 2.0);
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn an_unsigned_alg_none_token_is_refused() {
    let node = auth_node("alg-none", &[]);
    let mut bystander = Bystander::join(&node, Some(&hs256(&claims("alice", 60))), None).await;
    let payload = b64url(claims("mallory", 60).to_string().as_bytes());
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = b64url(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes());
        for token in [format!("{header}.{payload}."), format!("{header}.{payload}")] {
            let (response, _) = upgrade(&node, &format!("/ws?token={token}"), &[]).await;
            assert_refused(&response, 401, "unauthorized");
            let (response, _) = upgrade(&node, "/ws", &[("authorization", &format!("Bearer {token}"))]).await;
            assert_refused(&response, 401, "unauthorized");
        }
    }
    // `none` is not an algorithm jsonwebtoken knows: the header itself does not parse.
    assert_eq!(node.metric(&auth_failures("invalid")).await, 16.0);
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn an_expired_token_is_refused_and_leeway_is_honoured() {
    let node = auth_node("expired", &["--jwt-leeway", "2s"]);
    let mut bystander = Bystander::join(&node, Some(&hs256(&claims("alice", 60))), None).await;
    let (response, _) = upgrade(&node, &format!("/ws?token={}", hs256(&claims("mallory", -60))), &[]).await;
    assert_refused(&response, 401, "unauthorized");
    assert!(response.json()["message"].as_str().is_some_and(|m| m.contains("expired")), "{}", response.body);
    assert_eq!(node.metric(&auth_failures("expired")).await, 1.0);

    // Within the leeway (clock skew between issuer and node): accepted, and usable until
    // exp + leeway rather than closed at once.
    let skewed_claims = claims("bob", -1);
    let exp = skewed_claims["exp"].as_u64().expect("exp") as f64;
    let mut skewed = raw_with_token(&node, &hs256(&skewed_claims)).await;
    assert_serving(&mut skewed, 1).await;
    let closed = skewed.recv_close().await;
    assert_eq!(closed, Some((1008, "token expired".to_owned())));
    assert!(now_f64() >= exp + 2.0 - 0.05, "closed {:.2}s after exp, before exp + leeway", now_f64() - exp);
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn a_token_without_exp_is_refused() {
    let node = auth_node("no-exp", &[]);
    let mut bystander = Bystander::join(&node, Some(&hs256(&claims("alice", 60))), None).await;
    let (response, _) = upgrade(&node, &format!("/ws?token={}", hs256(&json!({"sub": "mallory"}))), &[]).await;
    assert_refused(&response, 401, "unauthorized");
    assert!(response.json()["message"].as_str().is_some_and(|m| m.contains("exp")), "{}", response.body);
    assert_eq!(node.metric(&auth_failures("no_exp")).await, 1.0);
    // `exp` that is not a number is no expiry either.
    let (response, _) =
        upgrade(&node, &format!("/ws?token={}", hs256(&json!({"sub": "m", "exp": "never"}))), &[]).await;
    assert_refused(&response, 401, "unauthorized");
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn a_token_with_an_exp_centuries_away_is_served_and_refreshed_without_harm() {
    let node = auth_node("far-exp", &["--jwt-leeway", "0s"]);
    let mut bystander = Bystander::join(&node, Some(&hs256(&claims("alice", 60))), None).await;
    // The largest `exp` a JSON number can carry: its expiry cannot be put on a clock.
    let far = hs256(&json!({"sub": "bob", "exp": u64::MAX}));
    let mut raw = raw_with_token(&node, &far).await;
    raw.subscribe(&fresh_channel("far-exp")).await;
    assert_serving(&mut raw, 1).await;
    let reply = raw.command(json!({"type": "refresh", "token": far}), 2).await;
    assert_eq!(reply, json!({"type": "ok", "id": 2}));
    assert_serving(&mut raw, 3).await;
    // A socket whose token expires soon, refreshed with the far one: the old expiry must not
    // close it.
    let short = claims("bob", 2);
    let short_exp = short["exp"].as_u64().expect("exp");
    let mut refreshed = raw_with_token(&node, &hs256(&short)).await;
    let reply = refreshed.command(json!({"type": "refresh", "token": far}), 1).await;
    assert_eq!(reply, json!({"type": "ok", "id": 1}));
    // Let the first token's expiry pass (this is the point of the test, not a synchronisation).
    let past = Duration::from_secs_f64((short_exp as f64 + 0.5 - now_f64()).max(0.0));
    tokio::time::sleep(past).await;
    assert_serving(&mut refreshed, 2).await;
    assert_eq!(node.metric(&disconnects("token_expired")).await, 0.0);
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn a_token_expiring_mid_connection_closes_the_socket_with_1008() {
    let node = auth_node("expiring", &["--jwt-leeway", "0s"]);
    let mut bystander = Bystander::join(&node, Some(&hs256(&claims("alice", 60))), None).await;
    let short = claims("bob", 2);
    let exp = short["exp"].as_u64().expect("exp");
    let started = Instant::now();
    let mut raw = raw_with_token(&node, &hs256(&short)).await;
    raw.subscribe(&fresh_channel("expiring")).await;
    assert_serving(&mut raw, 1).await;
    let closed = raw.recv_close().await;
    assert_eq!(closed, Some((1008, "token expired".to_owned())));
    assert!(now_f64() >= exp as f64 - 0.05, "closed before exp");
    assert!(started.elapsed() < Duration::from_secs(4), "closed {:?} after connecting", started.elapsed());
    node.wait_metric(&disconnects("token_expired"), 1.0).await;
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn a_refresh_before_expiry_keeps_the_socket_open() {
    let node = auth_node("refresh", &["--jwt-leeway", "0s"]);
    let mut bystander = Bystander::join(&node, Some(&hs256(&claims("alice", 60))), None).await;
    let first = claims("bob", 2);
    let first_exp = first["exp"].as_u64().expect("exp");
    let mut raw = raw_with_token(&node, &hs256(&first)).await;
    let channel = fresh_channel("refresh");
    raw.subscribe(&channel).await;
    let reply = raw.command(json!({"type": "refresh", "token": hs256(&claims("bob", 60))}), 1).await;
    assert_eq!(reply, json!({"type": "ok", "id": 1}));
    // Let the first token's expiry pass (this is the point of the test, not a synchronisation).
    let past = Duration::from_secs_f64((first_exp as f64 + 0.5 - now_f64()).max(0.0));
    tokio::time::sleep(past).await;
    assert_serving(&mut raw, 2).await;
    let publisher = client_with_token(&node, &hs256(&claims("carol", 60))).await;
    publisher.publish_json(&channel, &json!("after the first exp")).await.expect("publish");
    assert_eq!(raw.recv_json().await, json!({"type": "message", "channel": channel, "data": "after the first exp"}));
    assert_eq!(node.metric(&disconnects("token_expired")).await, 0.0);
    bystander.assert_unaffected().await;
}

/// The WebSocket library logs frame payloads at trace level. Even with RUST_LOG asking for trace,
/// down to the library's own module, neither the connect token nor a refresh token reaches the
/// log (the node is shut down first, so that every line it wrote has been read).
#[tokio::test]
async fn tokens_never_reach_the_log_even_at_trace_level() {
    let mut node = Gateway::start_logging("trace-logs", &["--jwt-secret", SECRET], "trace,tungstenite::protocol=trace");
    node.wait_readyz(200).await;
    let (connect_token, refresh_token) = (hs256(&claims("trace", 60)), hs256(&claims("trace", 120)));
    let mut raw = raw_with_token(&node, &connect_token).await;
    let reply = raw.command(json!({"type": "refresh", "token": refresh_token}), 1).await;
    assert_eq!(reply, json!({"type": "ok", "id": 1}));
    assert_serving(&mut raw, 2).await;
    drop(raw);
    node.wait_metric("gateway_connections", 0.0).await;
    node.terminate();
    assert!(node.wait_exit(Duration::from_secs(10)).await.success());
    let logs = node.logs_through_drain().await.join("\n");
    assert!(logs.contains("\"level\":\"DEBUG\""), "the node logs below info");
    for token in [&connect_token, &refresh_token] {
        let signature = token.rsplit('.').next().expect("a signature");
        assert!(!logs.contains(signature), "a token reached the logs");
    }
}

#[tokio::test]
async fn a_refresh_with_another_sub_or_a_bad_token_is_refused() {
    let node = auth_node("refresh-bad", &["--jwt-leeway", "0s"]);
    let mut bystander = Bystander::join(&node, Some(&hs256(&claims("alice", 60))), None).await;
    let mut raw = raw_with_token(&node, &hs256(&claims("bob", 2))).await;
    let cases = [
        (hs256(&claims("mallory", 60)), "subject_changed"),
        (hs256(&json!({"exp": now() + 60})), "subject_changed"),
        (
            sign(Algorithm::HS256, &claims("bob", 60), &EncodingKey::from_secret(b"not-the-secret-0123456789")),
            "invalid",
        ),
        (hs256(&claims("bob", -60)), "expired"),
        (sign(Algorithm::HS384, &claims("bob", 60), &EncodingKey::from_secret(SECRET.as_bytes())), "algorithm"),
    ];
    for (i, (token, _)) in cases.iter().enumerate() {
        let id = i as u64 + 1;
        let reply = raw.command(json!({"type": "refresh", "token": token}), id).await;
        assert_eq!((&reply["type"], &reply["code"]), (&json!("error"), &json!("unauthorized")), "{reply}");
    }
    for reason in ["subject_changed", "invalid", "expired", "algorithm"] {
        let expected = cases.iter().filter(|(_, r)| *r == reason).count() as f64;
        assert_eq!(node.metric(&auth_failures(reason)).await, expected, "{reason}");
    }
    // None of them extended the session: it still ends at the first token's expiry.
    assert_eq!(raw.recv_close().await, Some((1008, "token expired".to_owned())));
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn forbidden_subscribe_and_publish_answer_forbidden_and_the_socket_keeps_serving() {
    let node = auth_node("perms", &[]);
    let mut bystander = Bystander::join(&node, Some(&hs256(&claims("alice", 60))), None).await;
    let base = fresh_channel("perm");
    let (news, chat, secret) = (format!("{base}:news"), format!("{base}:chat:lobby"), format!("{base}:secret"));
    let mut grants = claims("bob", 60);
    grants["channels"] = json!({"subscribe": [news, format!("{base}:chat:*")], "publish": [format!("{base}:chat:*")]});
    let mut raw = raw_with_token(&node, &hs256(&grants)).await;

    let refused = [
        json!({"type": "subscribe", "channel": secret}),
        json!({"type": "subscribe", "channel": format!("{news}room")}),
        json!({"type": "subscribe", "channel": format!("{base}:chat")}),
        json!({"type": "publish", "channel": news, "data": 1}),
        json!({"type": "publish", "channel": secret, "data": 1}),
    ];
    for (i, command) in refused.into_iter().enumerate() {
        let id = i as u64 + 1;
        let reply = raw.command(command.clone(), id).await;
        assert_eq!(
            (&reply["type"], &reply["code"], &reply["id"]),
            (&json!("error"), &json!("forbidden"), &json!(id)),
            "{command} -> {reply}"
        );
    }
    assert_eq!(node.metric(r#"gateway_bad_frames_total{code="forbidden"}"#).await, 5.0);
    // What the token allows still works on the same socket.
    raw.subscribe(&news).await;
    raw.subscribe(&chat).await;
    assert_eq!(raw.command(json!({"type": "publish", "channel": chat, "data": "hi"}), 10).await["type"], "ok");
    // A refused subscription receives nothing: had `secret` been routed here, it would come first.
    let publisher = client_with_token(&node, &hs256(&claims("carol", 60))).await;
    publisher.publish_json(&secret, &json!("secret")).await.expect("publish");
    publisher.publish_json(&news, &json!("news")).await.expect("publish");
    let mut seen = Vec::new();
    while seen.last() != Some(&json!("news")) {
        seen.push(raw.recv_json().await["data"].clone());
    }
    assert!(!seen.contains(&json!("secret")), "{seen:?}");

    // `channels` present but a list absent: that action is allowed nowhere.
    let mut subscribe_only = claims("dave", 60);
    subscribe_only["channels"] = json!({"subscribe": ["*"]});
    let mut raw = raw_with_token(&node, &hs256(&subscribe_only)).await;
    raw.subscribe(&news).await;
    let reply = raw.command(json!({"type": "publish", "channel": news, "data": 1}), 1).await;
    assert_eq!(reply["code"], "forbidden", "{reply}");
    assert_serving(&mut raw, 2).await;
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn the_token_works_from_the_query_and_from_bearer_and_is_never_logged() {
    let node = auth_node("token-sources", &[]);
    let mut bystander = Bystander::join(&node, Some(&hs256(&claims("alice", 60))), None).await;
    let query_token = hs256(&claims("query-user", 60));
    let mut from_query = raw_with_token(&node, &query_token).await;
    assert_serving(&mut from_query, 1).await;

    let bearer_token = hs256(&claims("bearer-user", 60));
    let mut request = node.ws_url().into_client_request().expect("request");
    request.headers_mut().insert("authorization", format!("Bearer {bearer_token}").parse().expect("header"));
    let mut from_header = RawSocket::connect_request(request).await.expect("Bearer token accepted");
    assert_serving(&mut from_header, 1).await;

    let refused_token =
        sign(Algorithm::HS256, &claims("mallory", 60), &EncodingKey::from_secret(b"not-the-secret-0123456789"));
    let (response, _) = upgrade(&node, &format!("/ws?token={refused_token}&x=1"), &[]).await;
    assert_refused(&response, 401, "unauthorized");
    let expired_token = hs256(&claims("late", -60));
    let (response, _) = upgrade(&node, &format!("/ws?token={expired_token}"), &[]).await;
    assert_refused(&response, 401, "unauthorized");

    bystander.assert_unaffected().await;
    drop((from_query, from_header));
    node.wait_metric("gateway_connections", 1.0).await;
    let logs = node.logs().join("\n");
    assert!(!logs.is_empty());
    for token in [&query_token, &bearer_token, &refused_token, &expired_token] {
        let signature = token.rsplit('.').next().expect("a signature");
        assert!(!logs.contains(signature), "a token reached the logs:\n{logs}");
    }
}

// ---------------------------------------------------------------------------------------------
// The API key of POST /api/publish
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_wrong_or_missing_api_key_is_refused_with_401() {
    let node = Gateway::start("api-key", &["--api-key", API_KEY]);
    let mut bystander = Bystander::join(&node, None, Some(API_KEY)).await;
    let channel = bystander.channel.clone();
    let wrong_keys = ["wrong", &API_KEY[..API_KEY.len() - 1], &format!("{API_KEY}x"), ""];
    for key in wrong_keys {
        assert_refused(&node.publish_http(&channel, "\"forged\"", Some(key)).await, 401, "unauthorized");
    }
    assert_refused(&node.publish_http(&channel, "\"forged\"", None).await, 401, "unauthorized");
    let basic = node
        .http("POST", "/api/publish", &[("authorization", &format!("Basic {API_KEY}"))], r#"{"channel":"a","data":1}"#)
        .await;
    assert_refused(&basic, 401, "unauthorized");
    assert_eq!(node.metric(&auth_failures("api_key")).await, 6.0);
    // None of the refused publishes was delivered: the next message is the bystander's own.
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn the_publish_body_is_not_read_before_the_api_key_is_checked() {
    let node = Gateway::start("api-body", &["--api-key", API_KEY, "--handshake-timeout", "500ms"]);
    let mut bystander = Bystander::join(&node, None, Some(API_KEY)).await;
    // Headers announce a large body that never comes: a wrong key is refused at once, without
    // waiting for (or buffering) the body.
    let mut stream = TcpStream::connect(node.addr()).await.expect("connect");
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer wrong\r\nContent-Type: application/json\r\n\
         Content-Length: 1000000\r\n\r\n",
        node.addr()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    assert_refused(&read_response(&mut stream).await, 401, "unauthorized");
    // With the right key, a body that does not arrive within the handshake timeout is dropped.
    let mut stream = TcpStream::connect(node.addr()).await.expect("connect");
    let head = head.replace("Bearer wrong", &format!("Bearer {API_KEY}")).replace("1000000", "1000");
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(b"{\"channel\":").await.expect("write");
    let started = Instant::now();
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 408, "{response:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    // Announcing more than the size limit is refused before reading too.
    let mut stream = TcpStream::connect(node.addr()).await.expect("connect");
    let head = head.replace("Content-Length: 1000", "Content-Length: 100000");
    stream.write_all(head.as_bytes()).await.expect("write");
    assert_refused(&read_response(&mut stream).await, 413, "too_large");
    bystander.assert_unaffected().await;
}

// ---------------------------------------------------------------------------------------------
// Connection limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_connection_cap_per_node_answers_503() {
    let node = Gateway::start("node-cap", &["--max-connections", "3"]);
    let mut bystander = Bystander::join(&node, None, None).await;
    let (first, held1) = upgrade(&node, "/ws", &[]).await;
    let (second, _held2) = upgrade(&node, "/ws", &[]).await;
    assert_eq!((first.status, second.status), (101, 101));
    let (third, _) = upgrade(&node, "/ws", &[]).await;
    assert_refused(&third, 503, "rate_limited");
    let (fourth, _) = upgrade_from("127.0.0.2".parse().expect("ip"), &node, "/ws", &[]).await;
    assert_refused(&fourth, 503, "rate_limited");
    assert_eq!(node.metric(&limit_hits("connections")).await, 2.0);
    assert_eq!(node.metric("gateway_connections").await, 3.0);
    bystander.assert_unaffected().await;
    // A place freed is a place available again.
    drop(held1);
    node.wait_metric("gateway_connections", 2.0).await;
    let (again, _held3) = upgrade(&node, "/ws", &[]).await;
    assert_eq!(again.status, 101);
}

#[tokio::test]
async fn the_connection_cap_per_ip_answers_429() {
    let node = Gateway::start("ip-cap", &["--max-connections-per-ip", "2"]);
    let mut bystander = Bystander::join(&node, None, None).await;
    let attacker: IpAddr = "127.0.0.2".parse().expect("ip");
    let (first, held1) = upgrade_from(attacker, &node, "/ws", &[]).await;
    let (second, _held2) = upgrade_from(attacker, &node, "/ws", &[]).await;
    assert_eq!((first.status, second.status), (101, 101));
    let (third, _) = upgrade_from(attacker, &node, "/ws", &[]).await;
    assert_refused(&third, 429, "rate_limited");
    // X-Forwarded-For from an untrusted peer is ignored: no escape by claiming another address.
    let (spoofed, _) = upgrade_from(attacker, &node, "/ws", &[("x-forwarded-for", "203.0.113.50")]).await;
    assert_refused(&spoofed, 429, "rate_limited");
    assert_eq!(node.metric(&limit_hits("connections_per_ip")).await, 2.0);
    // Another address (the bystander's) still gets in.
    let (other_ip, _held3) = upgrade(&node, "/ws", &[]).await;
    assert_eq!(other_ip.status, 101);
    bystander.assert_unaffected().await;
    drop(held1);
    node.wait_metric("gateway_connections", 3.0).await;
    let (again, _held4) = upgrade_from(attacker, &node, "/ws", &[]).await;
    assert_eq!(again.status, 101);
}

#[tokio::test]
async fn x_forwarded_for_counts_per_forwarded_ip_only_behind_a_trusted_proxy() {
    let node = Gateway::start("xff", &["--max-connections-per-ip", "1", "--trusted-proxies", "127.0.0.1"]);
    // The bystander comes through the "proxy" (127.0.0.1) without X-Forwarded-For: counted as
    // the proxy's address.
    let mut bystander = Bystander::join(&node, None, None).await;
    let (a, _held_a) = upgrade(&node, "/ws", &[("x-forwarded-for", "203.0.113.7")]).await;
    assert_eq!(a.status, 101);
    let (a_again, _) = upgrade(&node, "/ws", &[("x-forwarded-for", "203.0.113.7")]).await;
    assert_refused(&a_again, 429, "rate_limited");
    // A client-supplied entry on the left does not change who is counted (the right-most
    // untrusted address is).
    let (spoof_left, _) = upgrade(&node, "/ws", &[("x-forwarded-for", "198.51.100.1, 203.0.113.7")]).await;
    assert_refused(&spoof_left, 429, "rate_limited");
    let (b, _held_b) = upgrade(&node, "/ws", &[("x-forwarded-for", "203.0.113.8")]).await;
    assert_eq!(b.status, 101);
    // From an untrusted peer (127.0.0.2) the header is ignored: both count as 127.0.0.2.
    let untrusted: IpAddr = "127.0.0.2".parse().expect("ip");
    let (c, _held_c) = upgrade_from(untrusted, &node, "/ws", &[("x-forwarded-for", "203.0.113.9")]).await;
    assert_eq!(c.status, 101);
    let (c_again, _) = upgrade_from(untrusted, &node, "/ws", &[("x-forwarded-for", "203.0.113.10")]).await;
    assert_refused(&c_again, 429, "rate_limited");
    assert_eq!(node.metric(&limit_hits("connections_per_ip")).await, 3.0);
    bystander.assert_unaffected().await;
}

// ---------------------------------------------------------------------------------------------
// Per-socket limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_subscription_cap_answers_rate_limited() {
    let node = Gateway::start("sub-cap", &["--max-subscriptions", "2"]);
    let mut bystander = Bystander::join(&node, None, None).await;
    let mut raw = RawSocket::connect(&node.ws_url()).await;
    let (a, b, c) = (fresh_channel("cap-a"), fresh_channel("cap-b"), fresh_channel("cap-c"));
    raw.subscribe(&a).await;
    raw.subscribe(&b).await;
    let reply = raw.command(json!({"type": "subscribe", "channel": c}), 1).await;
    assert_eq!((&reply["type"], &reply["code"]), (&json!("error"), &json!("rate_limited")), "{reply}");
    assert_eq!(node.metric(&limit_hits("subscriptions")).await, 1.0);
    // Re-subscribing to a held channel is still ok; leaving one makes room.
    raw.subscribe(&a).await;
    assert_eq!(raw.command(json!({"type": "unsubscribe", "channel": b}), 2).await["type"], "ok");
    raw.subscribe(&c).await;
    assert_serving(&mut raw, 3).await;
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn the_publish_rate_limit_answers_rate_limited_and_the_socket_keeps_serving() {
    let node = Gateway::start("rate", &["--publish-rate", "1", "--publish-burst", "3", "--rate-limit-strikes", "1000"]);
    let mut bystander = Bystander::join(&node, None, None).await;
    let mut raw = RawSocket::connect(&node.ws_url()).await;
    let channel = fresh_channel("rate");
    for id in 1..=3 {
        let reply = raw.command(json!({"type": "publish", "channel": channel, "data": id}), id).await;
        assert_eq!(reply, json!({"type": "ok", "id": id}));
    }
    let reply = raw.command(json!({"type": "publish", "channel": channel, "data": 4}), 4).await;
    assert_eq!(
        (&reply["type"], &reply["code"], &reply["id"]),
        (&json!("error"), &json!("rate_limited"), &json!(4)),
        "{reply}"
    );
    assert_serving(&mut raw, 5).await;
    assert_eq!(node.metric(&limit_hits("publish_rate")).await, 1.0);
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn sustained_publish_abuse_closes_the_socket_with_1008() {
    let node = Gateway::start("abuse", &["--publish-rate", "1", "--publish-burst", "2", "--rate-limit-strikes", "3"]);
    let mut bystander = Bystander::join(&node, None, None).await;
    let mut raw = RawSocket::connect(&node.ws_url()).await;
    let channel = fresh_channel("abuse");
    for id in 1..=20 {
        raw.send_json(json!({"type": "publish", "channel": channel, "data": id, "id": id})).await;
    }
    // Two publishes fit the burst, three refusals are answered (a debt of three, the most
    // allowed at one a second and three strikes), the fourth closes.
    assert_eq!(raw.recv_json().await, json!({"type": "ok", "id": 1}));
    assert_eq!(raw.recv_json().await, json!({"type": "ok", "id": 2}));
    for id in 3..=5 {
        let reply = raw.recv_json().await;
        assert_eq!((&reply["code"], &reply["id"]), (&json!("rate_limited"), &json!(id)), "{reply}");
    }
    assert_eq!(raw.recv_close().await, Some((1008, "rate limited".to_owned())));
    node.wait_metric(&disconnects("rate_limited"), 1.0).await;
    assert_eq!(node.metric(&limit_hits("publish_rate")).await, 4.0);
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn commands_other_than_publish_have_a_rate_limit_of_their_own() {
    let node = Gateway::start(
        "cmd-rate",
        &["--command-rate", "1", "--command-burst", "4", "--max-subscriptions", "4", "--rate-limit-strikes", "1000"],
    );
    let mut bystander = Bystander::join(&node, None, None).await;
    let mut raw = RawSocket::connect(&node.ws_url()).await;
    let channel = fresh_channel("cmd-rate");
    // Sent in one go, so the bucket (one token a second) has no time to refill. A ping and a
    // malformed frame take a token like a subscribe; the fifth frame is refused.
    raw.send_json(json!({"type": "ping", "id": 1})).await;
    raw.send_json(json!({"type": "nonsense", "id": 2})).await;
    raw.send_json(json!({"type": "subscribe", "channel": channel, "id": 3})).await;
    raw.send_json(json!({"type": "unsubscribe", "channel": channel, "id": 4})).await;
    raw.send_json(json!({"type": "subscribe", "channel": channel, "id": 5})).await;
    // Over the budget, a ping and a binary frame still get their usual answers (refusing them
    // would cost as much); they only count towards sustained abuse.
    raw.send_json(json!({"type": "ping", "id": 6})).await;
    raw.send_binary(b"binary".to_vec()).await;
    assert_eq!(raw.recv_json().await, json!({"type": "pong", "id": 1}));
    assert_eq!(raw.recv_json().await["code"], json!("bad_request"));
    assert_eq!(raw.recv_json().await, json!({"type": "ok", "id": 3}));
    assert_eq!(raw.recv_json().await, json!({"type": "ok", "id": 4}));
    let refused = raw.recv_json().await;
    assert_eq!(
        (&refused["type"], &refused["code"], &refused["id"]),
        (&json!("error"), &json!("rate_limited"), &json!(5)),
        "{refused}"
    );
    assert_eq!(raw.recv_json().await, json!({"type": "pong", "id": 6}));
    assert_eq!(raw.recv_json().await["code"], json!("bad_request"));
    // Publishes have their own budget, and the socket keeps serving.
    let reply = raw.command(json!({"type": "publish", "channel": channel, "data": 7}), 7).await;
    assert_eq!(reply, json!({"type": "ok", "id": 7}));
    assert_eq!(node.metric(&limit_hits("command_rate")).await, 3.0);
    assert_eq!(node.metric(&limit_hits("publish_rate")).await, 0.0);
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn websocket_pings_paced_above_the_budget_close_the_socket_with_1008() {
    // 100 a second allowed; pings every 2 ms (five times that), each answered by its pong. The
    // refusals run up a debt (the refill pays back only one in five); past one second of the
    // rate (100 frames), the socket is closed.
    let node = Gateway::start(
        "ping-flood",
        &["--command-rate", "100", "--command-burst", "10", "--max-subscriptions", "10", "--rate-limit-strikes", "20"],
    );
    let mut bystander = Bystander::join(&node, None, None).await;
    let mut raw = RawSocket::connect(&node.ws_url()).await;
    let mut pace = tokio::time::interval(Duration::from_millis(2));
    let closed = within("the ping flood to be closed", async {
        loop {
            pace.tick().await;
            raw.inner().send(Message::Ping(b"flood".to_vec().into())).await.expect("send ping");
            // Take what has arrived: pongs, and at last the close. Over the budget a WebSocket
            // ping gets no `error` of ours.
            while let Some(frame) = raw.inner().next().now_or_never() {
                match frame {
                    Some(Ok(Message::Close(close))) => return close,
                    Some(Ok(Message::Text(text))) => panic!("no text frame expected, got {text}"),
                    Some(Ok(_)) => {}
                    other => panic!("the socket ended without a close frame: {other:?}"),
                }
            }
        }
    })
    .await;
    let close = closed.expect("a close frame with a code");
    assert_eq!((u16::from(close.code), close.reason.as_str()), (1008, "rate limited"));
    node.wait_metric(&disconnects("rate_limited"), 1.0).await;
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn forbidden_publishes_are_charged_to_the_publish_budget() {
    let node =
        auth_node("forbidden-flood", &["--publish-rate", "1", "--publish-burst", "2", "--rate-limit-strikes", "3"]);
    let mut bystander = Bystander::join(&node, Some(&hs256(&claims("alice", 60))), None).await;
    let secret = fresh_channel("forbidden-flood");
    let mut grants = claims("mallory", 60);
    grants["channels"] = json!({"subscribe": [], "publish": []});
    let mut raw = raw_with_token(&node, &hs256(&grants)).await;
    for id in 1..=20 {
        raw.send_json(json!({"type": "publish", "channel": secret, "data": id, "id": id})).await;
    }
    // Two fit the burst and are answered `forbidden`; three refusals are answered; the next closes.
    for id in 1..=2 {
        assert_eq!(raw.recv_json().await["code"], json!("forbidden"), "publish {id}");
    }
    for id in 3..=5 {
        let reply = raw.recv_json().await;
        assert_eq!((&reply["code"], &reply["id"]), (&json!("rate_limited"), &json!(id)), "{reply}");
    }
    assert_eq!(raw.recv_close().await, Some((1008, "rate limited".to_owned())));
    bystander.assert_unaffected().await;
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let node = Gateway::start("too-big", &["--max-message-size", "1024"]);
    let mut bystander = Bystander::join(&node, None, None).await;
    let channel = fresh_channel("big");
    // At the limit: served.
    let mut raw = RawSocket::connect(&node.ws_url()).await;
    let head = json!({"type": "publish", "channel": channel, "data": "", "id": 1}).to_string();
    let fits = head.replace(r#""data":"""#, &format!(r#""data":"{}""#, "x".repeat(1024 - head.len())));
    assert_eq!(fits.len(), 1024);
    raw.send(&fits).await;
    assert_eq!(raw.recv_json().await, json!({"type": "ok", "id": 1}));
    // One byte over: 1009.
    raw.send(&format!("{fits} ")).await;
    assert_eq!(raw.recv_close().await, Some((1009, "message too big".to_owned())));

    // A frame header announcing 2^40 bytes is refused from the header alone (nothing buffered).
    let (response, mut stream) = upgrade(&node, "/ws", &[]).await;
    assert_eq!(response.status, 101);
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&(1u64 << 40).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    stream.write_all(&frame).await.expect("write a frame header");
    let mut close = [0u8; 4];
    within("the close frame", stream.read_exact(&mut close)).await.expect("a close frame");
    assert_eq!((close[0], u16::from_be_bytes([close[2], close[3]])), (0x88, 1009), "{close:?}");

    node.wait_metric(&disconnects("too_big"), 2.0).await;
    bystander.assert_unaffected().await;
}

// ---------------------------------------------------------------------------------------------
// Slow and cross-site upgrades
// ---------------------------------------------------------------------------------------------

/// Waits until the server closes `stream`, writing one byte of `trickle` every 100 ms meanwhile
/// (none when empty); returns how long it took.
async fn closed_by_server(mut stream: TcpStream, trickle: &[u8]) -> Duration {
    let started = Instant::now();
    let mut next = trickle.iter().cycle();
    let mut buf = [0u8; 256];
    within("the server to drop a slow client", async {
        loop {
            tokio::select! {
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // a 408 or similar, then EOF
                },
                () = tokio::time::sleep(Duration::from_millis(100)), if !trickle.is_empty() => {
                    let byte = [*next.next().expect("cycle")];
                    if stream.write_all(&byte).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await;
    started.elapsed()
}

#[tokio::test]
async fn slowloris_upgrades_are_dropped_after_the_handshake_timeout() {
    let node = Gateway::start("slowloris", &["--handshake-timeout", "500ms"]);
    let mut bystander = Bystander::join(&node, None, None).await;
    let mut attackers = Vec::new();
    for (i, opening) in
        [&b""[..], b"GET /ws HT", b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"].into_iter().enumerate()
    {
        for _ in 0..5 {
            let mut stream = TcpStream::connect(node.addr()).await.expect("connect");
            stream.write_all(opening).await.expect("write");
            // The last kind keeps sending a header byte every 100 ms, forever.
            let trickle: &'static [u8] = if i == 2 { b"X-Slow: aaaaaaaa\r\n" } else { b"" };
            attackers.push(tokio::spawn(closed_by_server(stream, trickle)));
        }
    }
    // While they hang on, the node serves everyone else, old and new.
    bystander.assert_unaffected().await;
    let mut newcomer = RawSocket::connect(&node.ws_url()).await;
    assert_serving(&mut newcomer, 1).await;
    for attacker in attackers {
        let took = attacker.await.expect("attacker task");
        assert!(took >= Duration::from_millis(400), "dropped after only {took:?}");
        assert!(took < Duration::from_millis(2500), "dropped only after {took:?}");
    }
    // The idle keep-alive connection after a complete request is bounded the same way.
    let mut stream = TcpStream::connect(node.addr()).await.expect("connect");
    stream
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", node.addr()).as_bytes())
        .await
        .expect("write");
    assert_eq!(read_response(&mut stream).await.status, 200);
    let took = closed_by_server(stream, b"").await;
    assert!(took < Duration::from_millis(2500), "idle keep-alive dropped only after {took:?}");
    bystander.assert_unaffected().await;
    assert_serving(&mut newcomer, 2).await;
}

#[tokio::test]
async fn a_cross_site_origin_is_refused_with_403_unless_allowed() {
    let node = Gateway::start("origin", &["--allowed-origins", "https://app.example,https://admin.example"]);
    let mut bystander = Bystander::join(&node, None, None).await;
    let addr = node.addr();
    let refused = [
        "https://evil.example".to_owned(),
        "null".to_owned(),
        format!("http://{addr}.evil.example"),
        format!("http://evil.example/{addr}"),
        "https://app.example.evil.example".to_owned(),
        "https://app.example:8443".to_owned(),
    ];
    for origin in &refused {
        let (response, _) = upgrade(&node, "/ws", &[("origin", origin)]).await;
        assert_refused(&response, 403, "forbidden");
    }
    assert_eq!(node.metric(&auth_failures("origin")).await, refused.len() as f64);
    let same_host = format!("http://{addr}");
    let allowed = [Some("https://app.example"), Some("https://ADMIN.example"), Some(same_host.as_str()), None];
    for origin in allowed {
        let headers: Vec<(&str, &str)> = origin.map(|o| ("origin", o)).into_iter().collect();
        let (response, _) = upgrade(&node, "/ws", &headers).await;
        assert_eq!(response.status, 101, "{origin:?}: {response:?}");
    }
    bystander.assert_unaffected().await;

    let open = Gateway::start("origin-any", &["--allowed-origins", "*"]);
    let (response, _) = upgrade(&open, "/ws", &[("origin", "https://evil.example")]).await;
    assert_eq!(response.status, 101);
}

/// A typed client connected with `?token=TOKEN`.
async fn client_with_token(node: &Gateway, token: &str) -> Client {
    within("client connect", Client::connect(&format!("{}?token={token}", node.ws_url())))
        .await
        .expect("client connects")
}

#[tokio::test]
async fn a_request_that_is_not_a_websocket_upgrade_gets_400_with_the_reason() {
    let node = Gateway::start("not-upgrade", &[]);
    node.wait_readyz(200).await;
    let plain = node.http("GET", "/ws", &[], "").await;
    assert_refused(&plain, 400, "bad_request");
    assert!(plain.json()["message"].as_str().is_some_and(|m| m.contains("Connection: upgrade")), "{plain:?}");
    // The node serves a real client meanwhile.
    let mut raw = RawSocket::connect(&node.ws_url()).await;
    assert_serving(&mut raw, 1).await;
}
