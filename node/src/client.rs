//! A small HTTP/1.1 client for a daemon's REST API ([`crate::api`]): what
//! the `shoal` client commands and the integration tests use. One
//! connection per request (the API is on localhost); JSON answers are read
//! up to [`JSON_RESPONSE_BYTES_MAX`]; content is streamed.

use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::api::ChannelBody;

/// Largest JSON answer read (a file list of many thousand entries).
pub const JSON_RESPONSE_BYTES_MAX: usize = 16 << 20;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No daemon answers at the address.
    #[error("cannot reach the shoal daemon at {addr} ({source}); is `shoal daemon --api {addr}` running?")]
    Unreachable {
        /// The API address.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// The daemon answered with an error.
    #[error("{message} ({status}, {code})")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The error code.
        code: String,
        /// What went wrong.
        message: String,
    },
    /// The exchange with the daemon broke (connection lost, bad answer).
    #[error("talking to the shoal daemon at {addr}: {message}")]
    Protocol {
        /// The API address.
        addr: SocketAddr,
        /// What went wrong.
        message: String,
    },
}

/// A request body: a whole buffer or a stream.
type RequestBody = BoxBody<Bytes, io::Error>;

/// A response body. It keeps its connection's request handle: hyper closes
/// a connection whose handle is dropped, even while a streamed response
/// body is still arriving.
pub struct ResponseBody {
    body: Incoming,
    _sender: SendRequest<RequestBody>,
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A client of one daemon's API.
#[derive(Clone, Copy, Debug)]
pub struct ApiClient {
    addr: SocketAddr,
}

impl ApiClient {
    /// A client of the API at `addr`.
    #[must_use]
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }

    /// The API address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn protocol(&self, message: impl std::fmt::Display) -> ClientError {
        ClientError::Protocol { addr: self.addr, message: message.to_string() }
    }

    /// Send one request; any status comes back.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(RequestBody, &'static str)>,
        headers: &[(hyper::header::HeaderName, String)],
    ) -> Result<Response<ResponseBody>, ClientError> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|source| ClientError::Unreachable { addr: self.addr, source })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| self.protocol(e))?;
        tokio::spawn(connection);
        let mut builder = Request::builder().method(method).uri(path_and_query).header(HOST, self.addr.to_string());
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        let body = match body {
            Some((body, content_type)) => {
                builder = builder.header(CONTENT_TYPE, content_type);
                body
            }
            None => Full::new(Bytes::new()).map_err(|never| match never {}).boxed(),
        };
        let request = builder.body(body).map_err(|e| self.protocol(e))?;
        let response = sender.send_request(request).await.map_err(|e| self.protocol(e))?;
        Ok(response.map(|body| ResponseBody { body, _sender: sender }))
    }

    /// Read a JSON answer: `T` on success, the API error otherwise.
    async fn json<T: DeserializeOwned>(&self, response: Response<ResponseBody>) -> Result<T, ClientError> {
        let status = response.status();
        let bytes = Limited::new(response.into_body(), JSON_RESPONSE_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| self.protocol(e))?
            .to_bytes();
        if !status.is_success() {
            return Err(self.api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| self.protocol(format!("unexpected answer: {e}")))
    }

    fn api_error(&self, status: StatusCode, bytes: &[u8]) -> ClientError {
        #[derive(serde::Deserialize)]
        struct Envelope {
            error: Inner,
        }
        #[derive(serde::Deserialize)]
        struct Inner {
            code: String,
            message: String,
        }
        match serde_json::from_slice::<Envelope>(bytes) {
            Ok(Envelope { error }) => {
                ClientError::Api { status: status.as_u16(), code: error.code, message: error.message }
            }
            Err(_) => ClientError::Api {
                status: status.as_u16(),
                code: "http".into(),
                message: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
            },
        }
    }

    /// `GET` a JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self.request(Method::GET, path, None, &[]).await?;
        self.json(response).await
    }

    /// `POST` (or another method) a JSON body, read a JSON answer.
    pub async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| self.protocol(e))?;
        let body = Full::new(Bytes::from(bytes)).map_err(|never| match never {}).boxed();
        let response = self.request(method, path, Some((body, "application/json")), &[]).await?;
        self.json(response).await
    }

    /// `DELETE`; success is any 2xx.
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        let response = self.request(Method::DELETE, path, None, &[]).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let bytes = Limited::new(response.into_body(), JSON_RESPONSE_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| self.protocol(e))?
            .to_bytes();
        Err(self.api_error(status, &bytes))
    }

    /// `GET` a body to stream (content); an error status is read as an API
    /// error.
    pub async fn stream(
        &self,
        path: &str,
        headers: &[(hyper::header::HeaderName, String)],
    ) -> Result<Response<ResponseBody>, ClientError> {
        let response = self.request(Method::GET, path, None, headers).await?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = Limited::new(response.into_body(), JSON_RESPONSE_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| self.protocol(e))?
            .to_bytes();
        Err(self.api_error(status, &bytes))
    }

    /// `PUT` a local file as a streamed body (read a chunk at a time).
    pub async fn put_file<T: DeserializeOwned>(&self, path: &str, file: tokio::fs::File) -> Result<T, ClientError> {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut file = file;
            loop {
                let mut buffer = vec![0u8; 256 * 1024];
                match file.read(&mut buffer).await {
                    Ok(0) => break,
                    Ok(n) => {
                        buffer.truncate(n);
                        if tx.send(Ok(Bytes::from(buffer))).await.is_err() {
                            break;
                        }
                    }
                    Err(error) => {
                        let _ = tx.send(Err(error)).await;
                        break;
                    }
                }
            }
        });
        let body = BodyExt::boxed(ChannelBody::new(rx));
        let response = self.request(Method::PUT, path, Some((body, "application/octet-stream")), &[]).await?;
        self.json(response).await
    }
}

/// Percent-encode a query value (RFC 3986 unreserved characters pass).
#[must_use]
pub fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode_query_value("holiday photos"), "holiday%20photos");
        assert_eq!(encode_query_value("a&b=c/é"), "a%26b%3Dc%2F%C3%A9");
        assert_eq!(encode_query_value("plain-1.0_x~"), "plain-1.0_x~");
    }
}
