//! Who may write. The console's write actions need the token it was started with
//! (`--token-env NAME`; the token itself is never printed or logged). A browser signs in once at
//! `/login`: the console sets a cookie derived from the token (`HttpOnly`, `SameSite=Strict`),
//! and every write form carries a second value derived from the token, so a page of another site
//! can neither read nor forge it; a request whose `Origin` is another site is refused too.
//! Programs may send `Authorization: Bearer <token>` instead of the cookie.

use std::sync::Arc;

use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;

use super::html::{esc, page};
use super::Console;
use crate::signing::sha256_hex;

const COOKIE: &str = "switchyard_console";

/// The token and the values derived from it.
pub struct Auth {
    token: Option<String>,
}

/// What a request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token is configured: nobody writes.
    ReadOnly,
    /// A token is configured and this request does not carry it.
    Anonymous,
    /// The request carries the token.
    Writer,
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl Auth {
    /// With `token`, or read-only without one.
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()),
        }
    }

    fn derived(&self, purpose: &str) -> Option<String> {
        self.token
            .as_ref()
            .map(|t| sha256_hex(format!("switchyard-console:{purpose}:{t}").as_bytes()))
    }

    /// The hidden form value that write forms carry (`None` when read-only).
    pub fn csrf(&self) -> Option<String> {
        self.derived("csrf")
    }

    /// What the request with `headers` may do.
    pub fn access(&self, headers: &HeaderMap) -> Access {
        let (Some(token), Some(session)) = (&self.token, self.derived("session")) else {
            return Access::ReadOnly;
        };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(name, _)| *name == COOKIE)
            .map(|(_, value)| value);
        match (bearer, cookie) {
            (Some(b), _) if same(b, token) => Access::Writer,
            (_, Some(c)) if same(c, &session) => Access::Writer,
            _ => Access::Anonymous,
        }
    }

    /// Whether a write request may go on: it carries the token, the form's `csrf` value (a
    /// bearer request needs none) and comes from this site. A refusal is the status and why.
    pub fn check_write(
        &self,
        headers: &HeaderMap,
        csrf: Option<&str>,
    ) -> Result<(), (StatusCode, &'static str)> {
        let refuse = |status, why| Err((status, why));
        match self.access(headers) {
            Access::ReadOnly => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "the console is read-only: start it with --token-env NAME to allow writes",
                )
            }
            Access::Anonymous => {
                return refuse(StatusCode::UNAUTHORIZED, "sign in with the token at /login")
            }
            Access::Writer => {}
        }
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let local = host.is_some_and(|h| {
                origin == format!("http://{h}") || origin == format!("https://{h}")
            });
            if !local {
                return refuse(StatusCode::FORBIDDEN, "cross-site request refused");
            }
        }
        let bearer = headers.contains_key(header::AUTHORIZATION);
        let form_ok = match (csrf, self.csrf()) {
            (Some(given), Some(expected)) => same(given, &expected),
            _ => false,
        };
        if !bearer && !form_ok {
            return refuse(
                StatusCode::FORBIDDEN,
                "the form's csrf value is missing or wrong",
            );
        }
        Ok(())
    }

    /// A hidden `csrf` input for a write form.
    pub fn csrf_input(&self) -> String {
        self.csrf()
            .map(|c| {
                format!(
                    "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
                    esc(&c)
                )
            })
            .unwrap_or_default()
    }
}

/// `GET /login`: the sign-in form.
pub async fn login_page(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let body = match console.auth.access(&headers) {
        Access::ReadOnly => {
            "<p>This console is read-only: it was started without --token-env.</p>".to_string()
        }
        Access::Writer => "<p id=\"signed-in\">Signed in: the write actions are shown.</p>".into(),
        Access::Anonymous => "<form method=\"post\" action=\"/login\">\
             <label>Token <input type=\"password\" name=\"token\" id=\"token\"></label> \
             <button type=\"submit\" id=\"sign-in\">Sign in</button></form>"
            .into(),
    };
    axum::response::Html(page("Token", "/login", None, &body)).into_response()
}

/// The sign-in form's fields.
#[derive(Deserialize)]
pub struct Login {
    token: String,
}

/// `POST /login`: sets the session cookie when the token is right.
pub async fn login(State(console): State<Arc<Console>>, Form(form): Form<Login>) -> Response {
    let auth = &console.auth;
    let right = auth.token.as_deref().is_some_and(|t| same(t, &form.token));
    if !right {
        let status = match auth.token {
            None => StatusCode::FORBIDDEN,
            Some(_) => StatusCode::UNAUTHORIZED,
        };
        let body = page("Token", "/login", Some("wrong token"), "");
        return (status, axum::response::Html(body)).into_response();
    }
    let session = auth.derived("session").unwrap_or_default();
    let cookie = format!("{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

/// The fields of a write form sent by someone allowed to write: extracting it runs
/// [`Auth::check_write`] with the request's headers and the form's `csrf` field, and answers the
/// refusal (401 or 403) itself.
pub struct WriteForm(pub Vec<(String, String)>);

impl WriteForm {
    /// The value of field `name`, if the form has one.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl FromRequest<Arc<Console>> for WriteForm {
    type Rejection = Response;

    async fn from_request(request: Request, console: &Arc<Console>) -> Result<Self, Response> {
        let headers = request.headers().clone();
        let Form(fields) = Form::<Vec<(String, String)>>::from_request(request, console)
            .await
            .map_err(IntoResponse::into_response)?;
        let form = Self(fields);
        console
            .auth
            .check_write(&headers, form.field("csrf"))
            .map_err(IntoResponse::into_response)?;
        Ok(form)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn without_a_token_nobody_writes() {
        let auth = Auth::new(None);
        let bearer = headers(&[("authorization", "Bearer anything")]);
        assert_eq!(auth.access(&bearer), Access::ReadOnly);
        assert_eq!(
            auth.check_write(&bearer, None).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn the_cookie_is_derived_from_the_token_and_writes_need_the_csrf_value() {
        let auth = Auth::new(Some("s3cret".into()));
        let session = auth.derived("session").unwrap();
        assert!(!session.contains("s3cret"));
        let signed = headers(&[
            ("cookie", &format!("a=b; {COOKIE}={session}")),
            ("host", "h:1"),
        ]);
        assert_eq!(auth.access(&signed), Access::Writer);
        assert_eq!(auth.access(&headers(&[(COOKIE, "x")])), Access::Anonymous);
        assert_eq!(
            auth.check_write(&headers(&[]), None).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            auth.check_write(&signed, None).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        let csrf = auth.csrf().unwrap();
        assert!(auth.check_write(&signed, Some(&csrf)).is_ok());
        let mut foreign = signed.clone();
        foreign.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert_eq!(
            auth.check_write(&foreign, Some(&csrf)).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        let mut same = signed;
        same.insert(header::ORIGIN, "http://h:1".parse().unwrap());
        assert!(auth.check_write(&same, Some(&csrf)).is_ok());
    }
}
