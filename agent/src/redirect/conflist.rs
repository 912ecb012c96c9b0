//! Sluice's entry in the node's primary CNI network configuration.
//!
//! The container runtime uses the lexically first network configuration file in its directory
//! (`*.conf`, `*.conflist`, `*.json`). Sluice chains itself onto that one: its plugin entry is the
//! last of the list's `plugins`. A single-plugin file (`*.conf`, or a `*.json` without `plugins`)
//! is converted to a list first and written as `<stem>.conflist`, and the single-plugin file is
//! removed, so the runtime reads the list. Every write goes to a hidden temporary file in the
//! same directory and is renamed into place, so the runtime never reads half a file. A file that
//! does not parse is left as it is, and the error names it.
use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};

/// The `type` of Sluice's plugin entry (the binary's name in the CNI bin directory).
pub const PLUGIN_TYPE: &str = "sluice";

/// Why the configuration could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a CNI network configuration ({reason}); left untouched")]
    Malformed { path: PathBuf, reason: String },
    #[error("no CNI network configuration (*.conflist, *.conf, *.json) in {dir} yet")]
    NoPrimary { dir: PathBuf },
}

/// What [`insert`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// The entry was already there, as wanted; nothing was written.
    Unchanged(PathBuf),
    /// The entry was added or corrected in this list.
    Written(PathBuf),
    /// A single-plugin file was converted into the list `to`, with the entry.
    Converted { from: PathBuf, to: PathBuf },
}

impl Inserted {
    /// The conflist holding the entry now.
    pub fn path(&self) -> &Path {
        match self {
            Inserted::Unchanged(p) | Inserted::Written(p) => p,
            Inserted::Converted { to, .. } => to,
        }
    }
}

