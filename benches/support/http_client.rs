//! A minimal HTTP/1.1 client for the load run: one keep-alive connection that sends a POST
//! and reads a response with `Content-Length`. It does much less work per request than a
//! general client, so that on a small machine the load generator leaves the CPU to the
//! server it measures.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: the status and the body.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One connection to `addr`, opened on first use and again after the server closed it or
/// an error occurred.
pub struct HttpConnection {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buffer: Vec<u8>,
}

/// The parts of a response head the client needs.
struct Head {
    status: u16,
    length: usize,
    close: bool,
    /// Bytes of the head, including the blank line.
    size: usize,
}

impl HttpConnection {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            stream: None,
            buffer: Vec::with_capacity(16 * 1024),
        }
    }

    /// Sends `POST path` with `headers` (complete lines, each ending in CRLF) and `body`,
    /// and reads the response.
    pub async fn post(&mut self, path: &str, headers: &str, body: &[u8]) -> io::Result<Response> {
        let request_head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\n{headers}Content-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        let result = self.exchange(request_head.as_bytes(), body).await;
        if !matches!(&result, Ok((_, false))) {
            self.stream = None;
        }
        result.map(|(response, _)| response)
    }

    /// Writes the request and reads the response. Returns it and whether the connection
    /// stays open.
    async fn exchange(&mut self, head: &[u8], body: &[u8]) -> io::Result<(Response, bool)> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(io::Error::other("no connection"));
        };
        stream.write_all(head).await?;
        stream.write_all(body).await?;

        self.buffer.clear();
        let head = loop {
            if let Some(head) = parse_head(&self.buffer)? {
                break head;
            }
            read_more(stream, &mut self.buffer).await?;
        };
        while self.buffer.len() < head.size + head.length {
            read_more(stream, &mut self.buffer).await?;
        }
        let body = self.buffer[head.size..head.size + head.length].to_vec();
        let response = Response {
            status: head.status,
            body,
        };
        Ok((response, !head.close))
    }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    let read = stream.read(&mut chunk).await?;
    if read == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    buffer.extend_from_slice(&chunk[..read]);
    Ok(())
}

/// Parses the response head once `buffer` contains all of it, and returns `None` until then.
fn parse_head(buffer: &[u8]) -> io::Result<Option<Head>> {
    let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&buffer[..end])
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "invalid status line"))?;
    let mut head = Head {
        status,
        length: 0,
        close: false,
        size: end + 4,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.length = value.parse().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, "invalid Content-Length")
            })?;
        } else if name.eq_ignore_ascii_case("connection") {
            head.close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "chunked responses are not supported",
            ));
        }
    }
    Ok(Some(head))
}
