//! A metering HTTP/1.1 proxy on loopback, in front of the local endpoint: it forwards every
//! request unchanged and counts requests and bytes on the wire (request plus response, heads
//! included) per AWS service.
//!
//! Why a proxy and not [`adpipe_aws::RequestCounter`]: the lake's traffic does not go through
//! the SDK clients adpipe configures. iceberg-rust's Glue catalog builds its own Glue client and
//! its `FileIO` reaches S3 through its own HTTP stack, so an SDK interceptor never sees them.
//! Pointing the lake's endpoint at this proxy counts every request the real code sends.
//!
//! The service is the SigV4 credential scope's (`Credential=…/<region>/<service>/aws4_request`),
//! else the `X-Amz-Target` prefix. S3 `GET`s are also counted by what they read ([`S3Object`]):
//! data files (which only the duplicate-key check reads), manifests, manifest lists and
//! `metadata.json` files, so a growth in S3 bytes per commit can be traced to its object kind.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use crate::soak::Traffic;

/// What the proxy has seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metered {
    /// By service (`s3`, `glue`, `dynamodb`, …).
    pub services: BTreeMap<String, Traffic>,
    /// S3 `GET`s of data files (`…/data/…`): response bytes.
    pub data_file_get_bytes: u64,
    /// S3 `GET`s of manifests (`…/metadata/…avro`, not `snap-`): response bytes.
    pub manifest_get_bytes: u64,
    /// S3 `GET`s of manifest lists (`…/metadata/snap-….avro`): response bytes.
    pub manifest_list_get_bytes: u64,
    /// S3 `GET`s of table metadata (`….metadata.json`): response bytes.
    pub metadata_json_get_bytes: u64,
}

/// What an S3 request path names, by the Iceberg table layout's file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Object {
    DataFile,
    Manifest,
    ManifestList,
    MetadataJson,
    Other,
}

impl S3Object {
    pub fn of_path(path: &str) -> S3Object {
        let key = path.split('?').next().unwrap_or(path);
        let name = key.rsplit('/').next().unwrap_or(key);
        if key.contains("/data/") {
            S3Object::DataFile
        } else if name.ends_with(".metadata.json") {
            S3Object::MetadataJson
        } else if key.contains("/metadata/") && name.ends_with(".avro") {
            if name.starts_with("snap-") {
                S3Object::ManifestList
            } else {
                S3Object::Manifest
            }
        } else {
            S3Object::Other
        }
    }
}

impl Metered {
    pub fn service(&self, name: &str) -> Traffic {
        self.services.get(name).copied().unwrap_or_default()
    }
}

/// The running proxy; it lives as long as the process.
pub struct MeteringProxy {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Metered>>,
}

impl MeteringProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> std::io::Result<MeteringProxy> {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Metered::default()));
        let shared = Arc::clone(&seen);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (seen, upstream) = (Arc::clone(&shared), upstream.clone());
                std::thread::spawn(move || {
                    // A connection ends when either side closes it.
                    let _ = serve(client, &upstream, &seen);
                });
            }
        });
        Ok(MeteringProxy { addr, seen })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn snapshot(&self) -> Metered {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A message head: the start line, the header lines as sent, and the bytes it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub start: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn encode(&self, skip: &str) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.start);
        for (n, v) in &self.headers {
            if !n.eq_ignore_ascii_case(skip) {
                out.push_str(&format!("{n}: {v}\r\n"));
            }
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn content_length(&self) -> Option<u64> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
    }
}

/// Reads a head; `None` at a clean end of stream.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<(Head, u64)>> {
    let mut start = String::new();
    let mut bytes = r.read_line(&mut start)? as u64;
    if bytes == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        bytes += n as u64;
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            headers.push((n.trim().to_owned(), v.trim().to_owned()));
        }
    }
    Ok(Some((
        Head {
            start: start.trim_end_matches(['\r', '\n']).to_owned(),
            headers,
        },
        bytes,
    )))
}

