//! The page and its files, and the security headers every page carries.

use axum::body::Body;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
font-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[derive(rust_embed::Embed)]
#[folder = "web/dist/"]
#[allow_missing = true]
struct Assets;

const FALLBACK_PAGE: &str = "<!doctype html><html><head><meta charset=\"utf-8\"><title>Tether</title></head>\
<body><h1>Tether</h1><p>The page was not built into this gateway: run <code>cargo dev up</code> to build the page.</p></body></html>";

pub(crate) fn with_security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

pub(crate) async fn index_page() -> Response {
    let body: Body = match Assets::get("index.html") {
        Some(f) => Body::from(f.data.into_owned()),
        None => Body::from(FALLBACK_PAGE),
    };
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_security_headers(r)
}

pub(crate) async fn asset(Path(path): Path<String>) -> Response {
    let file = Assets::get(&format!("assets/{path}")).or_else(|| Assets::get(&path));
    let Some(file) = file else {
        return with_security_headers(StatusCode::NOT_FOUND.into_response());
    };
    let mime = file.metadata.mimetype().to_owned();
    let mut r = Response::new(Body::from(file.data.into_owned()));
    if let Ok(v) = HeaderValue::from_str(&mime) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_security_headers(r)
}

pub(crate) fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A small page in words (sign-in errors, the popup's "done").
pub(crate) fn html_page(
    status: StatusCode,
    title: &str,
    body_html: &str,
    script: Option<&str>,
) -> Response {
    let script = script
        .map(|s| format!("<script src=\"{s}\"></script>"))
        .unwrap_or_default();
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <link rel=\"stylesheet\" href=\"/assets/main.css\">{script}</head><body><main class=\"card\">\
         <h1>{}</h1>{body_html}</main></body></html>",
        html_escape(title),
        html_escape(title)
    );
    let mut r = (status, page).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    with_security_headers(r)
}