/// Network configuration files the runtime would consider, in the order it considers them
/// (hidden files, including Sluice's temporary ones, are not among them).
pub fn candidates(dir: &Path) -> Result<Vec<PathBuf>, ConflistError> {
    let entries = fs::read_dir(dir).map_err(|source| ConflistError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            !name.starts_with('.')
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
                && p.is_file()
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The file the runtime uses: the lexically first candidate.
pub fn primary(dir: &Path) -> Result<PathBuf, ConflistError> {
    candidates(dir)?
        .into_iter()
        .next()
        .ok_or_else(|| ConflistError::NoPrimary {
            dir: dir.to_owned(),
        })
}

fn read_json(path: &Path) -> Result<Map<String, Value>, ConflistError> {
    let text = fs::read_to_string(path).map_err(|source| ConflistError::Read {
        path: path.to_owned(),
        source,
    })?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ConflistError::Malformed {
            path: path.to_owned(),
            reason: "not a JSON object".into(),
        }),
        Err(e) => Err(ConflistError::Malformed {
            path: path.to_owned(),
            reason: format!("invalid JSON: {e}"),
        }),
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// A configuration as a list: `(list, converted)`; a single plugin becomes a list of one.
fn as_list(
    path: &Path,
    mut conf: Map<String, Value>,
) -> Result<(Map<String, Value>, bool), ConflistError> {
    let malformed = |reason: &str| ConflistError::Malformed {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    match conf.get("plugins") {
        Some(Value::Array(_)) => return Ok((conf, false)),
        Some(_) => return Err(malformed("`plugins` is not a list")),
        None => {}
    }
    if !conf.get("type").is_some_and(Value::is_string) {
        return Err(malformed("neither `plugins` nor a plugin `type`"));
    }
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = conf.remove(key) {
            list.insert(key.to_owned(), v);
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(conf)]));
    Ok((list, true))
}

/// Puts `entry` (a plugin object whose `type` is [`PLUGIN_TYPE`]) last in the primary
/// configuration of `dir`, replacing any earlier entry of Sluice's. Idempotent.
pub fn insert(dir: &Path, entry: &Value) -> Result<Inserted, ConflistError> {
    let path = primary(dir)?;
    let original = read_json(&path)?;
    let (mut list, converted) = as_list(&path, original.clone())?;
    let Some(Value::Array(plugins)) = list.get_mut("plugins") else {
        unreachable!("as_list returns a list");
    };
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry.clone());
    if !converted {
        if list == original {
            return Ok(Inserted::Unchanged(path));
        }
        write_json(&path, &list)?;
        return Ok(Inserted::Written(path));
    }
    let to = path.with_extension("conflist");
    write_json(&to, &list)?;
    if to != path {
        fs::remove_file(&path).map_err(|source| ConflistError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(Inserted::Converted { from: path, to })
}

/// Removes Sluice's entry from every configuration in `dir` that has one; returns the files
/// changed. Files without the entry, and files that do not parse, are not touched.
pub fn remove(dir: &Path) -> Result<Vec<PathBuf>, ConflistError> {
    let mut changed = Vec::new();
    for path in candidates(dir)? {
        let Ok(mut conf) = read_json(&path) else {
            continue;
        };
        let Some(Value::Array(plugins)) = conf.get_mut("plugins") else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != before {
            write_json(&path, &conf)?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// Writes `conf` to `path` through a temporary file and a rename, keeping the file's mode.
fn write_json(path: &Path, conf: &Map<String, Value>) -> Result<(), ConflistError> {
    let mut text = serde_json::to_string_pretty(conf).map_err(|e| ConflistError::Write {
        path: path.to_owned(),
        source: std::io::Error::other(e),
    })?;
    text.push('\n');
    let mode = fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    write_atomically(path, text.as_bytes(), mode).map_err(|source| ConflistError::Write {
        path: path.to_owned(),
        source,
    })
}

/// A hidden name beside `path` for its next version.
pub fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.sluice-tmp"))
}

/// Writes `bytes` to a temporary file beside `to` with `mode`, then renames it over `to`.
pub fn write_atomically(to: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = temp_beside(to);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, to)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    fn entry() -> Value {
        json!({"type": "sluice", "enrollmentSocket": "/var/run/sluice/enroll.sock"})
    }

    const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "podnet",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

    /// The `type` of each plugin in the conflist at `path`, in order.
    pub(crate) fn plugins(path: &Path) -> Vec<String> {
        let v: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn chains_onto_the_lexically_first_list_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("10-bridge.conflist"), BRIDGE).unwrap();
        fs::write(dir.path().join("20-other.conflist"), BRIDGE).unwrap();
        fs::write(dir.path().join("sluice-kubeconfig"), "not a conf").unwrap();
        let first = dir.path().join("10-bridge.conflist");
        assert_eq!(
            insert(dir.path(), &entry()).unwrap(),
            Inserted::Written(first.clone())
        );
        assert_eq!(plugins(&first), ["bridge", "portmap", "sluice"]);
        let text = fs::read_to_string(&first).unwrap();
        assert_eq!(
            insert(dir.path(), &entry()).unwrap(),
            Inserted::Unchanged(first.clone())
        );
        assert_eq!(fs::read_to_string(&first).unwrap(), text, "idempotent");
        assert_eq!(
            fs::read_to_string(dir.path().join("20-other.conflist")).unwrap(),
            BRIDGE
        );
        // No temporary file is left behind.
        assert_eq!(
            listing(dir.path()),
            [
                "10-bridge.conflist",
                "20-other.conflist",
                "sluice-kubeconfig"
            ]
        );
    }

    #[test]
    fn a_changed_entry_is_corrected_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("10-bridge.conflist");
        fs::write(&first, BRIDGE).unwrap();
        insert(dir.path(), &json!({"type": "sluice", "old": true})).unwrap();
        assert_eq!(
            insert(dir.path(), &entry()).unwrap(),
            Inserted::Written(first.clone())
        );
        assert_eq!(plugins(&first), ["bridge", "portmap", "sluice"]);
        let v: Value = serde_json::from_str(&fs::read_to_string(&first).unwrap()).unwrap();
        assert_eq!(v["plugins"][2], entry());
    }

    #[test]
    fn a_rewrite_by_the_primary_cni_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("10-bridge.conflist");
        fs::write(&first, BRIDGE).unwrap();
        insert(dir.path(), &entry()).unwrap();
        // The primary CNI writes its own file again, without Sluice.
        fs::write(&first, BRIDGE).unwrap();
        assert_eq!(plugins(&first), ["bridge", "portmap"]);
        assert_eq!(
            insert(dir.path(), &entry()).unwrap(),
            Inserted::Written(first.clone())
        );
        assert_eq!(plugins(&first), ["bridge", "portmap", "sluice"]);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("05-flannel.conf");
        fs::write(
            &conf,
            r#"{"cniVersion": "0.3.1", "name": "cbr0", "type": "flannel", "delegate": {"isDefaultGateway": true}}"#,
        )
        .unwrap();
        fs::write(dir.path().join("10-bridge.conflist"), BRIDGE).unwrap();
        let to = dir.path().join("05-flannel.conflist");
        assert_eq!(
            insert(dir.path(), &entry()).unwrap(),
            Inserted::Converted {
                from: conf.clone(),
                to: to.clone()
            }
        );
        assert!(
            !conf.exists(),
            "the single-plugin file is replaced by the list"
        );
        let v: Value = serde_json::from_str(&fs::read_to_string(&to).unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["name"], "cbr0");
        assert_eq!(
            v["plugins"][0],
            json!({"type": "flannel", "delegate": {"isDefaultGateway": true}})
        );
        assert_eq!(plugins(&to), ["flannel", "sluice"]);
        // The list is now the primary, and stays as it is.
        assert_eq!(
            insert(dir.path(), &entry()).unwrap(),
            Inserted::Unchanged(to.clone())
        );
        // The primary CNI writes its .conf again: it sorts first, and is converted again.
        fs::write(
            &conf,
            r#"{"cniVersion": "0.3.1", "name": "cbr0", "type": "flannel"}"#,
        )
        .unwrap();
        assert!(matches!(
            insert(dir.path(), &entry()).unwrap(),
            Inserted::Converted { .. }
        ));
        assert_eq!(plugins(&to), ["flannel", "sluice"]);
        assert_eq!(
            listing(dir.path()),
            ["05-flannel.conflist", "10-bridge.conflist"]
        );
    }

    #[test]
    fn a_malformed_primary_is_left_untouched_with_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("10-broken.conflist");
        let broken = r#"{"cniVersion": "1.0.0", "plugins": [ {"type": "bridge" "#;
        fs::write(&first, broken).unwrap();
        let err = insert(dir.path(), &entry()).unwrap_err();
        assert!(matches!(err, ConflistError::Malformed { .. }), "{err}");
        assert!(err.to_string().contains("10-broken.conflist"), "{err}");
        assert!(err.to_string().contains("left untouched"), "{err}");
        assert_eq!(fs::read_to_string(&first).unwrap(), broken);

        fs::write(&first, r#"{"plugins": {"type": "bridge"}}"#).unwrap();
        let err = insert(dir.path(), &entry()).unwrap_err();
        assert!(err.to_string().contains("`plugins` is not a list"), "{err}");
        assert_eq!(listing(dir.path()), ["10-broken.conflist"]);
    }

    #[test]
    fn an_empty_directory_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = insert(dir.path(), &entry()).unwrap_err();
        assert!(matches!(err, ConflistError::NoPrimary { .. }), "{err}");
    }

    #[test]
    fn removal_takes_out_only_sluices_entry() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("10-bridge.conflist");
        fs::write(&first, BRIDGE).unwrap();
        fs::write(dir.path().join("99-broken.conflist"), "{").unwrap();
        let before: Value = serde_json::from_str(BRIDGE).unwrap();
        insert(dir.path(), &entry()).unwrap();
        assert_eq!(remove(dir.path()).unwrap(), vec![first.clone()]);
        let after: Value = serde_json::from_str(&fs::read_to_string(&first).unwrap()).unwrap();
        assert_eq!(after, before);
        assert_eq!(remove(dir.path()).unwrap(), Vec::<PathBuf>::new());
        assert_eq!(
            fs::read_to_string(dir.path().join("99-broken.conflist")).unwrap(),
            "{"
        );
    }

    #[test]
    fn the_file_mode_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("10-bridge.conflist");
        fs::write(&first, BRIDGE).unwrap();
        fs::set_permissions(&first, fs::Permissions::from_mode(0o600)).unwrap();
        insert(dir.path(), &entry()).unwrap();
        assert_eq!(
            fs::metadata(&first).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
