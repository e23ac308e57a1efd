//! A loopback HTTP server that answers every request with the bytes the fuzzer chose
//! (status line, headers and body, raw), so the agent's real clients parse them.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};

static ANSWER: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static URL: OnceLock<String> = OnceLock::new();

/// The server's base URL (started once per process).
pub fn server() -> &'static str {
    URL.get_or_init(|| {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let mut r = BufReader::new(match conn.try_clone() {
                    Ok(c) => c,
                    Err(_) => continue,
                });
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    head.push_str(&line);
                }
                let answer = ANSWER.lock().map(|a| a.clone()).unwrap_or_default();
                let mut conn = conn;
                let _ = conn.write_all(&answer);
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
        });
        url
    })
}

/// Answer the next requests with `bytes`.
pub fn answer(bytes: &[u8]) {
    if let Ok(mut a) = ANSWER.lock() {
        a.clear();
        a.extend_from_slice(bytes);
    }
}

/// The fuzzer's bytes as an HTTP answer: used raw when they start like one, else wrapped in
/// a 200 (so the fuzzer reaches the body parsers quickly) or, on a first byte picking a
/// status, in that status with the rest as body.
pub fn as_http(data: &[u8]) -> Vec<u8> {
    if data.starts_with(b"HTTP/") {
        return data.to_vec();
    }
    let (status, body) = match data.split_first() {
        Some((&b, rest)) if b < 16 => ([200u16, 304, 401, 403, 404, 408, 429, 500, 503, 206, 204, 301, 302, 400, 502, 599][b as usize], rest),
        _ => (200, data),
    };
    let mut out = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nETag: \"e\"\r\nConnection: close\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}
