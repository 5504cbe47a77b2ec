//! zygote's runtime in containerd's configuration, and nothing else of it
//! changed.
//!
//! containerd 1.6 and 1.7 read config `version = 2` and merge a drop-in
//! (`imports`) by replacing whole plugin tables: a drop-in that only adds
//! a runtime resets the CRI plugin's other settings (checked with 1.6.20:
//! `sandbox_image` back to its default, runc's options gone). So for them
//! the main file is edited in place: only the `runtimes.zygote` table is
//! added or removed, with comments, order and the rest kept byte for byte
//! (`toml_edit`). containerd 2.x (config `version = 3`) merges drop-ins
//! key by key: zygote's table goes in a file of its own, which the main
//! file's `imports` names.

use toml_edit::{Array, DocumentMut, Item, Table, value};

/// The runtime's name in the CRI (a `RuntimeClass`'s `handler`).
pub const HANDLER: &str = "zygote";
/// The shim's runtime type.
pub const RUNTIME_TYPE: &str = "io.containerd.zygote.v2";

/// A configuration zygote cannot register itself in.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not TOML.
    #[error("containerd's config is not valid TOML: {0}")]
    Parse(String),
    /// A version this installer does not edit.
    #[error(
        "containerd's config has version {0}: zygote registers itself in version 2 \
         (containerd 1.6, 1.7) and version 3 (containerd 2.x) configs"
    )]
    Version(i64),
    /// The path to zygote's table holds something that is not a table.
    #[error("containerd's config has `{0}` that is not a table")]
    NotATable(String),
}

/// The CRI plugin's runtimes table for config `version`.
fn cri_plugin(version: i64) -> &'static str {
    if version >= 3 {
        "io.containerd.cri.v1.runtime"
    } else {
        "io.containerd.grpc.v1.cri"
    }
}

/// `text` as an editable document.
fn parse(text: &str) -> Result<DocumentMut, ConfigError> {
    text.parse()
        .map_err(|e: toml_edit::TomlError| ConfigError::Parse(e.to_string()))
}

/// A parsed config's `version` (a file without one is version 1).
fn doc_version(doc: &DocumentMut) -> i64 {
    doc.get("version").and_then(Item::as_integer).unwrap_or(1)
}

/// The config's `version` (a file without one is version 1).
pub fn version(text: &str) -> Result<i64, ConfigError> {
    Ok(doc_version(&parse(text)?))
}

/// zygote's runtime table: its type, the annotations a pod may pass it,
/// and the shim's config file (`options.ConfigPath`).
fn runtime_table(config_path: &str) -> Table {
    let mut t = Table::new();
    t.insert("runtime_type", value(RUNTIME_TYPE));
    let mut annotations = Array::new();
    annotations.push("zygote.dev/*");
    t.insert("pod_annotations", value(annotations));
    t.insert("privileged_without_host_devices", value(true));
    let mut options = Table::new();
    options.insert("ConfigPath", value(config_path));
    t.insert("options", Item::Table(options));
    t
}

/// The keys from the document's root to zygote's table.
fn path(version: i64) -> [&'static str; 5] {
    [
        "plugins",
        cri_plugin(version),
        "containerd",
        "runtimes",
        HANDLER,
    ]
}

/// The table at `keys` (made, implicit, where missing).
fn table_at<'a>(root: &'a mut Table, keys: &[&str]) -> Result<&'a mut Table, ConfigError> {
    let mut t = root;
    for (i, key) in keys.iter().enumerate() {
        let item = t.entry(key).or_insert_with(|| {
            let mut new = Table::new();
            new.set_implicit(true);
            Item::Table(new)
        });
        t = item
            .as_table_mut()
            .ok_or_else(|| ConfigError::NotATable(keys[..=i].join(".")))?;
    }
    Ok(t)
}

/// `text` (a version 2 config, containerd 1.6/1.7) with zygote's runtime
/// registered, using the shim config at `config_path`; everything else as
/// it was. Registering twice gives the same bytes.
pub fn register_in_place(text: &str, config_path: &str) -> Result<String, ConfigError> {
    let mut doc = parse(text)?;
    let version = doc_version(&doc);
    if version != 2 {
        return Err(ConfigError::Version(version));
    }
    let keys = path(version);
    let runtimes = table_at(doc.as_table_mut(), &keys[..4])?;
    runtimes.insert(HANDLER, Item::Table(runtime_table(config_path)));
    Ok(doc.to_string())
}

