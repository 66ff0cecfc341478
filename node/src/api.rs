//! The daemon's REST API (axum), bound to localhost by default.
//!
//! Every handler reaches the node through a [`Command`] with a `oneshot`
//! reply: the driver loop stays the single owner of the `Node` and the
//! store. Anything a client sends is untrusted: bad input is a 4xx with a
//! JSON body `{ "error": { "code", "message" } }`, never a 500 or a panic.
//! Every limit is an [`ApiConfig`] field.
//!
//! Routes:
//! - `GET /v1/status`, `GET /v1/peers`, `GET /metrics` (Prometheus text);
//! - `GET /v1/files`; `POST /v1/files` `{"path", "name"?}` shares a local
//!   file in place; `PUT /v1/files?name=` uploads a body (streamed to the
//!   data dir, never buffered whole) and shares it;
//! - `GET /v1/files/{id}` (manifest and progress), `DELETE /v1/files/{id}`;
//! - `GET /v1/files/{id}/content`: the bytes, with a single HTTP Range;
//!   served while downloading, the requested range fetched first;
//! - `POST /v1/downloads` `{"id"}`, `GET /v1/downloads/{id}`;
//! - `GET /v1/search?q=`.

use std::fmt::Write as _;
use std::io;
use std::path::{Path as FsPath, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::control::{CommandError, FileState, FileView, NodeStatus, PieceRead, SearchHit, Shared};
use crate::core::content::{self, Layout};
use crate::core::ids::{FileId, PieceIndex};
use crate::core::manifest::{FileManifest, validate_name};
use crate::driver::Command;

/// API limits.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Where `PUT /v1/files` writes uploaded bodies (under the data dir).
    pub uploads_dir: PathBuf,
    /// Largest upload accepted.
    pub upload_bytes_max: u64,
    /// Uploads running at once (each holds an open file and a hasher).
    pub uploads_concurrent_max: usize,
    /// Largest JSON request body.
    pub json_body_bytes_max: usize,
    /// Longest search text.
    pub search_text_bytes_max: usize,
    /// Content streams served at once.
    pub streams_concurrent_max: usize,
    /// Chunks (pieces) a content stream reads ahead of its client.
    pub stream_chunks_queued_max: usize,
    /// How long a request waits for the driver's answer (the driver
    /// answers at once unless it is overloaded).
    pub reply_timeout: Duration,
    /// How long a search waits for its DHT lookup.
    pub search_timeout: Duration,
}

impl ApiConfig {
    /// Defaults, with uploads under `data_dir/uploads`.
    #[must_use]
    pub fn new(data_dir: &FsPath) -> Self {
        Self {
            uploads_dir: data_dir.join("uploads"),
            upload_bytes_max: 64 << 30,
            uploads_concurrent_max: 4,
            json_body_bytes_max: 64 * 1024,
            search_text_bytes_max: 256,
            streams_concurrent_max: 16,
            stream_chunks_queued_max: 4,
            reply_timeout: Duration::from_secs(10),
            search_timeout: Duration::from_secs(30),
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    commands: mpsc::Sender<Command>,
    stored: watch::Receiver<u64>,
    config: Arc<ApiConfig>,
    uploads: Arc<Semaphore>,
    streams: Arc<Semaphore>,
}

impl ApiState {
    /// State for a driver reached through `commands`, whose stored-piece
    /// counter is `stored` ([`crate::driver::Driver::stored_pieces`]).
    #[must_use]
    pub fn new(commands: mpsc::Sender<Command>, stored: watch::Receiver<u64>, config: ApiConfig) -> Self {
        Self {
            commands,
            stored,
            uploads: Arc::new(Semaphore::new(config.uploads_concurrent_max)),
            streams: Arc::new(Semaphore::new(config.streams_concurrent_max)),
            config: Arc::new(config),
        }
    }
}

/// The router of every route in the module docs.
pub fn router(state: ApiState) -> Router {
    let json_max = state.config.json_body_bytes_max;
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route(
            "/v1/files",
            get(list_files)
                .post(share_path)
                .layer(DefaultBodyLimit::max(json_max))
                // The upload enforces its own, much larger, limit as it streams.
                .put(upload)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/files/{id}", get(file).delete(remove))
        .route("/v1/files/{id}/content", get(content_handler))
        .route("/v1/downloads", axum::routing::post(start_download).layer(DefaultBodyLimit::max(json_max)))
        .route("/v1/downloads/{id}", get(file))
        .route("/v1/search", get(search))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// An API error: a status and `{ "error": { "code", "message" } }`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        let (status, code) = match &error {
            CommandError::UnknownFile(_) => (StatusCode::NOT_FOUND, "not_found"),
            CommandError::AlreadyPresent(_) => (StatusCode::CONFLICT, "conflict"),
            CommandError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            // Store errors for a client's request are about its file (a
            // path that cannot be shared, a full disk): reported as such.
            _ => (StatusCode::UNPROCESSABLE_ENTITY, "store"),
        };
        Self::new(status, code, error.to_string())
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route (the API is under /v1)")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}

/// A `{id}` path segment that is a file id.
struct FileParam(FileId);

impl<S: Send + Sync> FromRequestParts<S> for FileParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(text) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request("bad_path", rejection.body_text()))?;
        parse_file_id(&text).map(FileParam)
    }
}

