//! What a local server needs against the web pages its user visits: a `Host` check (DNS
//! rebinding: a page on `evil.example` whose name later resolves to 127.0.0.1 talks to us as
//! same-origin) and an `Origin` check (a cross-origin "simple" POST, `text/plain`, is sent
//! by browsers without a preflight and would be executed). CORS response headers come from
//! `tower-http`'s `CorsLayer`, only for the origins `--cors-origin` names.
//!
//! Clients that are not browsers (curl, the openai and ollama packages) send no `Origin` and
//! a `Host` naming the address they dialled, so they pass untouched.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::Shared;
use crate::error::ApiError;

/// Refuses (403) a request whose `Host` is not a name this server serves, or whose `Origin`
/// is a web page the server was not told to trust.
pub async fn check_host_and_origin(
    State(state): State<Shared>,
    req: Request,
    next: Next,
) -> Response {
    if let Err(message) = verdict(&state.config, req.headers())
        .and_then(|()| authority_verdict(&state.config, req.uri()))
    {
        let err = ApiError::new(StatusCode::FORBIDDEN, "invalid_request_error", message)
            .code("forbidden");
        return err.for_path(req.uri().path());
    }
    next.run(req).await
}

/// An absolute-form request target (`POST http://evil.example/v1/... HTTP/1.1`) names a host
/// too; it must pass the same check as `Host`.
fn authority_verdict(config: &crate::ServerConfig, uri: &axum::http::Uri) -> Result<(), String> {
    match uri.authority().map(|a| a.as_str()) {
        None => Ok(()),
        Some(raw) => match host_name(raw.rsplit('@').next().unwrap_or(raw)) {
            Some(name) if host_allowed(config, &name) => Ok(()),
            _ => Err(format!(
                "the request target names the host `{raw}`, which is not served here; start \
                 the server with `--allowed-hosts` to serve it"
            )),
        },
    }
}

fn verdict(config: &crate::ServerConfig, headers: &HeaderMap) -> Result<(), String> {
    // Two `Host` headers are ambiguous (RFC 9112 §3.2): a proxy may route by the other one.
    if headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err("the request has more than one Host header".into());
    }
    let host = match headers.get(header::HOST) {
        // HTTP/1.0 clients may send none; browsers always send one.
        None => None,
        Some(v) => {
            let raw = v
                .to_str()
                .map_err(|_| "the Host header is not valid text".to_string())?;
            let name =
                host_name(raw).ok_or_else(|| format!("the Host header `{raw}` is malformed"))?;
            if !host_allowed(config, &name) {
                return Err(format!(
                    "the Host `{name}` is not served here (a web page may be trying to reach this \
                     local server through DNS rebinding); start the server with \
                     `--allowed-hosts {name}` to serve that name"
                ));
            }
            Some(raw.to_ascii_lowercase())
        }
    };
    if let Some(v) = headers.get(header::ORIGIN) {
        let origin = v
            .to_str()
            .map_err(|_| "the Origin header is not valid text".to_string())?;
        if !origin_allowed(config, origin, host.as_deref()) {
            return Err(format!(
                "requests from the web origin `{origin}` are refused; start the server with \
                 `--cors-origin {origin}` to allow that page"
            ));
        }
    }
    Ok(())
}

