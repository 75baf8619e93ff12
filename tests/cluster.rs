//! Many nodes behave as one: cross-node delivery, one order for everyone, no gap after `ok`,
//! interest-based Redis subscriptions, and surviving Redis outages and node deaths.

mod support;

use gateway_client::{Client, ErrorCode, Subscription};
use serde_json::json;
use serde_json::value::RawValue;
use std::time::Duration;
use support::{Cluster, eventually, fresh_channel, within};

async fn next_data(sub: &mut Subscription) -> serde_json::Value {
    within("a delivery", sub.recv()).await.expect("subscription open").data_json()
}

#[tokio::test]
async fn a_message_published_on_one_node_reaches_subscribers_on_every_node() {
    let cluster = Cluster::redis(3, &[]).await;
    let channel = fresh_channel("cross");
    let mut subscriptions = Vec::new();
    let mut clients = Vec::new();
    for node in &cluster.nodes {
        let client = node.client().await;
        subscriptions.push(client.subscribe(&channel).await.expect("subscribe"));
        clients.push(client);
    }
    let publisher = cluster.nodes[0].client().await;
    publisher.publish_json(&channel, &json!({"hello": "cluster"})).await.expect("publish");
    cluster.nodes[2].publish_http(&channel, r#""via http""#, None).await;
    for sub in &mut subscriptions {
        assert_eq!(next_data(sub).await, json!({"hello": "cluster"}));
        assert_eq!(next_data(sub).await, json!("via http"));
    }
}

#[tokio::test]
async fn concurrent_publishers_on_different_nodes_give_every_subscriber_the_same_sequence() {
    let cluster = Cluster::redis(3, &[]).await;
    let channel = fresh_channel("order");
    let mut subscriptions = Vec::new();
    let mut keep = Vec::new();
    for i in 0..6 {
        let client = cluster.nodes[i % 3].client().await;
        subscriptions.push(client.subscribe(&channel).await.expect("subscribe"));
        keep.push(client);
    }
    const PER_PUBLISHER: usize = 300;
    let mut publishers = Vec::new();
    for p in 0..3 {
        let client = cluster.nodes[p].client().await;
        let channel = channel.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..PER_PUBLISHER {
                let data = RawValue::from_string(format!(r#"{{"p":{p},"i":{i}}}"#)).expect("raw");
                client.publish(&channel, &data).await.expect("publish");
            }
        }));
    }
    for p in publishers {
        within("publisher", p).await.expect("publisher ran");
    }
    let mut sequences = Vec::new();
    for sub in &mut subscriptions {
        let mut seen = Vec::with_capacity(3 * PER_PUBLISHER);
        for _ in 0..3 * PER_PUBLISHER {
            seen.push(next_data(sub).await);
        }
        sequences.push(seen);
    }
    for (i, seq) in sequences.iter().enumerate() {
        assert_eq!(seq, &sequences[0], "subscriber {i} saw another order than subscriber 0");
    }
    // And each publisher's own messages are in its publish order.
    for p in 0..3 {
        let mine: Vec<_> = sequences[0].iter().filter(|m| m["p"] == p).map(|m| m["i"].as_u64()).collect();
        assert_eq!(mine, (0..PER_PUBLISHER as u64).map(Some).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn nothing_published_after_ok_from_another_node_is_missed() {
    let cluster = Cluster::redis(2, &[]).await;
    let subscriber = cluster.nodes[0].client().await;
    let publisher = cluster.nodes[1].client().await;
    for round in 0..300 {
        let channel = fresh_channel("race");
        let mut sub = subscriber.subscribe(&channel).await.expect("subscribe");
        publisher.publish_json(&channel, &json!(round)).await.expect("publish");
        assert_eq!(next_data(&mut sub).await, json!(round), "round {round}");
        subscriber.unsubscribe(&channel).await.expect("unsubscribe");
    }
}

#[tokio::test]
async fn a_node_holds_one_redis_subscription_per_channel_only_while_it_has_local_interest() {
    let mut cluster = Cluster::redis(2, &[]).await;
    let channel = fresh_channel("numsub");
    let redis_channel = format!("gateway:{channel}");
    let (a, b) = (cluster.nodes[0].client().await, cluster.nodes[0].client().await);
    let c = cluster.nodes[1].client().await;
    a.subscribe(&channel).await.expect("subscribe");
    b.subscribe(&channel).await.expect("subscribe");
    let redis = cluster.redis_server();
    assert_eq!(redis.numsub(&redis_channel).await, 1, "two local subscribers, one Redis subscription");
    c.subscribe(&channel).await.expect("subscribe");
    assert_eq!(redis.numsub(&redis_channel).await, 2, "one per node");
    a.unsubscribe(&channel).await.expect("unsubscribe");
    assert_eq!(redis.numsub(&redis_channel).await, 2, "node 0 still has b");
    b.unsubscribe(&channel).await.expect("unsubscribe");
    assert_eq!(redis.numsub(&redis_channel).await, 1, "released once node 0 has nobody left");
    c.close().await;
    eventually("node 1 releases on disconnect", || async { redis.numsub(&redis_channel).await == 0 }).await;
}

#[tokio::test]
async fn a_redis_outage_of_over_ten_seconds_is_reported_and_then_healed_without_client_action() {
    let mut cluster = Cluster::redis(2, &[]).await;
    let channel = fresh_channel("outage");
    let subscriber = cluster.nodes[0].client().await;
    let mut sub = subscriber.subscribe(&channel).await.expect("subscribe");
    let publisher = cluster.nodes[1].client().await;
    publisher.publish_json(&channel, &json!("before")).await.expect("publish");
    assert_eq!(next_data(&mut sub).await, json!("before"));

    cluster.redis_server().kill();
    for node in &cluster.nodes {
        node.wait_readyz(503).await;
    }
    let refused = publisher.publish_json(&channel, &json!("during")).await;
    assert!(matches!(&refused, Err(e) if e.code() == Some(ErrorCode::BackplaneUnavailable)), "{refused:?}");
    let http = cluster.nodes[0].publish_http(&channel, "1", None).await;
    assert_eq!((http.status, http.json()["code"].clone()), (503, json!("backplane_unavailable")));
    let late = cluster.nodes[0].client().await;
    let refused = late.subscribe(&fresh_channel("outage-sub")).await;
    assert!(matches!(&refused, Err(e) if e.code() == Some(ErrorCode::BackplaneUnavailable)), "{refused:?}");
    assert_eq!(cluster.nodes[0].metric("gateway_backplane_up").await, 0.0);

    // Longer than redis-rs's default reconnect window: retries must never give up.
    tokio::time::sleep(Duration::from_secs(11)).await;
    cluster.redis_server().restart();
    for node in &cluster.nodes {
        within("readiness after Redis returns", node.wait_readyz(200)).await;
    }
    publisher.publish_json(&channel, &json!("after")).await.expect("publish after the outage");
    assert_eq!(next_data(&mut sub).await, json!("after"), "the old subscription works again");
    assert!(cluster.nodes[0].metric("gateway_backplane_reconnects_total").await >= 1.0);
}

#[tokio::test]
async fn a_frozen_redis_is_caught_by_the_canary_and_recovered_after_it_thaws() {
    let fast = ["--canary-interval", "200ms", "--canary-timeout", "500ms", "--redis-timeout", "500ms"];
    let mut cluster = Cluster::redis(2, &fast).await;
    let channel = fresh_channel("frozen");
    let subscriber = cluster.nodes[0].client().await;
    let mut sub = subscriber.subscribe(&channel).await.expect("subscribe");
    let publisher = cluster.nodes[1].client().await;

    cluster.redis_server().pause();
    for node in &cluster.nodes {
        node.wait_readyz(503).await;
    }
    assert!(cluster.nodes[0].metric("gateway_canary_failures_total").await >= 1.0);
    let refused = publisher.publish_json(&channel, &json!("frozen")).await;
    assert!(matches!(&refused, Err(e) if e.code() == Some(ErrorCode::BackplaneUnavailable)), "{refused:?}");

    cluster.redis_server().resume();
    for node in &cluster.nodes {
        node.wait_readyz(200).await;
    }
    publisher.publish_json(&channel, &json!("thawed")).await.expect("publish after thaw");
    // The message published while frozen was refused, so the next one is the first to arrive.
    assert_eq!(next_data(&mut sub).await, json!("thawed"));
}

#[tokio::test]
async fn a_killed_node_drops_its_clients_and_the_others_keep_working() {
    let mut cluster = Cluster::redis(3, &[]).await;
    let channel = fresh_channel("node-death");
    let doomed = cluster.nodes[2].client().await;
    let _doomed_sub = doomed.subscribe(&channel).await.expect("subscribe");
    let survivors: Vec<Client> = vec![cluster.nodes[0].client().await, cluster.nodes[1].client().await];
    let mut subs = Vec::new();
    for s in &survivors {
        subs.push(s.subscribe(&channel).await.expect("subscribe"));
    }
    cluster.nodes[2].kill();
    let closed = within("the dead node's client notices", doomed.closed()).await;
    assert_eq!(closed.code, None, "a killed node sends no close frame: {closed:?}");
    survivors[0].publish_json(&channel, &json!("still here")).await.expect("publish");
    for sub in &mut subs {
        assert_eq!(next_data(sub).await, json!("still here"));
    }
    let redis = cluster.redis_server();
    eventually("Redis drops the dead node's subscription", || async {
        redis.numsub(&format!("gateway:{channel}")).await == 2
    })
    .await;
}
