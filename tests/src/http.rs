//! A real HTTP/1.1 file server on loopback for the tests, which records
//! every request it gets.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Serves the files of one directory at `/<file name>`, with Range support.
pub struct FileServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

impl FileServer {
    pub fn start(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stop_flag) = (requests.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop_flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (root, log) = (root.clone(), log.clone());
                thread::spawn(move || {
                    let _ = serve(conn, &root, &log);
                });
            }
        });
        Ok(FileServer {
            addr,
            requests,
            stop,
        })
    }

    pub fn url(&self, file: &str) -> String {
        format!("http://{}/{}", self.addr, file)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests that asked for a body (GET), as opposed to HEAD.
    pub fn body_requests(&self) -> usize {
        self.requests().iter().filter(|r| r.method == "GET").count()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

pub(crate) fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some(Request {
        method,
        path,
        headers,
    }))
}

fn serve(
    conn: TcpStream,
    root: &std::path::Path,
    log: &Mutex<Vec<Request>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    while let Some(req) = read_request(&mut reader)? {
        log.lock().unwrap().push(req.clone());
        let name = req.path.trim_start_matches('/');
        let file = root.join(name);
        if name.contains("..") || !file.is_file() {
            out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
            continue;
        }
        let len = std::fs::metadata(&file)?.len();
        let (start, status) = match req.header("range").and_then(parse_range_start) {
            Some(start) if start < len => (start, "206 Partial Content"),
            _ => (0, "200 OK"),
        };
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\n",
            len - start
        );
        if start > 0 {
            head.push_str(&format!(
                "Content-Range: bytes {start}-{}/{len}\r\n",
                len - 1
            ));
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        if req.method == "GET" {
            let mut f = std::fs::File::open(&file)?;
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(start))?;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])?;
            }
        }
    }
    Ok(())
}

pub(crate) fn parse_range_start(value: &str) -> Option<u64> {
    value
        .strip_prefix("bytes=")?
        .split('-')
        .next()?
        .parse()
        .ok()
}