/// The name in a `Host` value, lower case, without port or trailing dot (`[::1]:8080` gives
/// `::1`); `None` when it cannot be a host.
pub fn host_name(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let name = if let Some(rest) = raw.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        inside
    } else {
        match raw.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return None,
            None => raw,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'));
    valid.then_some(name)
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_loopback_name(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Loopback names, any IP literal (a browser sends an IP as `Host` only when it really
/// dialled that address, so rebinding, which needs a name, cannot produce one), the bind
/// address, and the `--allowed-hosts` names (`*` for any, `.example.com` for its subdomains).
fn host_allowed(config: &crate::ServerConfig, name: &str) -> bool {
    is_loopback_name(name)
        || name.parse::<IpAddr>().is_ok()
        || host_name(&config.host).is_some_and(|h| h == name)
        || config.allowed_hosts.iter().any(|a| matches_host(a, name))
}

fn matches_host(pattern: &str, name: &str) -> bool {
    let pattern = pattern.trim().to_ascii_lowercase();
    // `name:8080` in the list means the name (ports are not part of the check).
    let pattern = match pattern.strip_prefix('.') {
        None if pattern != "*" => host_name(&pattern).unwrap_or(pattern),
        _ => pattern,
    };
    let pattern = pattern.strip_suffix('.').unwrap_or(&pattern);
    pattern == "*"
        || pattern == name
        || pattern
            .strip_prefix('.')
            .is_some_and(|suffix| name == suffix || name.ends_with(&format!(".{suffix}")))
}

/// A page may call the server when `--cors-origin` names its origin (or is `*`), when it is
/// served from a loopback name (a local web UI), or when it is the server's own origin.
fn origin_allowed(config: &crate::ServerConfig, origin: &str, host: Option<&str>) -> bool {
    let origin = origin.trim();
    if config
        .cors_origins
        .iter()
        .any(|o| o == "*" || o.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    // `null` (sandboxed frames, file: pages) is what an attacker can always produce.
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    if !matches!(scheme, "http" | "https") {
        return false;
    }
    let same_origin = host.is_some_and(|h| h.eq_ignore_ascii_case(authority));
    same_origin || host_name(authority).is_some_and(|n| is_loopback_name(&n))
}

/// CORS headers for the origins `--cors-origin` allows; none at all by default.
pub fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Browsers send origins in lower case; the list is matched byte for byte.
        AllowOrigin::list(origins.iter().filter_map(|o| {
            HeaderValue::from_str(&o.trim().trim_end_matches('/').to_ascii_lowercase()).ok()
        }))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            // Whatever the page's client sends (openai-node adds `x-stainless-*` headers):
            // who may call is decided by the origin list and the API key, not header names.
            .allow_headers(tower_http::cors::AllowHeaders::mirror_request())
            .max_age(std::time::Duration::from_secs(600)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServerConfig;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn host_names_parse() {
        assert_eq!(host_name("127.0.0.1:8080").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_name("[::1]:8080").as_deref(), Some("::1"));
        assert_eq!(host_name("[::1]").as_deref(), Some("::1"));
        assert_eq!(host_name("LocalHost.").as_deref(), Some("localhost"));
        assert_eq!(host_name("evil.example").as_deref(), Some("evil.example"));
        assert_eq!(host_name("a b"), None);
        assert_eq!(host_name("x:port"), None);
        assert_eq!(host_name("[::1]x"), None);
        assert_eq!(host_name(""), None);
    }

    #[test]
    fn hosts_other_than_loopback_and_ips_need_allowing() {
        let mut c = ServerConfig::new("m");
        for ok in [
            "localhost:8080",
            "127.0.0.1",
            "[::1]:1",
            "app.localhost",
            "192.168.1.5:8080",
        ] {
            assert!(verdict(&c, &headers(&[("host", ok)])).is_ok(), "{ok}");
        }
        let err = verdict(&c, &headers(&[("host", "evil.example")])).expect_err("refused");
        assert!(err.contains("--allowed-hosts evil.example"), "{err}");
        c.allowed_hosts = vec![".example".into()];
        assert!(verdict(&c, &headers(&[("host", "evil.example:80")])).is_ok());
        assert!(verdict(&c, &headers(&[("host", "example.org")])).is_err());
        c.allowed_hosts = vec!["Ember.LAN:8080".into()];
        assert!(verdict(&c, &headers(&[("host", "ember.lan:9000")])).is_ok());
        c.allowed_hosts = vec!["*".into()];
        assert!(verdict(&c, &headers(&[("host", "anything.test")])).is_ok());
        c = ServerConfig::new("m");
        c.host = "myhost.lan".into();
        assert!(verdict(&c, &headers(&[("host", "MYHOST.lan:8080")])).is_ok());
    }

    #[test]
    fn cross_origin_pages_need_cors_origin() {
        let mut c = ServerConfig::new("m");
        let h = |o: &str| headers(&[("host", "127.0.0.1:8080"), ("origin", o)]);
        assert!(verdict(&c, &h("https://evil.example")).is_err());
        assert!(verdict(&c, &h("null")).is_err());
        assert!(verdict(&c, &h("http://1.2.3.4")).is_err());
        assert!(verdict(&c, &h("http://localhost:3000")).is_ok());
        assert!(verdict(&c, &h("http://127.0.0.1:8080")).is_ok());
        c.cors_origins = vec!["https://app.example/".into()];
        assert!(verdict(&c, &h("https://app.example")).is_ok());
        assert!(verdict(&c, &h("https://evil.example")).is_err());
        c.cors_origins = vec!["*".into()];
        assert!(verdict(&c, &h("https://evil.example")).is_ok());
    }

    #[test]
    fn ambiguous_hosts_are_refused() {
        let c = ServerConfig::new("m");
        let mut h = headers(&[("host", "127.0.0.1")]);
        h.append(header::HOST, HeaderValue::from_static("evil.example"));
        assert!(verdict(&c, &h).is_err());
        let uri: axum::http::Uri = "http://evil.example/v1/models".parse().expect("uri");
        assert!(authority_verdict(&c, &uri).is_err());
        let uri: axum::http::Uri = "http://127.0.0.1:8080/v1/models".parse().expect("uri");
        assert!(authority_verdict(&c, &uri).is_ok());
        let uri: axum::http::Uri = "/v1/models".parse().expect("uri");
        assert!(authority_verdict(&c, &uri).is_ok());
    }
}
