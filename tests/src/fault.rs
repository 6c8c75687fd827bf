//! An HTTP/1.1 server on loopback that misbehaves on purpose, one scripted
//! fault per request, and records every request it gets.
//!
//! Every answer carries `Connection: close` and the connection is closed
//! after it, so each request the client makes is one connection and one
//! entry in the log, and a cut-off body is seen as one.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::http::{Request, parse_range_start, read_request};

/// How the server answers one request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The file, honouring `Range: bytes=N-` with a 206.
    Normal,
    /// Announces the full length of what was asked for, sends only this
    /// many bytes of it, and closes the connection.
    CutAfter(usize),
    /// This status with an empty body.
    Status(u16),
    /// Headers at once, then one byte per interval.
    Trickle(Duration),
    /// The whole file without Content-Length, ended by closing.
    NoLength,
    /// Announces this Content-Length, sends the whole file, closes.
    LyingLength(u64),
    /// A 302 to this path on the same server.
    RedirectTo(String),
    /// A 302 to `/hop<n+1>`, forever: a chain longer than any limit.
    RedirectChain,
    /// The whole file with 200, whatever Range asked.
    IgnoreRange,
    /// A 206 claiming `bytes 0-…`, with the whole file, whatever Range asked.
    WrongRange,
    /// The file, `chunk` bytes per `interval`.
    Slow { chunk: usize, interval: Duration },
}

/// A misbehaving server for one test.
pub struct FaultServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

impl FaultServer {
    /// Serves `body` at every path. Request `i` gets `script[i]`; requests
    /// after the script's end get its last fault (`Normal` if empty).
    /// `accept_ranges` decides whether answers advertise
    /// `Accept-Ranges: bytes`.
    pub fn start(body: Vec<u8>, script: Vec<Fault>, accept_ranges: bool) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            body,
            script,
            accept_ranges,
            count: AtomicUsize::new(0),
            log: requests.clone(),
            stop: stop.clone(),
        });
        thread::spawn(move || {
            for conn in listener.incoming() {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let shared = shared.clone();
                thread::spawn(move || {
                    let _ = shared.serve(conn);
                });
            }
        });
        Ok(FaultServer {
            addr,
            requests,
            stop,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests that asked for a body.
    pub fn gets(&self) -> usize {
        self.requests().iter().filter(|r| r.method == "GET").count()
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

struct Shared {
    body: Vec<u8>,
    script: Vec<Fault>,
    accept_ranges: bool,
    count: AtomicUsize,
    log: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

impl Shared {
    fn serve(&self, conn: TcpStream) -> std::io::Result<()> {
        let mut reader = BufReader::new(conn.try_clone()?);
        let Some(req) = read_request(&mut reader)? else {
            return Ok(());
        };
        self.log.lock().unwrap().push(req.clone());
        let n = self.count.fetch_add(1, Ordering::SeqCst);
        let fault = self
            .script
            .get(n)
            .or(self.script.last())
            .cloned()
            .unwrap_or(Fault::Normal);
        let mut out = conn;
        let len = self.body.len() as u64;
        let range_start = req
            .header("range")
            .and_then(parse_range_start)
            .filter(|s| *s < len);
        match fault {
            Fault::Normal | Fault::CutAfter(_) | Fault::Slow { .. } => {
                let start = range_start.unwrap_or(0);
                let mut head = if range_start.is_some() {
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{len}\r\n",
                        len - 1
                    )
                } else {
                    "HTTP/1.1 200 OK\r\n".to_string()
                };
                head.push_str(&format!("Content-Length: {}\r\n", len - start));
                self.finish_head(&mut out, head)?;
                let rest = &self.body[start as usize..];
                match fault {
                    Fault::CutAfter(n) => out.write_all(&rest[..n.min(rest.len())])?,
                    Fault::Slow { chunk, interval } => {
                        for piece in rest.chunks(chunk) {
                            out.write_all(piece)?;
                            thread::sleep(interval);
                        }
                    }
                    _ => out.write_all(rest)?,
                }
            }
            Fault::Status(code) => {
                let head = format!("HTTP/1.1 {code} Fault\r\nContent-Length: 0\r\n");
                self.finish_head(&mut out, head)?;
            }
            Fault::Trickle(interval) => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n");
                self.finish_head(&mut out, head)?;
                for byte in &self.body {
                    if self.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    out.write_all(std::slice::from_ref(byte))?;
                    out.flush()?;
                    thread::sleep(interval);
                }
            }
            Fault::NoLength => {
                self.finish_head(&mut out, "HTTP/1.1 200 OK\r\n".to_string())?;
                out.write_all(&self.body)?;
            }
            Fault::LyingLength(claimed) => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {claimed}\r\n");
                self.finish_head(&mut out, head)?;
                out.write_all(&self.body)?;
            }
            Fault::RedirectTo(path) => {
                let head =
                    format!("HTTP/1.1 302 Found\r\nLocation: {path}\r\nContent-Length: 0\r\n");
                self.finish_head(&mut out, head)?;
            }
            Fault::RedirectChain => {
                let head = format!(
                    "HTTP/1.1 302 Found\r\nLocation: /hop{}\r\nContent-Length: 0\r\n",
                    n + 1
                );
                self.finish_head(&mut out, head)?;
            }
            Fault::WrongRange => {
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-{}/{len}\r\nContent-Length: {len}\r\n",
                    len - 1
                );
                self.finish_head(&mut out, head)?;
                out.write_all(&self.body)?;
            }
            Fault::IgnoreRange => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n");
                self.finish_head(&mut out, head)?;
                out.write_all(&self.body)?;
            }
        }
        out.flush()?;
        // FIN after the last byte: a short body is a visible truncation.
        let _ = out.shutdown(std::net::Shutdown::Write);
        Ok(())
    }

    fn finish_head(&self, out: &mut TcpStream, mut head: String) -> std::io::Result<()> {
        if self.accept_ranges {
            head.push_str("Accept-Ranges: bytes\r\n");
        }
        head.push_str("Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n");
        out.write_all(head.as_bytes())
    }
}

/// `len` reproducible pseudo-random bytes; different seeds, different files.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64: fast, and no two seeds share a prefix.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// The MD5 of `data` in lower-case hex.
pub fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(data))
}
