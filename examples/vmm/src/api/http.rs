//! HTTP/1.1 framing for the API socket: requests parsed with `httparse` from a
//! connection's buffer, responses formatted into one. No I/O here (see
//! [`super::server`]), so every framing rule is unit-tested on byte strings.
//!
//! Rules: headers at most [`MAX_HEADER_BYTES`] and [`MAX_HEADERS`] lines; a body only
//! with `Content-Length`, at most [`MAX_BODY_BYTES`] (Firecracker's limit);
//! `Transfer-Encoding` is refused (501); `Expect: 100-continue` is answered; HTTP/1.0
//! and `Connection: close` end the connection after the response, HTTP/1.1 keeps it.

/// The largest request head (request line and headers), in bytes.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// The largest request body, in bytes (Firecracker's 50 KiB).
pub const MAX_BODY_BYTES: usize = 50 * 1024;

/// The most header lines a request may have.
pub const MAX_HEADERS: usize = 32;

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The request target, e.g. `/drives/rootfs` (any `?query` removed).
    pub path: String,
    /// The body (`Content-Length` bytes; empty without one).
    pub body: Vec<u8>,
    /// Whether the connection ends after the response (HTTP/1.0 without keep-alive, or
    /// `Connection: close`).
    pub close: bool,
}

/// A request that cannot be served: answered with `status` and `message`, then the
/// connection is closed (the rest of its bytes cannot be framed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramingError {
    /// The HTTP status.
    pub status: u16,
    /// The `fault_message`.
    pub message: String,
}

impl FramingError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        FramingError {
            status,
            message: message.into(),
        }
    }
}

/// What the start of a connection's buffer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet; `expect_continue` when the head is complete and asks
    /// for `100 Continue` before the client sends its body.
    Incomplete {
        /// The client waits for `100 Continue`.
        expect_continue: bool,
    },
    /// A request, and how many bytes of the buffer it took.
    Request(HttpRequest, usize),
    /// A request that cannot be served.
    Error(FramingError),
}

/// Parses the request at the start of `buf`.
pub fn parse_request(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEADER_BYTES {
                return Parsed::Error(head_too_large());
            }
            return Parsed::Incomplete {
                expect_continue: false,
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Error(FramingError::new(
                400,
                format!("too many request headers (at most {MAX_HEADERS})"),
            ))
        }
        Err(e) => {
            return Parsed::Error(FramingError::new(
                400,
                format!("malformed HTTP request: {e}"),
            ))
        }
    };
    if head_len > MAX_HEADER_BYTES {
        return Parsed::Error(head_too_large());
    }
    // Complete heads always have these.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Error(FramingError::new(400, "malformed HTTP request line"));
    };
    let mut close = version == 0;
    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for header in req.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        let value = value.trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let n = match value.parse::<usize>() {
                Ok(n) if value.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => {
                    return Parsed::Error(FramingError::new(
                        400,
                        format!("invalid Content-Length '{value}'"),
                    ))
                }
            };
            if content_length.is_some_and(|m| m != n) {
                return Parsed::Error(FramingError::new(400, "conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            let what = if value.to_ascii_lowercase().contains("chunked") {
                "chunked bodies (Transfer-Encoding: chunked) are".to_string()
            } else {
                format!("Transfer-Encoding '{value}' is")
            };
            return Parsed::Error(FramingError::new(
                501,
                format!("{what} not supported; send the body with a Content-Length"),
            ));
        } else if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        } else if header.name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case("100-continue") {
                expect_continue = true;
            } else {
                return Parsed::Error(FramingError::new(
                    417,
                    format!("Expect '{value}' is not supported"),
                ));
            }
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_BODY_BYTES {
        return Parsed::Error(FramingError::new(
            413,
            format!(
                "request body of {body_len} bytes is larger than the limit of \
                 {MAX_BODY_BYTES} bytes"
            ),
        ));
    }
    let end = head_len + body_len;
    let Some(body) = buf.get(head_len..end) else {
        return Parsed::Incomplete {
            expect_continue: expect_continue && body_len > 0,
        };
    };
    let path = target.split('?').next().unwrap_or(target);
    Parsed::Request(
        HttpRequest {
            method: method.to_string(),
            path: path.to_string(),
            body: body.to_vec(),
            close,
        },
        end,
    )
}

fn head_too_large() -> FramingError {
    FramingError::new(
        400,
        format!("request headers are larger than the limit of {MAX_HEADER_BYTES} bytes"),
    )
}

