//! The advertised URL: `ADVERTISE_URL`, else the ECS task metadata endpoint, else the bound
//! address.

use axum::Json;
use axum::Router;
use axum::routing::get;
use serde_json::json;
use worker::Agents;

use crate::helpers::*;

/// A fake of the ECS task metadata endpoint v4 (`${ECS_CONTAINER_METADATA_URI_V4}`).
async fn fake_metadata_endpoint() -> String {
    let metadata = json!({
        "DockerId": "cd189a933e5849daa93386466019ab50-2495160603",
        "Name": "worker",
        "Image": "123456789012.dkr.ecr.us-west-2.amazonaws.com/ensemble:latest",
        "Labels": {"com.amazonaws.ecs.task-definition-family": "worker-b"},
        "Networks": [{
            "NetworkMode": "awsvpc",
            "IPv4Addresses": ["10.0.3.7"],
            "AttachmentIndex": 0,
            "IPv4SubnetCIDRBlock": "10.0.3.0/24",
            "PrivateDNSName": "ip-10-0-3-7.us-west-2.compute.internal"
        }]
    });
    let app = Router::new().route(
        "/v4/abc-123",
        get(move || {
            let metadata = metadata.clone();
            async move { Json(metadata) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/v4/abc-123")
}

fn port_of(url: &str) -> &str {
    url.rsplit(':').next().unwrap()
}

#[tokio::test]
async fn on_ecs_the_worker_advertises_its_task_ip() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let mut config = test_config(&redis, &master);
    config.ecs_container_metadata_uri_v4 = Some(fake_metadata_endpoint().await);
    let worker = spawn_worker(&redis, config, Agents::new()).await;
    let record = redis.record(&worker.id).await.unwrap();
    assert_eq!(
        record.url,
        format!("http://10.0.3.7:{}", port_of(&worker.url))
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn advertise_url_wins_over_everything() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let mut config = test_config(&redis, &master);
    config.advertise_url = Some("http://worker-b.ensemble.local:5000/".into());
    config.ecs_container_metadata_uri_v4 = Some(fake_metadata_endpoint().await);
    let worker = spawn_worker(&redis, config, Agents::new()).await;
    let record = redis.record(&worker.id).await.unwrap();
    assert_eq!(record.url, "http://worker-b.ensemble.local:5000");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn without_metadata_the_bound_address_is_advertised() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let mut config = test_config(&redis, &master);
    // An endpoint that does not answer: the worker falls back rather than failing.
    config.ecs_container_metadata_uri_v4 =
        Some(format!("http://127.0.0.1:{}/v4/x", testkit::free_port()));
    let worker = spawn_worker(&redis, config, Agents::new()).await;
    let record = redis.record(&worker.id).await.unwrap();
    assert_eq!(record.url, worker.url);
    worker.stop().await.unwrap();
}
