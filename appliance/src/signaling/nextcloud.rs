//! The one HTTP client to Nextcloud: `auth`, `room` and `ping` requests to Talk's signaling
//! backend endpoint, and the capabilities fetch (hello-v2 key, `signaling-v3`, ping batch size).
//!
//! Requests carry the HMAC headers of reference §2.1 and upstream's request headers; answers are
//! OCS envelopes, size-limited, with a timeout. One keep-alive connection pool is shared by
//! every backend, with at most `connections_per_host` requests in flight to one host.
//! Capabilities are cached for a minute, failures included, so a broken Nextcloud is not
//! hammered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::Semaphore;

use super::api::{self, ApiError};
use super::backend_client::{BackendClient, BoxFuture};
use super::backends::{Backend, base_url};
use super::checksum;

/// Largest answer accepted from Nextcloud.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// How long capabilities are trusted.
const CAPABILITIES_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    pub features: Vec<String>,
    pub hello_v2_key: Option<String>,
    pub session_ping_limit: Option<usize>,
}

impl Capabilities {
    fn from_ocs(v: &Value) -> Self {
        let spreed = &v["ocs"]["data"]["capabilities"]["spreed"];
        let signaling = &spreed["config"]["signaling"];
        Self {
            features: spreed["features"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|f| f.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            hello_v2_key: signaling["hello-v2-token-key"].as_str().map(str::to_string),
            session_ping_limit: signaling["session-ping-limit"]
                .as_u64()
                .map(|n| n as usize)
                .filter(|n| *n > 0),
        }
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct NextcloudClient {
    client: HttpsClient,
    timeout: Duration,
    per_host: usize,
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
    capabilities: Mutex<HashMap<String, (Instant, Arc<Capabilities>)>>,
}

fn failed(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new("processing_failed", format!("{what}: {e}"))
}

impl NextcloudClient {
    pub fn new(timeout: Duration, connections_per_host: usize) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(connections_per_host)
            .build(https);
        Ok(Self {
            client,
            timeout,
            per_host: connections_per_host.max(1),
            hosts: Mutex::new(HashMap::new()),
            capabilities: Mutex::new(HashMap::new()),
        })
    }

    fn slot(&self, uri: &axum::http::Uri) -> Arc<Semaphore> {
        let host = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts
            .entry(host)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_host)))
            .clone()
    }

    async fn send(
        &self,
        req: axum::http::Request<Full<Bytes>>,
    ) -> Result<(axum::http::StatusCode, Value), ApiError> {
        let slot = self.slot(req.uri());
        let url = req.uri().to_string();
        let work = async {
            let _permit = slot
                .acquire()
                .await
                .map_err(|e| failed("request slot", e))?;
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| failed(&format!("request to {url}"), e))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| failed(&format!("reading the answer of {url}"), e))?
                .to_bytes();
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            Ok((status, v))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| failed(&format!("request to {url}"), "timed out"))?
    }

    /// Talk's capabilities for the Nextcloud of `url` (cached; `refresh` skips the cache).
    pub async fn capabilities(&self, url: &str, refresh: bool) -> Arc<Capabilities> {
        let base = base_url(url);
        if !refresh {
            let cache = self.capabilities.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, c)) = cache.get(&base)
                && at.elapsed() < CAPABILITIES_TTL
            {
                return c.clone();
            }
        }
        let caps_url = format!("{base}/ocs/v2.php/cloud/capabilities");
        let caps = match caps_url.parse::<axum::http::Uri>() {
            Ok(uri) => {
                let req = axum::http::Request::get(uri)
                    .header("OCS-APIRequest", "true")
                    .header("Accept", "application/json")
                    .header(
                        "User-Agent",
                        format!("nextcloud-spreed-signaling/{}", api::SERVER_VERSION),
                    )
                    .body(Full::new(Bytes::new()));
                match req {
                    Ok(req) => match self.send(req).await {
                        Ok((s, v)) if s.is_success() => Capabilities::from_ocs(&v),
                        Ok((s, _)) => {
                            tracing::debug!(url = %caps_url, status = %s, "no capabilities");
                            Capabilities::default()
                        }
                        Err(e) => {
                            tracing::warn!(url = %caps_url, error = %e, "capabilities fetch failed");
                            Capabilities::default()
                        }
                    },
                    Err(_) => Capabilities::default(),
                }
            }
            Err(_) => Capabilities::default(),
        };
        let caps = Arc::new(caps);
        let mut cache = self.capabilities.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 1000 {
            cache.clear();
        }
        cache.insert(base, (Instant::now(), caps.clone()));
        caps
    }

    /// POSTs a signaling backend request to `url` and returns the OCS `data`. A Talk error
    /// (`{"type":"error","error":{code,message}}`) comes back as that error.
    pub async fn request(
        &self,
        backend: &Backend,
        url: &str,
        body: &Value,
    ) -> Result<Value, ApiError> {
        let mut url = url.to_string();
        if url.contains("/spreed/api/v1/signaling/")
            && self
                .capabilities(&url, false)
                .await
                .features
                .iter()
                .any(|f| f == "signaling-v3")
        {
            url = url.replace("/spreed/api/v1/signaling/", "/spreed/api/v3/signaling/");
        }
        let uri: axum::http::Uri = url
            .parse()
            .map_err(|_| ApiError::new("invalid_backend", format!("not a URL: {url}")))?;
        let payload = body.to_string().into_bytes();
        let random = checksum::new_random();
        let sum = checksum::calculate(&random, &payload, &backend.secret);
        let req = axum::http::Request::post(uri)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            .header("OCS-APIRequest", "true")
            .header(
                "User-Agent",
                format!("nextcloud-spreed-signaling/{}", api::SERVER_VERSION),
            )
            .header(checksum::HEADER_FEATURES, api::features(false).join(","))
            .header(checksum::HEADER_RANDOM, random)
            .header(checksum::HEADER_CHECKSUM, sum)
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| failed("building the request", e))?;
        let (status, v) = self.send(req).await?;
        let data = if v.get("ocs").is_some() {
            v["ocs"]["data"].clone()
        } else {
            v.clone()
        };
        if v["ocs"]["meta"]["statuscode"].as_u64() == Some(429) {
            return Err(ApiError::new(
                "too_many_requests",
                "Nextcloud throttles this server.",
            ));
        }
        if data["type"] == "error" {
            let code = data["error"]["code"]
                .as_str()
                .unwrap_or("processing_failed");
            let message = data["error"]["message"]
                .as_str()
                .unwrap_or("Nextcloud refused the request.");
            return Err(ApiError::new(code, message));
        }
        if !status.is_success() {
            return Err(failed(
                &format!("request to {url}"),
                format!("HTTP {status}"),
            ));
        }
        Ok(data)
    }
}

