//! Object stores behind a table URI: local disk, S3-compatible (AWS, MinIO, …) and Azure
//! (Blob and ADLS Gen2 `abfss://`), configured from `[sinks.delta.storage]` options plus the usual
//! `AWS_*` / `AZURE_*` environment variables (options win).
//!
//! ADLS Gen2 is reached through the Blob API (object_store does this even for `abfss://`); the
//! Delta sink never renames, so it needs nothing that only the DFS API offers.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;

use crate::secret::SecretMap;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid storage URI {uri:?}: {message}")]
    Uri { uri: String, message: String },
    #[error("[sinks.delta.storage] {key}: {message}")]
    Option { key: String, message: String },
    #[error("{uri}: {source}")]
    Store {
        uri: String,
        #[source]
        source: object_store::Error,
    },
}

/// The kind of store a URI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Local,
    S3,
    Azure,
}

impl StoreKind {
    pub fn of(uri: &str) -> Option<StoreKind> {
        let Some((scheme, _)) = uri.split_once("://") else {
            return Some(StoreKind::Local);
        };
        match scheme {
            "file" => Some(StoreKind::Local),
            "s3" | "s3a" => Some(StoreKind::S3),
            "az" | "azure" | "abfs" | "abfss" => Some(StoreKind::Azure),
            _ => None,
        }
    }
}

/// Opens the store holding `uri` and returns it with the path of `uri` inside it.
pub fn open(
    uri: &str,
    options: &SecretMap,
) -> Result<(Arc<dyn ObjectStore>, StorePath), StorageError> {
    let uri_err = |message: String| StorageError::Uri {
        uri: uri.to_owned(),
        message,
    };
    let kind = StoreKind::of(uri).ok_or_else(|| uri_err("unsupported scheme".into()))?;
    match kind {
        StoreKind::Local => {
            let path = if uri.contains("://") {
                url::Url::parse(uri)
                    .map_err(|e| uri_err(e.to_string()))?
                    .to_file_path()
                    .map_err(|()| uri_err("not an absolute local path".into()))?
            } else {
                std::path::PathBuf::from(uri)
            };
            std::fs::create_dir_all(&path)
                .map_err(|e| uri_err(format!("cannot create {}: {e}", path.display())))?;
            let store =
                LocalFileSystem::new_with_prefix(&path).map_err(|source| StorageError::Store {
                    uri: uri.to_owned(),
                    source,
                })?;
            Ok((Arc::new(store), StorePath::default()))
        }
        StoreKind::S3 => {
            let b = with_options(
                AmazonS3Builder::from_env().with_url(uri),
                options,
                "S3",
                |b, k: AmazonS3ConfigKey, v| b.with_config(k, v),
            )?;
            let store = b.build().map_err(|source| StorageError::Store {
                uri: uri.to_owned(),
                source,
            })?;
            Ok((Arc::new(store), url_path(uri)?))
        }
        StoreKind::Azure => {
            let b = with_options(
                MicrosoftAzureBuilder::from_env().with_url(uri),
                options,
                "Azure",
                |b, k: AzureConfigKey, v| b.with_config(k, v),
            )?;
            let store = b.build().map_err(|source| StorageError::Store {
                uri: uri.to_owned(),
                source,
            })?;
            Ok((Arc::new(store), url_path(uri)?))
        }
    }
}

/// The keys of `options` the store behind `uri` does not take (every key for local disk, which
/// takes none): their values may be secrets under a misspelled key, so they are redacted like
/// secrets (see [`crate::secret::Redactor`]).
pub fn unknown_options<'a>(uri: &str, options: &'a SecretMap) -> Vec<&'a str> {
    let known = |k: &str| match StoreKind::of(uri) {
        Some(StoreKind::S3) => k.parse::<AmazonS3ConfigKey>().is_ok(),
        Some(StoreKind::Azure) => k.parse::<AzureConfigKey>().is_ok(),
        Some(StoreKind::Local) | None => false,
    };
    options
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !known(k))
        .collect()
}

/// Applies `[sinks.delta.storage]` options to a builder; an unknown key names itself.
fn with_options<B, K: std::str::FromStr>(
    mut builder: B,
    options: &SecretMap,
    kind: &str,
    set: impl Fn(B, K, &str) -> B,
) -> Result<B, StorageError> {
    for (k, v) in options.iter() {
        let key: K = k.parse().map_err(|_| StorageError::Option {
            key: k.clone(),
            message: format!("not an {kind} option (see object_store's {kind} config keys)"),
        })?;
        builder = set(builder, key, v);
    }
    Ok(builder)
}

fn url_path(uri: &str) -> Result<StorePath, StorageError> {
    let url = url::Url::parse(uri).map_err(|e| StorageError::Uri {
        uri: uri.to_owned(),
        message: e.to_string(),
    })?;
    StorePath::from_url_path(url.path()).map_err(|e| StorageError::Uri {
        uri: uri.to_owned(),
        message: e.to_string(),
    })
}
