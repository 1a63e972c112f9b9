//! `GET /downloads/gpufleet`: the agent binary cloud machines install (their
//! user data checks its SHA-256, which the answer also names in
//! `x-checksum-sha256`). No auth: it is the same program for every machine
//! and holds no secret.

use crate::error::ApiError;
use crate::views::ErrorBody;
use crate::SharedState;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::path::PathBuf;

/// Path of the agent binary in the download route.
pub const AGENT_BINARY_PATH: &str = "/downloads/gpufleet";

/// The binary served, and its digest.
#[derive(Debug, Clone)]
pub struct AgentBinary {
    pub path: PathBuf,
    /// Lowercase hex SHA-256 of the file.
    pub sha256: String,
}

impl AgentBinary {
    /// Hashes `path` (on a blocking thread: the file is tens of megabytes).
    pub async fn hash(path: PathBuf) -> std::io::Result<AgentBinary> {
        tokio::task::spawn_blocking(move || {
            use sha2::{Digest, Sha256};
            let mut file = std::fs::File::open(&path)?;
            let mut hasher = Sha256::new();
            std::io::copy(&mut file, &mut hasher)?;
            Ok(AgentBinary {
                sha256: hex::encode(hasher.finalize()),
                path,
            })
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// The agent binary cloud machines install (no auth).
#[utoipa::path(
    get, path = "/downloads/gpufleet", tag = "agent",
    responses(
        (status = 200, description = "The binary; `x-checksum-sha256` holds its lowercase hex SHA-256",
         content_type = "application/octet-stream", body = Vec<u8>,
         headers(("x-checksum-sha256" = String, description = "SHA-256 of the body, lowercase hex"))),
        (status = 404, description = "This control plane serves no agent binary (no public URL)", body = ErrorBody),
        (status = 503, description = "The binary cannot be read", body = ErrorBody),
    )
)]
pub async fn agent_binary(State(state): State<SharedState>) -> Result<Response, ApiError> {
    let Some(bin) = &state.agent_binary else {
        return Err(ApiError::not_found(
            "this control plane serves no agent binary",
        ));
    };
    let file = tokio::fs::File::open(&bin.path).await.map_err(|e| {
        tracing::error!(path = %bin.path.display(), error = %e, "cannot open the agent binary");
        ApiError::unavailable("the agent binary cannot be read")
    })?;
    let len = file.metadata().await.map(|m| m.len()).ok();
    let mut resp = (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static("x-checksum-sha256"),
                bin.sha256.clone(),
            ),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)),
    )
        .into_response();
    if let Some(len) = len {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    }
    Ok(resp)
}
