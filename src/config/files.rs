//! Secrets read from files (`*_file` settings, the Kubernetes Secret-volume convention):
//! `database.url_file`, `rabbitmq.url_file`, `nats.url_file`, `redis.url_file` and
//! `kafka.properties."<name>_file"`. Every command needs them readable; `check --offline` lists a file that is not there as
//! unchecked instead (the Secret volume exists only in the pod), and the value it would
//! have supplied goes unvalidated.

use std::path::{Path, PathBuf};

use super::{Secret, Settings, PROPERTY_FILE_SUFFIX};
use crate::checks::{invalid, ConfigError};

/// What loading does with a `*_file` secret whose file does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingFiles {
    /// An error naming the key, as for any unreadable file (every command but
    /// `check --offline`).
    Fail,
    /// Recorded as unchecked (`check --offline`). A file that exists but cannot be
    /// read is still an error.
    Unchecked,
}

/// One `*_file` setting and what became of it. Holds no secret: the path only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFile {
    /// The setting naming the file, e.g. `database.url_file`.
    pub key: String,
    /// The key whose value the file supplies, e.g. `database.url`.
    pub supplies: String,
    pub path: PathBuf,
    /// Read (true), or not there and left unchecked (false).
    pub read: bool,
}

impl Settings {
    /// Read `*_file` secrets: a file wins over the value set inline. Returns what was
    /// read and what was left unchecked (only with `MissingFiles::Unchecked`).
    pub(super) fn resolve_files(
        &mut self,
        missing: MissingFiles,
    ) -> Result<Vec<SecretFile>, ConfigError> {
        let mut out = Vec::new();
        let db = &self.database.url_file;
        if let Some(url) = url_file(db, "database.url_file", "database.url", missing, &mut out)? {
            self.database.url = url;
        }
        let mq = &self.rabbitmq.url_file;
        if let Some(url) = url_file(mq, "rabbitmq.url_file", "rabbitmq.url", missing, &mut out)? {
            self.rabbitmq.url = url;
        }
        let nats = &self.nats.url_file;
        if let Some(url) = url_file(nats, "nats.url_file", "nats.url", missing, &mut out)? {
            self.nats.url = url;
        }
        let redis = &self.redis.url_file;
        if let Some(url) = url_file(redis, "redis.url_file", "redis.url", missing, &mut out)? {
            self.redis.url = url;
        }
        let from_files: Vec<(String, String)> = self
            .kafka
            .properties
            .iter()
            .filter_map(|(k, path)| {
                k.strip_suffix(PROPERTY_FILE_SUFFIX)
                    .map(|name| (name.to_string(), path.clone()))
            })
            .collect();
        for (name, path) in from_files {
            let key = format!("kafka.properties.{name}{PROPERTY_FILE_SUFFIX}");
            if name.is_empty() {
                return Err(ConfigError::Property(format!(
                    "config key `{key}`: names no property"
                )));
            }
            let read = read_file(Path::new(&path), missing).map_err(|e| {
                ConfigError::Property(format!("config key `{key}`: cannot read {path}: {e}"))
            })?;
            let props = &mut self.kafka.properties;
            props.remove(&format!("{name}{PROPERTY_FILE_SUFFIX}"));
            let supplies = format!("kafka.properties.{name}");
            out.push(SecretFile::new(
                &key,
                &supplies,
                Path::new(&path),
                read.is_some(),
            ));
            if let Some(value) = read {
                props.insert(name, value);
            }
        }
        Ok(out)
    }
}

impl SecretFile {
    fn new(key: &str, supplies: &str, path: &Path, read: bool) -> Self {
        Self {
            key: key.to_string(),
            supplies: supplies.to_string(),
            path: path.to_path_buf(),
            read,
        }
    }
}

/// The URL in `file` (setting `key`, supplying `supplies`), recorded in `out`; `None`
/// without a file, or when it is not there and `missing` allows that.
fn url_file(
    file: &Option<PathBuf>,
    key: &'static str,
    supplies: &str,
    missing: MissingFiles,
    out: &mut Vec<SecretFile>,
) -> Result<Option<Secret>, ConfigError> {
    let Some(path) = file else { return Ok(None) };
    let read = read_file(path, missing)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    out.push(SecretFile::new(key, supplies, path, read.is_some()));
    Ok(read.map(Secret::new))
}

/// The file's content, trimmed; `None` when it does not exist and `missing` allows that.
fn read_file(path: &Path, missing: MissingFiles) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound && missing == MissingFiles::Unchecked =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
