//! Where artifact bytes come from: local files and HTTPS, as
//! [`ChunkSource`]s for the [`ArtifactCache`](crate::artifact_cache::ArtifactCache).
//! (S3 is in the AWS implementation.)

use std::path::Path;

use bytes::Bytes;
use tokio::io::AsyncReadExt;

use crate::artifact_cache::{io_error, ChunkSource};
use crate::error::{error_chain, CloudError};

const CHUNK: usize = 256 * 1024;

/// A local file (`file://` artifacts).
pub struct FileChunks {
    file: tokio::fs::File,
    artifact: String,
}

impl FileChunks {
    /// Opens `path`; a missing file is [`CloudError::NotFound`].
    pub async fn open(path: &Path, artifact: &str) -> Result<FileChunks, CloudError> {
        match tokio::fs::File::open(path).await {
            Ok(file) => Ok(FileChunks {
                file,
                artifact: artifact.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CloudError::NotFound {
                what: artifact.to_string(),
                code: None,
            }),
            Err(e) => Err(io_error(artifact, "open", &e)),
        }
    }
}

impl ChunkSource for FileChunks {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, CloudError> {
        let mut buf = vec![0u8; CHUNK];
        let n = self
            .file
            .read(&mut buf)
            .await
            .map_err(|e| io_error(&self.artifact, "read", &e))?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some(Bytes::from(buf)))
    }
}

/// An HTTP(S) download, streamed.
pub struct HttpChunks {
    response: reqwest::Response,
    service: &'static str,
}

impl HttpChunks {
    /// `GET url`. 404/410 is `NotFound`, 429 `Throttled`, 5xx and network
    /// failures `Transport` (worth retrying), other statuses `Artifact`.
    pub async fn get(client: &reqwest::Client, url: &str) -> Result<HttpChunks, CloudError> {
        let service = if url.starts_with("https://") {
            "https"
        } else {
            "http"
        };
        let response = client
            .get(url)
            .send()
            .await
            .map_err(|e| CloudError::Transport {
                service,
                message: error_chain(&e),
            })?;
        let status = response.status().as_u16();
        match status {
            200..=299 => Ok(HttpChunks { response, service }),
            404 | 410 => Err(CloudError::NotFound {
                what: url.to_string(),
                code: Some(format!("HTTP{status}")),
            }),
            429 => Err(CloudError::Throttled {
                service,
                code: "HTTP429".into(),
                message: format!("{url} asks to slow down"),
            }),
            500..=599 => Err(CloudError::Transport {
                service,
                message: format!("HTTP {status} from {url}"),
            }),
            _ => Err(CloudError::Artifact {
                artifact: url.to_string(),
                message: format!("HTTP {status}"),
            }),
        }
    }
}

impl ChunkSource for HttpChunks {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, CloudError> {
        self.response
            .chunk()
            .await
            .map_err(|e| CloudError::Transport {
                service: self.service,
                message: error_chain(&e),
            })
    }
}