/// The AWS service a request is for.
pub fn service_of(head: &Head) -> String {
    if let Some(scope) = head
        .header("authorization")
        .and_then(|a| a.split("Credential=").nth(1))
    {
        let parts: Vec<&str> = scope.split(['/', ',']).collect();
        if parts.len() > 3 {
            return parts[3].to_ascii_lowercase();
        }
    }
    match head.header("x-amz-target") {
        Some(t) if t.starts_with("AWSGlue") => "glue".into(),
        Some(t) if t.starts_with("DynamoDB") => "dynamodb".into(),
        Some(t) => t
            .split('.')
            .next()
            .unwrap_or("unknown")
            .to_ascii_lowercase(),
        None => "unknown".into(),
    }
}

/// Copies a body framed by `head` from `r` to `w`; returns the bytes copied. `until_eof`: the
/// body has no framing and ends when the connection does.
fn copy_body(
    head: &Head,
    until_eof: bool,
    r: &mut impl BufRead,
    w: &mut impl Write,
) -> std::io::Result<u64> {
    if head.chunked() {
        let mut total = 0u64;
        loop {
            let mut line = String::new();
            let n = r.read_line(&mut line)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            w.write_all(line.as_bytes())?;
            total += n as u64;
            let size = u64::from_str_radix(
                line.trim_end_matches(['\r', '\n'])
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim(),
                16,
            )
            .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let mut t = String::new();
                    let n = r.read_line(&mut t)?;
                    w.write_all(t.as_bytes())?;
                    total += n as u64;
                    if n == 0 || t == "\r\n" || t == "\n" {
                        return Ok(total);
                    }
                }
            }
            // The chunk and its CRLF.
            total += std::io::copy(&mut r.take(size + 2), w)?;
        }
    } else if let Some(n) = head.content_length() {
        std::io::copy(&mut r.take(n), w)
    } else if until_eof {
        std::io::copy(r, w)
    } else {
        Ok(0)
    }
}

