//! The URL the master should call this worker on: `ADVERTISE_URL`, else the task's private
//! IP from the ECS task metadata endpoint (Fargate uses awsvpc networking, so the task has
//! its own IP), else the bound address, where a wildcard bind (`0.0.0.0`) is replaced by the
//! address this host uses to reach the master.
//!
//! Every replica must advertise an address that reaches that replica and no other. A shared
//! name (a compose service name such as `http://worker-a:5000`, which Docker's DNS spreads
//! over all replicas of `--scale worker-a=3`) would let the master lease a step to one
//! worker and deliver it to another. The route to the master gives each container its own
//! address on the network it shares with the master, with no setting per replica.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::config::Config;

/// The base URL to advertise in the registry.
pub async fn advertise_url(config: &Config, bound: SocketAddr) -> String {
    if let Some(url) = &config.advertise_url {
        return url.trim_end_matches('/').to_string();
    }
    if let Some(uri) = &config.ecs_container_metadata_uri_v4 {
        match task_ip(uri).await {
            Ok(ip) => return format!("http://{}", SocketAddr::new(ip, bound.port())),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "could not read the task's IP from the ECS metadata endpoint; advertising the bound address"
            ),
        }
    }
    if bound.ip().is_unspecified()
        && let Some(ip) = route_to(&config.master_url).await
    {
        return format!("http://{}", SocketAddr::new(ip, bound.port()));
    }
    bound_url(bound)
}

/// The local address the operating system would send from to reach `url`'s host: the
/// address of this container (or host) on the network it shares with that host. A UDP
/// `connect` only chooses a route; nothing is sent.
async fn route_to(url: &str) -> Option<IpAddr> {
    let url = reqwest::Url::parse(url).ok()?;
    let host = url
        .host_str()?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = url.port_or_known_default()?;
    let target = tokio::net::lookup_host((host, port)).await.ok()?.next()?;
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(target).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// `http://{bound address}`, with a wildcard address replaced by loopback.
pub fn bound_url(bound: SocketAddr) -> String {
    let ip = match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, bound.port()))
}

/// The container metadata (v4) fields this reads.
#[derive(Deserialize)]
struct ContainerMetadata {
    #[serde(rename = "Networks", default)]
    networks: Vec<Network>,
}

#[derive(Deserialize)]
struct Network {
    #[serde(rename = "IPv4Addresses", default)]
    ipv4_addresses: Vec<String>,
}

/// `GET ${ECS_CONTAINER_METADATA_URI_V4}` → `Networks[0].IPv4Addresses[0]`. The endpoint is
/// local to the task; a few quick tries cover the moment right after the container starts.
async fn task_ip(uri: &str) -> anyhow::Result<IpAddr> {
    let client = common::http::client(Duration::from_secs(2));
    let mut last = None;
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
        }
        let result = async {
            let metadata: ContainerMetadata = client
                .get(uri)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            anyhow::Ok(metadata)
        }
        .await;
        match result {
            Ok(metadata) => {
                let address = metadata
                    .networks
                    .first()
                    .and_then(|n| n.ipv4_addresses.first())
                    .context("the metadata lists no Networks[0].IPv4Addresses[0]")?;
                return address
                    .parse()
                    .with_context(|| format!("`{address}` is not an IP address"));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
        .with_context(|| format!("GET {uri}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_addresses_become_loopback() {
        let bound: SocketAddr = "0.0.0.0:5000"
            .parse()
            .unwrap_or(SocketAddr::from(([0; 4], 0)));
        assert_eq!(bound_url(bound), "http://127.0.0.1:5000");
        let bound: SocketAddr = "[::]:5000".parse().unwrap_or(SocketAddr::from(([0; 4], 0)));
        assert_eq!(bound_url(bound), "http://[::1]:5000");
        let bound: SocketAddr = "10.0.1.7:80"
            .parse()
            .unwrap_or(SocketAddr::from(([0; 4], 0)));
        assert_eq!(bound_url(bound), "http://10.0.1.7:80");
    }

    #[tokio::test]
    async fn a_wildcard_bind_advertises_the_address_on_the_route_to_the_master() {
        // Loopback has many addresses; the route to one of them leaves from 127.0.0.1,
        // which is what a worker on a laptop must advertise.
        let config = Config {
            master_url: "http://127.0.0.1:8000".into(),
            ..Config::default()
        };
        let bound = SocketAddr::from(([0, 0, 0, 0], 5000));
        assert_eq!(advertise_url(&config, bound).await, "http://127.0.0.1:5000");
        let by_name = route_to("http://localhost:8000").await;
        assert!(by_name.is_some_and(|ip| ip.is_loopback()), "{by_name:?}");
        // A bound address that is not a wildcard is advertised as it is.
        let bound = SocketAddr::from(([127, 0, 0, 1], 5001));
        assert_eq!(advertise_url(&config, bound).await, "http://127.0.0.1:5001");
        // ADVERTISE_URL wins over both.
        let config = Config {
            advertise_url: Some("http://worker-7.internal:5000/".into()),
            ..config
        };
        assert_eq!(
            advertise_url(&config, bound).await,
            "http://worker-7.internal:5000"
        );
        // A URL without a host has no route: the bound address is used.
        assert_eq!(route_to("unix:/tmp/master.sock").await, None);
    }
}
