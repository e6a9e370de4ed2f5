//! Active bandwidth measurement: a sender that pushes data to a peer's sink for a few seconds,
//! and the sink that counts what arrives.
//!
//! The box's *egress* is what limits an SFU (server out = cap × n × (n−1)), so the box sends
//! and the peer counts: a sender cannot measure its own rate, because the kernel accepts
//! megabytes into socket buffers faster than the link drains them. The sink reports the bytes
//! it received and the time between the first and the last of them, leaving out a warm-up
//! (TCP slow start, the first queue fill). Plain HTTP/1.1 (`POST /api/v1/sizing/sink`, any
//! body) so that another talkbox, `talkbox sizing sink` or a browser can play either part.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

/// Where the sink lives on a box (the web service mounts it too).
pub const SINK_PATH: &str = "/api/v1/sizing/sink";
/// Data that arrives in the first part of a measurement is not counted.
const WARM_UP: Duration = Duration::from_millis(300);
/// A sink reads for at most this long, whatever the sender does.
const SINK_MAX: Duration = Duration::from_secs(35);

/// What a sink answers.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SinkReport {
    /// All body bytes received.
    pub bytes: u64,
    /// Bytes received after the warm-up, and the time they took.
    pub counted_bytes: u64,
    pub counted_micros: u64,
}

impl SinkReport {
    /// Measured rate in Mbit/s; `None` when too little was counted to say.
    pub fn mbps(&self) -> Option<f64> {
        (self.counted_micros >= 200_000 && self.counted_bytes > 0)
            .then(|| self.counted_bytes as f64 * 8.0 / self.counted_micros as f64)
    }
}

/// The sink's routes; one measurement at a time (a second one would halve both).
pub fn sink_router() -> Router {
    Router::new()
        .route(SINK_PATH, post(sink))
        .with_state(Arc::new(Semaphore::new(1)))
}

async fn sink(State(busy): State<Arc<Semaphore>>, body: Body) -> Response {
    let Ok(_permit) = busy.try_acquire() else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "another measurement is running; try again in a few seconds\n",
        )
            .into_response();
    };
    let mut stream = body.into_data_stream();
    let mut report = SinkReport {
        bytes: 0,
        counted_bytes: 0,
        counted_micros: 0,
    };
    let mut first: Option<Instant> = None;
    let mut counted_since: Option<Instant> = None;
    let deadline = tokio::time::Instant::now() + SINK_MAX;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let chunk = match next {
            Err(_) => break, // Ran too long: report what arrived.
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return (StatusCode::BAD_REQUEST, format!("reading the body: {e}\n"))
                    .into_response();
            }
            Ok(Some(Ok(c))) => c,
        };
        let now = Instant::now();
        let start = *first.get_or_insert(now);
        report.bytes += chunk.len() as u64;
        if now.duration_since(start) >= WARM_UP {
            let since = *counted_since.get_or_insert(now);
            // The chunk that opens the window only marks its start.
            if since != now {
                report.counted_bytes += chunk.len() as u64;
                report.counted_micros = now.duration_since(since).as_micros() as u64;
            }
        }
    }
    axum::Json(report).into_response()
}

/// Serves the sink alone on `listen` (plain HTTP) until the process ends.
pub async fn serve_sink(listener: tokio::net::TcpListener) -> Result<()> {
    axum::serve(listener, sink_router())
        .await
        .context("serving the sizing sink")
}

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Sends to the sink at `base` (`http://host:port` or `https://…`, certificate checked against
/// the web PKI) for `duration` and returns the sink's report.
pub async fn measure(base: &str, duration: Duration) -> Result<SinkReport> {
    let url = format!("{}{SINK_PATH}", base.trim_end_matches('/'));
    let uri: axum::http::Uri = url
        .parse()
        .with_context(|| format!("sizing peer {base:?} is not a URL"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(provider)?
        .https_or_http()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Body>(https);
    let end = tokio::time::Instant::now() + duration;
    let chunks = futures_util::stream::unfold((), move |()| async move {
        (tokio::time::Instant::now() < end)
            .then_some((Ok::<_, std::io::Error>(Bytes::from_static(&ZEROS)), ()))
    });
    let req = axum::http::Request::post(uri)
        .header("content-type", "application/octet-stream")
        .body(Body::from_stream(chunks))
        .context("building the measurement request")?;
    let resp = tokio::time::timeout(duration + Duration::from_secs(15), client.request(req))
        .await
        .with_context(|| format!("{url}: no answer within {} s", duration.as_secs() + 15))?
        .with_context(|| format!("sending to {url}"))?;
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .with_context(|| format!("{url}: the report did not arrive"))?
        .with_context(|| format!("reading the report of {url}"))?
        .to_bytes();
    if !status.is_success() {
        bail!(
            "{url} answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
        );
    }
    serde_json::from_slice(&body)
        .with_context(|| format!("{url} did not answer with a sizing report (is it a talkbox?)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loopback_measurement_reports_a_rate_and_a_busy_sink_refuses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_sink(listener));
        let base = format!("http://{addr}");
        let (a, b) = tokio::join!(measure(&base, Duration::from_millis(1200)), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            measure(&base, Duration::from_millis(200)).await
        });
        let report = a.unwrap();
        assert!(
            report.bytes > report.counted_bytes && report.counted_bytes > 0,
            "{report:?}"
        );
        assert!(report.mbps().unwrap() > 50.0, "{report:?}");
        let busy = b.unwrap_err().to_string();
        assert!(busy.contains("429"), "{busy}");
        // Not a sink at all.
        let err = measure("http://127.0.0.1:9", Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("127.0.0.1:9"), "{err:#}");
    }
}