/// `text` without zygote's runtime (any version); everything else as it was.
pub fn unregister(text: &str) -> Result<String, ConfigError> {
    let mut doc = parse(text)?;
    for version in [2, 3] {
        let keys = path(version);
        let mut t = Some(doc.as_table_mut());
        for key in &keys[..4] {
            t = t.and_then(|t| t.get_mut(key)).and_then(Item::as_table_mut);
        }
        if let Some(runtimes) = t {
            runtimes.remove(HANDLER);
        }
    }
    Ok(doc.to_string())
}

/// Whether `text` registers zygote's runtime.
pub fn registered(text: &str) -> bool {
    let Ok(doc) = parse(text) else {
        return false;
    };
    [2, 3].into_iter().any(|version| {
        let mut item = Some(doc.as_item());
        for key in path(version) {
            item = item.and_then(|i| i.get(key));
        }
        item.and_then(|i| i.get("runtime_type"))
            .and_then(Item::as_str)
            == Some(RUNTIME_TYPE)
    })
}

/// A version 3 drop-in (containerd 2.x) registering zygote's runtime.
pub fn drop_in(config_path: &str) -> String {
    let mut doc = DocumentMut::new();
    doc.insert("version", value(3));
    let keys = path(3);
    let runtimes = table_at(doc.as_table_mut(), &keys[..4]).expect("a new document has tables");
    runtimes.insert(HANDLER, Item::Table(runtime_table(config_path)));
    format!("# zygote's runtime for containerd's CRI (written by `zygote node install`).\n{doc}")
}

/// `text` (a version 3 main config) with `drop_in` in its `imports`
/// (unchanged if it is already there).
pub fn import(text: &str, drop_in: &str) -> Result<String, ConfigError> {
    let mut doc = parse(text)?;
    let version = doc_version(&doc);
    if version < 3 {
        return Err(ConfigError::Version(version));
    }
    let imports = doc
        .entry("imports")
        .or_insert_with(|| value(Array::new()))
        .as_array_mut()
        .ok_or_else(|| ConfigError::NotATable("imports".into()))?;
    if !imports.iter().any(|v| v.as_str() == Some(drop_in)) {
        imports.push(drop_in);
    }
    Ok(doc.to_string())
}

/// `text` without `drop_in` in its `imports` (an `imports` left empty by
/// that is removed); everything else as it was.
pub fn unimport(text: &str, drop_in: &str) -> Result<String, ConfigError> {
    let mut doc = parse(text)?;
    let Some(imports) = doc.get_mut("imports").and_then(Item::as_array_mut) else {
        return Ok(text.into());
    };
    let before = imports.len();
    imports.retain(|v| v.as_str() != Some(drop_in));
    if imports.len() == before {
        return Ok(text.into());
    }
    if imports.is_empty() {
        doc.remove("imports");
    }
    Ok(doc.to_string())
}

/// k3s and rke2 write containerd's config themselves at each start, from a
/// Go template when the node has one beside it (`config.toml.tmpl`;
/// `config-v3.toml.tmpl` for the containerd 2 they ship since 2025), in
/// which `{{ template "base" . }}` is the config they would have written.
/// zygote's table goes after it, between two marker lines; a template made
/// by the install is that line and the block alone.
pub mod template {
    use super::*;

    /// The template line that stands for k3s's own config.
    pub const BASE: &str = "{{ template \"base\" . }}\n";
    const BEGIN: &str =
        "# BEGIN zygote runtime (zygote node install; zygote node uninstall removes it)\n";
    const END: &str = "# END zygote runtime\n";

    /// Whether containerd's config at `path` is a k3s/rke2 template.
    pub fn is_template(path: &std::path::Path) -> bool {
        path.extension().is_some_and(|e| e == "tmpl")
    }

