//! The directories init creates and checks (C_API §5): created 0750 when missing, and each
//! must be a directory this process can write and enter.

use super::{ConfigError, PluginConfig, StateBackend};
use rustix::fs::Access;
use std::io;
use std::path::Path;

impl PluginConfig {
    /// Creates the configured directories that are missing (0750, whatever the umask) and
    /// checks that each is a directory this process can write; the error names the key,
    /// the path and the operating system's reason.
    pub fn prepare_directories(&self) -> Result<(), ConfigError> {
        let error_store = self
            .error_store_path
            .as_deref()
            .filter(|_| self.enable_error_logging);
        let dirs = [
            ("error_store_path", error_store),
            ("state_dir", self.state_dir.as_deref()),
            ("log_path", self.log_path.as_deref()),
        ];
        for (key, dir) in dirs {
            if let Some(dir) = dir {
                ensure_writable_dir(dir).map_err(|e| {
                    ConfigError(format!("key `{key}`: directory {}: {e}", dir.display()))
                })?;
            }
        }
        if let Some(file) = &self.metrics_textfile {
            let dir = crate::durable::parent_dir(file);
            writable_existing_dir(dir).map_err(|e| {
                ConfigError(format!(
                    "key `metrics_textfile`: directory {} of {}: {e}",
                    dir.display(),
                    file.display()
                ))
            })?;
        }
        if self.state_backend == StateBackend::Etcd {
            let files = [
                ("etcd_ca_file", &self.etcd.ca_file),
                ("etcd_cert_file", &self.etcd.cert_file),
                ("etcd_key_file", &self.etcd.key_file),
            ];
            for (key, file) in files {
                if let Some(file) = file {
                    std::fs::File::open(file).map_err(|e| {
                        ConfigError(format!("key `{key}`: file {}: {e}", file.display()))
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// Creates `dir` and its missing parents 0750 (chmod after create, so the umask does not
/// matter), then checks it is a directory this process may write and enter.
fn ensure_writable_dir(dir: &Path) -> io::Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
        Ok(_) => {}
        // 0750 whatever the umask, parents included, their entries fsynced.
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            crate::durable::create_private_dir(dir).map_err(|e| e.source)?
        }
        Err(err) => return Err(err),
    }
    writable_existing_dir(dir)
}

/// Checks that `dir` exists and is a directory this process may write and enter (nothing
/// is created).
fn writable_existing_dir(dir: &Path) -> io::Result<()> {
    if !std::fs::metadata(dir)?.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    rustix::fs::access(dir, Access::WRITE_OK | Access::EXEC_OK)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::PluginConfig;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn directories_are_created_0750_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("a/b/state");
        let text = format!(
            "state_dir = \"{}\"\nlog_path = \"{}\"",
            state.display(),
            tmp.path().join("logs").display()
        );
        PluginConfig::load(text.as_bytes()).unwrap();
        for dir in [tmp.path().join("a"), state.clone(), tmp.path().join("logs")] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o750, "{}", dir.display());
        }
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err =
            PluginConfig::load(format!("error_store_path = \"{}\"", file.display()).as_bytes())
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("error_store_path") && err.contains("Not a directory"),
            "{err}"
        );
        let err = PluginConfig::load(format!("state_dir = \"{}/sub\"", file.display()).as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("state_dir") && err.contains("Not a directory"),
            "{err}"
        );
    }

    #[test]
    fn the_metrics_textfile_directory_must_exist_and_is_not_created() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nowhere/backup.prom");
        let err =
            PluginConfig::load(format!("metrics_textfile = \"{}\"", missing.display()).as_bytes())
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("key `metrics_textfile`") && err.contains("No such file or directory"),
            "{err}"
        );
        assert!(!tmp.path().join("nowhere").exists());
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = PluginConfig::load(
            format!("metrics_textfile = \"{}/b.prom\"", file.display()).as_bytes(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("key `metrics_textfile`") && err.contains("Not a directory"),
            "{err}"
        );
        let ok = tmp.path().join("backup.prom");
        let c = PluginConfig::load(format!("metrics_textfile = \"{}\"", ok.display()).as_bytes())
            .unwrap();
        assert_eq!(c.metrics_textfile, Some(ok.clone()));
        assert!(
            !ok.exists(),
            "init checks the directory; the thread writes the file"
        );
    }
}