fn parse_file_id(text: &str) -> Result<FileId, ApiError> {
    text.parse::<FileId>().map_err(|_| {
        let shown: String = text.chars().take(80).collect();
        ApiError::bad_request("bad_file_id", format!("{shown:?} is not a file id (64 hex digits)"))
    })
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    // Axum's JSON rejections are all 4xx (400, 413, 415, 422).
    let status = rejection.status();
    let status = if status.is_client_error() { status } else { StatusCode::BAD_REQUEST };
    ApiError::new(status, "bad_body", rejection.body_text())
}

/// Send a command and wait for its answer.
async fn ask<T>(
    state: &ApiState,
    timeout: Duration,
    command: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Result<T, ApiError> {
    let (reply, answer) = oneshot::channel();
    let asked = async {
        state.commands.send(command(reply)).await.map_err(|_| ApiError::unavailable("the node is stopping"))?;
        answer.await.map_err(|_| ApiError::unavailable("the node is stopping"))
    };
    tokio::time::timeout(timeout, asked)
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the node did not answer in time"))?
}

async fn status(State(state): State<ApiState>) -> Result<Json<NodeStatus>, ApiError> {
    ask(&state, state.config.reply_timeout, |reply| Command::Status { reply }).await.map(Json)
}

async fn peers(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let peers = ask(&state, state.config.reply_timeout, |reply| Command::Peers { reply }).await?;
    Ok(Json(peers).into_response())
}

async fn list_files(State(state): State<ApiState>) -> Result<Json<Vec<FileView>>, ApiError> {
    ask(&state, state.config.reply_timeout, |reply| Command::Files { reply }).await.map(Json)
}

async fn file(State(state): State<ApiState>, FileParam(file): FileParam) -> Result<Json<FileView>, ApiError> {
    ask(&state, state.config.reply_timeout, |reply| Command::File { file, reply })
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("file {file} is not on this node")))
}

