//! The Kubernetes API client, with client-go's request rate limit (QPS and burst) as a tower
//! layer, so every request the provisioner makes counts: writes, reads, watches, events and
//! leader-election renewals alike.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use kube::Client;
use kube::client::ClientBuilder;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// A token bucket: `qps` tokens per second, holding at most `burst`.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub qps: f64,
    pub burst: u32,
}

#[derive(Clone, Copy)]
pub struct RateLimitLayer(pub Rate);

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            rate: self.0,
            tokens: f64::from(self.0.burst.max(1)),
            last: Instant::now(),
            sleep: None,
            reserved: false,
        }
    }
}

pub struct RateLimit<S> {
    inner: S,
    rate: Rate,
    tokens: f64,
    last: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    /// A token is taken for the next `call`.
    reserved: bool,
}

impl<S, R> Service<R> for RateLimit<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // kube's client drives this service from a single buffer worker, so poll_ready/call
        // pairs never interleave and one reservation at a time is enough.
        while !self.reserved {
            if let Some(s) = self.sleep.as_mut() {
                if s.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            let now = Instant::now();
            let elapsed = now.duration_since(self.last).as_secs_f64();
            self.last = now;
            let cap = f64::from(self.rate.burst.max(1));
            self.tokens = (self.tokens + elapsed * self.rate.qps).min(cap);
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                self.reserved = true;
            } else {
                let wait = (1.0 - self.tokens) / self.rate.qps.max(0.001);
                self.sleep = Some(Box::pin(tokio::time::sleep(Duration::from_secs_f64(wait))));
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.reserved = false;
        self.inner.call(req)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("loading the Kubernetes client configuration (in-cluster or KUBECONFIG): {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Build(#[from] kube::Error),
}

/// A client from the usual sources (KUBECONFIG, ~/.kube/config, in-cluster), rate limited.
pub async fn client(rate: Rate) -> Result<Client, ClientError> {
    let config = kube::Config::infer().await?;
    let builder = ClientBuilder::try_from(config)?;
    Ok(builder.with_layer(&RateLimitLayer(rate)).build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    #[derive(Clone)]
    struct Echo;
    impl Service<u32> for Echo {
        type Response = u32;
        type Error = Infallible;
        type Future = std::future::Ready<Result<u32, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, r: u32) -> Self::Future {
            std::future::ready(Ok(r))
        }
    }

    /// The burst goes through at once, then requests are spaced at 1/qps (on tokio's paused
    /// clock, so the test measures the limiter, not the machine).
    #[tokio::test(start_paused = true)]
    async fn spaces_requests_after_the_burst() {
        use tower::ServiceExt;
        let mut svc = RateLimitLayer(Rate {
            qps: 10.0,
            burst: 5,
        })
        .layer(Echo);
        let start = Instant::now();
        for i in 0..25u32 {
            let got = svc.ready().await.unwrap().call(i).await.unwrap();
            assert_eq!(got, i);
        }
        // 5 free, 20 more at 10/s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1990) && took < Duration::from_millis(2100),
            "{took:?}"
        );
    }
}
