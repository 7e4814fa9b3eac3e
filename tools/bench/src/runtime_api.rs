//! A minimal Lambda Runtime API on loopback, enough to run a function binary as Lambda does:
//! `GET /2018-06-01/runtime/invocation/next` (held until the bench delivers an event), and
//! `POST …/invocation/{id}/response`, `…/invocation/{id}/error`, `…/runtime/init/error`.
//!
//! Plain HTTP/1.1 over std threads: the runtime client keeps its connection alive and may
//! send chunked bodies, so both are handled. Every call is reported with the instant it
//! arrived, so the bench can time init (spawn → first `next`) apart from the event.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const NEXT: &str = "/2018-06-01/runtime/invocation/next";
const INVOCATION: &str = "/2018-06-01/runtime/invocation/";
const INIT_ERROR: &str = "/2018-06-01/runtime/init/error";

/// A call the function made, with when it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// The function asks for its next event.
    Next { at: Instant },
    /// The function answered an invocation.
    Response {
        at: Instant,
        request_id: String,
        body: Vec<u8>,
    },
    /// The function reported an invocation error.
    Error {
        at: Instant,
        request_id: String,
        body: Vec<u8>,
    },
    /// The function failed during init.
    InitError { at: Instant, body: Vec<u8> },
}

/// The emulator: a listener on `127.0.0.1:<port>`, a channel of calls, and the events to hand
/// out to held `next` requests.
pub struct RuntimeApi {
    pub addr: SocketAddr,
    calls: Receiver<Call>,
    events: Sender<Vec<u8>>,
}

/// What each connection needs.
struct Shared {
    calls: Sender<Call>,
    events: Mutex<Receiver<Vec<u8>>>,
    function_arn: String,
    timeout: Duration,
    invocations: Mutex<u64>,
}

impl RuntimeApi {
    /// Listens on a free loopback port. `timeout` sets each invocation's deadline header.
    pub fn start(function_arn: &str, timeout: Duration) -> std::io::Result<RuntimeApi> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let (call_tx, calls) = channel();
        let (events, event_rx) = channel();
        let shared = Arc::new(Shared {
            calls: call_tx,
            events: Mutex::new(event_rx),
            function_arn: function_arn.to_owned(),
            timeout,
            invocations: Mutex::new(0),
        });
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    // A connection ends when the function exits or the bench drops the API.
                    let _ = serve(stream, &shared);
                });
            }
        });
        Ok(RuntimeApi {
            addr,
            calls,
            events,
        })
    }

    /// The value of `AWS_LAMBDA_RUNTIME_API`.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// Hands `event` to the (current or next) held `next` request.
    pub fn deliver(&self, event: Vec<u8>) {
        // The receiver lives as long as the listener thread, which never ends.
        let _ = self.events.send(event);
    }

    /// The next call the function makes, or `None` after `timeout`.
    pub fn next_call(&self, timeout: Duration) -> Option<Call> {
        self.calls.recv_timeout(timeout).ok()
    }
}

/// One parsed request.
struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    while let Some(request) = read_request(&mut reader)? {
        let at = Instant::now();
        if request.method == "GET" && request.path == NEXT {
            let _ = shared.calls.send(Call::Next { at });
            // Held until the bench delivers an event, as Lambda holds it until one arrives.
            let event = match shared.events.lock() {
                Ok(events) => events.recv(),
                Err(_) => return Ok(()),
            };
            let Ok(event) = event else { return Ok(()) };
            let request_id = {
                let mut n = shared.invocations.lock().unwrap_or_else(|p| p.into_inner());
                *n += 1;
                format!("00000000-0000-4000-8000-{:012}", *n)
            };
            let deadline = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                + shared.timeout;
            let headers = [
                ("Content-Type", "application/json".to_owned()),
                ("Lambda-Runtime-Aws-Request-Id", request_id),
                (
                    "Lambda-Runtime-Deadline-Ms",
                    deadline.as_millis().to_string(),
                ),
                (
                    "Lambda-Runtime-Invoked-Function-Arn",
                    shared.function_arn.clone(),
                ),
                (
                    "Lambda-Runtime-Trace-Id",
                    "Root=1-00000000-000000000000000000000000;Sampled=0".to_owned(),
                ),
            ];
            respond(&mut writer, "200 OK", &headers, &event)?;
        } else if request.method == "POST" && request.path == INIT_ERROR {
            let _ = shared.calls.send(Call::InitError {
                at,
                body: request.body,
            });
            respond(&mut writer, "202 Accepted", &[], br#"{"status":"OK"}"#)?;
        } else if let Some(rest) = request
            .path
            .strip_prefix(INVOCATION)
            .filter(|_| request.method == "POST")
        {
            let call = match rest.split_once('/') {
                Some((id, "response")) => Call::Response {
                    at,
                    request_id: id.to_owned(),
                    body: request.body,
                },
                Some((id, "error")) => Call::Error {
                    at,
                    request_id: id.to_owned(),
                    body: request.body,
                },
                _ => {
                    respond(&mut writer, "404 Not Found", &[], b"{}")?;
                    continue;
                }
            };
            let _ = shared.calls.send(call);
            respond(&mut writer, "202 Accepted", &[], br#"{"status":"OK"}"#)?;
        } else {
            respond(&mut writer, "404 Not Found", &[], b"{}")?;
        }
    }
    Ok(())
}

fn read_request(reader: &mut impl BufRead) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default().to_owned(),
    );
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        read_chunked(reader)?
    } else {
        let len = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0usize);
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        body
    };
    Ok(Some(Request { method, path, body }))
}

fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let hex = size.trim().split(';').next().unwrap_or_default();
        let n = usize::from_str_radix(hex, 16)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if n == 0 {
            // Trailers, then the blank line that ends the body.
            loop {
                let mut t = String::new();
                if reader.read_line(&mut t)? == 0 || t.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + n, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf)?;
    }
}

fn respond(
    w: &mut impl Write,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_and_sized_bodies_are_read_alike() {
        let sized = b"POST /a HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello";
        let chunked =
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n";
        for raw in [&sized[..], &chunked[..]] {
            let r = read_request(&mut &raw[..]).unwrap().unwrap();
            assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/a"));
            assert_eq!(r.body, b"hello");
        }
    }

    #[test]
    fn a_held_next_gets_the_delivered_event_with_lambdas_headers() {
        let api =
            RuntimeApi::start("arn:aws:lambda:us-east-1:1:function:f", Duration::ZERO).unwrap();
        let mut conn = TcpStream::connect(api.addr).unwrap();
        conn.write_all(format!("GET {NEXT} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        assert!(matches!(
            api.next_call(Duration::from_secs(5)),
            Some(Call::Next { .. })
        ));
        api.deliver(b"{}".to_vec());
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut text = String::new();
        while !text.ends_with("\r\n\r\n") {
            reader.read_line(&mut text).unwrap();
        }
        assert!(text.starts_with("HTTP/1.1 200"));
        assert!(
            text.contains("Lambda-Runtime-Aws-Request-Id: 00000000-0000-4000-8000-000000000001")
        );
        assert!(text.contains("Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda"));
        assert!(text.contains("Lambda-Runtime-Deadline-Ms: "));
    }
}