impl BackendClient for NextcloudClient {
    fn capabilities<'a>(&'a self, url: &'a str, refresh: bool) -> BoxFuture<'a, Arc<Capabilities>> {
        Box::pin(NextcloudClient::capabilities(self, url, refresh))
    }

    fn request<'a>(
        &'a self,
        backend: &'a Backend,
        url: &'a str,
        body: &'a Value,
    ) -> BoxFuture<'a, Result<Value, ApiError>> {
        Box::pin(NextcloudClient::request(self, backend, url, body))
    }
}

/// Talk's signaling backend endpoint of a Nextcloud base URL (v1; rewritten to v3 by capability).
pub fn signaling_backend_url(base: &str) -> String {
    format!(
        "{}/ocs/v2.php/apps/spreed/api/v1/signaling/backend",
        base.trim_end_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn capabilities_are_read_from_the_ocs_envelope() {
        let v = json!({"ocs":{"data":{"capabilities":{"spreed":{"features":["signaling-v3"],"config":{"signaling":{"hello-v2-token-key":"KEY","session-ping-limit":50}}}}}}});
        let c = Capabilities::from_ocs(&v);
        assert_eq!(c.features, vec!["signaling-v3".to_string()]);
        assert_eq!(c.hello_v2_key.as_deref(), Some("KEY"));
        assert_eq!(c.session_ping_limit, Some(50));
        assert!(Capabilities::from_ocs(&json!({})).hello_v2_key.is_none());
    }
}