async fn remove(State(state): State<ApiState>, FileParam(file): FileParam) -> Result<StatusCode, ApiError> {
    ask(&state, state.config.reply_timeout, |reply| Command::Remove { file, reply }).await??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DownloadRequest {
    id: String,
}

async fn start_download(
    State(state): State<ApiState>,
    body: Result<Json<DownloadRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<FileView>), ApiError> {
    let Json(request) = body.map_err(json_rejection)?;
    let file = parse_file_id(&request.id)?;
    let view = ask(&state, state.config.reply_timeout, |reply| Command::Fetch { file, reply }).await?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchQuery {
    q: String,
}

async fn search(
    State(state): State<ApiState>,
    query: Result<Query<SearchQuery>, QueryRejection>,
) -> Result<Json<Vec<SearchHit>>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::bad_request("bad_query", rejection.body_text()))?;
    let text = query.q.trim().to_owned();
    if text.is_empty() {
        return Err(ApiError::bad_request("bad_query", "q must contain at least one word"));
    }
    if text.len() > state.config.search_text_bytes_max {
        let max = state.config.search_text_bytes_max;
        return Err(ApiError::bad_request("bad_query", format!("q is longer than {max} bytes")));
    }
    let hits = ask(&state, state.config.search_timeout, |reply| Command::SearchFor { text, reply }).await??;
    let hits = hits.into_iter().map(|e| SearchHit { id: e.file.to_string(), name: e.name, size: e.size }).collect();
    Ok(Json(hits))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareRequest {
    /// An absolute path on the daemon's machine.
    path: PathBuf,
    /// The name to publish (default: the file's name).
    name: Option<String>,
}

async fn share_path(
    State(state): State<ApiState>,
    body: Result<Json<ShareRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Shared>), ApiError> {
    let Json(request) = body.map_err(json_rejection)?;
    if !request.path.is_absolute() {
        return Err(ApiError::bad_request(
            "bad_path",
            "path must be absolute (the daemon has its own working directory)",
        ));
    }
    let name = match request.name {
        Some(name) => name,
        None => request
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .ok_or_else(|| ApiError::bad_request("bad_name", "the path has no UTF-8 file name; pass a name"))?,
    };
    share_file(&state, request.path, name).await.map(|shared| (StatusCode::CREATED, Json(shared)))
}

/// Chunk and hash a local file (off the async workers), then share it.
async fn share_file(state: &ApiState, path: PathBuf, name: String) -> Result<Shared, ApiError> {
    validate_name(&name).map_err(|e| ApiError::bad_request("bad_name", e.to_string()))?;
    let hashed_path = path.clone();
    let hashed = tokio::task::spawn_blocking(move || -> Result<(u64, content::Content), ApiError> {
        let bad_path = |e: io::Error| ApiError::bad_request("bad_path", format!("{}: {e}", hashed_path.display()));
        let file = std::fs::File::open(&hashed_path).map_err(bad_path)?;
        let metadata = file.metadata().map_err(bad_path)?;
        if !metadata.is_file() {
            return Err(ApiError::bad_request("bad_path", format!("{} is not a regular file", hashed_path.display())));
        }
        let size = metadata.len();
        let content = content::hash_reader(file, Layout::for_file(size))
            .map_err(|e| ApiError::bad_request("bad_path", format!("{}: {e}", hashed_path.display())))?;
        Ok((size, content))
    })
    .await
    .map_err(|_| ApiError::unavailable("hashing was interrupted"))??;
    let (size, content) = hashed;
    let manifest = FileManifest::new(&name, &content).map_err(|e| ApiError::bad_request("bad_name", e.to_string()))?;
    let piece_hashes = content.piece_hashes;
    let file = ask(&state.clone(), state.config.reply_timeout, |reply| Command::ShareLocal {
        path,
        manifest,
        piece_hashes,
        reply,
    })
    .await??;
    Ok(Shared { id: file.to_string(), name, size })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    name: String,
}

async fn upload(
    State(state): State<ApiState>,
    query: Result<Query<UploadQuery>, QueryRejection>,
    body: Body,
) -> Result<(StatusCode, Json<Shared>), ApiError> {
    let Query(UploadQuery { name }) =
        query.map_err(|rejection| ApiError::bad_request("bad_query", rejection.body_text()))?;
    validate_name(&name).map_err(|e| ApiError::bad_request("bad_name", e.to_string()))?;
    let _permit = state.uploads.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "too many uploads in progress; try again")
    })?;
    let dir = state.config.uploads_dir.clone();
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot create {}: {e}", dir.display())))?;
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| ApiError::unavailable(format!("no randomness: {e}")))?;
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let partial = dir.join(format!(".upload-{nonce}"));
    let written = receive_body(body, &partial, state.config.upload_bytes_max).await;
    if let Err(error) = written {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(error);
    }
    // One directory per upload keeps the published name as the file name
    // without two uploads of one name colliding.
    let target_dir = dir.join(nonce);
    let target = target_dir.join(&name);
    let moved = async {
        tokio::fs::create_dir(&target_dir).await?;
        tokio::fs::rename(&partial, &target).await
    };
    if let Err(e) = moved.await {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(ApiError::unavailable(format!("cannot store the upload in {}: {e}", target_dir.display())));
    }
    let shared = share_file(&state, target.clone(), name).await;
    match shared {
        Ok(shared) => Ok((StatusCode::CREATED, Json(shared))),
        Err(error) => {
            let _ = tokio::fs::remove_dir_all(&target_dir).await;
            Err(error)
        }
    }
}