    /// The config version the template renders: 3 for `config-v3.toml.tmpl`.
    pub fn version(path: &std::path::Path) -> i64 {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with("config-v3")) {
            3
        } else {
            2
        }
    }

    /// The template (`text`, None when the node has none) with zygote's
    /// block for config `version`; registering twice gives the same bytes.
    pub fn register(text: Option<&str>, version: i64, config_path: &str) -> String {
        let mut out = text.map_or(BASE.to_string(), unregistered);
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        let mut doc = DocumentMut::new();
        let keys = path(version);
        let runtimes = table_at(doc.as_table_mut(), &keys[..4]).expect("a new document has tables");
        runtimes.insert(HANDLER, Item::Table(runtime_table(config_path)));
        out.push_str(BEGIN);
        out.push_str(&doc.to_string());
        out.push_str(END);
        out
    }

    /// `text` without zygote's block.
    fn unregistered(text: &str) -> String {
        match (text.find(BEGIN), text.find(END)) {
            (Some(begin), Some(end)) if end > begin => {
                format!("{}{}", &text[..begin], &text[end + END.len()..])
            }
            _ => text.to_string(),
        }
    }

    /// The template without zygote's block; None when what is left is
    /// k3s's own config alone (the file goes: k3s renders the same).
    pub fn unregister(text: &str) -> Option<String> {
        let left = unregistered(text);
        (left != BASE && !left.trim().is_empty()).then_some(left)
    }

    /// Whether the template registers zygote's runtime.
    pub fn registered(text: &str) -> bool {
        text.find(BEGIN).is_some_and(|b| {
            text[b..]
                .find(END)
                .is_some_and(|e| super::registered(&text[b..b + e]))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// containerd 1.6's config as an operator leaves it: comments, runc's
    /// options, a sandbox image.
    const V2: &str = r#"# Node config: do not lose this comment.
version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.local/pause:3.9" # pinned
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = true
"#;

    #[test]
    fn registering_in_place_adds_only_zygotes_table() {
        let out = register_in_place(V2, "/etc/zygote/config.toml").unwrap();
        assert!(
            out.starts_with(V2),
            "the rest is kept byte for byte:\n{out}"
        );
        assert!(registered(&out) && !registered(V2));
        let doc: toml::Table = toml::from_str(&out).unwrap();
        let cri = &doc["plugins"]["io.containerd.grpc.v1.cri"];
        let z = &cri["containerd"]["runtimes"]["zygote"];
        assert_eq!(z["runtime_type"].as_str(), Some(RUNTIME_TYPE));
        assert_eq!(
            z["options"]["ConfigPath"].as_str(),
            Some("/etc/zygote/config.toml")
        );
        assert_eq!(
            cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"].as_bool(),
            Some(true)
        );
        assert_eq!(
            cri["sandbox_image"].as_str(),
            Some("registry.local/pause:3.9")
        );
        // Twice: the same bytes; a new config path replaces the old.
        assert_eq!(
            register_in_place(&out, "/etc/zygote/config.toml").unwrap(),
            out
        );
        let moved = register_in_place(&out, "/opt/z.toml").unwrap();
        assert!(moved.contains("/opt/z.toml") && !moved.contains("/etc/zygote/config.toml"));
        // Removed: what was there before, byte for byte.
        assert_eq!(unregister(&out).unwrap(), V2);
        assert_eq!(unregister(V2).unwrap(), V2, "nothing to remove");
    }

    #[test]
    fn other_versions_and_bad_files_are_refused_clearly() {
        assert!(matches!(
            register_in_place("root = \"/x\"\n", "/c"),
            Err(ConfigError::Version(1))
        ));
        assert!(matches!(
            register_in_place("version = 3\n", "/c"),
            Err(ConfigError::Version(3))
        ));
        assert!(matches!(
            register_in_place("version = 2\n[plugins\n", "/c"),
            Err(ConfigError::Parse(_))
        ));
        let err = register_in_place("version = 2\nplugins = 5\n", "/c").unwrap_err();
        assert!(
            err.to_string().contains("`plugins` that is not a table"),
            "{err}"
        );
    }

    #[test]
    fn containerd_2_gets_a_drop_in_its_main_file_imports() {
        let d = drop_in("/etc/zygote/config.toml");
        let doc: toml::Table = toml::from_str(&d).unwrap();
        assert_eq!(doc["version"].as_integer(), Some(3));
        assert!(registered(&d));
        assert!(
            doc["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["zygote"]
                .get("runtime_type")
                .is_some()
        );
        let main = "# v3\nversion = 3\nimports = [\"/etc/containerd/other.toml\"]\n";
        let with = import(main, "/etc/containerd/conf.d/zygote.toml").unwrap();
        assert!(with.starts_with("# v3\n"), "{with}");
        assert!(with.contains("other.toml") && with.contains("conf.d/zygote.toml"));
        assert_eq!(
            import(&with, "/etc/containerd/conf.d/zygote.toml").unwrap(),
            with
        );
        assert_eq!(
            unimport(&with, "/etc/containerd/conf.d/zygote.toml").unwrap(),
            main
        );
        let alone = "version = 3\n";
        let added = import(alone, "/d.toml").unwrap();
        assert_eq!(unimport(&added, "/d.toml").unwrap(), alone);
        assert!(matches!(import(V2, "/x"), Err(ConfigError::Version(2))));
    }

    /// The exact bytes the installer writes, kept as files a reviewer can
    /// read (`host/src/node/golden/`); a change shows in the diff.
    #[test]
    fn what_is_written_matches_the_golden_files() {
        let config = "/etc/zygote/config.toml";
        let k3s =
            std::path::Path::new("/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl");
        let k3s_v3 =
            std::path::Path::new("/var/lib/rancher/k3s/agent/etc/containerd/config-v3.toml.tmpl");
        assert!(template::is_template(k3s) && template::is_template(k3s_v3));
        assert_eq!((template::version(k3s), template::version(k3s_v3)), (2, 3));
        let cases = [
            ("k3s-config.toml.tmpl", template::register(None, 2, config)),
            (
                "k3s-config-v3.toml.tmpl",
                template::register(None, 3, config),
            ),
            (
                "k3s-operator-config.toml.tmpl",
                template::register(Some(K3S_OPERATOR), 2, config),
            ),
            ("containerd2-drop-in.toml", drop_in(config)),
            (
                "containerd1-config.toml",
                register_in_place(V2, config).unwrap(),
            ),
        ];
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        // The snippets deploy/ offers operators who register zygote by
        // hand are these texts too.
        let snippets = [
            (
                "../deploy/containerd/containerd-1.x-runtime.toml",
                template::register(Some(""), 2, config),
            ),
            (
                "../deploy/containerd/containerd-2.x-conf.d-zygote.toml",
                drop_in(config),
            ),
        ];
        let cases = cases
            .into_iter()
            .map(|(name, text)| (format!("src/node/golden/{name}"), text))
            .chain(snippets.into_iter().map(|(n, t)| (n.to_string(), t)));
        for (name, text) in cases {
            let file = src.join(&name);
            if std::env::var_os("ZYGOTE_BLESS").is_some() {
                std::fs::write(&file, &text).unwrap();
            }
            let golden = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e} (ZYGOTE_BLESS=1 writes it)", file.display()));
            assert_eq!(text, golden, "{name} differs from its golden file");
        }
    }

    /// A k3s template an operator wrote: their base plus a mirror setting.
    const K3S_OPERATOR: &str = r#"{{ template "base" . }}

[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
  endpoint = ["https://mirror.local"]
"#;

    #[test]
    fn a_k3s_template_gets_a_block_that_uninstall_takes_out_again() {
        let made = template::register(None, 2, "/c");
        assert!(made.starts_with(template::BASE) && template::registered(&made));
        assert_eq!(
            template::register(Some(&made), 2, "/c"),
            made,
            "twice: the same"
        );
        assert_eq!(
            template::unregister(&made),
            None,
            "made by the install: goes"
        );
        let theirs = template::register(Some(K3S_OPERATOR), 2, "/c");
        assert!(theirs.starts_with(K3S_OPERATOR) && template::registered(&theirs));
        assert_eq!(
            template::unregister(&theirs).as_deref(),
            Some(K3S_OPERATOR),
            "the operator's template byte for byte"
        );
        assert!(!template::registered(K3S_OPERATOR));
        // The block (the Go template's text aside) is containerd's TOML.
        let block = &made[template::BASE.len()..];
        let doc: toml::Table = toml::from_str(block).unwrap();
        assert_eq!(
            doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["zygote"]
                ["runtime_type"]
                .as_str(),
            Some(RUNTIME_TYPE)
        );
    }
}
