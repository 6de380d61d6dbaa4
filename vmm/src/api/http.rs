//! Minimal HTTP/1.1 framing for the API server: request parsing (httparse) with size limits,
//! and response serialization.

use serde::Serialize;

/// Largest accepted header section (request line and headers), in bytes.
pub(crate) const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Largest accepted request body, in bytes.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most headers one request may carry.
const MAX_HEADERS: usize = 64;

/// A complete request.
#[derive(Debug)]
pub(crate) struct Request {
    /// The method, as sent.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string (after `?`), if any.
    pub query: Option<String>,
    /// The body (`Content-Length` bytes; empty without `Content-Length`).
    pub body: Vec<u8>,
}

/// What the bytes received so far on a connection amount to.
#[derive(Debug)]
pub(crate) enum Parse {
    /// More bytes are needed.
    Partial,
    /// A whole request.
    Complete(Request),
    /// The request is unacceptable: send this answer and close.
    Error(Response),
}

/// Parses the request at the start of `buf`. Bytes after the request are ignored (one request
/// per connection).
pub(crate) fn parse_request(buf: &[u8]) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let header_len = match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEADER_BYTES {
                return Parse::Error(header_too_large());
            }
            return Parse::Partial;
        }
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => return Parse::Error(header_too_large()),
        Err(e) => return Parse::Error(Response::error(400, &format!("malformed request: {e}"))),
    };
    if header_len > MAX_HEADER_BYTES {
        return Parse::Error(header_too_large());
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Parse::Error(Response::error(400, "malformed request line"));
    };

    let mut content_length: Option<usize> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parse::Error(Response::error(
                411,
                "Transfer-Encoding is not supported: send a Content-Length",
            ));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let Some(n) = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                return Parse::Error(Response::error(400, "invalid Content-Length"));
            };
            if n > MAX_BODY_BYTES as u64 {
                return Parse::Error(Response::error(
                    413,
                    &format!("request body over {MAX_BODY_BYTES} bytes"),
                ));
            }
            let n = n as usize;
            if content_length.is_some_and(|old| old != n) {
                return Parse::Error(Response::error(400, "conflicting Content-Length headers"));
            }
            content_length = Some(n);
        }
    }
    let body_len = content_length.unwrap_or(0);
    let Some(body) = buf.get(header_len..header_len + body_len) else {
        return Parse::Partial;
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    Parse::Complete(Request {
        method: method.to_string(),
        path: path.to_string(),
        query,
        body: body.to_vec(),
    })
}

fn header_too_large() -> Response {
    Response::error(
        431,
        &format!("request header section over {MAX_HEADER_BYTES} bytes"),
    )
}

/// Splits a query string into `(name, value)` pairs (no percent-decoding: the API's parameters
/// are plain ASCII).
pub(crate) fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// An answer. Every answer closes the connection.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Response {
    status: u16,
    body: Option<Vec<u8>>,
    allow: Option<&'static str>,
}

impl Response {
    /// An answer with a JSON body.
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                body: Some(body),
                allow: None,
            },
            Err(e) => Self::error(500, &format!("cannot serialize the answer: {e}")),
        }
    }

    /// An error answer with body `{"error": msg, "fault_message": msg}` (the second is what
    /// Firecracker's clients read).
    pub fn error(status: u16, msg: &str) -> Self {
        let body = serde_json::json!({ "error": msg, "fault_message": msg })
            .to_string()
            .into_bytes();
        Response {
            status,
            body: Some(body),
            allow: None,
        }
    }

    /// 204 No Content.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
            allow: None,
        }
    }

    /// 405 Method Not Allowed, listing the allowed methods.
    pub fn method_not_allowed(method: &str, allow: &'static str) -> Self {
        let mut r = Self::error(
            405,
            &format!("method {method} not allowed here (allowed: {allow})"),
        );
        r.allow = Some(allow);
        r
    }

    /// The status code.
    #[cfg(test)]
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The bytes to send.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: tide\r\nConnection: close\r\n",
            self.status,
            reason(self.status)
        );
        if let Some(allow) = self.allow {
            out.push_str(&format!("Allow: {allow}\r\n"));
        }
        let mut out = match &self.body {
            Some(body) => {
                out.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                ));
                let mut bytes = out.into_bytes();
                bytes.extend_from_slice(body);
                bytes
            }
            // 204 carries neither a body nor Content-Length (RFC 9110, 8.6).
            None => {
                out.push_str("\r\n");
                out.into_bytes()
            }
        };
        out.shrink_to_fit();
        out
    }
}

/// The reason phrase for the status codes the server uses.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(p: Parse) -> u16 {
        match p {
            Parse::Error(r) => r.status(),
            Parse::Partial => 0,
            Parse::Complete(_) => 1,
        }
    }

    #[test]
    fn parses_a_request_with_body_and_query() {
        let raw = b"PATCH /hotplug/memory?x=1 HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcdEXTRA";
        for cut in 0..raw.len() - 9 {
            assert!(
                matches!(parse_request(&raw[..cut]), Parse::Partial),
                "cut {cut}"
            );
        }
        let Parse::Complete(r) = parse_request(raw) else {
            panic!("not complete")
        };
        assert_eq!(r.method, "PATCH");
        assert_eq!(r.path, "/hotplug/memory");
        assert_eq!(r.query.as_deref(), Some("x=1"));
        assert_eq!(r.body, b"abcd");
    }

    #[test]
    fn rejects_bad_requests() {
        assert_eq!(status_of(parse_request(b"GARBAGE\r\n\r\n")), 400);
        assert_eq!(status_of(parse_request(b"GET /vm HTTP/2.0\r\n\r\n")), 400);
        assert_eq!(
            status_of(parse_request(
                b"GET /vm HTTP/1.1\r\nContent-Length: x\r\n\r\n"
            )),
            400
        );
        assert_eq!(
            status_of(parse_request(
                b"GET /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
            )),
            400
        );
        assert_eq!(
            status_of(parse_request(
                b"PATCH /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            411
        );
        assert_eq!(
            status_of(parse_request(
                b"PATCH /vm HTTP/1.1\r\nContent-Length: 65537\r\n\r\n"
            )),
            413
        );
        let mut big = b"GET /vm HTTP/1.1\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEADER_BYTES));
        assert_eq!(status_of(parse_request(&big)), 431);
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status_of(parse_request(&big)), 431);
        let mut many = b"GET /vm HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(status_of(parse_request(&many)), 431);
    }

    #[test]
    fn serializes_responses() {
        let r = String::from_utf8(Response::error(404, "nope").to_bytes()).unwrap_or_default();
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(r.contains("Content-Type: application/json\r\nContent-Length: 39\r\n\r\n"));
        assert!(r.ends_with("{\"error\":\"nope\",\"fault_message\":\"nope\"}"));
        let r = String::from_utf8(Response::no_content().to_bytes()).unwrap_or_default();
        assert!(r.starts_with("HTTP/1.1 204 No Content\r\n") && r.ends_with("\r\n\r\n"));
        assert!(!r.contains("Content-Length"));
    }

    #[test]
    fn splits_queries() {
        let q: Vec<_> = query_pairs("a=1&&b&c=").collect();
        assert_eq!(q, [("a", "1"), ("b", ""), ("c", "")]);
    }
}