/// Stream a request body into `path`, refusing more than `max` bytes.
async fn receive_body(mut body: Body, path: &FsPath, max: u64) -> Result<u64, ApiError> {
    let io_error = |e: io::Error| ApiError::unavailable(format!("cannot write {}: {e}", path.display()));
    let mut file = tokio::fs::File::create(path).await.map_err(io_error)?;
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request("bad_body", format!("upload interrupted: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        total += data.len() as u64;
        if total > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("uploads are limited to {max} bytes"),
            ));
        }
        file.write_all(&data).await.map_err(io_error)?;
    }
    file.sync_all().await.map_err(io_error)?;
    Ok(total)
}

/// A single byte range, inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ByteRange {
    first: u64,
    last: u64,
}

/// Why a Range header cannot be served.
#[derive(Debug, PartialEq, Eq)]
enum RangeError {
    /// Not `bytes=A-B`, `bytes=A-` or `bytes=-N`, or several ranges.
    Malformed,
    /// Starts at or past the end.
    Unsatisfiable,
}

/// Parse a Range header (RFC 9110 §14.2) for a file of `size` bytes; one
/// range only.
fn parse_range(value: &str, size: u64) -> Result<ByteRange, RangeError> {
    let spec = value.trim().strip_prefix("bytes=").ok_or(RangeError::Malformed)?;
    if spec.contains(',') {
        return Err(RangeError::Malformed);
    }
    let (start, end) = spec.split_once('-').ok_or(RangeError::Malformed)?;
    let number = |text: &str| text.trim().parse::<u64>().map_err(|_| RangeError::Malformed);
    let (first, last) = if start.trim().is_empty() {
        let suffix = number(end)?;
        if suffix == 0 || size == 0 {
            return Err(RangeError::Unsatisfiable);
        }
        (size.saturating_sub(suffix), size - 1)
    } else {
        let first = number(start)?;
        let last = if end.trim().is_empty() { u64::MAX } else { number(end)? };
        if last < first {
            return Err(RangeError::Malformed);
        }
        (first, last)
    };
    if first >= size {
        return Err(RangeError::Unsatisfiable);
    }
    Ok(ByteRange { first, last: last.min(size - 1) })
}

async fn content_handler(
    State(state): State<ApiState>,
    FileParam(file): FileParam,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let view =
        ask(&state, state.config.reply_timeout, |reply| Command::File { file, reply }).await?.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("file {file} is not on this node; POST /v1/downloads first"),
            )
        })?;
    if matches!(view.state, FileState::FindingManifest | FileState::NotFound) || view.piece_bytes == 0 && view.size > 0
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_manifest",
            format!("the manifest of {file} is not known yet"),
        ));
    }
    let size = view.size;
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(value) => {
            let text = value.to_str().map_err(|_| ApiError::bad_request("bad_range", "Range is not ASCII"))?;
            match parse_range(text, size) {
                Ok(range) => Some(range),
                Err(RangeError::Malformed) => {
                    return Err(ApiError::bad_request(
                        "bad_range",
                        "Range must be one bytes=A-B, bytes=A- or bytes=-N",
                    ));
                }
                Err(RangeError::Unsatisfiable) => {
                    let mut response = ApiError::new(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "range_not_satisfiable",
                        format!("the file is {size} bytes"),
                    )
                    .into_response();
                    if let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}")) {
                        response.headers_mut().insert(header::CONTENT_RANGE, value);
                    }
                    return Ok(response);
                }
            }
        }
    };
    let permit = state.streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "too many content streams open; try again")
    })?;
    let (first, end) = match range {
        Some(range) => (range.first, range.last + 1),
        None => (0, size),
    };
    let piece_bytes = u64::from(view.piece_bytes.max(1));
    let (tx, rx) = mpsc::channel(state.config.stream_chunks_queued_max.max(1));
    tokio::spawn(stream_content(state.clone(), file, first, end, piece_bytes, tx, permit));
    let mut response = Response::new(Body::new(ChannelBody { rx }));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(value) = HeaderValue::from_str(&(end - first).to_string()) {
        headers.insert(header::CONTENT_LENGTH, value);
    }
    if range.is_some() {
        if let Ok(value) = HeaderValue::from_str(&format!("bytes {first}-{}/{size}", end - 1)) {
            headers.insert(header::CONTENT_RANGE, value);
        }
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(response)
}

