//! The one small HTTP/1.1 server the test fakes (IMDS, FleetLock, an HTTP bundle source) run
//! on: an accept loop with a thread per connection, the request line, headers and a
//! `Content-Length` body parsed here, and a handler closure that answers each request with a
//! status, headers and a body (or never answers at all). Connections are kept alive unless the
//! answer says `Connection: close`; a `HEAD` gets the headers of its answer without the body;
//! a client that opens with a TLS handshake is hung up on (so one that tries https first falls
//! back to http). Dropping the server stops it: no new connection is accepted, and an open one
//! is closed before its next answer.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// One request as the client sent it; header names are lowercase.
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Request {
    /// A header's value (any case of `name`).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_lowercase()).map(String::as_str)
    }
}

/// An answer: the status, headers in order (`Content-Length` is added), the body.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    fn closes(&self) -> bool {
        self.headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close"))
    }
}

/// What the handler returns: `None` never answers (the connection is held open, read and
/// ignored, until the client gives up and closes it).
pub type Handler = dyn Fn(&Request) -> Option<Response> + Send + Sync;

pub struct HttpServer {
    /// `http://ADDR` of the listener.
    pub url: String,
    stop: Arc<AtomicBool>,
    /// A handle on the listening socket, to wake the accept loop on drop.
    listener: TcpListener,
    accept: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serve on a free loopback port.
    pub fn start(handler: impl Fn(&Request) -> Option<Response> + Send + Sync + 'static) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        HttpServer::serve(listener, url, handler)
    }

    /// Serve on a listener bound elsewhere (another network namespace, a fixed address).
    pub fn serve(listener: TcpListener, url: String, handler: impl Fn(&Request) -> Option<Response> + Send + Sync + 'static) -> HttpServer {
        let handler: Arc<Handler> = Arc::new(handler);
        let stop = Arc::new(AtomicBool::new(false));
        let (l, st) = (listener.try_clone().unwrap(), stop.clone());
        let accept = std::thread::spawn(move || {
            for conn in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (h, st) = (handler.clone(), st.clone());
                std::thread::spawn(move || connection(conn, &*h, &st));
            }
        });
        HttpServer {
            url,
            stop,
            listener,
            accept: Some(accept),
        }
    }
}

/// A listener on `addr` in another network namespace (`/proc/PID/ns/net` of a node's PID 1,
/// `/run/netns/NAME`): bound from a thread that joined that namespace, so it accepts there.
pub fn bind_in_netns(ns: &str, addr: &str) -> TcpListener {
    let (ns, addr) = (ns.to_string(), addr.to_string());
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).unwrap_or_else(|e| panic!("{ns}: {e}"));
        // setns on this thread only.
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        TcpListener::bind(&addr).unwrap_or_else(|e| panic!("binding {addr} in {ns}: {e}"))
    })
    .join()
    .unwrap()
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket makes a blocked accept(2) return (EINVAL on Linux),
        // whichever network namespace the socket lives in.
        extern "C" {
            fn shutdown(fd: i32, how: i32) -> i32;
        }
        const SHUT_RDWR: i32 = 2;
        // SAFETY: the descriptor is ours and open until `self.listener` drops.
        unsafe { shutdown(self.listener.as_raw_fd(), SHUT_RDWR) };
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Serve the requests of one connection, in order, until the client closes it, an answer
/// closes it, or the server stops.
fn connection(conn: TcpStream, handler: &Handler, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    // A TLS ClientHello (record type 22) where a request line should be: hang up.
    let mut first = [0u8; 1];
    if conn.peek(&mut first).unwrap_or(0) == 1 && first[0] == 0x16 {
        return;
    }
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let Some(req) = read_request(&mut reader) else { return };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Some(resp) = handler(&req) else {
            // Never answer: hold the connection until the client gives up and closes it.
            let _ = reader.read_to_end(&mut Vec::new());
            return;
        };
        let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
        for (k, v) in &resp.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", resp.body.len()));
        let body: &[u8] = if req.method == "HEAD" { b"" } else { &resp.body };
        if conn.write_all(head.as_bytes()).is_err() || conn.write_all(body).is_err() || resp.closes() {
            return;
        }
    }
}

/// The request line, the headers up to the empty line, and a `Content-Length` body; `None` at
/// the end of the connection.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = reader.read_exact(&mut body);
    Some(Request { method, path, headers, body })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}
