//! Where a release tarball comes from.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArtifactSource {
    S3 { bucket: String, key: String },
    File(PathBuf),
    Https(String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{input}`: {reason}")]
pub struct ParseArtifactError {
    input: String,
    reason: &'static str,
}

impl FromStr for ArtifactSource {
    type Err = ParseArtifactError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseArtifactError {
            input: s.to_string(),
            reason,
        };
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, key) = rest
                .split_once('/')
                .ok_or_else(|| err("expected s3://BUCKET/KEY"))?;
            if bucket.is_empty() || key.is_empty() {
                return Err(err("expected s3://BUCKET/KEY"));
            }
            Ok(ArtifactSource::S3 {
                bucket: bucket.to_string(),
                key: key.to_string(),
            })
        } else if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(err(
                    "file:// needs an absolute path (file:///srv/builds/app.tar.gz)",
                ));
            }
            Ok(ArtifactSource::File(PathBuf::from(path)))
        } else if s.starts_with("https://") {
            if s.len() <= "https://".len() {
                return Err(err("missing host"));
            }
            Ok(ArtifactSource::Https(s.to_string()))
        } else if s.starts_with("http://") {
            Err(err(
                "plain http:// is refused; use https://, s3:// or file://",
            ))
        } else {
            Err(err("unknown scheme; expected s3://, file:// or https://"))
        }
    }
}

impl fmt::Display for ArtifactSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArtifactSource::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
            ArtifactSource::File(p) => write!(f, "file://{}", p.display()),
            ArtifactSource::Https(u) => f.write_str(u),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_scheme() {
        assert_eq!(
            "s3://releases/app/v1.tar.gz".parse(),
            Ok(ArtifactSource::S3 {
                bucket: "releases".into(),
                key: "app/v1.tar.gz".into()
            })
        );
        assert_eq!(
            "file:///tmp/a.tar.gz".parse(),
            Ok(ArtifactSource::File("/tmp/a.tar.gz".into()))
        );
        assert_eq!(
            "https://example.com/a.tar.gz".parse(),
            Ok(ArtifactSource::Https("https://example.com/a.tar.gz".into()))
        );
    }

    #[test]
    fn refuses_unknown_and_incomplete() {
        for bad in [
            "ftp://x/y",
            "s3://bucket",
            "s3:///key",
            "file://relative",
            "http://x/y",
            "app.tar.gz",
        ] {
            assert!(bad.parse::<ArtifactSource>().is_err(), "{bad}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["s3://b/k/v.tgz", "file:///a/b.tgz", "https://h/x.tgz"] {
            assert_eq!(s.parse::<ArtifactSource>().unwrap().to_string(), s);
        }
    }
}