/// Feed `[first, end)` of `file` into `tx`, piece by piece, in order,
/// waiting for pieces still on their way (asking the node to fetch from
/// there first). Ends early if the client goes away or the file does.
async fn stream_content(
    state: ApiState,
    file: FileId,
    first: u64,
    end: u64,
    piece_bytes: u64,
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let mut stored = state.stored.clone();
    let mut streaming = false;
    let mut position = first;
    while position < end {
        let index = position / piece_bytes;
        let Ok(piece) = u32::try_from(index).map(PieceIndex) else { break };
        stored.mark_unchanged();
        let read = ask(&state, state.config.reply_timeout, |reply| Command::ReadPiece { file, piece, reply }).await;
        match read {
            Ok(PieceRead::Held(bytes)) => {
                let piece_start = index * piece_bytes;
                let from = (position - piece_start) as usize;
                let to = ((end - piece_start) as usize).min(bytes.len());
                if from >= to {
                    break; // the store's piece is shorter than the layout says: stop
                }
                position = piece_start + to as u64;
                if tx.send(Ok(bytes.slice(from..to))).await.is_err() {
                    break; // the client went away
                }
            }
            Ok(PieceRead::Missing) => {
                if !streaming {
                    streaming = true;
                    let _ = state.commands.send(Command::Stream { file, from: Some(piece) }).await;
                }
                // Wait for the next stored piece, or for the client to leave.
                tokio::select! {
                    biased;
                    () = tx.closed() => break,
                    changed = stored.changed() => if changed.is_err() { break },
                }
            }
            Ok(PieceRead::Unknown) => {
                let _ = tx.send(Err(io::Error::other(format!("file {file} was removed")))).await;
                break;
            }
            Ok(PieceRead::Unreadable(message)) => {
                let _ = tx.send(Err(io::Error::other(message))).await;
                break;
            }
            Err(error) => {
                let _ = tx.send(Err(io::Error::other(error.message))).await;
                break;
            }
        }
    }
    if streaming {
        let _ = state.commands.send(Command::Stream { file, from: None }).await;
    }
}

/// A body fed by a channel of chunks (content responses here, uploads in
/// the client).
pub(crate) struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
}

impl ChannelBody {
    pub(crate) fn new(rx: mpsc::Receiver<Result<Bytes, io::Error>>) -> Self {
        Self { rx }
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx.poll_recv(cx).map(|chunk| chunk.map(|result| result.map(Frame::data)))
    }
}

async fn metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let status = ask(&state, state.config.reply_timeout, |reply| Command::Status { reply }).await?;
    let mut response = render_metrics(&status).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    Ok(response)
}

