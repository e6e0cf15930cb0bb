//! The `http` runtime: the work item is sent to an HTTP service as JSON; a 2xx JSON object is the
//! result; a 4xx is a failure the card's retry policy does not apply to; a 5xx, a timeout or a
//! refused connection is a failure it does. Header values come from environment variables and
//! are never logged (their `Debug` shows only the names).

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::agent::{not_runnable, Failure, Reply};
use crate::cards::{Card, Runtime};
use crate::envelope::WorkItem;
use crate::error::{Error, Result};

/// The largest answer read; a larger one is a failure.
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// Runs a card's `http` runtime.
#[derive(Clone)]
pub struct HttpHandler {
    client: reqwest::Client,
    method: Method,
    url: String,
    headers: HeaderMap,
}

impl std::fmt::Debug for HttpHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHandler")
            .field("method", &self.method)
            .field("url", &self.url)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl HttpHandler {
    /// The handler for `card`; reads its header values from the environment now, and fails
    /// naming the variable when one is not set.
    pub fn new(card: &Card) -> Result<Self> {
        let Runtime::Http {
            url,
            method,
            headers,
            timeout,
        } = &card.runtime
        else {
            return Err(not_runnable(card));
        };
        let setup = |why: String| Error::Setup(format!("card `{}`: {why}", card.name));
        let method = Method::from_bytes(method.to_uppercase().as_bytes())
            .map_err(|_| setup(format!("`runtime.method` `{method}` is not an HTTP method")))?;
        let mut map = HeaderMap::new();
        for (name, var) in headers {
            let value = std::env::var(var).map_err(|_| {
                setup(format!(
                    "header `{name}` takes its value from `{var}`, which is not set; set it (values never go in the card)"
                ))
            })?;
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| setup(format!("`{name}` is not a header name")))?;
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| setup(format!("the value of `{var}` is not a valid header value")))?;
            value.set_sensitive(true);
            map.insert(name, value);
        }
        map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let client = reqwest::Client::builder()
            .timeout(timeout.unwrap_or(card.timeout))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| setup(format!("HTTP client: {e}")))?;
        Ok(Self {
            client,
            method,
            url: url.clone(),
            headers: map,
        })
    }

    async fn answer(&self, item: &WorkItem) -> Result<Reply, Failure> {
        let body = serde_json::to_vec(item).map_err(|e| e.to_string())?;
        let mut answer = self
            .client
            .request(self.method.clone(), &self.url)
            .headers(self.headers.clone())
            .body(body)
            .send()
            .await
            .map_err(|e| format!("{} {}: {}", self.method, self.url, describe(e)))?;
        let status = answer.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = answer
            .chunk()
            .await
            .map_err(|e| format!("reading the answer: {}", describe(e)))?
        {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_ANSWER_BYTES {
                return Err(format!("the answer is over {MAX_ANSWER_BYTES} bytes").into());
            }
        }
        let text = || String::from_utf8_lossy(&bytes[..bytes.len().min(500)]).into_owned();
        match status {
            s if s.is_success() => reply(&bytes),
            s if s.is_client_error()
                && s != StatusCode::REQUEST_TIMEOUT
                && s != StatusCode::TOO_MANY_REQUESTS =>
            {
                Err(Failure::permanent(format!("HTTP {s}: {}", text())))
            }
            s => Err(format!("HTTP {s}: {}", text()).into()),
        }
    }
}

/// What went wrong with a request, without its URL or any header.
fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection refused or unreachable".into()
    } else {
        e.without_url().to_string()
    }
}

/// A JSON object answer as a result; a top-level numeric `confidence` becomes its confidence.
pub fn reply(bytes: &[u8]) -> Result<Reply, Failure> {
    let payload: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("the answer is not JSON: {e}"))?;
    if !payload.is_object() {
        return Err("the answer is JSON but not an object".into());
    }
    let confidence = payload.get("confidence").and_then(Value::as_f64);
    Ok(Reply {
        payload,
        confidence,
        usage: None,
    })
}

impl super::Runner for HttpHandler {
    async fn run(&self, item: &WorkItem) -> Result<Reply, Failure> {
        self.answer(item).await
    }
}