fn serve(client: TcpStream, upstream: &str, seen: &Mutex<Metered>) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = BufWriter::new(client);
    let mut conn: Option<(BufReader<TcpStream>, BufWriter<TcpStream>)> = None;
    while let Some((req, req_head_bytes)) = read_head(&mut from_client)? {
        if conn.is_none() {
            let up = TcpStream::connect(upstream)?;
            up.set_nodelay(true)?;
            conn = Some((BufReader::new(up.try_clone()?), BufWriter::new(up)));
        }
        let (from_up, to_up) = conn.as_mut().expect("connected");
        // Answer `Expect: 100-continue` here and drop it upstream: the body follows at once.
        let expect = req
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if expect {
            to_client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            to_client.flush()?;
        }
        to_up.write_all(&req.encode("expect"))?;
        let req_body = copy_body(&req, false, &mut from_client, to_up)?;
        to_up.flush()?;

        let method = req.start.split(' ').next().unwrap_or("").to_owned();
        let path = req.start.split(' ').nth(1).unwrap_or("").to_owned();
        let (mut resp, mut resp_bytes) =
            read_head(from_up)?.ok_or(std::io::ErrorKind::UnexpectedEof)?;
        while resp
            .start
            .split(' ')
            .nth(1)
            .is_some_and(|s| s.starts_with('1'))
        {
            to_client.write_all(&resp.encode(""))?;
            let (next, n) = read_head(from_up)?.ok_or(std::io::ErrorKind::UnexpectedEof)?;
            resp = next;
            resp_bytes += n;
        }
        let status = resp.start.split(' ').nth(1).unwrap_or("").to_owned();
        let no_body = method == "HEAD" || status == "204" || status == "304";
        let close = resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || (resp.start.starts_with("HTTP/1.0")
                && !resp
                    .header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("keep-alive")));
        to_client.write_all(&resp.encode(""))?;
        let resp_body = if no_body {
            0
        } else {
            let framed = resp.chunked() || resp.content_length().is_some();
            copy_body(&resp, !framed, from_up, &mut to_client)?
        };
        to_client.flush()?;

        let service = service_of(&req);
        {
            let mut m = seen.lock().unwrap_or_else(|p| p.into_inner());
            if service == "s3" && method == "GET" {
                let read = resp_bytes + resp_body;
                match S3Object::of_path(&path) {
                    S3Object::DataFile => m.data_file_get_bytes += read,
                    S3Object::Manifest => m.manifest_get_bytes += read,
                    S3Object::ManifestList => m.manifest_list_get_bytes += read,
                    S3Object::MetadataJson => m.metadata_json_get_bytes += read,
                    S3Object::Other => {}
                }
            }
            let t = m.services.entry(service).or_default();
            t.requests += 1;
            t.bytes += req_head_bytes + req_body + resp_bytes + resp_body;
        }
        let framed = no_body || resp.chunked() || resp.content_length().is_some();
        if close || !framed {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> Head {
        Head {
            start: "POST / HTTP/1.1".into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_service_comes_from_the_signature_scope_or_the_target() {
        let auth = "AWS4-HMAC-SHA256 Credential=test/20261129/us-east-1/glue/aws4_request, SignedHeaders=host, Signature=ab";
        assert_eq!(service_of(&head(&[("Authorization", auth)])), "glue");
        let s3 = "AWS4-HMAC-SHA256 Credential=test/20261129/us-east-1/s3/aws4_request,SignedHeaders=host,Signature=ab";
        assert_eq!(service_of(&head(&[("authorization", s3)])), "s3");
        assert_eq!(
            service_of(&head(&[("X-Amz-Target", "DynamoDB_20120810.PutItem")])),
            "dynamodb"
        );
        assert_eq!(service_of(&head(&[])), "unknown");
    }

    /// Two requests on one kept-alive connection, one with a chunked response: both reach the
    /// upstream unchanged and are counted with their bytes.
    #[test]
    fn requests_are_forwarded_and_counted() {
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = upstream.local_addr().unwrap();
        std::thread::spawn(move || {
            let (s, _) = upstream.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            for reply in [
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            ] {
                let (h, _) = read_head(&mut r).unwrap().unwrap();
                let n = h.content_length().unwrap_or(0);
                let mut body = vec![0; n as usize];
                r.read_exact(&mut body).unwrap();
                w.write_all(reply.as_bytes()).unwrap();
            }
        });
        let proxy = MeteringProxy::start(&format!("http://{up_addr}")).unwrap();
        let mut c = TcpStream::connect(proxy.addr).unwrap();
        let auth = "Authorization: AWS4-HMAC-SHA256 Credential=t/d/us-east-1/s3/aws4_request\r\n";
        let first = format!("PUT /b/k HTTP/1.1\r\n{auth}Content-Length: 3\r\n\r\nxyz");
        let second = format!("GET /b/t/data/f.parquet HTTP/1.1\r\n{auth}\r\n");
        c.write_all(first.as_bytes()).unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let (h, _) = read_head(&mut r).unwrap().unwrap();
        let mut body = vec![0; h.content_length().unwrap() as usize];
        r.read_exact(&mut body).unwrap();
        assert_eq!(body, b"hello");
        c.write_all(second.as_bytes()).unwrap();
        let (h, _) = read_head(&mut r).unwrap().unwrap();
        let mut sink = Vec::new();
        copy_body(&h, false, &mut r, &mut sink).unwrap();
        assert_eq!(sink, b"3\r\nabc\r\n0\r\n\r\n");
        // The proxy counts after it has forwarded the response.
        for _ in 0..100 {
            if proxy.snapshot().service("s3").requests == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let m = proxy.snapshot();
        let resp1 = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".len() as u64;
        let resp2 = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            .len() as u64;
        assert_eq!(m.service("s3").requests, 2);
        assert_eq!(
            m.service("s3").bytes,
            (first.len() + second.len()) as u64 + resp1 + resp2
        );
        assert_eq!(m.data_file_get_bytes, resp2);
        assert_eq!(m.manifest_get_bytes + m.manifest_list_get_bytes, 0);
    }

    #[test]
    fn s3_paths_are_told_apart_by_the_iceberg_layout() {
        let t = "/bucket/warehouse/db.db/clicks";
        for (path, kind) in [
            (
                format!("{t}/data/impression_time_hour=1/00000-0-a.parquet"),
                S3Object::DataFile,
            ),
            (format!("{t}/metadata/5a1b-m0.avro"), S3Object::Manifest),
            (
                format!("{t}/metadata/snap-123-1-5a1b.avro"),
                S3Object::ManifestList,
            ),
            (
                format!("{t}/metadata/00012-5a1b.metadata.json?x-id=GetObject"),
                S3Object::MetadataJson,
            ),
            ("/bucket?list-type=2".to_owned(), S3Object::Other),
        ] {
            assert_eq!(S3Object::of_path(&path), kind, "{path}");
        }
    }
}