/// The Prometheus text exposition format (version 0.0.4).
#[must_use]
pub fn render_metrics(status: &NodeStatus) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |value: u64| vec![(String::new(), value)];
    metric("shoal_peers", "gauge", "Open peer connections.", &one(status.peers as u64));
    metric(
        "shoal_routing_contacts",
        "gauge",
        "Contacts in the Kademlia routing table.",
        &one(status.routing_contacts as u64),
    );
    metric(
        "shoal_files",
        "gauge",
        "Files on this node by state.",
        &[
            ("{state=\"seeding\"}".to_owned(), status.files_seeding as u64),
            ("{state=\"downloading\"}".to_owned(), status.files_downloading as u64),
        ],
    );
    let mut traffic = Vec::new();
    for line in &status.traffic {
        traffic.push((format!("{{direction=\"sent\",kind=\"{}\"}}", line.kind), line.sent_bytes));
        traffic.push((format!("{{direction=\"received\",kind=\"{}\"}}", line.kind), line.received_bytes));
    }
    metric("shoal_wire_bytes_total", "counter", "Wire bytes by direction and message kind.", &traffic);
    metric(
        "shoal_pieces_verified_total",
        "counter",
        "Pieces that passed their hash check.",
        &one(status.pieces_verified),
    );
    metric("shoal_pieces_failed_total", "counter", "Pieces that failed their hash check.", &one(status.pieces_failed));
    metric("shoal_blocks_served_total", "counter", "Blocks served to peers.", &one(status.blocks_served));
    metric(
        "shoal_wasted_bytes_total",
        "counter",
        "Received payload bytes that were not needed.",
        &one(status.wasted_bytes),
    );
    let mut lookups = Vec::new();
    for line in &status.lookups {
        lookups.push((format!("{{kind=\"{}\",result=\"ok\"}}", line.kind), line.succeeded));
        lookups.push((format!("{{kind=\"{}\",result=\"failed\"}}", line.kind), line.total - line.succeeded));
    }
    metric("shoal_lookups_total", "counter", "DHT lookups finished, by purpose and result.", &lookups);
    metric(
        "shoal_gossip_messages_total",
        "counter",
        "Gossip messages by event.",
        &[
            ("{event=\"published\"}".to_owned(), status.gossip_published),
            ("{event=\"delivered\"}".to_owned(), status.gossip_delivered),
            ("{event=\"duplicate\"}".to_owned(), status.gossip_duplicates),
        ],
    );
    metric("shoal_store_errors_total", "counter", "Store operations that failed.", &one(status.store_errors));
    metric(
        "shoal_blocks_cancelled_total",
        "counter",
        "Queued blocks not sent: the peer cancelled them.",
        &one(status.blocks_cancelled),
    );
    metric("shoal_slow_peers_total", "counter", "Peers dropped for not keeping up.", &one(status.slow_peers));
    metric(
        "shoal_handshakes_failed_total",
        "counter",
        "Dials or handshakes that failed.",
        &one(status.handshakes_failed),
    );
    metric("shoal_uptime_seconds", "gauge", "Seconds since the node started.", &one(status.uptime_s));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_as_rfc_9110_says() {
        let ok = |first, last| Ok(ByteRange { first, last });
        assert_eq!(parse_range("bytes=0-99", 1000), ok(0, 99));
        assert_eq!(parse_range("bytes=900-", 1000), ok(900, 999));
        assert_eq!(parse_range("bytes=900-5000", 1000), ok(900, 999));
        assert_eq!(parse_range("bytes=-100", 1000), ok(900, 999));
        assert_eq!(parse_range("bytes=-5000", 1000), ok(0, 999));
        assert_eq!(parse_range("bytes=1000-", 1000), Err(RangeError::Unsatisfiable));
        assert_eq!(parse_range("bytes=-0", 1000), Err(RangeError::Unsatisfiable));
        assert_eq!(parse_range("bytes=5-1", 1000), Err(RangeError::Malformed));
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), Err(RangeError::Malformed));
        assert_eq!(parse_range("items=0-1", 1000), Err(RangeError::Malformed));
        assert_eq!(parse_range("bytes=x-1", 1000), Err(RangeError::Malformed));
        assert_eq!(parse_range("bytes=0-1", 0), Err(RangeError::Unsatisfiable));
    }

    #[test]
    fn metrics_name_every_family_once() {
        let status = NodeStatus {
            peers: 3,
            traffic: vec![crate::control::TrafficLine { kind: "block".into(), sent_bytes: 7, received_bytes: 9 }],
            lookups: vec![crate::control::LookupLine { kind: "search".into(), total: 4, succeeded: 3 }],
            ..NodeStatus::default()
        };
        let text = render_metrics(&status);
        assert!(text.contains("shoal_peers 3\n"), "{text}");
        assert!(text.contains("shoal_wire_bytes_total{direction=\"received\",kind=\"block\"} 9\n"), "{text}");
        assert!(text.contains("shoal_lookups_total{kind=\"search\",result=\"failed\"} 1\n"), "{text}");
        assert_eq!(text.matches("# TYPE shoal_wire_bytes_total counter").count(), 1);
    }
}