/// The interim response to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The reason phrase of `status`.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        417 => "Expectation Failed",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// Appends a response to `out`: status line, `Server`, `Content-Length` (always),
/// `Content-Type: application/json` when there is a body, `Connection: close` when
/// `close`.
pub fn write_response(out: &mut Vec<u8>, status: u16, body: Option<&[u8]>, close: bool) {
    let body = body.unwrap_or(&[]);
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nServer: Ember\r\nContent-Length: {}\r\n",
        reason(status),
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
}

/// The JSON body of an error: `{"fault_message": "..."}`.
pub fn fault_body(message: &str) -> Vec<u8> {
    serde_json::json!({ "fault_message": message })
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(p: Parsed) -> (HttpRequest, usize) {
        match p {
            Parsed::Request(r, n) => (r, n),
            other => panic!("not a request: {other:?}"),
        }
    }

    fn error(p: Parsed) -> FramingError {
        match p {
            Parsed::Error(e) => e,
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn a_get_without_body() {
        let raw = b"GET /?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\nPUT";
        let (r, n) = request(parse_request(raw));
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/");
        assert!(r.body.is_empty());
        assert!(!r.close);
        assert_eq!(n, raw.len() - 3, "the next request's bytes stay");
    }

    #[test]
    fn a_put_with_body_arrives_in_pieces() {
        let raw = b"PUT /vm HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        for cut in 0..raw.len() {
            assert_eq!(
                parse_request(&raw[..cut]),
                Parsed::Incomplete {
                    expect_continue: false
                },
                "{cut}"
            );
        }
        let (r, n) = request(parse_request(raw));
        assert_eq!((r.method.as_str(), r.path.as_str()), ("PUT", "/vm"));
        assert_eq!(r.body, b"hello");
        assert_eq!(n, raw.len());
    }

    #[test]
    fn connection_close_and_http_1_0() {
        let (r, _) = request(parse_request(
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        ));
        assert!(r.close);
        let (r, _) = request(parse_request(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(r.close);
        let (r, _) = request(parse_request(
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        ));
        assert!(!r.close);
    }

    #[test]
    fn chunked_bodies_are_refused() {
        let e = error(parse_request(
            b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ));
        assert_eq!(e.status, 501);
        assert!(e.message.contains("chunked"), "{}", e.message);
        assert!(e.message.contains("Content-Length"), "{}", e.message);
    }

    #[test]
    fn a_body_over_50_kib_is_refused_before_it_arrives() {
        let e = error(parse_request(
            b"PUT /vm HTTP/1.1\r\nContent-Length: 51201\r\n\r\n",
        ));
        assert_eq!(e.status, 413);
        assert!(e.message.contains("51201"), "{}", e.message);
        assert!(e.message.contains("51200"), "{}", e.message);
        // The limit itself is fine.
        assert_eq!(
            parse_request(b"PUT /vm HTTP/1.1\r\nContent-Length: 51200\r\n\r\n"),
            Parsed::Incomplete {
                expect_continue: false
            }
        );
    }

    #[test]
    fn headers_over_8_kib_are_refused() {
        let mut raw = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', MAX_HEADER_BYTES));
        let e = error(parse_request(&raw));
        assert_eq!(e.status, 400);
        assert!(e.message.contains("8192"), "{}", e.message);
        // Complete but too long, too.
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(error(parse_request(&raw)).status, 400);
    }

    #[test]
    fn bad_content_length_and_garbage() {
        for raw in [
            &b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"[..],
            b"PUT / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"\x00\x01garbage\r\n\r\n",
        ] {
            assert_eq!(error(parse_request(raw)).status, 400, "{raw:?}");
        }
    }

    #[test]
    fn expect_100_continue() {
        assert_eq!(
            parse_request(b"PUT /vm HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"),
            Parsed::Incomplete {
                expect_continue: true
            }
        );
        let e = error(parse_request(b"PUT /vm HTTP/1.1\r\nExpect: magic\r\n\r\n"));
        assert_eq!(e.status, 417);
    }

    #[test]
    fn responses_carry_length_and_type() {
        let mut out = Vec::new();
        write_response(&mut out, 204, None, false);
        assert_eq!(
            out,
            b"HTTP/1.1 204 No Content\r\nServer: Ember\r\nContent-Length: 0\r\n\r\n"
        );
        out.clear();
        write_response(&mut out, 400, Some(&fault_body("no \"x\"")), true);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(
            text.contains("Content-Type: application/json\r\n"),
            "{text}"
        );
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(text.contains("Content-Length: 28\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\n{\"fault_message\":\"no \\\"x\\\"\"}"),
            "{text}"
        );
    }
}
